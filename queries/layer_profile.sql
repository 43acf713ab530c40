-- purpose: Layer profile of one run and site: per layer, the mean per-token statistics over non-special
--   tokens (L1, L2, max |a|, top-1 share, fraction under thresholds, top-p sparsity).
-- param run RUN: run id or unique prefix
-- param site SITE = 'intermediate': FFN site
-- columns: layer, depth, width, n_tokens, l1_mean, l2_mean, max_abs_mean, top1_share_mean,
--   frac_below_1e_3_mean, frac_below_1e_2_mean, frac_below_1e_1_mean, sparsity_p50_mean ... sparsity_p99_mean
SELECT * EXCLUDE (run_id, model, site, n_layers)
FROM layers
WHERE run_id = $run AND site = $site
ORDER BY layer
