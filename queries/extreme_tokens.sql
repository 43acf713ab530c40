-- purpose: The most and the least sparse tokens of a run (top-p sparsity at p, non-special tokens), with
--   their text and the neighbouring tokens of the same window ([brackets] mark the token itself).
-- param run RUN: run id or unique prefix
-- param site SITE = 'intermediate': FFN site
-- param p DOUBLE [0.5, 0.99] = 0.9: top-p value, one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99
-- param layer INTEGER [-1, 4095] = -1: one layer, or -1 for the mean over all layers
-- param n INTEGER [1, 100000] = 10: tokens of each kind
-- param context INTEGER [0, 1000] = 4: neighbouring tokens shown on each side
-- columns: kind, rank, token_index, sequence, position, token, sparsity, l1_mean, max_abs, context
WITH per_token AS (
    SELECT token_index, sequence, position,
           avg(CASE $p WHEN 0.5 THEN sparsity_p50 WHEN 0.7 THEN sparsity_p70 WHEN 0.8 THEN sparsity_p80
                       WHEN 0.9 THEN sparsity_p90 WHEN 0.95 THEN sparsity_p95 WHEN 0.99 THEN sparsity_p99
                       ELSE error('p must be one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 (the token_stats grid)') END)
               AS sparsity,
           avg(l1) AS l1_mean, max(max_abs) AS max_abs
    FROM token_stats
    WHERE run_id = $run AND site = $site AND NOT special AND ($layer = -1 OR layer = $layer)
    GROUP BY token_index, sequence, position
),
picked AS (
    SELECT 'most sparse' AS kind, row_number() OVER (ORDER BY sparsity DESC, token_index) AS rank, *
    FROM (SELECT * FROM per_token ORDER BY sparsity DESC, token_index LIMIT $n)
    UNION ALL
    SELECT 'least sparse', row_number() OVER (ORDER BY sparsity, token_index), *
    FROM (SELECT * FROM per_token ORDER BY sparsity, token_index LIMIT $n)
),
run_tokens AS (
    SELECT token_index, sequence, position, replace(token_text, chr(10), '\n') AS text
    FROM tokens WHERE run_id = $run
)
SELECT p.kind, p.rank, p.token_index, p.sequence, p.position, any_value(t.text) AS token, p.sparsity, p.l1_mean,
       p.max_abs,
       string_agg(CASE WHEN c.position = p.position THEN '[' || c.text || ']' ELSE c.text END, '' ORDER BY c.position)
           AS context
FROM picked AS p
JOIN run_tokens AS t ON t.token_index = p.token_index
JOIN run_tokens AS c ON c.sequence = p.sequence AND c.position BETWEEN p.position - $context AND p.position + $context
GROUP BY p.kind, p.rank, p.token_index, p.sequence, p.position, p.sparsity, p.l1_mean, p.max_abs
ORDER BY p.kind DESC, p.rank
