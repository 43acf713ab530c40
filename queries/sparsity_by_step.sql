-- purpose: Sparsity per generation or denoising step of a per-step analysis (`actsparse steps`), for any
--   rule and target analysed: at model level (layer -1) or one layer, over every stored row and over the
--   positions still masked or noised at the step (diffusion runs).
-- param run RUN: run id or unique prefix
-- param target TARGET = 'intermediate': the sparsified target
-- param rule STEP_RULE = 'top-p-flat': the rule (top-p-flat: the authors' diffusion top-p)
-- param value DOUBLE = NULL: the rule value, or NULL for every value analysed
-- param layer INTEGER = -1: one layer, or -1 for the model level
-- columns: value, step, block, n_tokens, sparsity, n_noised, sparsity_noised
SELECT value, step, block, max(n_tokens) AS n_tokens,
       sum(sparsity * n_tokens * width) / sum(n_tokens * width) AS sparsity, max(n_noised) AS n_noised,
       sum(sparsity_noised * n_noised * width) / nullif(sum(n_noised * width), 0) AS sparsity_noised
FROM step_sparsity
WHERE run_id = $run AND target = $target AND rule = $rule AND ($value IS NULL OR value = $value) AND layer = $layer
GROUP BY value, step, block
ORDER BY value DESC, step, block
