"""Closed-loop sparsification: apply a rule at one FFN target in every layer of a real forward pass.

The hook points are the paper's (docs/paper-notes.md §2), found structurally by ``pipeline.sites.resolve_ffn``
so they work for GLU (``gate_proj``/``up_proj``), fused Phi-3 (``gate_up_proj``) and non-GLU FFNs:

=============  ==============================================================================  ======
target         hook                                                                            width
=============  ==============================================================================  ======
input          x, the FFN input: forward pre-hook on the gate projection; for a GLU the up     d_model
               projection reads the same tensor, and its pre-hook reuses the sparsified x
               computed for the gate (one mask per token, as the authors' pre-hook on ``mlp``)
gate           act(W_g x): forward hook on the activation module (non-GLU: = the intermediate)  d_ff
up             W_u x: forward hook on the up projection (fused: the second half of its output)  d_ff
intermediate   h, the down projection's input: forward pre-hook on ``down_proj``               d_ff
all-inputs     input and intermediate together (h is computed from the sparsified x)           both
=============  ==============================================================================  ======

Entries the rule drops are replaced by zeros (the authors' harness uses ``torch.where``; see
``Sparsifier._apply`` for why a product with the mask gives the same values). Realized
sparsity is counted per token and hook as the number of zeroed entries over the width (zeros in the
activation count as sparse), summed over the positions a caller marks valid (docs/paper-notes.md §1.4).

Top-p on the CPU does not use ``torch.sort``: on SmolLM2-135M's intermediate ([2048, 1536] float32,
one core) ``analyze.rules.topp_mask`` takes about 200 ms, more than the FFN's three matmuls for those
tokens. :func:`topp_mask_fast` sorts the magnitudes' bit patterns with numpy's SIMD integer sort
instead (about 30 ms, of which the sort is two thirds) and is bit-identical to ``topp_mask``
(``make bench-evaluate`` prints both).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import torch

from actsparse.analyze.flat_topp import check_flat_value, flat_topp_mask
from actsparse.analyze.rules import (
    check_block,
    check_rule_value,
    magnitude,
    rule_mask,
    threshold_mask,
    topp_mask,
)
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import CALIBRATED_RULES, FLAT_TOPP, RULES, TARGETS, WEIGHTED_RULES
from actsparse.pipeline.sites import FFNArchitecture

# Every rule runs in closed loop. The calibrated ones (threshold, cett) need a tau per hook point, calibrated
# on a run's stored activations (``analyze.evaluate`` does it when given the run); one absolute tau for every
# layer is not the rule TEAL or the Sparsing Law evaluates.
CLOSED_LOOP_RULES = RULES
# The rules that take one value for every hook: generation, lm-eval tasks and diffusion have no stored run to
# calibrate on.
UNCALIBRATED_RULES = tuple(r for r in RULES if r not in CALIBRATED_RULES)
# Diffusion LMs also take the authors' flattened top-p (one budget per sample: each row of the hooked tensor).
DIFFUSION_RULES = (*UNCALIBRATED_RULES, FLAT_TOPP)

# Non-negative floats order like their bit patterns read as signed integers of the same width, so an
# integer sort of |a| gives exactly the values torch.sort gives (NaN rows are handled separately).
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}
# Below this many rows a thread pool costs more than it saves.
_PARALLEL_ROWS = 256
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _sort_rows(bits: np.ndarray) -> np.ndarray:
    """The bitwise complements of every row of a 2-D integer array, sorted ascending in place.

    ``~x`` reverses integer order, so inverting the result gives each row sorted descending and
    the result itself serves ``searchsorted`` (which needs ascending rows). Rows are split over
    torch's thread count; numpy's sort releases the GIL, and the result does not depend on the split.
    """
    global _pool, _pool_size
    comp = np.invert(bits)
    n_threads = min(torch.get_num_threads(), os.cpu_count() or 1, len(bits) // _PARALLEL_ROWS)
    if n_threads <= 1:
        comp.sort(axis=-1)
    else:
        if _pool is None or _pool_size < n_threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="actsparse-sort")
            _pool_size = n_threads
        parts = np.array_split(np.arange(len(bits)), n_threads)
        list(_pool.map(lambda idx: comp[idx[0]:idx[-1] + 1].sort(axis=-1), parts))
    return comp


def _topp_keep_count(a: torch.Tensor, p: float, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p keep mask (bool, a's shape) and kept entries per token (int64, a's shape without width).

    The kept count comes from a binary search in the sorted row instead of a pass over the mask.
    See :func:`topp_mask_fast` for the numerics; a must be a CPU tensor of a dtype in ``_INT_VIEW``.
    """
    a = a.detach()
    s = magnitude(a, power)
    width = s.shape[-1]
    rows = s.reshape(-1, width)
    int_dtype = _INT_VIEW[s.dtype]
    comp = torch.from_numpy(_sort_rows(rows.view(int_dtype).numpy()))  # ~bits, ascending
    srt = torch.bitwise_not(comp).view(s.dtype)  # |a| descending
    cum = srt.cumsum(dim=-1, dtype=torch.float64)
    total = cum[:, -1:]
    idx = torch.searchsorted(cum, total * p)
    bad = ~torch.isfinite(total[:, 0])
    any_bad = bool(bad.any())
    if any_bad:
        idx = torch.where(bad[:, None], torch.zeros_like(idx), idx)  # any in-range index; rows redone below
    thr = srt.gather(-1, idx)
    keep = rows >= thr
    # s >= thr  <=>  ~bits(s) <= ~bits(thr): count the sorted complements up to ~bits(thr).
    kept = torch.searchsorted(comp, torch.bitwise_not(thr.view(int_dtype)), right=True)[:, 0]
    if any_bad:
        keep[bad] = topp_mask(a.reshape(-1, width)[bad], p, power)
        kept[bad] = keep[bad].sum(dim=-1)
    return keep.reshape(s.shape), kept.reshape(s.shape[:-1])


def topp_mask_fast(a: torch.Tensor, p: float, power: float = 1.0) -> torch.Tensor:
    """Top-p keep mask, bit-identical to ``analyze.rules.topp_mask`` and several times faster on CPU.

    a: [..., width], any float dtype; returns bool of a's shape. Same steps as the authors'
    ``get_topp_mask`` (docs/paper-notes.md §1.2): s = |a| (or |a|**power) in a's dtype, sorted descending, float64
    cumsum, idx = first index with cumsum >= p * total, thr = sorted[idx], keep s >= thr. Two changes
    that do not alter any bit:

    * the sort: s's bit patterns are sorted as integers by numpy (SIMD sort, threads over rows). For
      s >= 0 integer order is float order, so the sorted values are the ones ``torch.sort`` returns;
    * idx comes from ``torch.searchsorted`` on the cumsum (non-decreasing, as every added term is
      >= 0) instead of a comparison over the whole width and an argmax.

    Rows whose total is not finite (NaN or inf entries) are recomputed by ``topp_mask``, whose
    fallbacks define them. Tensors off the CPU go to ``topp_mask`` directly (GPU sorts are fast).
    """
    return keep_and_count("top-p", a, p, power)[0]


def keep_and_count(rule: str, a: torch.Tensor, value: float, power: float = 1.0,
                   norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask of ``rule`` at ``value`` and the kept entries per token, for a block a [..., width].

    Returns bool of a's shape (identical to ``analyze.rules.rule_mask``; top-p as
    :func:`topp_mask_fast`; ``top-p-flat`` as ``analyze.flat_topp.flat_topp_mask``, a sample per index of the
    leading dimension) and int64 of a's shape without the width. A calibrated rule's value is its tau (applied as
    ``threshold``); the WINA rules need ``norms`` [width].
    """
    check_block(a)
    if rule in CALIBRATED_RULES:
        check_rule_value("threshold", value)
        keep = threshold_mask(a, value)
        return keep, keep.sum(dim=-1)
    if rule == FLAT_TOPP:
        if power != 1.0:
            raise ActsparseError(f"power applies only to the top-p rule, not {FLAT_TOPP}")
        keep = flat_topp_mask(a if a.ndim > 2 else a[None], value).reshape(a.shape)
        return keep, keep.sum(dim=-1)
    check_rule_value(rule, value, power)
    if rule == "top-p" and a.device.type == "cpu" and a.dtype in _INT_VIEW:
        return _topp_keep_count(a, value, power)
    keep = rule_mask(rule, a, value, power=power, norms=norms)
    return keep, keep.sum(dim=-1)


def check_closed_loop(target: str, rule: str, values, power: float = 1.0,
                      rules: tuple[str, ...] = CLOSED_LOOP_RULES) -> None:
    """Raise ActsparseError for an unknown target, a rule not among ``rules`` (those usable where it is applied)
    or a bad value (a calibrated rule's values are its targets: sparsities for threshold, relative errors for
    cett, each in [0, 1])."""
    if target not in TARGETS:
        raise ActsparseError(f"unknown target '{target}' (choose {', '.join(TARGETS)})")
    if rule not in rules:
        if rule in CALIBRATED_RULES:
            raise ActsparseError(f"rule '{rule}' needs a per-layer calibrated tau (from a stored run) and is not "
                                 f"supported here (choose {', '.join(rules)})")
        raise ActsparseError(f"unknown rule '{rule}' (choose {', '.join(rules)})")
    for v in values:
        if rule in CALIBRATED_RULES:
            check_rule_value("cett", v)  # a target in [0, 1]
            check_rule_value("top-p", 0.0, power)  # power only for top-p
        elif rule == FLAT_TOPP:
            check_flat_value(v)
            if power != 1.0:
                raise ActsparseError(f"power applies only to the top-p rule, not {FLAT_TOPP}")
        else:
            check_rule_value(rule, v, power)


@dataclass(frozen=True)
class HookPoint:
    """One sparsified tensor: ``site`` (input, gate, up or intermediate) of FFN layer ``layer``."""

    layer: int
    site: str
    width: int


def hook_points(arch: FFNArchitecture, target: str) -> tuple[HookPoint, ...]:
    """The hook points of ``target`` in layer order (all-inputs: input then intermediate per layer).

    Raises:
        ActsparseError: unknown target, or ``up`` on a non-GLU FFN.
    """
    check_closed_loop(target, "top-p", ())
    if target == "up" and not arch.glu:
        raise ActsparseError(f"target 'up' does not exist for a non-GLU FFN (pattern {arch.pattern}); "
                             f"choose from {', '.join(t for t in TARGETS if t != 'up')}")
    sites = ("input", "intermediate") if target == "all-inputs" else (target,)
    return tuple(HookPoint(layer.index, site, arch.d_model if site == "input" else arch.d_ff)
                 for layer in arch.layers for site in sites)


class Sparsifier:
    """Context manager that sparsifies ``target`` with ``rule`` at ``value`` in every FFN layer.

    ``value`` is one rule value for every hook, or a sequence with one value per hook point (in
    :attr:`points` order; :func:`per_hook` expands one value per layer): a per-layer allocation
    (``analyze.allocate``), or the per-hook taus of a calibrated rule (threshold, cett), which must be given
    this way. The WINA rules rank by ``|a_i| * ||W[:, i]||`` with the column norms of the consuming weight
    (``analyze.weighted.consumer_norms``), taken from the model's own FFN weights on entry.

    Usage per batch: ``begin_batch(valid)`` with ``valid`` bool [batch, seq] (positions whose
    sparsity is counted: not padding, not special), run the model, then ``end_batch()`` returns the
    zeroed-entry counts int64 [n_hooks, batch] summed over each sequence's valid positions, hooks in
    :attr:`points` order. Every hook point must fire exactly once per batch (P11: hooks registered
    after ``torch.compile`` are skipped silently), else ``end_batch`` raises. Hooks are removed on exit.

    ``rules``: the rules accepted (``DIFFUSION_RULES`` adds the flattened top-p for diffusion LMs).

    Raises:
        ActsparseError: unknown target or rule, a value out of range, ``up`` on a non-GLU FFN.
    """

    def __init__(self, arch: FFNArchitecture, target: str, rule: str, value, *, power: float = 1.0,
                 rules: tuple[str, ...] = CLOSED_LOOP_RULES) -> None:
        self.points = hook_points(arch, target)
        if isinstance(value, int | float):
            if rule in CALIBRATED_RULES:
                raise ActsparseError(f"rule {rule} needs a calibrated tau per hook point (one value per layer), "
                                     "not one value for every layer")
            values = [float(value)] * len(self.points)
        else:
            values = [float(v) for v in value]
            if len(values) != len(self.points):
                raise ActsparseError(f"{len(values)} rule values for {len(self.points)} hook points of target "
                                     f"{target}")
        if rule in CALIBRATED_RULES:
            check_closed_loop(target, rule, (), power, rules)
            for v in values:
                check_rule_value("threshold", v)
        else:
            check_closed_loop(target, rule, values, power, rules)
        self.arch, self.target, self.rule, self.power = arch, target, rule, float(power)
        self.values = values
        self.value = values[0] if len(set(values)) == 1 else None  # one value for all hooks, else None
        self._norms: list[torch.Tensor | None] = [None] * len(self.points)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._valid: torch.Tensor | None = None
        self._counts: list[torch.Tensor | None] = [None] * len(self.points)
        self._fired = [0] * len(self.points)
        # Per layer: (dense x, sparsified x) from the gate projection's pre-hook, reused by the up
        # projection's pre-hook when it receives the very same tensor object.
        self._x_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _apply(self, k: int, t: torch.Tensor) -> torch.Tensor:
        keep, kept = keep_and_count(self.rule, t, self.values[k], self.power, self._norms[k])
        self._fired[k] += 1
        if self._valid is not None:
            sparse = t.shape[-1] - kept
            # OPT-style FFNs see tokens flattened to [batch * seq, width].
            valid = self._valid.reshape(sparse.shape)
            self._counts[k] = (sparse * valid).reshape(self._valid.shape[0], -1).sum(dim=-1)
        # Dropped entries are finite (inf magnitudes are always kept), so multiplying by the mask equals
        # the authors' torch.where(keep, t, 0) up to the sign of zero, at a third of its cost on CPU.
        return t * keep

    def _register(self, k: int, point: HookPoint) -> list[torch.utils.hooks.RemovableHandle]:
        layer = self.arch.layers[point.layer]
        d_ff = self.arch.d_ff
        fused = self.arch.pattern == "glu-fused"
        if point.site == "input":
            def pre_input(module, args):
                x = args[0]
                cached = self._x_cache.get(point.layer)
                if cached is not None and cached[0] is x:
                    return (cached[1], *args[1:])
                y = self._apply(k, x)
                self._x_cache[point.layer] = (x, y)
                return (y, *args[1:])

            modules = [layer.gate] + ([layer.up] if layer.up is not None else [])
            return [m.register_forward_pre_hook(pre_input) for m in modules]
        if point.site == "gate":
            return [layer.act.register_forward_hook(lambda m, args, out: self._apply(k, out))]
        if point.site == "up":
            if fused:
                # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1); sparsify the up half only.
                def fused_up(m, args, out):
                    return torch.cat([out[..., :d_ff], self._apply(k, out[..., d_ff:])], dim=-1)

                return [layer.gate.register_forward_hook(fused_up)]
            return [layer.up.register_forward_hook(lambda m, args, out: self._apply(k, out))]
        return [layer.down.register_forward_pre_hook(lambda m, args: (self._apply(k, args[0]), *args[1:]))]

    def begin_batch(self, valid: torch.Tensor | None) -> None:
        """Start a batch; ``valid`` bool [batch, seq] selects the counted positions (None: count nothing)."""
        self._valid = None if valid is None else valid.bool()
        self._counts = [None] * len(self.points)
        self._fired = [0] * len(self.points)
        self._x_cache.clear()

    def end_batch(self) -> torch.Tensor | None:
        """Zeroed-entry counts int64 [n_hooks, batch] of the batch (None when ``valid`` was None).

        Raises:
            ActsparseError: a hook point fired other than exactly once.
        """
        self._x_cache.clear()
        wrong = [(p, n) for p, n in zip(self.points, self._fired) if n != 1]
        if wrong:
            shown = ", ".join(f"{p.site}@{p.layer}={n}" for p, n in wrong[:5])
            raise ActsparseError(f"{len(wrong)} of {len(self.points)} sparsification hooks did not fire exactly once "
                                 f"({shown}); hooks registered after torch.compile are skipped")
        if self._valid is None:
            return None
        return torch.stack(self._counts)

    def __enter__(self) -> Sparsifier:
        if self._handles:
            raise ActsparseError("this Sparsifier is already active")
        if self.rule in WEIGHTED_RULES and self._norms[0] is None:
            self._norms = _wina_norms(self.arch, self.points)
        try:
            for k, point in enumerate(self.points):
                self._handles.extend(self._register(k, point))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._x_cache.clear()


def per_hook(arch: FFNArchitecture, target: str, layer_values) -> list[float]:
    """One value per layer (a sequence indexed by layer) expanded to one per hook point of ``target``
    (all-inputs: both hooks of a layer take its value)."""
    values = list(layer_values)
    if len(values) != len(arch.layers):
        raise ActsparseError(f"{len(values)} per-layer values for a model with {len(arch.layers)} FFN layers")
    return [float(values[p.layer]) for p in hook_points(arch, target)]


def _wina_norms(arch: FFNArchitecture, points) -> list[torch.Tensor]:
    """Per hook point, the column norms of the weight consuming it, from the model's own FFN weights
    (``analyze.weighted.consumer_norms``; computed in float32, kept on the weights' device)."""
    from actsparse.analyze.weighted import consumer_norms
    from actsparse.pipeline.ffn import ffn_weights

    out, layer, weights = [], None, None
    for p in points:  # in layer order: one layer's float32 copy at a time
        if p.layer != layer:
            layer, weights = p.layer, ffn_weights(arch, p.layer)
        out.append(consumer_norms(weights, p.site))
    return out
