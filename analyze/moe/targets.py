"""One target and one rule value on one mixture-of-experts layer, recomputed from its input: the block-output
error, the entries each routed row (and the shared expert) drops, and each expert's own output error.

Targets, as the closed loop (``analyze.moe_sparsifier``) applies them inside every expert and the shared expert
(docs/paper-notes.md §1.1, §2):

=============  ==================================================  =========================================
target         sparsified tensor per routed row (token t, slot j)  recomputed expert FFN
=============  ==================================================  =========================================
input          x_t (the same vector for each of t's slots)         W_d[e](act(W_g[e] x') * W_u[e] x')
gate           a = act(W_g[e] x_t)                                  W_d[e]((m*a) * u)
up             u = W_u[e] x_t                                       W_d[e](a * (m*u))
intermediate   h = a * u                                            W_d[e](m*h)
all-inputs     x_t, then h' computed from the sparsified x          W_d[e](m' * h')
=============  ==================================================  =========================================

The router (and Qwen2-MoE's ``shared_expert_gate``) always sees the dense x: routing does not change. The block
output is ``y_t = Σ_j w_tj · W_d[e_tj] h_tj + s_t · W_sd h_st`` (``pipeline.expert_ffn.block_output``). Errors
come from the dropped part ``dy = y - y'`` (as ``analyze.curves`` does): ``rel_err = ||dy|| / ||y||`` (0 where
y = 0) and ``cos(y, y - dy)`` per token; per routed row the expert's own output error
``||W_d[e](h - h')|| / ||W_d[e] h||``.

This is the per-value path: every grid value recomputes the experts (what ``input`` and ``all-inputs`` need);
the linear targets sweep a whole grid at once in ``analyze.moe.linear``, and the tests hold the two together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import TARGETS
from actsparse.pipeline.expert_ffn import grouped_linear, routed_from_rows, shared_sites

Keep = Callable[[torch.Tensor], torch.Tensor]
"""A rule at one value: maps a tensor [..., width] to a bool keep mask of its shape, per row."""
Keeps = Keep | Mapping[str, Keep]
"""One rule for every hook site, or one per hook site (the threshold rule calibrates each: ``{"input": ...,
"intermediate": ...}`` for all-inputs)."""
HOOK_SITES = {"input": ("input",), "gate": ("gate",), "up": ("up",), "intermediate": ("intermediate",),
              "all-inputs": ("input", "intermediate")}
"""The hook sites a target sparsifies (``gate``: the activation output), in forward order."""


@dataclass(frozen=True)
class TargetResult:
    """Per-token results of one target and rule value on one MoE layer's block of T tokens.

    ``rel_err``, ``cos``, ``dropped_norm`` (||dy||) float64 [T] compare the block outputs; ``slot_rel_err``
    float64 [T, k] each routed expert's own output. ``zeroed`` maps each hook site of the target to the entries
    zeroed per routed row, int64 [T, k], ``widths`` to that hook's width. ``kept_mass`` / ``total_mass`` float64
    [T]: the L1 mass of every hooked tensor of the token (its k rows and the shared expert's) kept and in all.
    ``shared_zeroed`` int64 [T] / ``shared_widths`` / ``shared_rel_err`` float64 [T] are the shared expert's
    (empty / None without one).
    """

    target: str
    rel_err: torch.Tensor
    cos: torch.Tensor
    dropped_norm: torch.Tensor
    slot_rel_err: torch.Tensor
    zeroed: dict[str, torch.Tensor]
    widths: dict[str, int]
    kept_mass: torch.Tensor
    total_mass: torch.Tensor
    shared_zeroed: dict[str, torch.Tensor]
    shared_widths: dict[str, int]
    shared_rel_err: torch.Tensor | None


def masked(keep: Keep, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t with dropped entries zeroed, entries zeroed per row int64, kept L1 per row, L1 per row)`` (float64).

    Raises:
        ActsparseError: the rule returned no bool mask of t's shape.
    """
    mask = keep(t)
    if mask.shape != t.shape or mask.dtype != torch.bool:
        raise ActsparseError(f"the rule returned a {mask.dtype} mask of shape {tuple(mask.shape)} for activations "
                             f"of shape {tuple(t.shape)}; expected a bool mask of the same shape")
    mag = t.abs().double()
    return t * mask, t.shape[-1] - mask.sum(dim=-1), (mag * mask).sum(dim=-1), mag.sum(dim=-1)


class _Sites:
    """Sparsified h' and the per-row tallies of one expert FFN's rows (routed or shared)."""

    def __init__(self, target: str, keep: Keeps, x_rows: torch.Tensor, dense: Mapping[str, torch.Tensor],
                 recompute: Callable[[torch.Tensor], torch.Tensor]):
        self.zeroed: dict[str, torch.Tensor] = {}
        self.widths: dict[str, int] = {}
        self.kept = self.total = torch.zeros(dense["intermediate"].shape[:-1], dtype=torch.float64)
        if target == "intermediate":
            self.h = self._drop(keep, "intermediate", dense["intermediate"])
        elif target == "gate":
            self.h = self._drop(keep, "gate", dense["act"]) * dense["up"]
        elif target == "up":
            self.h = dense["act"] * self._drop(keep, "up", dense["up"])
        else:
            h = recompute(self._drop(keep, "input", x_rows))
            self.h = h if target == "input" else self._drop(keep, "intermediate", h)

    def _drop(self, keep: Keeps, site: str, t: torch.Tensor) -> torch.Tensor:
        sparse, zeroed, kept, total = masked(keep[site] if isinstance(keep, Mapping) else keep, t)
        self.zeroed[site], self.widths[site] = zeroed, t.shape[-1]
        self.kept, self.total = self.kept + kept, self.total + total
        return sparse


def rel_norm(dropped: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``||dropped|| / ||full||`` per row in float64, 0 where ``full`` is 0."""
    d, f = dropped.double().norm(dim=-1), full.double().norm(dim=-1)
    return torch.where(f > 0, d / f.clamp_min(1e-300), torch.zeros_like(d))


def check_inputs(x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
                 weights: Mapping[str, torch.Tensor], sites: Mapping[str, torch.Tensor]) -> None:
    """Raise ActsparseError unless the block's tensors fit together: x [T, d_model], expert_ids and routing
    weights [T, k], ids within the experts of ``weights``, stored per-slot sites [T, k, d_moe]."""
    if x.ndim != 2 or expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ActsparseError(f"expected input [T, d_model] and expert_id [T, k], got {tuple(x.shape)} and "
                             f"{tuple(expert_ids.shape)}")
    if routing_weights.shape != expert_ids.shape:
        raise ActsparseError(f"routing weights {tuple(routing_weights.shape)} do not match expert_id "
                             f"{tuple(expert_ids.shape)}")
    n_experts, d_moe, d_model = weights["gate"].shape
    if x.shape[1] != d_model:
        raise ActsparseError(f"input width {x.shape[1]} does not match the expert weights' d_model {d_model}")
    if expert_ids.numel() and not (int(expert_ids.min()) >= 0 and int(expert_ids.max()) < n_experts):
        raise ActsparseError(f"expert ids outside [0, {n_experts}) in the stored expert_id")
    for site in ("gate", "act", "up", "intermediate"):
        if site in sites and tuple(sites[site].shape) != (*expert_ids.shape, d_moe):
            raise ActsparseError(f"stored {site} has shape {tuple(sites[site].shape)}, expected "
                                 f"{(*expert_ids.shape, d_moe)} (the top-k of expert_id and d_moe of the weights)")


def target_error(target: str, keep: Keeps, x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
                 weights: Mapping[str, torch.Tensor], activation: str, sites: Mapping[str, torch.Tensor] | None = None,
                 *, keep_shared: Keeps | None = None) -> TargetResult:
    """Sparsify ``target`` with ``keep`` in every routed expert (and the shared expert) of one MoE layer.

    Args:
        target: one of ``actsparse.core.vocab.TARGETS``.
        keep: the rule at one value (:data:`Keeps`: one for every hook site, or one per site);
            ``keep_shared`` the shared expert's (default ``keep``; the threshold rule calibrates one per unit).
        x: the FFN input [T, d_model]; expert_ids int [T, k]; routing_weights [T, k].
        weights: as ``pipeline.moe_weights.moe_weights`` (a shared expert is included when it has ``shared_*``
            keys).
        activation: an ACT2FN key.
        sites: stored tensors under their site names (``gate``/``act``/``up``/``intermediate`` [T, k, d_moe],
            ``shared_act``/``shared_up``/``shared_intermediate`` [T, d_shared], ``shared_weight`` [T]); missing
            ones are recomputed from x. Everything is computed in float32, norms in float64.

    Raises:
        ActsparseError: unknown target, inconsistent shapes (e.g. a top-k that differs between stored tensors),
            expert ids out of range, a rule that does not return a bool mask of its input's shape.
    """
    if target not in TARGETS:
        raise ActsparseError(f"unknown target '{target}' (choose {', '.join(TARGETS)})")
    sites = dict(sites or {})
    check_inputs(x, expert_ids, routing_weights, weights, sites)
    dtype = weights["gate"].dtype
    x = x.to(dtype)
    expert_ids = expert_ids.long()
    routing = routing_weights.to(dtype)[..., None]
    x_rows = x[:, None, :].expand(-1, expert_ids.shape[1], -1)
    need = ("act", "up", "intermediate")
    routed = {s: sites[s].to(dtype) for s in need if s in sites}
    if len(routed) < len(need):
        routed = routed_from_rows(x_rows, expert_ids, weights, activation) | routed

    sp = _Sites(target, keep, x_rows, routed,
                lambda rows: routed_from_rows(rows, expert_ids, weights, activation)["intermediate"])
    h = routed["intermediate"]
    slot_out = grouped_linear(h, expert_ids, weights["down"])
    slot_drop = grouped_linear(h - sp.h, expert_ids, weights["down"])
    y, dy = (slot_out * routing).sum(dim=1), (slot_drop * routing).sum(dim=1)
    kept, total = sp.kept.sum(dim=1), sp.total.sum(dim=1)

    shared_zeroed, shared_widths, shared_rel = {}, {}, None
    if "shared_gate" in weights:
        names = ("shared_act", "shared_up", "shared_intermediate", "shared_weight")
        shared = {s: sites[s].to(dtype) for s in names if s in sites}
        if len(shared) < len(names):
            shared = shared_sites(x, weights, activation) | shared
        plain = {s: shared[f"shared_{s}"] for s in need}
        ss = _Sites(target, keep_shared or keep, x, plain,
                    lambda rows: shared_sites(rows, weights, activation)["shared_intermediate"])
        s_out = plain["intermediate"] @ weights["shared_down"].T
        s_drop = (plain["intermediate"] - ss.h) @ weights["shared_down"].T
        s = shared["shared_weight"][:, None]
        y, dy = y + s * s_out, dy + s * s_drop
        shared_zeroed, shared_widths, shared_rel = ss.zeroed, ss.widths, rel_norm(s_drop, s_out)
        kept, total = kept + ss.kept, total + ss.total

    cos = torch.nn.functional.cosine_similarity(y.double(), (y - dy).double(), dim=-1)
    return TargetResult(target, rel_norm(dy, y), cos, dy.double().norm(dim=-1), rel_norm(slot_drop, slot_out),
                        sp.zeroed, sp.widths, kept, total, shared_zeroed, shared_widths, shared_rel)
