"""Sparsification rules over one block of stored activations.

Every rule maps a block ``a`` of shape ``[tokens, width]`` (any floating dtype; leading
dimensions beyond ``tokens`` also work) to a bool *keep* mask of the same shape, computed
per token (per row), exactly as the paper authors' harness does it
(``lm_eval/sparsification_manager.py``: ``get_topp_mask``, ``get_topk_mask``,
``get_maxp_mask``; docs/paper-notes.md §1.2–1.4). The threshold rule is the
calibrated TEAL-style rule of docs/paper-notes.md §8. The WINA rules (``wina-top-k``,
``wina-top-p``) rank by |a_i| * ||W[:, i]||_2 of the weight that consumes the vector
(docs/paper-notes.md §1.3; ``analyze.weighted`` says which weight per target); ``cett`` is a
threshold calibrated per layer on a target output error (``analyze.weighted``).

Numerics follow the authors to the bit: magnitudes and thresholds live in ``a``'s dtype
(bf16 in all of the paper's runs), only the top-p cumulative sum is float64, and an
entry is kept when its magnitude is ``>=`` the threshold, so ties at the threshold are
always kept. ``analyze.sweep`` computes the same kept counts for a whole grid of rule
values from one sort; the two are tested against each other.
"""

from __future__ import annotations

import math

import torch

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import RULES

# docs/paper-notes.md §3.3: the dense-model top-p grid (26 points), in the authors' order.
DEFAULT_TOPP_GRID = (
    1.00, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91,
    0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10, 0.00,
)  # fmt: skip


def check_block(a: torch.Tensor, *, ndim: int | None = None) -> None:
    """Raise ActsparseError unless ``a`` is a floating tensor with a non-empty last dim.

    ``ndim`` additionally pins the number of dimensions (the sweep needs exactly
    ``[tokens, width]``).
    """
    if not isinstance(a, torch.Tensor) or not a.is_floating_point():
        raise ActsparseError(f"activations must be a floating-point tensor, got {getattr(a, 'dtype', type(a))}")
    if a.ndim == 0 or a.shape[-1] == 0:
        raise ActsparseError(f"activations must have a non-empty last (width) dimension, got shape {tuple(a.shape)}")
    if ndim is not None and a.ndim != ndim:
        raise ActsparseError(f"activations must have {ndim} dimensions [tokens, width], got shape {tuple(a.shape)}")


def check_rule_value(rule: str, value: float, power: float = 1.0) -> None:
    """Raise ActsparseError unless ``value`` (and ``power``) are valid for ``rule``.

    Ranges: top-p, wina-top-p and max-p p in [0, 1] (the authors assert 0 <= th <= 1);
    top-k and wina-top-k fraction kept in (0, 1] (the authors crash at 0); threshold tau finite
    >= 0; cett a target relative FFN-output error in [0, 1].
    ``power`` q must be finite and >= 1 (authors' assert) and is only defined for top-p.
    """
    if rule not in RULES:
        raise ActsparseError(f"unknown sparsification rule {rule!r}; expected one of {', '.join(RULES)}")
    try:
        v = float(value)
        q = float(power)
    except (TypeError, ValueError):
        raise ActsparseError(f"{rule} value and power must be numbers, got {value!r} and {power!r}") from None
    # Written as positive range checks so that NaN fails them.
    if rule in ("top-p", "max-p", "wina-top-p", "cett") and not 0.0 <= v <= 1.0:
        raise ActsparseError(f"{rule} value must be in [0, 1], got {value!r}")
    if rule in ("top-k", "wina-top-k") and not 0.0 < v <= 1.0:
        raise ActsparseError(f"{rule} value (fraction kept) must be in (0, 1], got {value!r}")
    if rule == "threshold" and not (v >= 0.0 and math.isfinite(v)):
        raise ActsparseError(f"threshold value must be finite and >= 0, got {value!r}")
    if not (q >= 1.0 and math.isfinite(q)):
        raise ActsparseError(f"power must be finite and >= 1, got {power!r}")
    if q != 1.0 and rule != "top-p":
        raise ActsparseError(f"power applies only to the top-p rule, got power={power!r} with {rule}")


def magnitude(a: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Ranking score ``|a|`` (or ``|a|**power`` when power != 1), in ``a``'s dtype.

    Shape as ``a``. Source: authors' ``get_topp_mask`` step 1 — the power is applied in
    the tensor dtype, so for bf16 the score is rounded to bf16 (which can create ties).
    """
    s = a.abs()
    if power != 1.0:
        s = s**power
    return s


def threshold_in_dtype(tau: float, dtype: torch.dtype) -> torch.Tensor:
    """The 0-dim threshold ``tau`` rounded to ``dtype``, as compared by ``threshold_mask``.

    torch itself rounds a Python scalar to the tensor's dtype in ``tensor >= scalar``;
    doing it explicitly here lets ``analyze.sweep`` reproduce the comparison exactly.
    """
    return torch.tensor(float(tau), dtype=torch.float64).to(dtype)


def topk_k(width: int, fraction: float) -> int:
    """Number of entries top-k keeps before ties: ``max(int(width * fraction), 1)``.

    ``int(width * fraction)`` is the authors' ``get_topk_mask`` (truncation of a double
    product, so e.g. 100 * 0.29 gives 28). The authors crash when that is 0; we keep at
    least one entry (the largest, plus ties) instead.
    """
    return max(int(width * float(fraction)), 1)


def topp_mask(a: torch.Tensor, p: float, power: float = 1.0) -> torch.Tensor:
    """Top-p keep mask: the fewest largest-|a| entries holding a fraction p of the L1 mass.

    a: [tokens, width], any float dtype; returns bool [tokens, width].
    Source: authors' sparsification_manager.get_topp_mask (docs/paper-notes.md §1.2), reproduced
    step by step: s = |a| (or |a|**power, q >= 1) in a's dtype; sort s descending; cumsum
    in float64; total = last cumsum element; idx = first index with cumsum >= p * total
    (0 if none); thr = sorted[idx] (already in a's dtype, so bf16 input gives a bf16
    threshold); keep s >= thr, ties at the threshold kept.

    Edge cases, all the authors' behaviour:
      * p = 0 keeps the max entry and its ties.
      * p = 1 is not "keep everything": idx is the first index where the float64 cumsum
        reaches the total, so zeros (and entries too small to change the float64 sum)
        are dropped and counted as sparse. It is dense in effect, not in count.
      * An all-zero row has total 0, so idx = 0, thr = 0 and every entry is kept
        (sparsity 0) for every p.
      * Non-finite rows: an inf entry makes the total inf, so only the inf entries are
        kept; a NaN entry makes thr NaN and nothing is kept.
    """
    check_block(a)
    check_rule_value("top-p", p, power)
    s = magnitude(a, power)
    srt, _ = s.sort(dim=-1, descending=True)
    cum = srt.cumsum(dim=-1, dtype=torch.float64)
    total = cum[..., -1:]
    exceeds = cum >= total * p
    # argmax returns the first maximal index, i.e. the first True; rows without a True
    # (only possible with NaN/inf totals) fall back to 0 as in the authors' code.
    idx = exceeds.int().argmax(dim=-1, keepdim=True)
    idx = torch.where(exceeds.any(dim=-1, keepdim=True), idx, torch.zeros_like(idx))
    thr = srt.gather(-1, idx).to(a.dtype)
    return s >= thr


def topk_mask(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """Top-k keep mask: entries with |a| >= the k-th largest |a|, k = topk_k(width, fraction).

    a: [tokens, width], any float dtype; returns bool [tokens, width]. ``fraction`` is
    the fraction *kept*, in (0, 1]. Source: authors' get_topk_mask (docs/paper-notes.md §1.3);
    ties at the k-th value are kept, so a row may keep more than k entries.
    """
    check_block(a)
    check_rule_value("top-k", fraction)
    s = a.abs()
    thr = torch.topk(s, topk_k(s.shape[-1], fraction), dim=-1, sorted=True).values[..., -1:]
    return s >= thr


def maxp_mask(a: torch.Tensor, p: float) -> torch.Tensor:
    """Max-p keep mask: entries with |a| >= p * max|a| of their token.

    a: [tokens, width], any float dtype; returns bool [tokens, width]. p in [0, 1].
    Source: authors' get_maxp_mask (docs/paper-notes.md §1.3). The product p * max is computed in
    a's dtype (torch scalar arithmetic: float32 multiply, then rounded to bf16 for bf16
    input), exactly as in the authors' code. An all-zero row keeps everything.
    """
    check_block(a)
    check_rule_value("max-p", p)
    s = a.abs()
    return s >= s.amax(dim=-1, keepdim=True) * p


def threshold_mask(a: torch.Tensor, tau: float) -> torch.Tensor:
    """Fixed-threshold keep mask: entries with |a| >= tau (TEAL-style, docs/paper-notes.md §8).

    a: [tokens, width], any float dtype; returns bool [tokens, width]. ``tau`` is one
    scalar for the whole block, finite and >= 0, rounded to a's dtype before comparing
    (see ``threshold_in_dtype``); thresholds from ``calibrate_threshold`` are already
    representable, so the rounding does not move them.
    """
    check_block(a)
    check_rule_value("threshold", tau)
    return a.abs() >= threshold_in_dtype(tau, a.dtype)


def calibrate_threshold(a_calib: torch.Tensor, target_sparsity: float) -> float:
    """TEAL-style calibration: the ``target_sparsity`` quantile of |a| over all entries.

    a_calib: any shape, any float dtype (all entries pooled). Returns tau such that,
    with k = round(target * numel), exactly k entries satisfy |a| < tau when the data
    has no ties at tau (so ``threshold_mask`` hits the target within 0.5/numel); ties
    at tau are kept, which can only lower the sparsity. tau is the (k+1)-th smallest
    |a|, a value of a's dtype; for k = 0 it is 0, and for k = numel it is the next
    representable value of a's dtype above max|a| (so everything is dropped).

    Memory: |a| is flattened to a float32 copy (float64 input stays float64) and
    ``torch.kthvalue`` makes one more working copy, so about 8 bytes per entry on top of
    the input. Subsample tokens for calibration sets beyond a few hundred million entries.
    """
    if not isinstance(a_calib, torch.Tensor) or not a_calib.is_floating_point():
        raise ActsparseError("calibration activations must be a floating-point tensor")
    t = float(target_sparsity)
    if not 0.0 <= t <= 1.0:
        raise ActsparseError(f"target sparsity must be in [0, 1], got {target_sparsity!r}")
    n = a_calib.numel()
    if n == 0:
        raise ActsparseError("calibration activations are empty")
    work_dtype = torch.float64 if a_calib.dtype == torch.float64 else torch.float32
    s = a_calib.detach().reshape(-1).abs().to(work_dtype)
    if torch.isnan(s).any():
        raise ActsparseError("calibration activations contain NaN")
    k = math.floor(t * n + 0.5)
    if k == 0:
        return 0.0
    if k == n:
        top = s.max().to(a_calib.dtype)
        return float(torch.nextafter(top, torch.tensor(math.inf, dtype=a_calib.dtype)))
    return float(torch.kthvalue(s, k + 1).values)


def wina_score(a: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """WINA's ranking score ``|a_i| * ||W[:, i]||_2``, in a's dtype.

    a: [tokens, width], any float dtype; norms: [width] column norms of the weight that consumes
    the vector (``analyze.weighted.consumer_norms``), cast to a's dtype; returns a's shape and dtype.
    Source: WINA (Chen et al. 2025, arXiv 2505.19427), eq. 4: the product of the input magnitude and
    the column norm of the weight it multiplies.

    Raises:
        ActsparseError: norms whose shape is not [width].
    """
    check_block(a)
    if not isinstance(norms, torch.Tensor) or tuple(norms.shape) != (a.shape[-1],):
        raise ActsparseError(f"WINA needs column norms of shape [{a.shape[-1]}], got "
                             f"{tuple(getattr(norms, 'shape', ()))}")
    return a.abs() * norms.to(a.dtype)


def wina_mask(rule: str, a: torch.Tensor, value: float, norms: torch.Tensor) -> torch.Tensor:
    """Keep mask of a WINA rule: ``wina-top-k`` (fraction kept) or ``wina-top-p`` on ``wina_score``.

    a: [tokens, width]; returns bool [tokens, width]. The score replaces |a| in ``topk_mask`` /
    ``topp_mask`` (ties at the threshold kept; top-p's mass is the score's L1 mass).
    """
    check_rule_value(rule, value)
    s = wina_score(a, norms)
    return topk_mask(s, value) if rule == "wina-top-k" else topp_mask(s, value)


def rule_mask(rule: str, a: torch.Tensor, value: float, *, power: float = 1.0,
              norms: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask of ``rule`` (one of ``RULES``) at ``value``.

    a: [tokens, width], any float dtype; returns bool [tokens, width]. ``power`` is only
    valid for top-p; ``norms`` [width] (column norms of the consuming weight) only and always for
    the WINA rules. ``cett`` is a calibrated threshold: its per-layer tau is applied with
    ``threshold``. Unknown rules, out-of-range values and missing norms raise ActsparseError.
    """
    check_rule_value(rule, value, power)
    if rule in ("wina-top-k", "wina-top-p"):
        if norms is None:
            raise ActsparseError(f"rule {rule} needs the column norms of the weight consuming the vector")
        return wina_mask(rule, a, value, norms)
    if rule == "cett":
        raise ActsparseError("rule cett is a per-layer calibrated threshold: calibrate tau "
                             "(analyze.weighted.calibrate_cett) and apply it with the threshold rule")
    if rule == "top-p":
        return topp_mask(a, value, power)
    if rule == "top-k":
        return topk_mask(a, value)
    if rule == "max-p":
        return maxp_mask(a, value)
    return threshold_mask(a, value)


def sparsity(mask: torch.Tensor) -> torch.Tensor:
    """Per-token sparsity: the fraction of entries zeroed, ``#(~mask) / width``.

    mask: bool [tokens, width]; returns float64 [tokens]. Source: docs/paper-notes.md §1.4 (per token
    per hook ``sparse / feat_dim``; zero entries dropped by the rule count as sparse).
    """
    return (~mask).sum(dim=-1).to(torch.float64) / mask.shape[-1]
