"""The field's vocabulary, defined once: FFN sites, sparsification targets and rules.

Plain tuples with no imports, so that light code (named-query parameters, CLI checks) can validate a
name without loading torch.
"""

SITES: tuple[str, ...] = ("input", "gate", "act", "up", "intermediate", "output")
"""FFN sites, in forward order (``pipeline.sites`` documents where each is hooked)."""

TARGETS: tuple[str, ...] = ("input", "gate", "up", "intermediate", "all-inputs")
"""Sparsification targets of the paper (§3): the FFN input, the activation output, the up
projection, the down projection's input, and every linear layer's input."""

RULES: tuple[str, ...] = ("top-p", "top-k", "max-p", "threshold", "wina-top-k", "wina-top-p", "cett")
"""Sparsification rules (``analyze.rules``; the weight-aware ``wina-*`` and ``cett``: ``analyze.weighted``)."""

WEIGHTED_RULES: tuple[str, ...] = ("wina-top-k", "wina-top-p")
"""Rules ranking by WINA's score |x_i| * ||W[:, i]||_2 (they need the consuming weight's column norms)."""

CALIBRATED_RULES: tuple[str, ...] = ("threshold", "cett")
"""Rules whose per-layer tau is calibrated on a run's calibration windows (docs/paper-notes.md §8)."""

FLAT_TOPP: str = "top-p-flat"
"""The authors' diffusion top-p (docs/paper-notes.md §1.7): one budget per sample over its flattened
[tokens, width] tensor, kept mass <= p (``analyze.rules.flat_topp_mask``)."""

STEP_RULES: tuple[str, ...] = (*RULES, FLAT_TOPP)
"""Rules of the per-step analysis of generation and diffusion runs (``analyze.steps``)."""

PHASES: tuple[str, ...] = ("prefill", "generation", "denoising")
"""What a stored token row was fed by (docs/paper-notes.md §1.4, §1.7): the prompt's forward pass, a one-token
forward of autoregressive generation (KV cache), or a denoising step of a diffusion LM. Runs of plain text are
all prefill."""
