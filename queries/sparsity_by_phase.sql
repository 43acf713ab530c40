-- purpose: Sparsity by phase (docs/paper-notes.md §1.4): the authors' prefill / generation / total split of the
--   per-token top-p sparsity at p over the non-special tokens a run stored (generation counted up to each
--   prompt's first stop token; a run of text is all prefill, a diffusion run all denoising).
-- param run RUN: run id or unique prefix
-- param site SITE = 'intermediate': FFN site
-- param p DOUBLE = 0.9: top-p value, one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99
-- param layer INTEGER = -1: one layer, or -1 for all layers pooled
-- columns: phase, n_tokens, n_steps, sparsity_mean, l1_mean, max_abs_mean
WITH t AS (
    SELECT k.phase, k.step, s.token_index, s.l1, s.max_abs,
           CASE $p WHEN 0.5 THEN s.sparsity_p50 WHEN 0.7 THEN s.sparsity_p70 WHEN 0.8 THEN s.sparsity_p80
                   WHEN 0.9 THEN s.sparsity_p90 WHEN 0.95 THEN s.sparsity_p95 WHEN 0.99 THEN s.sparsity_p99
                   ELSE error('p must be one of 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 (the token_stats grid)') END
               AS sparsity
    FROM token_stats s JOIN tokens k USING (run_id, token_index)
    WHERE s.run_id = $run AND s.site = $site AND NOT s.special AND ($layer = -1 OR s.layer = $layer)
)
SELECT coalesce(phase, 'total') AS phase, count(DISTINCT token_index) AS n_tokens, count(DISTINCT step) AS n_steps,
       avg(sparsity) AS sparsity_mean, avg(l1) AS l1_mean, avg(max_abs) AS max_abs_mean
FROM t
GROUP BY ROLLUP (phase)
ORDER BY list_position(['prefill', 'generation', 'denoising', 'total'], coalesce(phase, 'total'))
