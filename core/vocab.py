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
