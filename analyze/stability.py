"""Diffusion analysis over per-step FFN activations: kept masks, sparsity per step, mask stability.

Input layout: the activations of one FFN site of one layer over the denoising steps of one run,
``acts`` [S, R, T, H]: S steps, R rows (batch rows, and the CFG halves), T positions, H width.
Everything here is a pure function of such tensors, except :class:`StepMaskTracker`, the in-loop
recorder the paper's authors use, kept to check the offline path and for closed-loop runs (where
the masks depend on upstream sparsification and cannot be recomputed offline).

Rules (``core.vocab.STEP_RULES``): the per-token rules of ``analyze.rules`` (``top-p``, ``top-k``,
``max-p``, ``threshold``; one mask per token, as the authors' harness) and ``top-p-flat``, the
authors' diffusion top-p (``analyze.flat_topp``): one budget per sample over its flattened [T, H].

Mask stability (docs/paper-notes.md §1.7, the authors' ``_update_jaccard_aggregation`` and
``analyze_diff_steps.py::stability_vs_interval``), between the kept masks A (earlier step) and
B (later step) of the same tokens:

* **global**: ``Σ_tokens |A ∩ B| / Σ_tokens |A ∪ B|``;
* **token-aware**: the mean over tokens of ``|A_t ∩ B_t| / |A_t ∪ B_t|``; a token whose union is
  empty scores ``empty`` (default 0: the in-loop hook clamps the union to 1;
  ``analyze_diff_steps.py`` scores such a token 1);
* pairs: **consecutive** (t-1, t), **drift** (first step, t), **interval** Δ (t-Δ, t) for
  Δ in :data:`DELTAS`, over every step t that has the partner (the authors' interval analysis
  only had snapshots at multiples of the interval; filter ``ref_step % Δ == 0`` to match it).

Note: ``analyze_diff_steps.py``'s own "global" Jaccard is over the union of neuron indices of all
tokens (token identity dropped); the global measure here is the in-loop hook's, which the paper's
consecutive/drift numbers use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from actsparse.analyze.flat_topp import flat_topp_mask
from actsparse.analyze.sparsifier import keep_and_count
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import FLAT_TOPP, RULES, STEP_RULES

DELTAS = (4, 8, 16, 32)
KINDS = ("consecutive", "drift", "interval")
STABILITY_COLUMNS = ("kind", "delta", "step", "ref_step", "n_intersection", "n_union", "token_jaccard_sum",
                     "n_tokens", "global_jaccard", "token_jaccard")


# --------------------------------------------------------------------------------------------
# Kept masks


def step_masks(acts: torch.Tensor, rule: str, value: float, *, power: float = 1.0) -> torch.Tensor:
    """Kept masks of ``acts`` [S, R, T, H] under ``rule`` at ``value``; bool [S, R, T, H].

    Per-token rules use ``analyze.sparsifier.keep_and_count`` (bit-identical to ``analyze.rules``);
    ``top-p-flat`` budgets each (step, row) over [T, H].

    Raises:
        ActsparseError: unknown rule, bad value, or ``acts`` not 4-D.
    """
    if acts.ndim != 4:
        raise ActsparseError(f"per-step activations must be [steps, rows, tokens, width], "
                             f"got shape {tuple(acts.shape)}")
    if rule == FLAT_TOPP:
        if power != 1.0:
            raise ActsparseError(f"power is not defined for {FLAT_TOPP}")
        return flat_topp_mask(acts, value)
    if rule not in RULES:
        raise ActsparseError(f"unknown rule '{rule}' (choose {', '.join(STEP_RULES)})")
    return keep_and_count(rule, acts, value, power)[0]


def _token_select(masks: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """masks [S, ..., H] -> [S, N, H] over the selected tokens (``tokens`` bool of shape masks[1:-1])."""
    flat = masks.reshape(masks.shape[0], -1, masks.shape[-1])
    if tokens is None:
        return flat
    if tuple(tokens.shape) != tuple(masks.shape[1:-1]):
        raise ActsparseError(f"token selection has shape {tuple(tokens.shape)}, expected {tuple(masks.shape[1:-1])}")
    return flat[:, tokens.reshape(-1).bool()]


def sparsity_per_step(masks: torch.Tensor, tokens: torch.Tensor | None = None) -> np.ndarray:
    """Fraction of entries dropped at each step over the selected tokens; float64 [S].

    masks: bool [S, ..., H]; tokens: bool of masks' middle shape (None: all). Counted as
    ``Σ dropped / Σ entries`` (every token weighs its width, docs/paper-notes.md §1.4).
    """
    sel = _token_select(masks, tokens)
    if sel.shape[1] == 0:
        raise ActsparseError("no tokens selected")
    kept = sel.view(torch.uint8).sum(dim=(1, 2), dtype=torch.int64)  # 6x faster than summing bools
    return (1.0 - kept.double() / (sel.shape[1] * sel.shape[2])).numpy()


# --------------------------------------------------------------------------------------------
# Jaccard between steps


@dataclass(frozen=True)
class PairCounts:
    """Jaccard counts of step pairs (each field [pairs]): ``intersection`` and ``union`` entry
    counts summed over tokens (int64), ``token_jaccard_sum`` the sum of per-token Jaccard (float64),
    ``n_tokens`` the tokens compared."""

    intersection: np.ndarray
    union: np.ndarray
    token_jaccard_sum: np.ndarray
    n_tokens: int


def pack_masks(masks: torch.Tensor) -> np.ndarray:
    """bool [..., H] -> uint8 [..., ceil(H / 8)], 8 mask entries a byte (``np.packbits``, zero-padded).

    Intersections and unions are then byte-wise AND / OR and a popcount (``np.bitwise_count``,
    numpy >= 2.0): ~50x faster than summing bool tensors ([63, 80, 1536]: 1 ms against 47 ms).
    ``masks`` is a CPU bool tensor.
    """
    return np.packbits(masks.numpy(), axis=-1)


def packed_pair_counts(a: np.ndarray, b: np.ndarray, *, empty: float = 0.0) -> PairCounts:
    """Jaccard counts between packed masks a and b, uint8 [pairs, N, W] (b may broadcast over pairs)."""
    inter = np.bitwise_count(a & b).sum(axis=-1, dtype=np.int64)  # [pairs, N]
    union = np.bitwise_count(a | b).sum(axis=-1, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_token = np.where(union > 0, inter / np.maximum(union, 1), float(empty))
    return PairCounts(inter.sum(axis=-1), union.sum(axis=-1), per_token.sum(axis=-1), int(a.shape[1]))


def pair_counts(a: torch.Tensor, b: torch.Tensor, *, empty: float = 0.0) -> PairCounts:
    """Jaccard counts between kept masks a and b, bool [pairs, N, H] (b may broadcast over pairs)."""
    return packed_pair_counts(pack_masks(a), pack_masks(b), empty=empty)


def _rows(kind: str, delta: int, steps: np.ndarray, refs: np.ndarray, c: PairCounts) -> dict[str, np.ndarray]:
    n = len(steps)
    with np.errstate(invalid="ignore", divide="ignore"):
        glob = np.where(c.union > 0, c.intersection / np.maximum(c.union, 1), np.nan)
    return dict(kind=np.full(n, kind, dtype=object), delta=np.full(n, delta, dtype=np.int32),
                step=steps.astype(np.int64), ref_step=refs.astype(np.int64),
                n_intersection=c.intersection.astype(np.int64),
                n_union=c.union.astype(np.int64), token_jaccard_sum=c.token_jaccard_sum,
                n_tokens=np.full(n, c.n_tokens, dtype=np.int64), global_jaccard=glob,
                token_jaccard=c.token_jaccard_sum / max(c.n_tokens, 1))


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {c: np.array([], dtype=object if c == "kind" else np.float64) for c in STABILITY_COLUMNS}
    return {c: np.concatenate([p[c] for p in parts]) for c in STABILITY_COLUMNS}


def mask_stability(masks: torch.Tensor, *, tokens: torch.Tensor | None = None, deltas: Sequence[int] = DELTAS,
                   step_ids: Sequence[int] | None = None, empty: float = 0.0) -> dict[str, np.ndarray]:
    """Jaccard of the kept masks between steps: consecutive, drift from the first step, intervals.

    Args:
        masks: bool [S, ..., H], the kept masks of one layer's site at S consecutive steps.
        tokens: bool of masks' middle shape, tokens compared (None: all), the same at every step.
        deltas: interval lengths Δ (pairs (t-Δ, t)).
        step_ids: the step numbers of ``masks[0..S-1]`` (default 0..S-1).
        empty: token-aware Jaccard of a token whose union is empty (module docstring).

    Returns:
        Columns (:data:`STABILITY_COLUMNS`), one row per pair: ``kind``, ``delta`` (1 for
        consecutive, t - first for drift), ``step`` (later step), ``ref_step``, summed
        ``n_intersection``/``n_union``, ``token_jaccard_sum``, ``n_tokens``, ``global_jaccard``
        (NaN when the union is empty) and ``token_jaccard`` (mean over tokens).

    Raises:
        ActsparseError: masks not bool with at least 3 dims, bad token selection or step ids,
            a Δ < 1.
    """
    if masks.dtype != torch.bool or masks.ndim < 3:
        raise ActsparseError(f"masks must be bool [steps, ..., width], got {masks.dtype} {tuple(masks.shape)}")
    if any(int(d) < 1 for d in deltas):
        raise ActsparseError(f"intervals must be >= 1 step, got {list(deltas)}")
    sel = pack_masks(_token_select(masks, tokens))
    n_steps = sel.shape[0]
    ids = np.arange(n_steps) if step_ids is None else np.asarray(step_ids, dtype=np.int64)
    if ids.shape != (n_steps,):
        raise ActsparseError(f"{len(ids)} step ids for {n_steps} steps")
    parts = []
    if n_steps > 1:
        parts.append(_rows("consecutive", 1, ids[1:], ids[:-1], packed_pair_counts(sel[1:], sel[:-1], empty=empty)))
        drift = packed_pair_counts(sel[1:], sel[:1], empty=empty)
        parts.append(_rows("drift", 0, ids[1:], np.full(n_steps - 1, ids[0]), drift))
        parts[-1]["delta"] = (ids[1:] - ids[0]).astype(np.int32)
    for d in sorted({int(d) for d in deltas}):
        if d < n_steps:
            parts.append(_rows("interval", d, ids[d:], ids[:-d], packed_pair_counts(sel[d:], sel[:-d], empty=empty)))
    return _concat(parts)


def summarize(table: dict[str, np.ndarray]) -> dict[tuple[str, int], tuple[float, float]]:
    """Aggregate a stability table over steps: ``{(kind, delta): (global, token_aware)}``, with
    drift pooled over all steps under delta 0. Global = Σ intersection / Σ union; token-aware =
    Σ token_jaccard_sum / Σ n_tokens (every compared token weighs the same, as the authors'
    ``get_tokenaware_per_step`` / ``get_jaccard_results``)."""
    out = {}
    delta = np.where(table["kind"] == "drift", 0, table["delta"])
    for kind in KINDS:
        for d in sorted(set(delta[table["kind"] == kind].tolist())):
            rows = (table["kind"] == kind) & (delta == d)
            union = table["n_union"][rows].sum()
            out[(kind, int(d))] = (float(table["n_intersection"][rows].sum() / union) if union else math.nan,
                                   float(table["token_jaccard_sum"][rows].sum() / table["n_tokens"][rows].sum()))
    return out


def stability_by_layer(acts_by_layer: Iterable[tuple[int, torch.Tensor]], rule: str, value: float, *,
                       power: float = 1.0, tokens: torch.Tensor | None = None, deltas: Sequence[int] = DELTAS,
                       step_ids: Sequence[int] | None = None, empty: float = 0.0
                       ) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Mask stability and sparsity per step of every layer.

    ``acts_by_layer`` yields ``(layer, acts [S, R, T, H])`` (one layer in memory at a time).
    Returns the :func:`mask_stability` columns of all layers plus a ``layer`` column, and
    ``{layer: sparsity_per_step [S]}``.
    """
    parts, sparsity = [], {}
    for layer, acts in acts_by_layer:
        masks = step_masks(acts, rule, value, power=power)
        table = mask_stability(masks, tokens=tokens, deltas=deltas, step_ids=step_ids, empty=empty)
        table["layer"] = np.full(len(table["step"]), layer, dtype=np.int32)
        parts.append(table)
        sparsity[layer] = sparsity_per_step(masks, tokens)
    if not parts:
        raise ActsparseError("no layers to analyse")
    return {c: np.concatenate([p[c] for p in parts]) for c in (*STABILITY_COLUMNS, "layer")}, sparsity


# --------------------------------------------------------------------------------------------
# In-loop recording (the authors' method)


class StepMaskTracker:
    """Accumulates mask stability while the denoising loop runs, one :meth:`update` per step.

    Keeps the first mask, and the last ``max(deltas)`` masks for the intervals, as the authors'
    hook keeps ``initial_mask`` / ``previous_mask`` (``_update_jaccard_tracking``). :meth:`table`
    returns the same columns as :func:`mask_stability`, equal to it on the same masks.
    """

    def __init__(self, *, tokens: torch.Tensor | None = None, deltas: Sequence[int] = DELTAS, empty: float = 0.0):
        self.tokens, self.empty = tokens, empty
        self.deltas = sorted({int(d) for d in deltas})
        self._history: list[tuple[int, np.ndarray]] = []  # (step, packed mask [N, W]), the last max(deltas)
        self._first: tuple[int, np.ndarray] | None = None
        self._parts: list[dict[str, np.ndarray]] = []

    def _add(self, kind: str, delta: int, step: int, ref: tuple[int, np.ndarray], mask: np.ndarray) -> None:
        c = packed_pair_counts(mask[None], ref[1][None], empty=self.empty)
        self._parts.append(_rows(kind, delta, np.array([step]), np.array([ref[0]]), c))

    def update(self, step: int, mask: torch.Tensor) -> None:
        """Record the kept mask (bool [..., H], one step) of denoising step ``step``."""
        cur = pack_masks(_token_select(mask[None], self.tokens)[0])
        if self._first is None:
            self._first = (step, cur)
        else:
            self._add("consecutive", 1, step, self._history[-1], cur)
            self._add("drift", step - self._first[0], step, self._first, cur)
            for d in self.deltas:
                if len(self._history) >= d:
                    self._add("interval", d, step, self._history[-d], cur)
        self._history.append((step, cur))
        del self._history[: max(len(self._history) - max(self.deltas, default=1), 0)]

    def table(self) -> dict[str, np.ndarray]:
        """The recorded pairs, :data:`STABILITY_COLUMNS`."""
        return _concat(self._parts)
