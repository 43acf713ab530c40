-- purpose: Sparsity by position in the window: non-special tokens grouped into position buckets, with mean
--   top-p sparsity at p, L1, max |a| and top-1 share (early positions often behave differently).
-- param run RUN: run id or unique prefix
-- param site SITE = 'intermediate': FFN site
-- param p DOUBLE [0.5, 0.99] = 0.9: top-p value, one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99
-- param layer INTEGER [-1, 4095] = -1: one layer, or -1 for all layers pooled
-- param bucket INTEGER [1, 1048576] = 16: positions per bucket (1: every position)
-- columns: position_from, position_to, n_tokens, sparsity_mean, l1_mean, max_abs_mean, top1_share_mean
SELECT (position // $bucket) * $bucket AS position_from, (position // $bucket) * $bucket + $bucket - 1 AS position_to,
       count(DISTINCT token_index) AS n_tokens,
       avg(CASE $p WHEN 0.5 THEN sparsity_p50 WHEN 0.7 THEN sparsity_p70 WHEN 0.8 THEN sparsity_p80
                   WHEN 0.9 THEN sparsity_p90 WHEN 0.95 THEN sparsity_p95 WHEN 0.99 THEN sparsity_p99
                   ELSE error('p must be one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 (the token_stats grid)') END)
           AS sparsity_mean,
       avg(l1) AS l1_mean, avg(max_abs) AS max_abs_mean, avg(top1_share) AS top1_share_mean
FROM token_stats
WHERE run_id = $run AND site = $site AND NOT special AND ($layer = -1 OR layer = $layer)
  AND (CASE WHEN $bucket >= 1 THEN true ELSE error('bucket must be at least 1') END)
GROUP BY ALL
ORDER BY position_from
