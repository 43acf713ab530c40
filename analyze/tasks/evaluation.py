"""Running a task evaluation: the dense reference and one sparsified run per grid value of every task, each saved
as it finishes (resume per grid value and task), then the summary, per-example and critical tables."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from actsparse.analyze.evaluate.storage import base_dir, checksum
from actsparse.analyze.sparsifier import hook_points
from actsparse.analyze.tasks.config import N_BOOT, TaskEvalConfig, TaskEvaluation, task_identity
from actsparse.analyze.tasks.critical import critical_tables, task_curve
from actsparse.analyze.tasks.harness import TaskResult, evaluate_task
from actsparse.analyze.tasks.selection import AVERAGE, require_lm_eval, select_tasks, task_fingerprint
from actsparse.analyze.tasks.storage import parts_dir, read_widths, stored_runs, write_part
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_json, atomic_write_parquet, exclusive_lock

LABEL = "lm-eval task"
Runs = dict[str, dict[float | None, TaskResult]]  # {task: {value or None (dense): run}}


def evaluate_tasks(cfg: TaskEvalConfig, tasks: str | Sequence[str], store: str | Path | None = None,
                   run: str | None = None, *, include_paths: Sequence[str | Path] = (), n_boot: int = N_BOOT,
                   seed: int = 0, log: Callable[[str], None] = print) -> TaskEvaluation:
    """Run lm-eval ``tasks`` dense and at every grid value of ``cfg`` (resuming in ``store`` when possible).

    Args:
        cfg: what to evaluate; ``cfg.model`` defaults to the run's.
        tasks: ``--tasks``: comma-separated task or tag names, task YAML files or directories of them
            (``selection.select_tasks``; actsparse's shipped tasks are always known).
        store: local store directory (created if missing) or None (compute only, nothing written).
        run: run id or unique prefix to attach the results to; its model weights must be the ones evaluated.
        include_paths: extra directories of task YAMLs.
        n_boot, seed: bootstrap replicates over examples and their seed.
        log: where one-line progress messages go.

    Returns:
        :class:`TaskEvaluation` with the summary, per-example and critical-sparsity tables.

    Raises:
        ActsparseError: lm-eval missing, bad settings, an unknown task or one that does not parse, a model that
            is not the run's, a task whose data is not available offline, another process evaluating the same
            configuration.
    """
    from actsparse.pipeline.models import resolve_model
    from actsparse.pipeline.reader import StoreReader

    cfg.validate()
    version = require_lm_eval()
    manifest = None
    if run is not None:
        if store is None:
            raise ActsparseError("--run needs --store (the store holding the run)")
        manifest = StoreReader(str(store)).run(run).manifest
        cfg = dataclasses.replace(cfg, model=cfg.model or manifest.model_spec)
    if cfg.model is None:
        raise ActsparseError("evaluate --tasks needs --model (or --run with --store to use the run's)")
    selection = select_tasks(tasks, include_paths)
    resolved = resolve_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if manifest is not None and resolved.weights_sha256 != manifest.model.weights_sha256:
        raise ActsparseError(f"model {cfg.model} (weights sha256 {resolved.weights_sha256[:12]}) does not match run "
                             f"{manifest.run_id} (model {manifest.model_spec}, weights sha256 "
                             f"{manifest.model.weights_sha256[:12]})")
    identity = task_identity(cfg, resolved.weights_sha256, version)
    eval_id = fmt.content_hash(identity)
    run_id = None if manifest is None else manifest.run_id
    meta = dict(run_id=run_id, eval_id=eval_id, model=cfg.model, target=cfg.target, rule=cfg.rule, power=cfg.power,
                count_mode=cfg.count_mode)
    fingerprints = {t: task_fingerprint(selection.task_manager, t) for t in selection.names}
    wanted = [(t, v) for v in (None, *cfg.values()) for t in selection.names]
    job = _Job(cfg, resolved, selection, fingerprints, identity, meta, log)
    if store is None:
        runs: Runs = {t: {} for t in selection.names}
        for task, value, result in job.compute(wanted):
            runs[task][value] = result
        return _finish(job, runs, None, n_boot, seed, list(wanted), [])

    base = base_dir(store, run_id)
    parts = parts_dir(base, eval_id)
    with exclusive_lock(parts / fmt.LOCK, f"task evaluation {eval_id}"):
        widths = read_widths(parts)
        stored = {} if widths is None else stored_runs(parts, widths)
        reused = [(t, v) for t, v in wanted if t in stored and stored[t][0] == fingerprints[t] and v in stored[t][1]]
        todo = [w for w in wanted if w not in reused]
        if reused:
            log(f"task evaluation {eval_id}: {len(reused)} of {len(wanted)} runs already done, skipping them")
        for task, _, result in job.compute(todo, parts=parts, base=base):
            path = write_part(parts, result, fingerprints[task])
            checksum(base, run_id, [path])
        widths = read_widths(parts)
        # every task stored under this id, with at least one grid value (a run killed after the dense one has none)
        runs = {t: r for t, (_, r) in stored_runs(parts, widths).items() if len(r) > 1}
        return _finish(job, runs, base, n_boot, seed, todo, reused)


@dataclasses.dataclass
class _Job:
    """A task evaluation ready to run: config (model filled in), resolved model, tasks, identity and meta."""

    cfg: TaskEvalConfig
    resolved: object
    selection: object
    fingerprints: dict[str, str]
    identity: dict
    meta: dict
    log: Callable[[str], None]

    def compute(self, todo: list[tuple[str, float | None]], *, parts: Path | None = None, base: Path | None = None):
        """Yield ``(task, value, run)`` for every wanted run, loading the model only when there is one to make;
        with ``parts``, the directory's ``config.json`` (identity, settings, hooks) is written first."""
        if not todo:
            return
        from actsparse.pipeline.models import load_model, load_tokenizer
        from actsparse.pipeline.sites import resolve_ffn

        cfg = self.cfg
        tokenizer, _ = load_tokenizer(self.resolved)
        model = load_model(self.resolved, cfg.compute_dtype)
        arch = resolve_ffn(model)
        if parts is not None:
            hooks = [dict(layer=p.layer, site=p.site, width=p.width) for p in hook_points(arch, cfg.target)]
            path = parts / fmt.EVALUATION_CONFIG
            atomic_write_json(path, dict(identity=self.identity, meta=self.meta, hooks=hooks, ffn=arch.describe(),
                                         settings=dataclasses.asdict(cfg)))
            checksum(base, self.meta["run_id"], [path])
        for task, value in todo:
            result = evaluate_task(model, tokenizer, task, self.selection.task_manager, target=cfg.target,
                                   rule=cfg.rule, value=value, power=cfg.power, mode=cfg.count_mode,
                                   limit=cfg.lm_eval_limit, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size,
                                   metric=cfg.metric, arch=arch)
            label = "dense" if value is None else f"{cfg.target} {cfg.rule} {value:g}"
            sparsity = "" if value is None else f", sparsity {result.model_sparsity():.4f}"
            self.log(f"{task} {label}: {result.metric} {result.score:.4f}{sparsity} "
                     f"({len(result.doc_ids)} examples) [{result.seconds:.1f} s]")
            yield task, value, result


def _nanmean(xs: list[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    return float(np.mean(ok)) if ok else math.nan


def _run_facts(r: TaskResult) -> dict:
    """The summary columns that come from one run rather than from the curve."""
    pre, gen = r.phase("prefill"), r.phase("generation")
    return dict(n_shot=r.n_shot, sparsity_prefill=r.model_sparsity("prefill"),
                sparsity_generation=r.model_sparsity("generation"), positions_prefill=pre.positions,
                positions_generation=gen.positions, generated_tokens=r.generated_tokens, seconds=r.seconds)


def tables(runs: Runs, meta: dict, *, n_boot: int = N_BOOT, seed: int = 0):
    """``(summary, examples, critical)`` polars DataFrames of ``runs`` (``{task: {value or None: run}}``), with the
    documented columns of the ``task_evaluations``, ``task_examples`` and ``task_critical`` result kinds.

    Raises:
        ActsparseError: a task without its dense run or grid values, runs over different examples.
    """
    import polars as pl

    curves, facts, examples = [], {}, []
    for task, by_value in runs.items():
        if None not in by_value:
            raise ActsparseError(f"task {task}: the dense reference run is missing")
        values = sorted((v for v in by_value if v is not None), reverse=True)
        dense = by_value[None]
        curves.append(task_curve(dense, [by_value[v] for v in values]))
        for v in values:
            r = by_value[v]
            facts[(task, v)] = _run_facts(r)
            examples += [dict(meta, task=task, metric=r.metric, value=v, doc_id=int(d), score=float(s),
                              dense_score=float(ds)) for d, s, ds in zip(r.doc_ids, r.scores, dense.scores)]
    curve_rows, critical_rows = critical_tables(curves, n_boot=n_boot, seed=seed)
    summary = []
    for row in curve_rows:
        if row["task"] == AVERAGE:
            per = [facts[(t, row["value"])] for t in runs]
            extra = dict(n_shot=None, sparsity_prefill=_nanmean([f["sparsity_prefill"] for f in per]),
                         sparsity_generation=_nanmean([f["sparsity_generation"] for f in per]),
                         **{k: sum(f[k] for f in per) for k in ("positions_prefill", "positions_generation",
                                                                  "generated_tokens", "seconds")})
        else:
            extra = facts[(row["task"], row["value"])]
        summary.append(dict(meta, **row, **extra, label=LABEL))

    def frame(rows: list[dict], kind: fmt.ResultKind):
        import pyarrow as pa

        names = [c for c, _ in kind.columns]
        rows = [{c: r.get(c) for c in names} for r in rows]
        return pl.from_arrow(pa.Table.from_pylist(rows, schema=fmt.arrow_schema(kind.columns)))

    return (frame(summary, fmt.TASK_EVALUATION), frame(examples, fmt.TASK_EXAMPLES),
            frame([dict(meta, **r, label=LABEL) for r in critical_rows], fmt.TASK_CRITICAL))


def _finish(job: _Job, runs: Runs, base: Path | None, n_boot: int, seed: int, computed: list, reused: list):
    """The three tables of every run so far; written beside the parts when stored."""
    summary, examples, critical = tables(runs, job.meta, n_boot=n_boot, seed=seed)
    if base is not None:
        files = [base / fmt.result_file(kind, job.meta["eval_id"])
                 for kind in (fmt.TASK_EVALUATION, fmt.TASK_EXAMPLES, fmt.TASK_CRITICAL)]
        for path, df in zip(files, (summary, examples, critical)):
            atomic_write_parquet(path, df.to_arrow())
        checksum(base, job.meta["run_id"], files)
    return TaskEvaluation(job.meta["eval_id"], base, dict(identity=job.identity, settings=dataclasses.asdict(job.cfg)),
                          list(job.selection.names), summary, examples, critical, computed, reused)
