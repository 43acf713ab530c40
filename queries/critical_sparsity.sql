-- purpose: Critical sparsity across runs: for each run, target, rule, metric and tolerance, the highest
--   sparsity whose error stays within the tolerance (analysis output), with the run's model and corpus.
-- param target TARGET = NULL: only this target (NULL: every target)
-- param rule RULE = 'top-p': only this rule (NULL: every rule)
-- param metric VARCHAR = NULL: only this error metric (NULL: every metric)
-- param tolerance DOUBLE [0, 1000000] = NULL: only this tolerance (NULL: every tolerance)
-- columns: model_name, corpus, run_id, target, rule, metric, tolerance, critical_sparsity_interp,
--   critical_sparsity_grid, critical_value_grid, label, analysis_id
SELECT r.model_name, r.corpus, c.run_id, c.target, c.rule, c.metric, c.tolerance, c.critical_sparsity_interp,
       c.critical_sparsity_grid, c.critical_value_grid, c.label, c.analysis_id
FROM critical_sparsity AS c
JOIN runs AS r USING (run_id)
WHERE ($target IS NULL OR c.target = $target)
  AND ($rule IS NULL OR c.rule = $rule)
  AND ($metric IS NULL OR c.metric = $metric)
  AND ($tolerance IS NULL OR c.tolerance = $tolerance)
ORDER BY c.target, c.rule, c.metric, c.tolerance, r.model_name, c.run_id
