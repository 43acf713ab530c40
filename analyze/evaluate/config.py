"""What a closed-loop evaluation is (:class:`EvalConfig`), its identity, and its result (:class:`Evaluation`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from actsparse.analyze.sparsifier import check_closed_loop
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError

EVAL_VERSION = 1
SPLIT = "heldout"
ACC_RATIO = 0.99  # docs/paper-notes.md §1.5: keep >= 99% of dense performance
N_BOOT = 200
MIN_TOKENS = 64  # predicted positions below which bootstrap intervals are meaningless
# Held-out windows below which no bootstrap interval is reported (NaN): resampling whole windows of so few
# gives a handful of distinct resamples (one window: every resample is the sample, a zero-width interval).
MIN_WINDOWS = 5
DEFAULT_GRID = (1.0, 0.99, 0.98, 0.97, 0.95, 0.92, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
# Dense log-probabilities are kept between grid values when they fit (float32 [tokens, vocab]);
# otherwise the LM head is re-applied to the cached dense hidden states for every value.
DENSE_CACHE_BYTES = 2 << 30
# Tokens per LM-head call: bounds the [tokens, vocab] float32 logits (262k vocab: 256 tokens).
_LOGITS_BYTES = 256 << 20


def grid_values(grid) -> tuple[float, ...]:
    """A grid as floats, duplicates dropped, in the given order.

    Raises:
        ActsparseError: a value that is not a number.
    """
    try:
        return tuple(dict.fromkeys(float(v) for v in grid))
    except (TypeError, ValueError):
        raise ActsparseError(f"grid values must be numbers, got {grid!r}") from None


@dataclass(frozen=True)
class EvalConfig:
    """What a closed-loop evaluation computes.

    Attributes:
        model: alias, HF id or checkpoint path (None: the run's model, when a run is given).
        corpus: built-in name or path (None: the run's corpus); its held-out split is used.
        target: input | gate | up | intermediate | all-inputs.
        rule: top-p | top-k | max-p (``actsparse.analyze.sparsifier.CLOSED_LOOP_RULES``).
        grid: rule values; order does not matter, duplicates are dropped.
        power: top-p power q >= 1.
        max_tokens: tokens of the held-out split to use, BOS included (None: all).
        seq_len, batch_size: windows as in collection; the batch composition changes float results,
            so both are part of the identity.
        compute_dtype: float32 | bfloat16 | float16 model dtype.
        include_special: count BOS and other special tokens' sparsity, as the authors' harness does
            (docs/paper-notes.md §1.4; excluded by default, docs/pitfalls.md P4). Predictions are unchanged.
        allocation: a per-layer allocation file's object (``analyze.allocate.read_allocation``): each of its
            allocations is one grid value (its requested model-level sparsity), applied with one rule value
            per layer; target and rule are the file's.
    """

    model: str | None = None
    corpus: str | None = None
    target: str = "intermediate"
    rule: str = "top-p"
    grid: tuple[float, ...] = DEFAULT_GRID
    power: float = 1.0
    max_tokens: int | None = 4096
    seq_len: int = 256
    batch_size: int = 8
    compute_dtype: str = "float32"
    text_field: str | None = None
    trust_remote_code: bool = False
    include_special: bool = False
    allocation: dict | None = field(default=None, hash=False, compare=False)

    def values(self) -> tuple[float, ...]:
        """The grid as floats, duplicates dropped, in the given order (with an allocation: its sparsities)."""
        if self.allocation is not None:
            return tuple(dict.fromkeys(float(a["sparsity"]) for a in self.allocation["allocations"]))
        return grid_values(self.grid)

    def validate(self) -> None:
        """Raise ActsparseError for values that cannot work, before anything is loaded."""
        if not self.values():
            raise ActsparseError("the grid is empty; give at least one rule value")
        if self.allocation is not None:
            if (self.allocation["target"], self.allocation["rule"]) != (self.target, self.rule):
                raise ActsparseError(f"the allocation is for {self.allocation['target']}/{self.allocation['rule']}, "
                                     f"not {self.target}/{self.rule}")
            for a in self.allocation["allocations"]:
                check_closed_loop(self.target, self.rule, a["values"], self.power)
        else:
            check_closed_loop(self.target, self.rule, self.values(), self.power)
        if self.seq_len < 2:
            raise ActsparseError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.batch_size < 1:
            raise ActsparseError(f"--batch-size must be positive (got {self.batch_size})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ActsparseError(f"--max-tokens must be positive (got {self.max_tokens})")
        if self.compute_dtype not in fmt.STORED_DTYPES:
            raise ActsparseError(f"unknown compute dtype '{self.compute_dtype}' "
                                 f"(choose {', '.join(fmt.STORED_DTYPES)})")


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    ``summary``, ``layers`` and ``critical`` are polars DataFrames as stored (module docstring);
    they cover every grid value evaluated under ``eval_id`` so far, not only this call's.
    ``computed`` and ``reused`` list this call's grid values by what happened to them. ``experts`` is the
    per-expert table of a mixture-of-experts model (``actsparse.core.format.EVALUATION_EXPERTS``), else None.
    """

    eval_id: str
    base: Path | None
    config: dict
    summary: object
    layers: object
    critical: object
    computed: list[float] = field(default_factory=list)
    reused: list[float] = field(default_factory=list)
    experts: object = None


def eval_identity(cfg: EvalConfig, weights_sha256: str, corpus_sha256: str, run_id: str | None = None) -> dict:
    """What identifies an evaluation (its ``eval_id`` is the content hash of this dict): the model
    weights' and corpus' sha256, every setting that changes a number, and the torch/transformers
    versions. The grid is not part of it: values are added to an evaluation as they are computed."""
    import transformers

    return dict(kind="evaluate", version=EVAL_VERSION, weights_sha256=weights_sha256, corpus_sha256=corpus_sha256,
                split=SPLIT, target=cfg.target, rule=cfg.rule, power=cfg.power, seq_len=cfg.seq_len,
                max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, compute_dtype=cfg.compute_dtype, add_bos=True,
                torch=torch.__version__, transformers=transformers.__version__) | extra_identity(cfg, run_id)


def extra_identity(cfg: EvalConfig, run_id: str | None = None) -> dict:
    """Identity keys of the newer settings, present only when they differ from the default so that the ids of
    evaluations made before them stay valid: special tokens counted, the allocation (its per-layer values and the
    run whose curves made it), the run calibrating a calibrated rule's taus (``cfg`` is planned: see
    ``evaluation._plan``)."""
    from actsparse.core.vocab import CALIBRATED_RULES

    extra: dict = {}
    if cfg.include_special:
        extra["include_special"] = True
    if cfg.allocation is not None:
        extra["allocation"] = dict(run_id=cfg.allocation["run_id"], analysis_id=cfg.allocation.get("analysis_id"),
                                   values={str(float(a["sparsity"])): a["values"]
                                           for a in cfg.allocation["allocations"]})
    if cfg.rule in CALIBRATED_RULES:
        extra["calibration"] = dict(run_id=run_id, windows="every 4th")
    return extra
