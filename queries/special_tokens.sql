-- purpose: Effect of special tokens (BOS and other tokenizer specials) per layer: their mean top-p
--   sparsity at p, L1, max |a| and top-1 share side by side with ordinary tokens.
-- param run RUN: run id or unique prefix
-- param site SITE = 'intermediate': FFN site
-- param p DOUBLE [0.5, 0.99] = 0.9: top-p value, one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99
-- columns: layer, n_special, n_regular, sparsity_special, sparsity_regular, l1_special, l1_regular,
--   max_abs_special, max_abs_regular, max_abs_ratio, top1_share_special, top1_share_regular
WITH t AS (
    SELECT layer, special, l1, max_abs, top1_share,
           CASE $p WHEN 0.5 THEN sparsity_p50 WHEN 0.7 THEN sparsity_p70 WHEN 0.8 THEN sparsity_p80
                   WHEN 0.9 THEN sparsity_p90 WHEN 0.95 THEN sparsity_p95 WHEN 0.99 THEN sparsity_p99
                   ELSE error('p must be one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 (the token_stats grid)') END
               AS sparsity
    FROM token_stats
    WHERE run_id = $run AND site = $site
)
SELECT layer,
       count(*) FILTER (WHERE special) AS n_special, count(*) FILTER (WHERE NOT special) AS n_regular,
       avg(sparsity) FILTER (WHERE special) AS sparsity_special, avg(sparsity) FILTER (WHERE NOT special) AS sparsity_regular,
       avg(l1) FILTER (WHERE special) AS l1_special, avg(l1) FILTER (WHERE NOT special) AS l1_regular,
       avg(max_abs) FILTER (WHERE special) AS max_abs_special, avg(max_abs) FILTER (WHERE NOT special) AS max_abs_regular,
       avg(max_abs) FILTER (WHERE special) / avg(max_abs) FILTER (WHERE NOT special) AS max_abs_ratio,
       avg(top1_share) FILTER (WHERE special) AS top1_share_special,
       avg(top1_share) FILTER (WHERE NOT special) AS top1_share_regular
FROM t
GROUP BY layer
ORDER BY layer
