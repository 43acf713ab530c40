"""An experts implementation of actsparse's own, so that capture and closed-loop sparsification see every routed
(token, slot) row of every expert.

transformers 5 dispatches the forward of fused experts modules through ``ExpertsInterface``
(``transformers.integrations.moe``; ``use_experts_implementation`` reads ``self.config._experts_implementation``
on every call). :func:`experts_override` registers :data:`IMPLEMENTATION` (class-wide: the registry is shared)
and selects it on the experts modules' configs for the duration of a ``with`` block; each selected layer's
call then goes to a handler that runs :func:`routed_forward`: the eager computation of the experts
(``pipeline.expert_ffn``), per expert on rows sorted by expert, with an ``edit`` callback that sees (and may
replace) the input, gate, act, up and intermediate rows. Logits equal the default ``grouped_mm`` path within
float tolerance (0.0 difference in float32 on the tested models; tests/pipeline/test_moe_capture.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import nn

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.expert_ffn import expert_order, grouped_mm
from actsparse.pipeline.moe import MoEArchitecture

IMPLEMENTATION = "actsparse"
"""The name under which the capture / sparsifier experts implementation is registered in ``ExpertsInterface``."""

Handler = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_HANDLERS: dict[int, Handler] = {}  # id(experts module) -> handler, while an override is active


def _dispatch(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
              top_k_weights: torch.Tensor) -> torch.Tensor:
    handler = _HANDLERS.get(id(self))
    if handler is None:
        raise ActsparseError(f"experts implementation {IMPLEMENTATION!r} is selected for a {type(self).__name__} "
                             "outside an actsparse capture or sparsifier")
    return handler(self, hidden_states, top_k_index, top_k_weights)


@contextlib.contextmanager
def experts_override(arch: MoEArchitecture, handlers: Mapping[int, Handler]) -> Iterator[None]:
    """Route the experts call of each MoE layer ``i`` in ``handlers`` to ``handlers[i]`` inside the block.

    A handler is called as ``handler(experts, hidden_states [T, d_model], top_k_index [T, k], top_k_weights
    [T, k])`` and returns the routed output [T, d_model]. Every config's previous implementation is restored on
    exit, also on error.

    Raises:
        ActsparseError: a layer index that is not a MoE layer, or experts already overridden (nesting).
    """
    from transformers.integrations.moe import ExpertsInterface

    by_index = {la.index: la for la in arch.moe_layers}
    unknown = sorted(set(handlers) - set(by_index))
    if unknown:
        raise ActsparseError(f"layers {unknown} are not MoE layers of {arch.model_class}")
    experts = [by_index[i].experts for i in handlers]
    if any(id(e) in _HANDLERS for e in experts):
        raise ActsparseError("an actsparse capture or sparsifier is already active on these experts")
    ExpertsInterface.register(IMPLEMENTATION, _dispatch)
    configs = {id(e.config): e.config for e in experts}
    saved = {key: c._experts_implementation_internal for key, c in configs.items()}
    try:
        for i, handler in handlers.items():
            _HANDLERS[id(by_index[i].experts)] = handler
        for c in configs.values():
            c._experts_implementation_internal = IMPLEMENTATION
        yield
    finally:
        for key, c in configs.items():
            c._experts_implementation_internal = saved[key]
        for e in experts:
            _HANDLERS.pop(id(e), None)


class ExpertsContext:
    """Base of a context manager that routes the experts call of every MoE layer of ``self.arch`` to
    ``self._handler(layer)`` (:func:`experts_override`) and registers the module hooks ``self._hooks()`` returns;
    both are undone on exit, also when entering fails half-way. Subclasses set ``arch``, define ``_handler``
    and ``_hooks``, and may act once entered (``_entered``).

    Raises:
        ActsparseError: entered twice, or as :func:`experts_override`.
    """

    arch: MoEArchitecture
    _stack: contextlib.ExitStack | None = None

    def _handler(self, layer: int) -> Handler:
        raise NotImplementedError

    def _hooks(self) -> list:
        return []

    def _entered(self) -> None:
        """Called once the override and hooks are in place."""

    def __enter__(self):
        if self._stack is not None:
            raise ActsparseError(f"this {type(self).__name__} is already active")
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(experts_override(self.arch, {la.index: self._handler(la.index)
                                                             for la in self.arch.moe_layers}))
            for handle in self._hooks():
                stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._entered()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


@dataclass(frozen=True)
class RoutedRows:
    """The routed (token, slot) rows of one experts call, sorted by expert (stable: token-major within one).

    ``order`` int64 [S] maps sorted row r to the flat slot ``order[r] = token * k + slot``; ``expert_ids``
    int64 [S] are the sorted experts; ``counts`` the rows per expert (``n_experts`` ints).
    """

    order: torch.Tensor
    expert_ids: torch.Tensor
    counts: list[int]
    n_tokens: int
    top_k: int

    @property
    def tokens(self) -> torch.Tensor:
        """Token index (int64 [S]) of each sorted row."""
        return torch.div(self.order, self.top_k, rounding_mode="floor")

    def unsort(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row tensor [S, ...] in sorted order as [T, k, ...] in token / slot order."""
        out = torch.empty_like(t)
        out[self.order] = t
        return out.view(self.n_tokens, self.top_k, *t.shape[1:])


Edit = Callable[[str, torch.Tensor, RoutedRows], torch.Tensor]


def routed_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, edit: Edit | None = None) -> tuple[torch.Tensor, RoutedRows]:
    """The eager experts computation on rows sorted by expert, with an optional edit of each site.

    hidden_states [T, d_model]; top_k_index int [T, k]; top_k_weights [T, k]. ``edit(site, tensor, rows)`` is
    called with the sorted rows [S = T·k, width] of ``input`` (x per slot), ``gate`` (pre-activation),
    ``act``, ``up`` and ``intermediate``, in that order, and returns the tensor to continue with (the same one
    to observe only; the ``gate`` return value is ignored: edit ``act``). Returns the routed output
    [T, d_model] in hidden_states' dtype (slot outputs times their weights, summed over slots, as
    ``grouped_mm_experts_forward`` does) and the :class:`RoutedRows`. Gate and up are rows ``[:d_moe]`` and
    ``[d_moe:]`` of ``gate_up_proj`` (``_default_apply_gate`` chunks them in that order).
    """
    n_tokens, top_k = top_k_index.shape
    order, counts = expert_order(top_k_index, experts.num_experts)
    rows = RoutedRows(order, top_k_index.reshape(-1)[order].long(), counts, n_tokens, top_k)
    edit = edit or (lambda site, t, r: t)

    gate_up_proj, down_proj = experts.gate_up_proj, experts.down_proj
    x = edit("input", hidden_states[rows.tokens].to(gate_up_proj.dtype), rows)
    gate_up = grouped_mm(x, gate_up_proj, counts)
    d_moe = gate_up.shape[1] // 2
    gate, up = gate_up[:, :d_moe], gate_up[:, d_moe:]
    edit("gate", gate, rows)
    act = edit("act", experts.act_fn(gate), rows)
    up = edit("up", up, rows)
    h = edit("intermediate", act * up, rows)
    out = grouped_mm(h, down_proj, counts)
    weighted = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    routed = rows.unsort(weighted).sum(dim=1)
    return routed.to(hidden_states.dtype), rows


def check_top_k(arch: MoEArchitecture, layer: int, top_k_index: torch.Tensor) -> None:
    """Raise ActsparseError unless the router of ``layer`` routed each token to ``arch.top_k`` slots."""
    if top_k_index.ndim != 2 or top_k_index.shape[-1] != arch.top_k:
        raise ActsparseError(f"layer {layer} routed tokens to {tuple(top_k_index.shape)} slots; the resolved "
                             f"layout has top_k={arch.top_k} (routing changed after resolve_moe?)")
