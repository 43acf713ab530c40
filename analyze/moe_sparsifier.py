"""Closed-loop sparsification of mixture-of-experts models: a rule applied inside every expert, the shared expert
and every dense FFN of a real forward pass.

Every MoE layer's experts call runs ``pipeline.experts.routed_forward`` (through ``experts_override``) with the
rule applied to the target of each routed (token, slot) row, so each expert sees exactly what a hook on a
per-expert module would see (the authors' ``experts.E`` hooks, docs/paper-notes.md §2); the shared expert and the
dense FFNs of mixed models are sparsified with module hooks at the same target:

=============  ================================================  ==========================================
target         routed rows (per expert)                          shared expert / dense FFN (module hooks)
=============  ================================================  ==========================================
input          x per routed row                                  pre-hook on the FFN module (its input x)
gate           act(W_g x) (the ``act`` site)                     output of ``act_fn``
up             W_u x                                             output of ``up_proj``
intermediate   act * up, the down projection's input             pre-hook on ``down_proj``
all-inputs     input, then intermediate (from the sparse x)      both
=============  ================================================  ==========================================

The router and ``shared_expert_gate`` see the dense x, so routing is the dense model's routing given the
(sparsified) residual stream. Dropped entries are zeroed by multiplying with the keep mask, as
``analyze.sparsifier.Sparsifier`` does, and the mask is ``analyze.sparsifier.keep_and_count``'s (bit-identical
to ``analyze.rules``). Realized sparsity is counted as the authors count it (``analyze.moe.counting``): per hook
(layer, expert or shared or dense, site) the entries zeroed and the rows seen, over the positions a caller marks
valid, per sequence. Top-p at p = 1 drops exact zeros and entries too small to change the row's float64 L1 sum,
so its logits equal the dense capture path's bit for bit (tests/analyze/test_moe_closed_loop.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from actsparse.analyze.moe.targets import HOOK_SITES
from actsparse.analyze.sparsifier import check_closed_loop, keep_and_count
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.experts import ExpertsContext, RoutedRows, check_top_k, routed_forward
from actsparse.pipeline.moe import DenseLayer, MoEArchitecture, MoELayer

# routed_forward's site names -> hook sites (the target vocabulary: the gate target is the act output).
_ROUTED_HOOK = {"input": "input", "act": "gate", "up": "up", "intermediate": "intermediate"}
# One value for every expert: no per-expert calibration, no consuming-weight norms per expert.
MOE_RULES = ("top-p", "top-k", "max-p")


@dataclass(frozen=True)
class MoEHookPoint:
    """One counted hook: ``site`` of expert ``expert`` (unit ``expert``) or of the ``shared`` expert or a ``dense``
    FFN (``expert`` = -1) in decoder layer ``layer``, ``width`` entries per row."""

    layer: int
    unit: str
    expert: int
    site: str
    width: int

    def describe(self) -> dict:
        """The hook as an evaluation's ``config.json`` lists it."""
        return asdict(self)


def hook_points(arch: MoEArchitecture, target: str) -> tuple[MoEHookPoint, ...]:
    """The counted hooks of ``target`` in layer order: per MoE layer and site the experts 0..E-1, then the
    shared expert's sites; per dense layer its sites.

    Raises:
        ActsparseError: unknown target.
    """
    check_closed_loop(target, "top-p", ())
    sites = HOOK_SITES[target]
    points = []
    for la in arch.layers:
        if isinstance(la, MoELayer):
            for site in sites:
                width = arch.d_model if site == "input" else arch.d_moe
                points += [MoEHookPoint(la.index, "expert", e, site, width) for e in range(arch.n_experts)]
            if la.shared is not None:
                points += [MoEHookPoint(la.index, "shared", -1, s, arch.d_model if s == "input" else arch.d_shared)
                           for s in sites]
        else:
            points += [MoEHookPoint(la.index, "dense", -1, s, arch.d_model if s == "input" else arch.d_ff_dense)
                       for s in sites]
    return tuple(points)


class MoESparsifier(ExpertsContext):
    """Context manager that sparsifies ``target`` with ``rule`` at ``value`` in every FFN of a MoE model.

    The interface of ``analyze.sparsifier.Sparsifier``: per batch ``begin_batch(valid)`` with ``valid`` bool
    [batch, seq] (None: count nothing), run the model, ``end_batch()`` returns the entries zeroed int64
    [n_points, batch] summed over each sequence's valid positions, points in :attr:`points` order; then
    :attr:`rows` holds the rows each point saw, int64 [n_points, batch] (an expert sees only the rows routed to
    it). Every MoE layer's experts call and every module hook must fire exactly once per batch, else
    ``end_batch`` raises (docs/pitfalls.md P11). The experts implementation and hooks are restored on exit.

    Raises:
        ActsparseError: unknown target or rule, a value out of range; at run time a top-k other than the
            resolved one, or a ``valid`` mask whose size differs from the tokens of the forward.
    """

    def __init__(self, arch: MoEArchitecture, target: str, rule: str, value: float, *, power: float = 1.0) -> None:
        check_closed_loop(target, rule, (value,), power, MOE_RULES)
        self.arch, self.target, self.rule, self.value, self.power = arch, target, rule, float(value), float(power)
        self.sites = HOOK_SITES[target]
        self.points = hook_points(arch, target)
        self._index = {(p.layer, p.unit, p.expert, p.site): k for k, p in enumerate(self.points)}
        self._groups = sorted({(p.layer, p.unit) for p in self.points})
        self._valid: torch.Tensor | None = None
        self._zeroed = self.rows = torch.zeros(0, dtype=torch.int64)
        self._fired: dict[tuple[int, str, str], int] = {}

    def _apply(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t with dropped entries zeroed, entries zeroed per row)``."""
        keep, kept = keep_and_count(self.rule, t, self.value, self.power)
        return t * keep, t.shape[-1] - kept

    def _count(self, first: int, n_units: int, units: torch.Tensor, tokens: torch.Tensor, zeroed: torch.Tensor,
               n_tokens: int) -> None:
        """Add the per-row ``zeroed`` of rows (token ``tokens`` of the forward's ``n_tokens``, unit ``units``)
        to points ``first .. first + n_units - 1``, per sequence."""
        if self._valid is None:
            return
        batch, seq = self._valid.shape
        if batch * seq != n_tokens:
            raise ActsparseError(f"the valid mask covers {batch}x{seq} tokens, the forward {n_tokens}")
        v = self._valid.reshape(-1).long()[tokens]
        flat = units * batch + torch.div(tokens, seq, rounding_mode="floor")
        size = n_units * batch
        z = torch.zeros(size, dtype=torch.int64).index_add_(0, flat, zeroed.long() * v)
        r = torch.zeros(size, dtype=torch.int64).index_add_(0, flat, v)
        self._zeroed[first:first + n_units] += z.view(n_units, batch)
        self.rows[first:first + n_units] += r.view(n_units, batch)

    def _fire(self, layer: int, unit: str, site: str) -> None:
        self._fired[(layer, unit, site)] = self._fired.get((layer, unit, site), 0) + 1

    def _handler(self, layer: int):
        def handler(experts, hidden_states, top_k_index, top_k_weights):
            check_top_k(self.arch, layer, top_k_index)

            def edit(site: str, t: torch.Tensor, rows: RoutedRows) -> torch.Tensor:
                hook = _ROUTED_HOOK.get(site)
                if hook not in self.sites:
                    return t
                self._fire(layer, "expert", hook)
                sparse, zeroed = self._apply(t)
                self._count(self._index[(layer, "expert", 0, hook)], self.arch.n_experts, rows.expert_ids.cpu(),
                            rows.tokens.cpu(), zeroed.cpu(), rows.n_tokens)
                return sparse

            return routed_forward(experts, hidden_states, top_k_index, top_k_weights, edit)[0]

        return handler

    def _module_hooks(self, mlp: nn.Module, layer: int, unit: str) -> list:
        handles = []
        for site in self.sites:
            first = self._index[(layer, unit, -1, site)]

            def apply(t: torch.Tensor, site=site, first=first) -> torch.Tensor:
                self._fire(layer, unit, site)
                sparse, zeroed = self._apply(t)
                zeroed = zeroed.reshape(-1).cpu()
                tokens = torch.arange(zeroed.shape[0])
                self._count(first, 1, torch.zeros_like(tokens), tokens, zeroed, zeroed.shape[0])
                return sparse

            if site == "input":
                handles.append(mlp.register_forward_pre_hook(lambda m, args, f=apply: (f(args[0]), *args[1:])))
            elif site == "gate":
                handles.append(mlp.act_fn.register_forward_hook(lambda m, args, out, f=apply: f(out)))
            elif site == "up":
                handles.append(mlp.up_proj.register_forward_hook(lambda m, args, out, f=apply: f(out)))
            else:
                handles.append(mlp.down_proj.register_forward_pre_hook(
                    lambda m, args, f=apply: (f(args[0]), *args[1:])))
        return handles

    def _entered(self) -> None:
        self.begin_batch(None)

    def _hooks(self) -> list:
        """The module hooks of the shared experts and dense FFNs."""
        handles = []
        for la in self.arch.layers:
            if isinstance(la, DenseLayer):
                handles += self._module_hooks(la.mlp, la.index, "dense")
            elif la.shared is not None:
                handles += self._module_hooks(la.shared, la.index, "shared")
        return handles

    def begin_batch(self, valid: torch.Tensor | None) -> None:
        """Start a batch; ``valid`` bool [batch, seq] selects the counted positions (None: count nothing)."""
        self._valid = None if valid is None else valid.detach().bool().cpu()
        batch = 0 if valid is None else valid.shape[0]
        self._zeroed = torch.zeros(len(self.points), batch, dtype=torch.int64)
        self.rows = torch.zeros(len(self.points), batch, dtype=torch.int64)
        self._fired = {}

    def end_batch(self) -> torch.Tensor | None:
        """Entries zeroed int64 [n_points, batch] of the batch (None when ``valid`` was None); :attr:`rows` then
        holds the rows each point saw.

        Raises:
            ActsparseError: a MoE layer's experts or a module hook fired other than exactly once.
        """
        expected = {(la, unit, s) for la, unit in self._groups for s in self.sites}
        wrong = sorted((key, self._fired.get(key, 0)) for key in expected if self._fired.get(key, 0) != 1)
        if wrong:
            shown = ", ".join(f"{unit}.{site}@{layer}={n}" for (layer, unit, site), n in wrong[:5])
            raise ActsparseError(f"{len(wrong)} of {len(expected)} MoE sparsification points did not fire exactly "
                                 f"once ({shown}); hooks registered after torch.compile are skipped (P11)")
        return None if self._valid is None else self._zeroed.clone()
