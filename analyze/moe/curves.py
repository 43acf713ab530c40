"""Open-loop curves of a mixture-of-experts run: per layer and model level (the ``curves`` result, as for dense
runs) and per expert (the ``expert_curves`` result), cached in the store with their critical sparsity.

``actsparse.analyze.curves.compute_curves`` hands a MoE run to :func:`moe_curves`. The sweep streams blocks of
tokens per decoder layer (``analyze.moe.blocks``) through every target and rule (``analyze.moe.grid``) on worker
threads, as the dense sweep does. Counting (docs/paper-notes.md §1.4, ``analyze.moe.counting``):

* a layer row's sparsity counts every hook of the layer: the k routed rows of each counted token (each with
  its expert's width) and the shared expert's row, so it equals ``Σ zeroed / Σ rows·width`` over the layer's
  hooks; its error is the MoE block output's (routing-weighted sum over slots, shared expert included), per
  token, averaged over tokens;
* the model-level row (layer -1) weighs layers by their entries (``analyze.curves.compute.model_level``):
  ``Σ_hooks Σ zeroed / Σ_hooks Σ entries`` over every layer, the authors' ``"average"``; its error is the mean of
  the layers' errors, as for dense runs;
* an expert row counts the rows routed to that expert (load = rows per counted token) and their own output
  error, ``||W_d[e](h − h')|| / ||W_d[e] h||`` averaged over its rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from actsparse.analyze.curves.accumulator import Accumulator
from actsparse.analyze.curves.compute import (
    LayerWeightCache,
    cached_result,
    model_level,
    one_torch_thread,
    ordered_map,
    save_critical,
    save_result,
)
from actsparse.analyze.curves.config import CALIBRATION_EVERY, MAX_WORKERS, CurveConfig, required_sites
from actsparse.analyze.moe.accumulator import UnitAccumulator
from actsparse.analyze.moe.blocks import MoEBlock
from actsparse.analyze.moe.calibrate import calibrate
from actsparse.analyze.moe.grid import target_block, token_width, unit_width
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError


def stored_sites(run) -> tuple[str, ...]:
    """The sites a MoE run holds for its experts (those of its ``routed`` arrays), with ``input`` if stored."""
    routed = [s for s in fmt.EXPERT_SITES if fmt.moe_array(fmt.ROUTED, s) in run.manifest.moe_arrays]
    return (*(["input"] if "input" in run.sites else []), *routed)


def moe_curves(st, run, cfg: CurveConfig, *, layers: Sequence[int] | None = None, use_cache: bool = True,
               progress: Callable[[int], None] | None = None):
    """``(curves, expert_curves)`` polars DataFrames of a MoE run (module docstring), with the columns of
    ``actsparse.core.format.CURVES`` and ``EXPERT_CURVES``; cached in the store like dense curves (both results
    under one ``analysis_id``, and the critical sparsity of the curves beside them).

    Raises:
        ActsparseError: a target whose sites the run did not store (nor ``input`` to recompute them from),
            NaN/inf in the data, the threshold rule without windows left to evaluate.
    """
    import polars as pl

    for t in cfg.targets:
        required_sites(t, stored_sites(run), True)
    if "threshold" in cfg.rules and len(cfg.rules) > 1:
        # as for dense runs: threshold evaluates only the windows that do not calibrate it, so two analyses
        parts = [moe_curves(st, run, CurveConfig(cfg.targets, tuple(rs), cfg.grids, cfg.power, cfg.include_special,
                                                 cfg.with_error, cfg.block_tokens), layers=layers,
                            use_cache=use_cache, progress=progress)
                 for rs in ([r for r in cfg.rules if r != "threshold"], ["threshold"])]
        return tuple(_sorted(pl.concat(dfs, how="diagonal_relaxed")) for dfs in zip(*parts))
    analysis_id = fmt.content_hash(cfg.ident())
    cached = use_cache and layers is None
    if cached:
        curves, experts = cached_result(st, run, analysis_id), _cached_experts(st, run, analysis_id)
        if curves is not None and experts is not None:
            return curves, experts
    plan = _plan(run, cfg, layers)
    _sweep(run, cfg, plan, progress)
    curves, experts = _finish(run, cfg, plan, analysis_id)
    if cached:
        save_result(st, run, fmt.result_file(fmt.EXPERT_CURVES, analysis_id), experts)
        save_result(st, run, fmt.result_file(fmt.CURVES, analysis_id), curves)
        save_critical(st, run, curves)
    return curves, experts


def _sorted(df):
    """Rows by target, rule, layer (then unit and expert for expert rows), grid values descending."""
    keys = [c for c in ("target", "rule", "layer", "unit", "expert") if c in df.columns]
    return df.sort([*keys, "value"], descending=[False] * len(keys) + [True])


def _cached_experts(st, run, analysis_id: str):
    import polars as pl

    path = st.path(fmt.result_base(run.run_id), fmt.result_file(fmt.EXPERT_CURVES, analysis_id))
    if not st.fs.exists(path):
        return None
    with st.fs.open(path, "rb") as f:
        return pl.read_parquet(f)


@dataclass
class _Plan:
    """What one sweep covers: layers, counted (``include``) and calibrating (``calib``) tokens, the blocks
    ``(layer, start, stop)``, and per ``(layer, target, rule)`` a layer and an expert accumulator."""

    layer_ids: list[int]
    include: np.ndarray
    calib: np.ndarray
    blocks: list[tuple[int, int, int]]
    layer_accs: dict
    unit_accs: dict


def _plan(run, cfg: CurveConfig, layers: Sequence[int] | None) -> _Plan:
    tokens = run.tokens()
    seq = tokens["sequence"].to_numpy()
    calib = (seq % CALIBRATION_EVERY == 0) if "threshold" in cfg.rules else np.zeros(len(seq), bool)
    include = np.ones(len(seq), bool) if cfg.include_special else ~tokens["special"].to_numpy()
    if "threshold" in cfg.rules and not (include & ~calib).any():
        raise ActsparseError(f"threshold rule: run {run.run_id} has {len(np.unique(seq))} window(s), all of them "
                             f"calibrating tau (every {CALIBRATION_EVERY}th); it needs windows left to evaluate")
    moe = run.moe
    layer_ids = list(range(run.n_layers)) if layers is None else list(layers)
    for layer in layer_ids:
        moe.position(layer)  # a layer out of range fails here, before any work
    keys = [(layer, t, r) for layer in layer_ids for t in cfg.targets for r in cfg.rules]
    blocks = [(layer, s, min(s + cfg.block_tokens, run.n_tokens)) for layer in layer_ids
              for s in range(0, run.n_tokens, cfg.block_tokens)]
    return _Plan(layer_ids, include, calib, blocks,
                 {k: Accumulator(len(cfg.grid(k[2])), token_width(moe, k[1], k[0] in moe.dense_layers)) for k in keys},
                 {k: UnitAccumulator(moe.n_experts, len(cfg.grid(k[2]))) for k in keys})


def _sweep(run, cfg: CurveConfig, plan: _Plan, progress: Callable[[int], None] | None) -> None:
    weights_of = LayerWeightCache(run, run.expert_weights)
    taus: dict = {}
    if "threshold" in cfg.rules:
        calib_rows = np.nonzero(plan.calib & plan.include)[0][:2048]  # bounded memory, as for dense runs
        for layer in plan.layer_ids:
            taus |= calibrate(run, cfg, layer, calib_rows, weights_of(layer))

    def work(item):
        layer, s, e = item
        keep = torch.from_numpy(np.nonzero(plan.include[s:e] & ~plan.calib[s:e])[0])
        out: list = []
        if len(keep):
            blk = MoEBlock(run, layer, s, e, keep, weights_of(layer))
            with torch.inference_mode():
                for target in cfg.targets:
                    target_block(target, blk, cfg, taus, lambda *a: out.append(("layer", *a)),
                                 lambda *a: out.append(("unit", *a)))
        return e - s, out

    workers = min(MAX_WORKERS, (os.cpu_count() or 1) + 1)
    with one_torch_thread():
        for n, out in ordered_map(work, plan.blocks, workers):
            for kind, key, *args in out:
                (plan.layer_accs if kind == "layer" else plan.unit_accs)[key].add(*args)
            if progress is not None:
                progress(n)


def _finish(run, cfg: CurveConfig, plan: _Plan, analysis_id: str):
    """The curves rows (per layer, then model level) and the expert rows, labelled and sorted."""
    import polars as pl

    moe = run.moe
    layer_rows, unit_rows = [], []
    for (layer, target, rule), acc in plan.layer_accs.items():
        base = dict(run_id=run.run_id, target=target, rule=rule, layer=layer)
        for value, r in zip(cfg.grid(rule), acc.rows()):
            layer_rows.append(base | dict(value=float(value), width=acc.width, **r))
        widths = {"expert": unit_width(target, moe.d_model, moe.d_moe),
                  "dense": unit_width(target, moe.d_model, moe.d_ff_dense or 0),
                  "shared": unit_width(target, moe.d_model, moe.d_shared or 0)}
        for r in plan.unit_accs[(layer, target, rule)].rows(cfg.grid(rule), widths, acc.n):
            unit_rows.append(base | r)
    df = pl.DataFrame(layer_rows)
    curves = pl.concat([df, model_level(df)], how="diagonal_relaxed").with_columns(
        analysis_id=pl.lit(analysis_id), label=pl.lit("open-loop"))
    experts = pl.DataFrame(unit_rows).with_columns(analysis_id=pl.lit(analysis_id), label=pl.lit("open-loop"))
    return _sorted(curves), _sorted(experts).select([c for c, _ in fmt.EXPERT_CURVES.columns])
