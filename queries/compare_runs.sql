-- purpose: Two runs compared layer by layer (e.g. two models, or one model on two corpora): mean top-p
--   sparsity at p, L1 and max |a| over non-special tokens, and the difference b - a.
-- param run_a RUN: first run (id or unique prefix)
-- param run_b RUN: second run (id or unique prefix)
-- param site SITE = 'intermediate': FFN site
-- param p DOUBLE [0.5, 0.99] = 0.9: top-p value, one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99
-- columns: layer, depth_a, depth_b, sparsity_a, sparsity_b, sparsity_diff, l1_a, l1_b, max_abs_a, max_abs_b,
--   n_tokens_a, n_tokens_b
WITH per_layer AS (
    SELECT run_id, layer, count(*) AS n_tokens,
           avg(CASE $p WHEN 0.5 THEN sparsity_p50 WHEN 0.7 THEN sparsity_p70 WHEN 0.8 THEN sparsity_p80
                       WHEN 0.9 THEN sparsity_p90 WHEN 0.95 THEN sparsity_p95 WHEN 0.99 THEN sparsity_p99
                       ELSE error('p must be one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 (the token_stats grid)') END)
               AS sparsity,
           avg(l1) AS l1, avg(max_abs) AS max_abs
    FROM token_stats
    WHERE run_id IN ($run_a, $run_b) AND site = $site AND NOT special
    GROUP BY run_id, layer
),
a AS (SELECT * FROM per_layer WHERE run_id = $run_a),
b AS (SELECT * FROM per_layer WHERE run_id = $run_b),
depths AS (SELECT run_id, n_layers FROM runs WHERE run_id IN ($run_a, $run_b))
SELECT layer,
       layer / greatest((SELECT n_layers FROM depths WHERE run_id = $run_a) - 1, 1) AS depth_a,
       layer / greatest((SELECT n_layers FROM depths WHERE run_id = $run_b) - 1, 1) AS depth_b,
       a.sparsity AS sparsity_a, b.sparsity AS sparsity_b, b.sparsity - a.sparsity AS sparsity_diff,
       a.l1 AS l1_a, b.l1 AS l1_b, a.max_abs AS max_abs_a, b.max_abs AS max_abs_b,
       a.n_tokens AS n_tokens_a, b.n_tokens AS n_tokens_b
FROM a FULL OUTER JOIN b USING (layer)
ORDER BY layer
