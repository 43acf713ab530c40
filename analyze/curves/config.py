"""What a curves result is: targets, rules, grids and options (hashed into its ``analysis_id``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from actsparse.analyze import rules as R
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import RULES, TARGETS

LINEAR = ("gate", "up", "intermediate")
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "top-p": R.DEFAULT_TOPP_GRID,
    # top-k: fraction kept; max-p: fraction of the max; threshold: target sparsity of the calibration
    "top-k": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02),
    "max-p": (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5),
    "threshold": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
    # WINA: fraction kept (top-k) and fraction of the score's L1 mass (top-p) of |a_i| * ||W[:, i]||
    "wina-top-k": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02),
    "wina-top-p": R.DEFAULT_TOPP_GRID,
    # cett: target relative FFN-output error per layer
    "cett": (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
}
# Offline critical sparsity: the largest model-level sparsity whose mean relative FFN-output error
# stays <= this. Chosen against closed-loop runs (README "Results"): with 0.1 the open-loop value falls
# inside, or at the upper edge of, the closed-loop 99%-accuracy interval for intermediate and input on
# both packaged models; it is optimistic for gate and up.
DEFAULT_TOLERANCE = 0.1
# Blocks processed concurrently, one torch thread each: one more than the cores, as zarr serialises
# part of every read (measured on 2 cores: 3 workers sweep 15% faster than 2); at most 8 (memory).
MAX_WORKERS = 8
# Tokens per streamed block: four stored chunks per read, which zarr decodes concurrently (measured
# 15-20% faster sweeps than one chunk per block on SmolLM2-135M); ~150 MB per block in flight.
DEFAULT_BLOCK_TOKENS = 4096
CALIBRATION_EVERY = 4  # threshold and cett rules: every 4th window calibrates tau, the others are evaluated
# 2: sites ranked in their stored (or 16-bit compute) dtype, so max-p/threshold compare in it (was float32)
ANALYSIS_VERSION = 2


@dataclass(frozen=True)
class CurveConfig:
    """What determines a curves result (hashed into its ``analysis_id``)."""

    targets: tuple[str, ...] = ("intermediate",)
    rules: tuple[str, ...] = ("top-p",)
    grids: dict = field(default_factory=dict)
    power: float = 1.0
    include_special: bool = False
    with_error: bool = True
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def grid(self, rule: str) -> tuple[float, ...]:
        return tuple(self.grids.get(rule) or DEFAULT_GRIDS[rule])

    def validate(self) -> None:
        for t in self.targets:
            if t not in TARGETS:
                raise ActsparseError(f"unknown target '{t}' (choose {', '.join(TARGETS)})")
        for r in self.rules:
            if r not in RULES:
                raise ActsparseError(f"unknown rule '{r}' (choose {', '.join(RULES)})")
            grid = self.grid(r)
            if not grid:
                raise ActsparseError(f"empty grid for rule {r}")
            for v in grid:
                if r == "threshold":
                    if not 0.0 <= v <= 1.0:
                        raise ActsparseError(f"threshold grid values are target sparsities in [0, 1], got {v}")
                elif r == "cett":
                    if not 0.0 <= v <= 1.0:
                        raise ActsparseError(f"cett grid values are target relative errors in [0, 1], got {v}")
                else:
                    R.check_rule_value(r, v, self.power if r == "top-p" else 1.0)
        if not self.targets or not self.rules:
            raise ActsparseError("need at least one target and one rule")

    def ident(self) -> dict:
        d = asdict(self)
        d["grids"] = {r: list(self.grid(r)) for r in self.rules}
        d.pop("block_tokens")
        return d | dict(version=ANALYSIS_VERSION)


def required_sites(target: str, run_sites: Sequence[str], glu: bool = True) -> tuple[str, ...]:
    """Stored sites a target needs: its own tensors, or ``input`` to recompute them from the weights.

    Raises:
        ActsparseError: naming the missing site(s).
    """
    have = set(run_sites)
    need = {"input": ("input",), "all-inputs": ("input",), "intermediate": ("intermediate",),
            "gate": ("gate", "intermediate") if "act" not in have else ("act", "intermediate"),
            "up": ("up", "intermediate")}[target]
    if target == "up" and not glu:
        raise ActsparseError("target 'up' needs a GLU FFN (this model has no up projection)")
    if set(need) <= have or "input" in have:
        return need
    missing = sorted(set(need) - have)
    raise ActsparseError(f"target '{target}' needs site(s) {', '.join(missing)} (or 'input' to recompute them); "
                         f"the run stored {', '.join(run_sites)}")


def check_tolerance(tolerance: float) -> None:
    """Raise ActsparseError unless ``tolerance`` (a relative error bound) is a finite number >= 0."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ActsparseError(f"--tolerance must be a finite number >= 0 (a relative error bound), got {tolerance}")
