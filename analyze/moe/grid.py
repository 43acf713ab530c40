"""One target's rules over one block of a mixture-of-experts layer: per token what the layer's hooks keep and the
block-output error, per routed row (and shared-expert row) what it drops and its own output error.

Every grid value of a linear target (``gate``, ``up``, ``intermediate``) comes from one ranking of each row and
one grouped gather-accumulate (``analyze.moe.linear``); ``input`` and ``all-inputs`` recompute the experts per
value (``analyze.moe.targets``). Results go to two callbacks:

* ``emit_layer(key, counts, kept_l1, errs, x_norm)`` with ``key = (layer, target, rule)``: kept entries of all
  the layer's hooks per token, int64 [T, P] (over :func:`token_width` entries), the fraction of their L1 mass
  kept, float64 [T, P], ``errs`` (``rel_err``, ``cos``, ``dropped_norm`` float64 [T, P]) or None, and ||x|| [T]
  or None: what ``analyze.curves.accumulator.Accumulator.add`` takes;
* ``emit_unit(key, unit, experts, zeroed, own_err, weight)``: per row of ``unit`` (``expert``, ``shared``,
  ``dense``) its expert (int64 [R]), entries zeroed over the target's hook sites (int64 [R, P]), its own
  output error (float64 [R, P] or None) and its scale in the block output (routing weight, gate, 1) [R].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actsparse.analyze.curves.config import LINEAR, CurveConfig
from actsparse.analyze.curves.targets import rank_block
from actsparse.analyze.moe.blocks import MoEBlock
from actsparse.analyze.moe.linear import UnitRows, grid_order, grouped_target_errors
from actsparse.analyze.moe.targets import HOOK_SITES, target_error
from actsparse.analyze.rules import rule_mask, threshold_mask
from actsparse.pipeline.expert_ffn import routed_sites, shared_sites

RANK_SITE = {"intermediate": "intermediate", "gate": "act", "up": "up"}
EmitLayer = Callable[..., None]
EmitUnit = Callable[..., None]


def site_width(site: str, d_model: int, d_ffn: int) -> int:
    """Entries per row of a hook site: d_model for ``input``, the expert's width otherwise."""
    return d_model if site == "input" else d_ffn


def unit_width(target: str, d_model: int, d_ffn: int) -> int:
    """Entries per row of one expert's hooks of ``target`` (all-inputs: input and intermediate)."""
    return sum(site_width(s, d_model, d_ffn) for s in HOOK_SITES[target])


def token_width(moe, target: str, dense: bool) -> int:
    """Entries per token of a layer's hooks of ``target`` (``moe``: the run's ``MoELayout``): k routed rows
    and the shared expert's for a MoE layer, one dense FFN's for a dense layer."""
    if dense:
        return unit_width(target, moe.d_model, moe.d_ff_dense)
    shared = unit_width(target, moe.d_model, moe.d_shared) if moe.d_shared is not None else 0
    return moe.top_k * unit_width(target, moe.d_model, moe.d_moe) + shared


def rule_values(rule: str, cfg: CurveConfig, taus: dict, key: tuple) -> list[float]:
    """The values a rule is applied at: the grid, or for threshold the taus calibrated for ``key``."""
    return list(taus[key]) if rule == "threshold" else list(cfg.grid(rule))


def keep_at(rule: str, value: float, power: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The keep mask of ``rule`` at ``value`` (threshold: tau), as ``analyze.rules``."""
    if rule == "threshold":
        return lambda t: threshold_mask(t, value)
    return lambda t: rule_mask(rule, t, value, power=power)


def target_block(target: str, blk: MoEBlock, cfg: CurveConfig, taus: dict, emit_layer: EmitLayer,
                 emit_unit: EmitUnit) -> None:
    """Every rule and value of ``target`` over one :class:`MoEBlock` (module docstring for the callbacks)."""
    x_norm = blk.input().norm(dim=1) if cfg.with_error and blk.stored("input") else None
    if target in LINEAR:
        _linear(target, blk, cfg, taus, x_norm, emit_layer, emit_unit)
    else:
        _recomputed(target, blk, cfg, taus, x_norm, emit_layer, emit_unit)


def _unit_rows(blk: MoEBlock, site: str, *, shared: bool, native: bool) -> torch.Tensor:
    if shared:
        return blk.shared(site, native=native)
    t = blk.routed(site, native=native)
    return t.reshape(-1, t.shape[-1])


def _linear(target, blk: MoEBlock, cfg: CurveConfig, taus: dict, x_norm, emit_layer, emit_unit) -> None:
    n, k = blk.expert_ids.shape
    tokens = torch.arange(n)
    units = [(blk.unit, False)] + ([("shared", True)] if blk.has_shared else [])
    for rule in cfg.rules:
        power = cfg.power if rule == "top-p" else 1.0
        fast = rule == "top-p" and power == 1.0  # the histogram path ranks the stored 16-bit values
        key = (blk.layer, target, rule)
        counts_tok = torch.zeros(n, len(cfg.grid(rule)), dtype=torch.int64)
        kept_mass = torch.zeros(counts_tok.shape, dtype=torch.float64)
        mass = torch.zeros(n, dtype=torch.float64)
        rows = []
        for unit, shared in units:
            a = _unit_rows(blk, RANK_SITE[target], shared=shared, native=fast)
            counts, kept_l1, order = rank_block(a, rule, rule_values(rule, cfg, taus, (*key, unit)), power,
                                                with_order=cfg.with_error)
            row_mass = a.double().abs().sum(dim=1)
            token = tokens if shared else tokens.repeat_interleave(k)
            counts_tok.index_add_(0, token, counts)
            kept_mass.index_add_(0, token, kept_l1 * row_mass[:, None])
            mass.index_add_(0, token, row_mass)
            h = _unit_rows(blk, "intermediate", shared=shared, native=True)
            if shared:
                expert, weight, down = torch.zeros(n, dtype=torch.int64), blk.shared("weight"), \
                    blk.weights["shared_down"][None]
            else:
                expert, weight, down = blk.expert_ids.reshape(-1), blk.routing.reshape(-1), blk.weights["down"]
            rows.append((unit, UnitRows(h, order, counts, token, expert, weight, down)))
        kept_l1_tok = torch.where(mass[:, None] > 0, kept_mass / mass.clamp_min(1e-300)[:, None], 1.0)
        errs, own = None, [None] * len(rows)
        if cfg.with_error:
            errs, own = grouped_target_errors([r for _, r in rows], n, grid_order(rule, cfg.grid(rule)))
        emit_layer(key, counts_tok, kept_l1_tok, errs, x_norm)
        for (unit, r), own_err in zip(rows, own):
            emit_unit(key, unit, r.expert, r.h.shape[1] - r.counts, own_err, r.weight)


def _recomputed(target, blk: MoEBlock, cfg: CurveConfig, taus: dict, x_norm, emit_layer, emit_unit) -> None:
    """input and all-inputs: the experts recomputed from the sparsified input at every value, against the dense
    experts recomputed from the same input (as the dense sweep does: rounding of stored sites is no error)."""
    x, n = blk.input(), blk.n_tokens
    act = blk.run.moe.activation
    dense = routed_sites(x, blk.expert_ids, blk.weights, act)
    if blk.has_shared:
        dense |= shared_sites(x, blk.weights, act)
    width = token_width(blk.run.moe, target, blk.unit == "dense")
    units = [blk.unit] + (["shared"] if blk.has_shared else [])
    for rule in cfg.rules:
        power = cfg.power if rule == "top-p" else 1.0
        key = (blk.layer, target, rule)
        per_value = []
        for j in range(len(cfg.grid(rule))):
            keeps = {unit: {site: keep_at(rule, _value(rule, cfg, taus, key, unit, site, j), power)
                            for site in HOOK_SITES[target]} for unit in units}
            per_value.append(target_error(target, keeps[blk.unit], x, blk.expert_ids, blk.routing, blk.weights,
                                          act, dense, keep_shared=keeps.get("shared")))
        zeroed = torch.stack([sum(z.sum(dim=1) for z in r.zeroed.values())
                              + sum(r.shared_zeroed.values(), torch.zeros(n, dtype=torch.int64))
                              for r in per_value], dim=1)
        errs = {name: torch.stack([getattr(r, name) for r in per_value], dim=1)
                for name in ("rel_err", "cos", "dropped_norm")}
        kept_l1 = torch.stack([torch.where(r.total_mass > 0, r.kept_mass / r.total_mass.clamp_min(1e-300), 1.0)
                               for r in per_value], dim=1)
        emit_layer(key, width - zeroed, kept_l1, errs, x_norm)
        slot_zeroed = torch.stack([sum(r.zeroed.values()).reshape(-1) for r in per_value], dim=1)
        slot_err = torch.stack([r.slot_rel_err.reshape(-1) for r in per_value], dim=1)
        emit_unit(key, blk.unit, blk.expert_ids.reshape(-1), slot_zeroed, slot_err, blk.routing.reshape(-1))
        if blk.has_shared:
            emit_unit(key, "shared", torch.zeros(n, dtype=torch.int64),
                      torch.stack([sum(r.shared_zeroed.values()) for r in per_value], dim=1),
                      torch.stack([r.shared_rel_err for r in per_value], dim=1), blk.shared("weight"))


def _value(rule: str, cfg: CurveConfig, taus: dict, key: tuple, unit: str, site: str, j: int) -> float:
    """Grid value j of ``rule`` for one unit's hook site (threshold: its tau; all-inputs' intermediate has its
    own, calibrated on h computed from the sparsified input)."""
    if rule != "threshold":
        return cfg.grid(rule)[j]
    layer, target, _ = key
    if target == "all-inputs" and site == "intermediate":
        return taus[(layer, "all-inputs/h", rule, unit)][j]
    return taus[(layer, target, rule, unit)][j]
