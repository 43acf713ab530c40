-- purpose: Expert profile of a mixture-of-experts run (open-loop curves, `actsparse curves`): per layer and
--   expert (and shared expert or dense layer), its load (rows routed to it per counted token), mean routing
--   weight, and the sparsity and own output error the rule induces at one value. Where several analyses
--   hold that value, the one that counted the most rows is used.
-- param run RUN: run id or unique prefix
-- param target TARGET = 'intermediate': sparsified target
-- param rule RULE = 'top-p': sparsification rule
-- param value DOUBLE = 0.9: rule value (a value of the analysed grid)
-- columns: layer, unit, expert, load, weight_mean, rows, width, sparsity, rel_err_mean, analysis_id
WITH chosen AS (
    SELECT analysis_id
    FROM expert_curves
    WHERE run_id = $run AND target = $target AND rule = $rule AND value = $value
    GROUP BY analysis_id
    ORDER BY sum(rows) DESC, analysis_id
    LIMIT 1
)
SELECT layer, unit, expert, load, weight_mean, rows, width, sparsity, rel_err_mean, analysis_id
FROM expert_curves
WHERE run_id = $run AND target = $target AND rule = $rule AND value = $value
  AND analysis_id = (SELECT analysis_id FROM chosen)
ORDER BY layer, unit, expert
