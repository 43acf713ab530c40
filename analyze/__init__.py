"""Analysis of stored activations: sparsification rules, whole-grid sweeps, open-loop curves, closed-loop
evaluation, per-token statistics and the HTML report."""
