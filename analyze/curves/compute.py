"""The open-loop sweep of one run: plan the blocks, stream them through the targets on worker threads,
finish with the model-level rows and cache the result (and its critical sparsity) in the store.

Layers are independent until the model-level rows: :func:`layer_rows` computes the rows of one layer (a task of
an executor, ``compute_curves(..., map_layers=...)``), and the assembly orders them as one process does, so a
result computed in tasks is the one computed here."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from actsparse.analyze.curves.accumulator import Accumulator
from actsparse.analyze.curves.blocks import SiteBlock
from actsparse.analyze.curves.config import (
    CALIBRATION_EVERY,
    DEFAULT_BLOCK_TOKENS,
    MAX_WORKERS,
    CurveConfig,
    required_sites,
)
from actsparse.analyze.curves.critical import critical_sparsity
from actsparse.analyze.curves.targets import calibrate, target_block
from actsparse.core import format as fmt
from actsparse.core.checksums import update_checksums
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_parquet
from actsparse.core.vocab import CALIBRATED_RULES


def ordered_map(fn, items: Sequence, workers: int):
    """``fn`` over ``items`` on ``workers`` threads, results in order, at most ``workers + 1`` in flight
    (bounded memory). numpy sorts and torch kernels release the GIL, so the threads use both cores."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:
        pending: list = []
        for it in items:
            pending.append(ex.submit(fn, it))
            if len(pending) > workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


Rows = dict[tuple[int, str, str], list[dict]]  # (layer, target, rule) -> one row per grid value


class LayerMap(Protocol):
    """``map_layers(store, run_id, cfg, layers, layer_done)``: :func:`layer_rows` of every layer of ``layers``,
    merged (computed wherever an executor runs them); ``layer_done()`` is called as each layer finishes."""

    def __call__(self, store: str, run_id: str, cfg: CurveConfig, layers: list[int],
                 layer_done: Callable[[], None] | None) -> Rows: ...


class one_torch_thread:
    """Run torch single-threaded per worker while the workers themselves use the cores."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def compute_curves(store, run_id: str | None = None, *, targets: Sequence[str] = ("intermediate",),
                   rules: Sequence[str] = ("top-p",), grids: dict | None = None, power: float = 1.0,
                   include_special: bool = False, with_error: bool = True, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                   layers: Sequence[int] | None = None, use_cache: bool = True,
                   progress: Callable[[int], None] | None = None, map_layers: LayerMap | None = None):
    """Open-loop sparsity curves of one run, as a polars DataFrame (cached in the store as Parquet).

    Args:
        store: store path/URL or an open ``actsparse.pipeline.reader.StoreReader``.
        run_id: run id or unique prefix (None: the store's only run).
        targets: subset of ``TARGETS``; rules: subset of ``RULES``.
        grids: ``{rule: values}``; default ``DEFAULT_GRIDS`` (top-p: the paper's 26 values). For
            the calibrated rules the values are targets (``threshold``: sparsities; ``cett``: relative
            FFN-output errors); tau is calibrated per layer on every ``CALIBRATION_EVERY``-th window,
            and only the other windows are evaluated for them (the other rules evaluate every window:
            with a calibrated rule among others, the result joins two analyses, each with its own
            ``analysis_id``). The WINA rules rank by |a_i| * ||W[:, i]|| with the stored weights.
        power: top-p power q >= 1 (authors' ``topp_power``).
        include_special: count BOS/special tokens (excluded by default: attention-sink tokens skew
            statistics, docs/pitfalls.md P4).
        with_error: compute the FFN-output error columns (False: sparsity only, about the cost of
            reading the arrays; error columns are NaN). all-inputs always computes them.
        block_tokens: tokens per streamed block (memory bound).
        layers: restrict to these layers (default all); not cached when given.
        use_cache: reuse/write the run's ``curves`` result (``actsparse.core.format.CURVES``).
        progress: ``advance(n)`` called with the tokens of each finished block of a layer.
        map_layers: computes the per-layer rows elsewhere (an executor's tasks, ``LayerMap``); None computes
            them here. The result is the same either way.

    A mixture-of-experts run is swept by ``actsparse.analyze.moe.moe_curves``: the same rows (a layer's
    sparsity counts all its experts' rows, its error is the MoE block output's), and per-expert rows cached
    beside them (``actsparse.analyze.moe.expert_curves``).

    Returns:
        One row per (target, rule, value, layer) plus model-level rows with ``layer = -1``
        (dimension-weighted across hooks as the paper counts: sum sparse / sum total, docs/paper-notes.md
        §1.4; their sparsity_p10/p50/p90 are quantiles of the layer means, i.e. the spread across layers),
        with the columns of ``actsparse.core.format.CURVES``. ``value`` is the grid value (threshold: target
        sparsity).

    Raises:
        ActsparseError: unknown run/target/rule, grid out of range, missing sites, NaN/Inf in the data,
            the threshold rule on a run with no window left to evaluate after calibration.
    """
    import polars as pl

    from actsparse.pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    cfg = CurveConfig(tuple(targets), tuple(rules), dict(grids or {}), float(power), include_special,
                      with_error or "all-inputs" in targets, block_tokens)
    cfg.validate()
    if run.moe is not None:  # a mixture-of-experts run: per layer and per expert (analyze.moe)
        other = [r for r in cfg.rules if r not in ("top-p", "top-k", "max-p", "threshold")]
        if other:
            raise ActsparseError(f"rule(s) {', '.join(other)} are not defined on mixture-of-experts runs "
                                 f"(choose top-p, top-k, max-p or threshold)")
        from actsparse.analyze.moe.curves import moe_curves

        return moe_curves(st, run, cfg, layers=layers, use_cache=use_cache, progress=progress)[0]
    for t in cfg.targets:
        required_sites(t, run.sites, run.manifest.ffn.glu)
    calibrated = [r for r in cfg.rules if r in CALIBRATED_RULES]
    if calibrated and len(calibrated) < len(cfg.rules):
        # the calibrated rules evaluate only the windows that do not calibrate them; every other rule
        # keeps every window, so the two are separate analyses (each cached on its own)
        parts = [compute_curves(st, run.run_id, targets=cfg.targets, rules=rs, grids=cfg.grids, power=cfg.power,
                                include_special=include_special, with_error=with_error, block_tokens=block_tokens,
                                layers=layers, use_cache=use_cache, progress=progress, map_layers=map_layers)
                 for rs in ([r for r in cfg.rules if r not in CALIBRATED_RULES], calibrated)]
        return pl.concat(parts, how="diagonal_relaxed").sort(
            ["target", "rule", "layer", "value"], descending=[False, False, False, True])
    analysis_id = fmt.content_hash(cfg.ident())
    cached = use_cache and layers is None
    if cached:
        df = cached_result(st, run, analysis_id)
        if df is not None:
            return df
    plan = _plan(run, cfg, layers)
    if map_layers is None:
        _sweep(run, cfg, plan, progress)
        rows = _rows(run.run_id, cfg, plan.accs)
    else:
        rows = map_layers(st.root, run.run_id, cfg, plan.layer_ids,
                          None if progress is None else lambda: progress(run.n_tokens))
    df = _finish([row for key in plan.accs for row in rows[key]], analysis_id)
    if cached:
        save_result(st, run, fmt.result_file(fmt.CURVES, analysis_id), df)
        save_critical(st, run, df)
    return df


def layer_rows(store, run_id: str, cfg: CurveConfig, layer: int) -> Rows:
    """The per-layer rows of one layer of a curves result (what :func:`compute_curves` assembles).

    Args:
        store: store path/URL or an open ``actsparse.pipeline.reader.StoreReader``.
        run_id: the run (its full id).
        cfg: the validated analysis (``CurveConfig``), checked against the run by ``compute_curves``.
        layer: the layer.

    Returns:
        ``{(layer, target, rule): rows}``: one row per grid value, the columns of ``CURVES`` before labelling
        (``all-inputs/h`` rows are the all-inputs target's second hook, folded into the model level).

    Raises:
        ActsparseError: as :func:`compute_curves` (NaN/Inf in the data, a missing site).
    """
    from actsparse.pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    plan = _plan(run, cfg, [layer])
    _sweep(run, cfg, plan, None)
    return _rows(run.run_id, cfg, plan.accs)


@dataclass
class _Plan:
    """What one sweep covers: the layers, the tokens counted (``include``) and calibrating (``calib``), the
    streamed blocks ``(layer, start, stop)`` and an accumulator per ``(layer, target, rule)``."""

    layer_ids: list[int]
    include: np.ndarray
    calib: np.ndarray
    blocks: list[tuple[int, int, int]]
    accs: dict


def _plan(run, cfg: CurveConfig, layers: Sequence[int] | None) -> _Plan:
    tokens = run.tokens()
    special = tokens["special"].to_numpy()
    seq = tokens["sequence"].to_numpy()
    calibrated = any(r in CALIBRATED_RULES for r in cfg.rules)
    calib = (seq % CALIBRATION_EVERY == 0) if calibrated else np.zeros(len(seq), bool)
    include = np.ones(len(seq), bool) if cfg.include_special else ~special
    if calibrated and not (include & ~calib).any():
        raise ActsparseError(f"calibrated rules: run {run.run_id} has {len(np.unique(seq))} window(s), all of them "
                             f"calibrating tau (every {CALIBRATION_EVERY}th); it needs windows left to evaluate")
    layer_ids = list(range(run.n_layers)) if layers is None else list(layers)
    ffn = run.manifest.ffn
    width_of = {"input": ffn.d_model, "all-inputs": ffn.d_model, "all-inputs/h": ffn.d_ff, "gate": ffn.d_ff,
                "up": ffn.d_ff, "intermediate": ffn.d_ff}
    keys = [(layer, t, r) for layer in layer_ids for t in cfg.targets for r in cfg.rules]
    keys += [(layer, "all-inputs/h", r) for layer in layer_ids for r in cfg.rules if "all-inputs" in cfg.targets]
    blocks = [(layer, s, min(s + cfg.block_tokens, run.n_tokens)) for layer in layer_ids
              for s in range(0, run.n_tokens, cfg.block_tokens)]
    return _Plan(layer_ids, include, calib, blocks,
                 {k: Accumulator(len(cfg.grid(k[2])), width_of[k[1]]) for k in keys})


def _sweep(run, cfg: CurveConfig, plan: _Plan, progress: Callable[[int], None] | None) -> None:
    """Stream every block through the targets on worker threads and add the results to the accumulators."""
    weights_of = LayerWeightCache(run)
    taus: dict = {}
    calib_rows = np.nonzero(plan.calib & plan.include)[0][:2048]  # bounded memory: enough entries for a quantile
    if any(r in CALIBRATED_RULES for r in cfg.rules):
        for layer in plan.layer_ids:
            taus |= calibrate(run, cfg, layer, calib_rows, weights_of(layer))
    needed = _needed(cfg, run)

    def work(item):
        layer, s, e = item
        keep = torch.from_numpy(np.nonzero(plan.include[s:e] & ~plan.calib[s:e])[0])
        sites = SiteBlock(run, layer, s, e, keep, weights_of(layer))
        for name in needed:
            sites.native(name)  # read and checked for NaN/inf before any work
        out: list = []
        if len(keep):
            with torch.inference_mode():
                for target in cfg.targets:
                    target_block(target, sites, cfg, taus, layer, lambda *a: out.append(a))
        return e - s, out

    workers = min(MAX_WORKERS, (os.cpu_count() or 1) + 1)
    with one_torch_thread():
        for n, out in ordered_map(work, plan.blocks, workers):
            for key, *args in out:
                plan.accs[key].add(*args)
            if progress is not None:
                progress(n)


class LayerWeightCache:
    """``weights_of(layer)``: the stored weights of a layer (``read(layer)``, default ``run.weights``), kept for
    the few layers in flight (blocks arrive in layer order), shared by the worker threads."""

    def __init__(self, run, read: Callable | None = None):
        self.read, self.cache, self.lock = read or run.weights, {}, threading.Lock()

    def __call__(self, layer: int):
        with self.lock:
            if layer not in self.cache:
                if len(self.cache) >= 4:
                    self.cache.pop(min(self.cache))
                self.cache[layer] = self.read(layer)
            return self.cache[layer]


def _rows(run_id: str, cfg: CurveConfig, accs: dict) -> Rows:
    """The per-layer rows of the accumulators, by ``(layer, target, rule)``."""
    return {(layer, target, rule): [dict(run_id=run_id, target=target, rule=rule, value=float(value), layer=layer,
                                         width=acc.width, **r) for value, r in zip(cfg.grid(rule), acc.rows())]
            for (layer, target, rule), acc in accs.items()}


def _finish(rows: list[dict], analysis_id: str):
    """The result: the per-layer ``rows`` (in the plan's order, which fixes the order of the model-level sums),
    the model level (layer -1), labelled and sorted."""
    import polars as pl

    df = pl.DataFrame(rows)
    df = pl.concat([df.filter(pl.col("target") != "all-inputs/h"), model_level(df)], how="diagonal_relaxed")
    return df.with_columns(analysis_id=pl.lit(analysis_id), label=pl.lit("open-loop")).sort(
        ["target", "rule", "layer", "value"], descending=[False, False, False, True])


def cached_result(st, run, analysis_id: str):
    """A stored result of this analysis, or None; a result cached before critical rows were stored gets them."""
    import polars as pl

    path = st.path(fmt.result_base(run.run_id), fmt.result_file(fmt.CURVES, analysis_id))
    if not st.fs.exists(path):
        return None
    with st.fs.open(path, "rb") as f:
        df = pl.read_parquet(f)
    critical = st.path(fmt.result_base(run.run_id), fmt.result_file(fmt.CRITICAL, analysis_id))
    if st.is_local and not st.fs.exists(critical):
        save_critical(st, run, df)
    return df


def save_critical(st, run, df) -> None:
    """Store the open-loop critical sparsity of a cached analysis at the default tolerance beside it (the
    store's ``critical_sparsity`` table)."""
    import polars as pl

    analysis_id = df["analysis_id"][0]
    crit = critical_sparsity(df).with_columns(analysis_id=pl.lit(analysis_id))
    save_result(st, run, fmt.result_file(fmt.CRITICAL, analysis_id), crit)


def _needed(cfg: CurveConfig, run) -> list[str]:
    need = []
    for t in cfg.targets:
        for s in required_sites(t, run.sites):
            if s not in need and s in run.sites:
                need.append(s)
    return need


def model_level(df):
    """Model-level rows (layer -1): sparsity dimension-weighted over hooks (docs/paper-notes.md §1.4), errors averaged
    over layers. For all-inputs both hooks of a layer (x: d_model, h': d_ff) count with their widths."""
    import polars as pl

    hooks = df.with_columns(
        pl.when(pl.col("target") == "all-inputs/h").then(pl.lit("all-inputs")).otherwise(pl.col("target")).alias("t"))
    w = pl.col("width") * pl.col("n_tokens")
    sparsity = hooks.group_by(["run_id", "t", "rule", "value"]).agg(
        sparsity_mean=(pl.col("sparsity_mean") * w).sum() / w.sum(),
        kept_l1_mean=(pl.col("kept_l1_mean") * w).sum() / w.sum(),
        # at model level the quantiles describe the spread of layer means (per-token model-level
        # sparsity would need per-token state across all layers, which grows with the token count)
        sparsity_p10=pl.col("sparsity_mean").quantile(0.1, "linear"),
        sparsity_p50=pl.col("sparsity_mean").quantile(0.5, "linear"),
        sparsity_p90=pl.col("sparsity_mean").quantile(0.9, "linear"),
        width=pl.col("width").sum(), n_tokens=pl.col("n_tokens").max())
    errors = df.filter(pl.col("target") != "all-inputs/h").group_by(["run_id", "target", "rule", "value"]).agg(
        rel_err_mean=pl.col("rel_err_mean").mean(), rel_err_p90=pl.col("rel_err_p90").mean(),
        cos_mean=pl.col("cos_mean").mean(), err_vs_input_mean=pl.col("err_vs_input_mean").mean())
    return (sparsity.rename({"t": "target"}).join(errors, on=["run_id", "target", "rule", "value"])
            .with_columns(layer=pl.lit(-1, pl.Int64)))


def save_result(st, run, name: str, df) -> None:
    """Write a result into the run's ``analysis/`` if the store is local and writable (remote stores: compute
    only), and record it in the run's checksums."""
    if not st.is_local:
        return
    run_dir = Path(st.root).resolve() / fmt.run_path(run.run_id)
    path = run_dir / fmt.ANALYSIS / name
    try:
        atomic_write_parquet(path, df.to_arrow())
    except OSError:
        return  # read-only store: results are still returned
    update_checksums(run_dir, [path])
