"""Capture of a mixture-of-experts model's FFN sites: per routed slot, per shared expert, per dense layer.

Each MoE layer's experts call runs ``pipeline.experts.routed_forward`` through ``experts_override``; the
shared expert, the block output and the dense layers of mixed models are captured with module hooks. The
sink receives every tensor under the name of the array that stores it (``actsparse.core.format``), with its
decoder layer and its tokens first (``T`` = batch·seq tokens in the block's flattening order, batch-major):

=======================================  ==================  ================================================
name                                      shape               meaning
=======================================  ==================  ================================================
``input``                                 [T, d_model]        the FFN input x (the router's input), any layer
``output``                                [T, d_model]        the FFN (MoE block) output, shared expert included
``routed/expert_id``                      int64 [T, k]        routed expert of each slot
``routed/weight``                         [T, k]              its routing weight (the router's dtype)
``routed/<site>``                         [T, k, d_moe]       gate (pre-activation), act, up, intermediate of
                                                              the slot's expert
``shared/<site>``                         [T, d_shared]       the shared expert's sites (its input is x)
``shared/weight``                         [T]                 sigmoid(shared_expert_gate(x))
``dense/<site>``                          [T, d_ff_dense]     a dense layer's sites (mixed models)
=======================================  ==================  ================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES
from actsparse.pipeline.experts import ExpertsContext, Handler, check_top_k, routed_forward
from actsparse.pipeline.moe import DenseLayer, MoEArchitecture, MoELayer
from actsparse.pipeline.recorder import FireCounts

Sink = Callable[[str, int, torch.Tensor], None]
_SHARED_WEIGHT = fmt.moe_array(fmt.SHARED, fmt.ROUTING_WEIGHT)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])


class MoERecorder(FireCounts, ExpertsContext):
    """Context manager that captures the requested ``sites`` of every FFN layer of a MoE model.

    ``sink(name, layer, tensor)`` receives the tensors of the module docstring's table (detached, in the
    model's dtype; routed sites freshly allocated in token / slot order); ``routed/expert_id`` and
    ``routed/weight`` (and ``shared/weight``) always, the others for the requested sites. Fires are counted
    per (name, layer); :meth:`check_fired` asserts each fired ``expected`` times since :meth:`reset_counts`
    (docs/pitfalls.md P11; ``pipeline.recorder.FireCounts``). The model's experts implementation and all hooks are
    restored on exit.

    Raises:
        ActsparseError: an empty or unknown ``sites``; at run time (from inside the forward) a top-k other
            than the resolved one.
    """

    _what = "MoE capture points"

    def __init__(self, arch: MoEArchitecture, sites: Sequence[str], sink: Sink) -> None:
        sites = tuple(dict.fromkeys(sites))
        unknown = [s for s in sites if s not in SITES]
        if not sites or unknown:
            raise ActsparseError(f"unknown or no capture sites {unknown or list(sites)}; "
                                 f"choose from {', '.join(SITES)}")
        self.arch, self.sites, self._sink = arch, sites, sink
        self._expert_sites = tuple(s for s in fmt.EXPERT_SITES if s in sites)
        self._counts = dict.fromkeys(self._expected(), 0)

    def _entered(self) -> None:
        self.reset_counts()

    def _expected(self) -> list[tuple[str, int]]:
        keys = []
        for la in self.arch.layers:
            names = [s for s in ("input", "output") if s in self.sites]
            if isinstance(la, MoELayer):
                names += [fmt.moe_array(fmt.ROUTED, n) for n in (fmt.EXPERT_ID, fmt.ROUTING_WEIGHT,
                                                                  *self._expert_sites)]
                if la.shared is not None:
                    names += [fmt.moe_array(fmt.SHARED, n) for n in (*self._expert_sites, fmt.ROUTING_WEIGHT)]
            else:
                names += [fmt.moe_array(fmt.DENSE, s) for s in self._expert_sites]
            keys += [(name, la.index) for name in names]
        return keys

    def _emit(self, name: str, layer: int, tensor: torch.Tensor) -> None:
        self._counts[(name, layer)] += 1
        self._sink(name, layer, tensor)

    def _handler(self, layer: int) -> Handler:
        wanted = set(self._expert_sites)

        def handler(experts, hidden_states, top_k_index, top_k_weights):
            check_top_k(self.arch, layer, top_k_index)
            recorded: dict[str, torch.Tensor] = {}

            def edit(site, t, rows):
                if site in wanted:
                    recorded[site] = t
                return t

            out, rows = routed_forward(experts, hidden_states, top_k_index, top_k_weights, edit)
            self._emit(fmt.moe_array(fmt.ROUTED, fmt.EXPERT_ID), layer, top_k_index.detach().long())
            self._emit(fmt.moe_array(fmt.ROUTED, fmt.ROUTING_WEIGHT), layer, top_k_weights.detach())
            if "input" in self.sites:
                self._emit("input", layer, hidden_states.detach())
            for site in self._expert_sites:
                self._emit(fmt.moe_array(fmt.ROUTED, site), layer, rows.unsort(recorded[site].detach()))
            return out

        return handler

    def _glu_hooks(self, mlp: nn.Module, layer: int, group: str | None) -> list:
        """Hooks on a dense GLU's modules: its expert sites under ``group`` (``shared`` or ``dense``), and for a
        dense layer (``group`` ``dense``) its ``input`` and ``output`` too."""
        emit, handles = self._emit, []
        hooks = {"gate": (mlp.gate_proj, "out"), "act": (mlp.act_fn, "out"), "up": (mlp.up_proj, "out"),
                 "intermediate": (mlp.down_proj, "in")}
        named = {fmt.moe_array(group, s): where for s, where in hooks.items() if s in self._expert_sites}
        if group == fmt.DENSE:
            named |= {s: w for s, w in (("input", (mlp.gate_proj, "in")), ("output", (mlp.down_proj, "out")))
                      if s in self.sites}
        for name, (module, where) in named.items():
            if where == "in":
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: emit(name, layer, _flat(args[0]))))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, name=name: emit(name, layer, _flat(out))))
        return handles

    def _hooks(self) -> list:
        handles = []
        for la in self.arch.layers:
            if isinstance(la, DenseLayer):
                handles += self._glu_hooks(la.mlp, la.index, fmt.DENSE)
                continue
            if "output" in self.sites:
                handles.append(la.block.register_forward_hook(
                    lambda m, args, out, i=la.index: self._emit("output", i, _flat(out))))
            if la.shared is not None:
                handles += self._glu_hooks(la.shared, la.index, fmt.SHARED)
                handles.append(la.shared_gate.register_forward_hook(
                    lambda m, args, out, i=la.index: self._emit(_SHARED_WEIGHT, i,
                                                                torch.sigmoid(out.detach()).reshape(-1))))
        return handles
