-- purpose: Critical sparsity against model size across every run of the store, one line per model family
--   (model_type): open-loop critical sparsity (actsparse curves) and, where evaluated, closed-loop (actsparse
--   evaluate, top-1 accuracy ratio), with the parameter count recorded at collection (NULL for older runs).
-- param target TARGET = 'intermediate': sparsification target
-- param rule RULE = 'top-p': sparsification rule
-- param tolerance DOUBLE = 0.1: open-loop relative-error tolerance
-- columns: family, model_name, n_params, run_id, corpus, open_critical, open_critical_grid, closed_critical,
--   closed_lo, closed_hi
WITH open AS (
    SELECT run_id, max(critical_sparsity_interp) AS open_critical, max(critical_sparsity_grid) AS open_critical_grid
    FROM critical_sparsity
    WHERE target = $target AND rule = $rule AND tolerance = $tolerance AND metric = 'rel_err_mean'
    GROUP BY run_id
),
closed AS (
    SELECT run_id, max(critical_sparsity_interp) AS closed_critical, max(critical_lo) AS closed_lo,
           max(critical_hi) AS closed_hi
    FROM evaluation_critical
    WHERE target = $target AND rule = $rule AND criterion = 'top1_acc' AND run_id IS NOT NULL
    GROUP BY run_id
)
SELECT coalesce(r.model_type, r.architecture, 'unknown') AS family, r.model_name, r.n_params, r.run_id, r.corpus,
       o.open_critical, o.open_critical_grid, c.closed_critical, c.closed_lo, c.closed_hi
FROM runs AS r
LEFT JOIN open AS o USING (run_id)
LEFT JOIN closed AS c USING (run_id)
WHERE o.open_critical IS NOT NULL OR c.closed_critical IS NOT NULL
ORDER BY family, r.n_params NULLS LAST, r.model_name, r.run_id
