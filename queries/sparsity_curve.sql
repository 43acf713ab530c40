-- purpose: Sparsity curve of one run and target: per-token sparsity (mean, p10/p50/p90) at each rule
--   value, from one analysis of the curves table (the one with the most grid values, then the most
--   tokens, or the one named). Without any, the top-p points of token_stats (p = 0.5 ... 0.99,
--   non-special tokens) of the site holding the target's tensor (gate: `act`, the activation output),
--   marked source = 'token_stats'.
-- param run RUN: run id or unique prefix
-- param target TARGET = 'intermediate': analysis target
-- param rule RULE = 'top-p': sparsification rule (token_stats holds top-p only)
-- param layer INTEGER [-1, 4095] = -1: one layer, or -1 for the whole model (all layers pooled)
-- param analysis VARCHAR = NULL: one analysis (analysis_id or its prefix; NULL: chosen as above)
-- columns: source, analysis_id, value, layer, n_tokens, sparsity_mean, sparsity_p10, sparsity_p50,
--   sparsity_p90, kept_l1_mean, rel_err_mean, cos_mean
WITH candidates AS (
    SELECT * FROM curves
    WHERE run_id = $run AND target = $target AND rule = $rule AND layer = $layer
      AND ($analysis IS NULL OR starts_with(analysis_id, $analysis))
),
chosen AS (
    SELECT analysis_id FROM candidates
    GROUP BY analysis_id ORDER BY count(*) DESC, max(n_tokens) DESC, analysis_id LIMIT 1
),
from_curves AS (
    SELECT 'curves' AS source, analysis_id, value, layer, n_tokens, sparsity_mean, sparsity_p10, sparsity_p50,
           sparsity_p90, kept_l1_mean, rel_err_mean, cos_mean
    FROM candidates WHERE analysis_id = (SELECT analysis_id FROM chosen)
),
pooled AS (
    -- one pass over the rows: every column's mean and quantiles at once (no unpivot of the rows)
    SELECT count(DISTINCT token_index) AS n_tokens,
           avg(sparsity_p50) AS m50, avg(sparsity_p70) AS m70, avg(sparsity_p80) AS m80,
           avg(sparsity_p90) AS m90, avg(sparsity_p95) AS m95, avg(sparsity_p99) AS m99,
           quantile_cont(sparsity_p50, [0.1, 0.5, 0.9]) AS q50, quantile_cont(sparsity_p70, [0.1, 0.5, 0.9]) AS q70,
           quantile_cont(sparsity_p80, [0.1, 0.5, 0.9]) AS q80, quantile_cont(sparsity_p90, [0.1, 0.5, 0.9]) AS q90,
           quantile_cont(sparsity_p95, [0.1, 0.5, 0.9]) AS q95, quantile_cont(sparsity_p99, [0.1, 0.5, 0.9]) AS q99
    FROM token_stats
    WHERE run_id = $run AND site = (CASE $target WHEN 'gate' THEN 'act' ELSE $target END)
      AND NOT special AND ($layer = -1 OR layer = $layer)
      AND $rule = 'top-p' AND $analysis IS NULL AND NOT EXISTS (SELECT 1 FROM from_curves)
)
SELECT * FROM from_curves
UNION ALL
SELECT 'token_stats', NULL, u.value, $layer, n_tokens, u.m, u.q[1], u.q[2], u.q[3], NULL, NULL, NULL
FROM pooled,
     LATERAL (VALUES (0.5, m50, q50), (0.7, m70, q70), (0.8, m80, q80),
                     (0.9, m90, q90), (0.95, m95, q95), (0.99, m99, q99)) AS u(value, m, q)
WHERE n_tokens > 0
ORDER BY value
