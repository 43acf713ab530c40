"""The FFN of a mixture-of-experts block as plain tensors: grouped per-expert projections, the routed and
shared experts' sites, and the block output.

Shared by the capture (``pipeline.experts.routed_forward`` computes the experts inside the model with
:func:`grouped_mm`) and the offline analysis (``analyze.moe`` recomputes sites and block outputs from stored
tensors and weights). Weights are in the layout of ``pipeline.moe_weights.moe_weights``: per expert
``nn.Linear`` ``[out, in]``, i.e. ``gate``/``up`` ``[E, d_moe, d_model]``, ``down`` ``[E, d_model, d_moe]``;
the shared expert's ``shared_gate``/``shared_up`` ``[d_shared, d_model]``, ``shared_down``
``[d_model, d_shared]`` and ``shared_expert_gate`` ``[1, d_model]``.

The math is the eager ``forward`` of the fused ``*Experts`` modules of transformers 5 (``modeling_<m>.py``;
the commented example in ``transformers.integrations.moe``), for routed row (token t, slot j), expert
``e = expert_ids[t, j]`` and routing weight ``w = weights[t, j]``::

    gate = W_g[e] x_t;  up = W_u[e] x_t;  act = act_fn(gate);  h = act * up;  o = W_d[e] h
    y_t = Σ_j w_tj o_tj  (+ sigmoid(W_sg x_t) · W_sd(act_fn(W_sgate x_t) * W_sup x_t) with a shared expert,
                          ``Qwen2MoeSparseMoeBlock.forward``)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers.activations import ACT2FN


def grouped_mm(rows: torch.Tensor, weights: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Rows sorted by expert times their expert's weight: ``rows[r] @ weights[e].T``.

    rows: [S, in], the first ``counts[0]`` rows routed to expert 0, the next ``counts[1]`` to expert 1, …;
    weights: [E, out, in]. Returns [S, out] in the rows' dtype (one ``torch.mm`` per expert with rows).
    """
    out = rows.new_empty(rows.shape[0], weights.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(rows[start:start + n], weights[e].T, out=out[start:start + n])
            start += n
    return out


def expert_order(expert_ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, list[int]]:
    """``(order, counts)``: int64 [S] permutation sorting the flattened ``expert_ids`` by expert (stable, so
    token-major within an expert) and the rows per expert (``n_experts`` ints)."""
    flat = expert_ids.reshape(-1).long()
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=n_experts).tolist()


def grouped_linear(a: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each row ``a[..., :]`` times the weight of its expert: ``[*lead, in] -> [*lead, out]``.

    expert_ids: int [*lead] (e.g. ``[T, k]``), values in ``[0, E)``; weights: [E, out, in].
    """
    lead, width = a.shape[:-1], a.shape[-1]
    order, counts = expert_order(expert_ids, weights.shape[0])
    rows = a.reshape(-1, width)[order]
    out = torch.empty(rows.shape[0], weights.shape[1], dtype=rows.dtype)
    out[order] = grouped_mm(rows, weights, counts)
    return out.view(*lead, -1)


def routed_from_rows(x_rows: torch.Tensor, expert_ids: torch.Tensor, weights: Mapping[str, torch.Tensor],
                     activation: str) -> dict[str, torch.Tensor]:
    """The per-slot sites ``gate`` (pre-activation), ``act``, ``up`` and ``intermediate`` [T, k, d_moe] from
    the input of each routed row ``x_rows`` [T, k, d_model] (rows of one token may differ, e.g. sparsified)."""
    gate = grouped_linear(x_rows, expert_ids, weights["gate"])
    act = ACT2FN[activation](gate)
    up = grouped_linear(x_rows, expert_ids, weights["up"])
    return {"gate": gate, "act": act, "up": up, "intermediate": act * up}


def routed_sites(x: torch.Tensor, expert_ids: torch.Tensor, weights: Mapping[str, torch.Tensor],
                 activation: str) -> dict[str, torch.Tensor]:
    """:func:`routed_from_rows` of the FFN input x [T, d_model] (cast to the weights' dtype), shared by the
    k slots of each token (expert_ids int [T, k])."""
    x = x.to(weights["gate"].dtype)
    return routed_from_rows(x[:, None, :].expand(-1, expert_ids.shape[1], -1), expert_ids, weights, activation)


def shared_sites(x: torch.Tensor, weights: Mapping[str, torch.Tensor], activation: str) -> dict[str, torch.Tensor]:
    """The shared expert's ``shared_gate``/``shared_act``/``shared_up``/``shared_intermediate`` [T, d_shared]
    and ``shared_weight`` [T] = sigmoid(shared_expert_gate x) from x [T, d_model] (``Qwen2MoeSparseMoeBlock``)."""
    x = x.to(weights["shared_gate"].dtype)
    gate = x @ weights["shared_gate"].T
    act = ACT2FN[activation](gate)
    up = x @ weights["shared_up"].T
    return {"shared_gate": gate, "shared_act": act, "shared_up": up, "shared_intermediate": act * up,
            "shared_weight": torch.sigmoid(x @ weights["shared_expert_gate"].T)[:, 0]}


def block_output(intermediate: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor,
                 weights: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The MoE block output [T, d_model]: ``Σ_j w_tj W_d[e_tj] h_tj`` from the per-slot ``intermediate``
    [T, k, d_moe], expert_ids [T, k] and routing_weights [T, k], plus ``s_t W_sd h_st`` when ``shared`` holds
    ``shared_intermediate`` [T, d_shared] and ``shared_weight`` [T]. Computed in the weights' dtype."""
    h = intermediate.to(weights["down"].dtype)
    y = (grouped_linear(h, expert_ids, weights["down"]) * routing_weights.to(h.dtype)[..., None]).sum(dim=1)
    if shared is not None:
        hs = shared["shared_intermediate"].to(h.dtype)
        y = y + shared["shared_weight"].to(h.dtype)[:, None] * (hs @ weights["shared_down"].T)
    return y
