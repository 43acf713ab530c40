-- purpose: Downstream-task critical sparsity (actsparse evaluate --tasks): per lm-eval task and the task average,
--   the largest realized sparsity keeping >= 99% of dense task accuracy, with its 95% bootstrap interval over
--   examples, per model, target and rule (runs and store-level evaluations alike).
-- param task VARCHAR = NULL: only this task ('average': the task averages; NULL: every task)
-- param target TARGET = NULL: only this target (NULL: every target)
-- param rule RULE = 'top-p': only this rule (NULL: every rule)
-- columns: model, run_id, target, rule, power, count_mode, task, metric, dense_acc, critical_sparsity_interp,
--   critical_lo, critical_hi, critical_sparsity_grid, critical_value_grid, n_values, n_examples, eval_id
SELECT c.model, c.run_id, c.target, c.rule, c.power, c.count_mode, c.task, c.metric, c.dense_acc,
       c.critical_sparsity_interp, c.critical_lo, c.critical_hi, c.critical_sparsity_grid, c.critical_value_grid,
       c.n_values, c.n_examples, c.eval_id
FROM task_critical AS c
WHERE ($task IS NULL OR c.task = $task)
  AND ($target IS NULL OR c.target = $target)
  AND ($rule IS NULL OR c.rule = $rule)
ORDER BY c.model, c.target, c.rule, c.task = 'average', c.task, c.eval_id
