"""Running an evaluation: the dense reference pass, then one sparsified pass per grid value, each saved as it
finishes so that a killed evaluation resumes and a later call with more values reuses the finished ones."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actsparse.analyze.evaluate.bootstrap import summarize
from actsparse.analyze.evaluate.config import (
    _LOGITS_BYTES,
    DENSE_CACHE_BYTES,
    MIN_TOKENS,
    N_BOOT,
    SPLIT,
    EvalConfig,
    Evaluation,
    eval_identity,
)
from actsparse.analyze.evaluate.experts import expert_table
from actsparse.analyze.evaluate.lm import Batch, LMHead, make_batch, token_metrics
from actsparse.analyze.evaluate.storage import base_dir, check_against_run, checksum, done_values, with_run
from actsparse.analyze.sparsifier import Sparsifier, hook_points, per_hook
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_json, atomic_write_parquet, disk_error, exclusive_lock
from actsparse.core.vocab import CALIBRATED_RULES, WEIGHTED_RULES

# hook_rows only for mixture-of-experts models, whose expert hooks see only the rows routed to them
WINDOW_COLUMNS = tuple(c for c, _ in fmt.EVALUATION_VALUE_COLUMNS if c not in ("value", "hook_rows"))


def evaluate(cfg: EvalConfig, store: str | Path | None = None, run: str | None = None, *, n_boot: int = N_BOOT,
             seed: int = 0, dense_cache_bytes: int = DENSE_CACHE_BYTES,
             log: Callable[[str], None] = print) -> Evaluation:
    """Run the closed-loop evaluation of ``cfg`` (resuming it in ``store`` when possible).

    Args:
        cfg: what to evaluate; ``cfg.model``/``cfg.corpus`` default to the run's.
        store: local store directory (created if missing) or None (compute only, nothing written).
        run: run id or unique prefix to attach the results to; its model weights and corpus must
            be the ones evaluated.
        n_boot, seed: bootstrap resamples over windows and their seed.
        dense_cache_bytes: memory allowed for the dense log-probabilities kept across grid values.
        log: where one-line progress messages go.

    Returns:
        :class:`Evaluation` with the summary, per-layer and critical-sparsity tables.

    Raises:
        ActsparseError: unknown target/rule, a value out of range, a held-out split with fewer than
            ``MIN_TOKENS`` predicted tokens, a model or corpus that is not the run's, an unsupported
            model, non-finite logits, or another process evaluating the same config.
    """
    job = _plan(cfg, store, run)
    if store is None:
        frames, hooks, computed = _run_values(job, job.cfg.values(), dense_cache_bytes, log)
        return _finish(job, frames, hooks, None, n_boot, seed, computed, [])
    base = base_dir(store, job.run_id)
    parts = base / fmt.evaluation_parts(job.eval_id)
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, f"creating {parts}") from e
    with exclusive_lock(parts / fmt.LOCK, f"evaluation {job.eval_id}"):
        values = job.cfg.values()
        done = done_values(parts)
        reused = [v for v in values if v in done]
        if reused:
            log(f"evaluation {job.eval_id}: {len(reused)} of {len(values)} grid values already done, skipping them")
        config_path = parts / fmt.EVALUATION_CONFIG
        hooks = json.loads(config_path.read_text())["hooks"] if config_path.is_file() else None
        _, hooks, computed = _run_values(job, [v for v in values if v not in done], dense_cache_bytes, log,
                                         parts=parts, base=base, hooks=hooks)
        import polars as pl

        frames = [pl.read_parquet(p) for p in sorted(parts.glob("value-*.parquet"))]
        return _finish(job, frames, hooks, base, n_boot, seed, computed, reused)


@dataclass
class _Job:
    """An evaluation ready to run: config (model and corpus filled in), resolved model, batches, identity."""

    cfg: EvalConfig
    resolved: object
    batches: list[Batch]
    run_id: str | None
    eval_id: str
    identity: dict
    meta: dict
    store: object = None
    moe: fmt.MoELayout | None = None  # the run's, checked against the model's (a changed top-k is refused)


def hook_values(job: _Job, arch, values: Sequence[float]) -> dict[float, float | list[float]]:
    """What the Sparsifier applies for each grid value: the value itself; with an allocation, its per-layer
    values expanded to the hook points; for a calibrated rule (threshold, cett), the per-hook taus calibrated
    on the run's calibration windows as ``actsparse curves`` calibrates them (analyze.curves.targets.calibrate)."""
    cfg = job.cfg
    per_layer: dict[float, list[float]] = {}
    if cfg.allocation is not None:
        by_s = {float(a["sparsity"]): a["values"] for a in cfg.allocation["allocations"]}
        per_layer = {float(v): [float(x) for x in by_s[float(v)]] for v in values}
    if cfg.rule not in CALIBRATED_RULES:
        if not per_layer:
            return {float(v): float(v) for v in values}
        return {v: per_hook(arch, cfg.target, vals) for v, vals in per_layer.items()}
    from actsparse.analyze.curves.config import CALIBRATION_EVERY, CurveConfig
    from actsparse.analyze.curves.targets import calibrate
    from actsparse.pipeline.reader import StoreReader

    run = StoreReader(str(job.store)).run(job.run_id)
    tokens = run.tokens()
    calib = (tokens["sequence"].to_numpy() % CALIBRATION_EVERY == 0) & ~tokens["special"].to_numpy()
    rows = np.nonzero(calib)[0][:2048]
    points = hook_points(arch, cfg.target)
    out: dict[float, list[float]] = {float(v): [] for v in values}
    for layer in range(len(arch.layers)):
        w = run.weights(layer)
        for v in values:
            grid = (per_layer[float(v)][layer],) if per_layer else (float(v),)
            taus = calibrate(run, CurveConfig((cfg.target,), (cfg.rule,), {cfg.rule: grid}), layer, rows, w)
            for p in points:
                if p.layer == layer:
                    key = (layer, "all-inputs/h" if cfg.target == "all-inputs" and p.site == "intermediate"
                           else cfg.target, cfg.rule)
                    out[float(v)].append(taus[key][0])
    return out


def _plan(cfg: EvalConfig, store, run: str | None) -> _Job:
    """Validate, resolve the model and corpus (the run's where given), cut the held-out windows into batches."""
    from actsparse.pipeline.corpora import open_corpus
    from actsparse.pipeline.models import load_tokenizer, resolve_model
    from actsparse.pipeline.windows import iter_windows

    cfg.validate()
    cfg, manifest = with_run(cfg, store, run)

    resolved = resolve_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tok, _ = load_tokenizer(resolved, seq_len=cfg.seq_len)
    corpus = open_corpus(cfg.corpus, text_field=cfg.text_field)
    if manifest is not None:
        check_against_run(manifest, cfg.model, resolved.weights_sha256, cfg.corpus, corpus.sha256)
    windows = list(iter_windows(corpus.split(SPLIT), tok, cfg.seq_len, max_tokens=cfg.max_tokens, add_bos=True))
    special_ids = set(tok.all_special_ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [make_batch(windows[b:b + cfg.batch_size], pad_id, special_ids, count_special=cfg.include_special)
               for b in range(0, len(windows), cfg.batch_size)]
    n_pred = sum(len(b.targets) for b in batches)
    if n_pred < MIN_TOKENS:
        raise ActsparseError(f"the held-out split of corpus {cfg.corpus} gives {n_pred} predicted tokens "
                             f"({len(windows)} windows); closed-loop evaluation needs at least {MIN_TOKENS}")
    run_id = manifest.run_id if manifest is not None else None
    if cfg.rule in CALIBRATED_RULES and run_id is None:
        raise ActsparseError(f"rule {cfg.rule} calibrates a tau per layer on a stored run: give --run and --store")
    identity = eval_identity(cfg, resolved.weights_sha256, corpus.sha256, run_id)
    eval_id = fmt.content_hash(identity)
    rule = f"{cfg.rule}/allocated" if cfg.allocation is not None else cfg.rule
    meta = dict(run_id=run_id, eval_id=eval_id, model=cfg.model, corpus=corpus.spec, split=SPLIT,
                target=cfg.target, rule=rule, power=cfg.power)
    return _Job(cfg, resolved, batches, run_id, eval_id, identity, meta, store,
                manifest.moe if manifest is not None else None)


def _run_values(job: _Job, values: Sequence[float], dense_cache_bytes: int, log: Callable[[str], None], *,
                parts: Path | None = None, base: Path | None = None, hooks: list[dict] | None = None):
    """Dense pass, then one sparse pass per value; returns (per-window frames, hooks, computed values).

    With ``parts`` set, each value's frame is written there as soon as it is complete (and recorded in the
    run's checksums); the caller then reads the directory for every value done so far.
    """
    import polars as pl

    from actsparse.pipeline.models import load_model

    if not values:
        return [], hooks, []
    cfg = job.cfg
    model = load_model(job.resolved, cfg.compute_dtype)
    arch, hooks = _resolve(model, job)
    applied = hook_values(job, arch, values)
    head = LMHead(model, cfg.model)
    if parts is not None:
        atomic_write_json(parts / fmt.EVALUATION_CONFIG, dict(identity=job.identity, meta=job.meta, hooks=hooks,
                                                              ffn=arch.describe()))
        checksum(base, job.run_id, [parts / fmt.EVALUATION_CONFIG])
    frames, computed = [], []
    with torch.inference_mode():
        dense = _dense_pass(job, head, dense_cache_bytes, log)
        for v in values:
            t1 = time.perf_counter()
            cols = _sparse_pass(job, head, arch, v, applied[float(v)], dense)
            frame = pl.DataFrame(dict(value=[float(v)] * len(cols["window"]), **cols), schema_overrides=dict(
                window=pl.Int64, n_pred=pl.Int64, n_valid=pl.Int64, correct_sparse=pl.Int64, correct_dense=pl.Int64,
                hook_sparse=pl.List(pl.Int64), hook_rows=pl.List(pl.Int64)))
            if parts is not None:
                path = parts / fmt.value_part(v)
                atomic_write_parquet(path, frame.to_arrow())
                checksum(base, job.run_id, [path])
            frames.append(frame)
            computed.append(float(v))
            tokens = frame["n_pred"].sum()
            log(f"{cfg.target} {cfg.rule} {v:g}: sparsity {_sparsity(frame, hooks):.4f}, "
                f"nll {frame['nll_sparse'].sum() / tokens:.4f} (dense {frame['nll_dense'].sum() / tokens:.4f}), "
                f"top-1 {frame['correct_sparse'].sum() / tokens:.4f} "
                f"(dense {frame['correct_dense'].sum() / tokens:.4f}) "
                f"[{time.perf_counter() - t1:.1f} s]")
    return frames, hooks, computed


@dataclass
class _Dense:
    """The dense reference of every batch: hidden states at the predicted positions, the log-probabilities
    in chunks (None where they do not fit the cache: recomputed from the hidden states), per-window sums."""

    hidden: list
    logp: list
    nll: list
    hit: list
    chunk: int


def _dense_pass(job: _Job, head: LMHead, dense_cache_bytes: int, log: Callable[[str], None]) -> _Dense:
    t0 = time.perf_counter()
    first = job.batches[0]
    head.check(first.ids[:1], first.attn[:1])
    vocab = head.linear.weight.shape[0]
    n_total = sum(len(b.targets) for b in job.batches)
    cache_logp = n_total * vocab * 4 <= dense_cache_bytes
    dense = _Dense([], [], [], [], max(1, _LOGITS_BYTES // (vocab * 4)))
    for b in job.batches:
        h = head.hidden(b.ids, b.attn)[b.rows, b.cols]
        nll = torch.zeros(len(b.windows), dtype=torch.float64)
        hit = torch.zeros(len(b.windows), dtype=torch.int64)
        chunks = []
        for s in range(0, len(h), dense.chunk):
            logits = head.logits(h[s:s + dense.chunk])
            logp = torch.log_softmax(logits, dim=-1)
            y, r = b.targets[s:s + dense.chunk], b.rows[s:s + dense.chunk]
            nll.index_add_(0, r, -logp.gather(1, y[:, None])[:, 0].double())
            hit.index_add_(0, r, (logits.argmax(dim=-1) == y).long())
            if cache_logp:
                chunks.append(logp)
        _check_finite(nll, job.cfg, "dense")
        dense.hidden.append(h)
        dense.logp.append(chunks if cache_logp else None)
        dense.nll.append(nll)
        dense.hit.append(hit)
    log(f"dense reference: {n_total} predicted tokens in {len(job.batches)} batches ({time.perf_counter() - t0:.1f} s)")
    return dense


def _resolve(model, job: _Job) -> tuple[object, list[dict]]:
    """The model's FFNs and the hook list of the evaluation: a dense FFN's hooks per layer and site, or a
    mixture-of-experts model's per layer, unit, expert and site (its layout checked against the run's)."""
    from actsparse.pipeline.moe import check_layout, has_experts, resolve_moe
    from actsparse.pipeline.sites import resolve_ffn

    if has_experts(model):
        from actsparse.analyze.moe_sparsifier import hook_points as moe_hook_points

        cfg = job.cfg
        if cfg.rule in CALIBRATED_RULES or cfg.rule in WEIGHTED_RULES or cfg.allocation is not None:
            raise ActsparseError(f"closed loop on a mixture-of-experts model takes one rule value for every expert "
                                 f"(top-p, top-k or max-p); {cfg.rule}{' with an allocation' if cfg.allocation else ''}"
                                 f" is not supported there")
        arch = resolve_moe(model)
        if job.run_id is not None:
            check_layout(job.moe, arch, f"run {job.run_id}")
        return arch, [p.describe() for p in moe_hook_points(arch, job.cfg.target)]
    arch = resolve_ffn(model)
    return arch, [dict(layer=p.layer, site=p.site, width=p.width) for p in hook_points(arch, job.cfg.target)]


def _sparsifier(arch, cfg: EvalConfig, value: float | list[float]):
    """``analyze.sparsifier.Sparsifier`` applying ``value`` (one for every hook, or one per hook point), or
    ``analyze.moe_sparsifier.MoESparsifier`` for a MoE model (one value: ``_resolve`` refuses the others)."""
    from actsparse.pipeline.moe import MoEArchitecture

    if isinstance(arch, MoEArchitecture):
        from actsparse.analyze.moe_sparsifier import MoESparsifier

        return MoESparsifier(arch, cfg.target, cfg.rule, value, power=cfg.power)
    return Sparsifier(arch, cfg.target, cfg.rule, value, power=cfg.power)


def _sparse_pass(job: _Job, head: LMHead, arch, value: float, applied, dense: _Dense) -> dict[str, list]:
    """Every batch with the rule at grid value ``value`` in every FFN layer (``applied``: one value for every
    hook, or one per hook point; see :func:`hook_values`): per-window sums (``WINDOW_COLUMNS``)."""
    cfg, chunk = job.cfg, dense.chunk
    cols: dict[str, list] = {c: [] for c in WINDOW_COLUMNS}
    with _sparsifier(arch, cfg, applied) as sp:
        if hasattr(sp, "rows"):
            cols["hook_rows"] = []
        for i, b in enumerate(job.batches):
            sp.begin_batch(b.valid)
            h_s = head.hidden(b.ids, b.attn)[b.rows, b.cols]
            counts = sp.end_batch()
            n_win = len(b.windows)
            nll = torch.zeros(n_win, dtype=torch.float64)
            hit = torch.zeros(n_win, dtype=torch.int64)
            kl = torch.zeros(n_win, dtype=torch.float64)
            for k, s in enumerate(range(0, len(h_s), chunk)):
                logp_d = (dense.logp[i][k] if dense.logp[i] is not None
                          else torch.log_softmax(head.logits(dense.hidden[i][s:s + chunk]), dim=-1))
                tok_nll, tok_hit, tok_kl = token_metrics(head.logits(h_s[s:s + chunk]), logp_d, b.targets[s:s + chunk])
                r = b.rows[s:s + chunk]
                nll.index_add_(0, r, tok_nll.double())
                hit.index_add_(0, r, tok_hit.long())
                kl.index_add_(0, r, tok_kl.double())
            _check_finite(nll, cfg, f"{cfg.rule} {value}")
            cols["window"] += [w.sequence for w in b.windows]
            cols["n_pred"] += torch.bincount(b.rows, minlength=n_win).tolist()
            cols["n_valid"] += b.valid.sum(dim=1).tolist()
            cols["nll_sparse"] += nll.tolist()
            cols["nll_dense"] += dense.nll[i].tolist()
            cols["correct_sparse"] += hit.tolist()
            cols["correct_dense"] += dense.hit[i].tolist()
            cols["kl"] += kl.tolist()
            cols["hook_sparse"] += counts.T.tolist()
            if "hook_rows" in cols:
                cols["hook_rows"] += sp.rows.T.tolist()
    return cols


def _sparsity(frame, hooks: list[dict]) -> float:
    counts = np.asarray(frame["hook_sparse"].to_list(), dtype=np.float64)
    widths = np.array([h["width"] for h in hooks], dtype=np.float64)
    if "hook_rows" in frame.columns:  # authors' counting: each hook over the rows it saw
        return float(counts.sum() / (np.asarray(frame["hook_rows"].to_list(), dtype=np.float64) @ widths).sum())
    return float(counts.sum() / (frame["n_valid"].sum() * widths.sum()))


def _check_finite(nll: torch.Tensor, cfg: EvalConfig, what: str) -> None:
    if not bool(torch.isfinite(nll).all()):
        raise ActsparseError(f"non-finite NLL in the {what} run of {cfg.model} ({cfg.compute_dtype}); "
                             "try --compute-dtype float32")


def _finish(job: _Job, frames: list, hooks: list[dict], base: Path | None, n_boot: int, seed: int,
            computed: list[float], reused: list[float]) -> Evaluation:
    """Summary, per-layer and critical tables from every value's frame; written beside the parts when stored."""
    import polars as pl

    windows = pl.concat(frames, how="diagonal_relaxed")
    summary, layers, critical = summarize(windows, hooks, job.meta, n_boot=n_boot, seed=seed)
    experts = expert_table(windows, hooks, job.meta) if "unit" in hooks[0] else None
    if base is not None:
        tables = [(fmt.EVALUATION, summary), (fmt.EVALUATION_LAYERS, layers), (fmt.EVALUATION_CRITICAL, critical)]
        tables += [(fmt.EVALUATION_EXPERTS, experts)] if experts is not None else []
        files = [base / fmt.result_file(kind, job.eval_id) for kind, _ in tables]
        for path, (_, df) in zip(files, tables):
            atomic_write_parquet(path, df.to_arrow())
        checksum(base, job.run_id, files)
    return Evaluation(job.eval_id, base, job.identity, summary, layers, critical, computed, reused, experts)
