"""The field's vocabulary, defined once: FFN sites, sparsification targets and rules.

Plain tuples with no imports, so that light code (named-query parameters, CLI checks) can validate a
name without loading torch.
"""

SITES: tuple[str, ...] = ("input", "gate", "act", "up", "intermediate", "output")
"""FFN sites, in forward order (``pipeline.sites`` documents where each is hooked)."""

TARGETS: tuple[str, ...] = ("input", "gate", "up", "intermediate", "all-inputs")
"""Sparsification targets of the paper (§3): the FFN input, the activation output, the up
projection, the down projection's input, and every linear layer's input."""

RULES: tuple[str, ...] = ("top-p", "top-k", "max-p", "threshold")
"""Sparsification rules (``analyze.rules``)."""
