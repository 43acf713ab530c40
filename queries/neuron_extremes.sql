-- purpose: Always-on and never-on neurons of a run (the per-neuron table of actsparse deployment): neurons the
--   rule keeps for at least a share `on` of the tokens, or for at most a share `off`, with their mean |a|.
-- param run RUN: run id or unique prefix
-- param site SITE = 'intermediate': FFN site
-- param on DOUBLE = 0.99: keep rate at or above which a neuron is always-on
-- param off DOUBLE = 0.01: keep rate at or below which a neuron is never-on
-- param layer INTEGER = NULL: one layer (NULL: every layer)
-- columns: kind, layer, neuron, keep_rate, mean_abs, rule, value, n_tokens, analysis_id
SELECT CASE WHEN keep_rate >= $on THEN 'always-on' ELSE 'never-on' END AS kind, layer, neuron, keep_rate,
       mean_abs, rule, value, n_tokens, analysis_id
FROM neurons
WHERE run_id = $run AND site = $site AND (keep_rate >= $on OR keep_rate <= $off)
  AND ($layer IS NULL OR layer = $layer)
ORDER BY kind, layer, keep_rate DESC, neuron
