-- purpose: Mask stability across denoising steps (`actsparse steps` on a diffusion run, docs/paper-notes.md
--   §1.7): the Jaccard index of the kept masks between consecutive steps, from the first step (drift, delta 0
--   when pooled) and at step intervals, global (sum of intersections over sum of unions) and token-aware (mean
--   per-token Jaccard), pooled over steps or per step.
-- param run RUN: run id or unique prefix
-- param target TARGET = 'intermediate': the sparsified target
-- param rule STEP_RULE = 'top-p-flat': the rule (top-p-flat: the authors' diffusion top-p)
-- param value DOUBLE = NULL: the rule value, or NULL for every value analysed
-- param layer INTEGER = -1: one layer, or -1 for the model level
-- param by_step BOOLEAN = false: one row per step (and drift distance) instead of pooling the steps
-- columns: value, kind, delta, step, n_pairs, global_jaccard, token_jaccard
SELECT value, kind, CASE WHEN kind = 'drift' AND NOT $by_step THEN 0 ELSE delta END AS delta,
       CASE WHEN $by_step THEN step END AS step, count(*) AS n_pairs,
       sum(n_intersection) / nullif(sum(n_union), 0) AS global_jaccard,
       sum(token_jaccard_sum) / nullif(sum(n_tokens), 0) AS token_jaccard
FROM step_stability
WHERE run_id = $run AND target = $target AND rule = $rule AND ($value IS NULL OR value = $value) AND layer = $layer
GROUP BY 1, 2, 3, 4
ORDER BY value DESC, list_position(['consecutive', 'drift', 'interval'], kind), delta, step
