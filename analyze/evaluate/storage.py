"""An evaluation's files in a store: where they live, which grid values are done, and reading them back.

Every reader of stored evaluations (the proxy check, the report, the demo) goes through
:func:`stored_evaluations` / :func:`read_evaluation`, which leave out an evaluation that cannot be read (one
being written, or of another layout) rather than fail on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from actsparse.core import format as fmt
from actsparse.core.checksums import update_checksums
from actsparse.core.errors import ActsparseError


def base_dir(store, run_id: str | None) -> Path:
    """The absolute result directory of an evaluation: the run's ``analysis/``, or the store's
    ``evaluations/`` for a model or corpus never collected (the store is created if missing)."""
    from actsparse.pipeline.store_root import create_store

    return create_store(store).result_dir(run_id).resolve()


def checksum(base: Path, run_id: str | None, files: list[Path]) -> None:
    """List files written into a run's ``analysis/`` in its checksums.json (store-level results have none)."""
    if run_id is not None:
        update_checksums(base.parent, [Path(f).resolve() for f in files])


def done_values(parts: Path) -> dict[float, Path]:
    """``{grid value: its per-window file}`` of the values already evaluated in an evaluation's parts directory."""
    import pyarrow.parquet as pq

    done = {}
    for p in sorted(parts.glob("value-*.parquet")):
        v = pq.read_table(p, columns=["value"]).column("value")
        if len(v):
            done[float(v[0].as_py())] = p
    return done


def with_run(cfg, store, run: str | None):
    """``(cfg, manifest)``: an evaluation config (any dataclass with ``model`` and ``corpus``) with the model and
    corpus of stored run ``run`` where it names none, and the run's manifest (None without ``run``).

    Raises:
        ActsparseError: ``run`` without ``store``, an unknown run, or neither a model and corpus nor a run.
    """
    import dataclasses

    from actsparse.pipeline.reader import StoreReader

    manifest = None
    if run is not None:
        if store is None:
            raise ActsparseError("--run needs --store (the store holding the run)")
        manifest = StoreReader(str(store)).run(run).manifest
        cfg = dataclasses.replace(cfg, model=cfg.model or manifest.model_spec,
                                  corpus=cfg.corpus or manifest.corpus.spec)
    if cfg.model is None or cfg.corpus is None:
        raise ActsparseError("evaluate needs --model and --corpus (or --run with --store to use the run's)")
    return cfg, manifest


def check_against_run(m: fmt.Manifest, model: str, weights_sha256: str, corpus: str, corpus_sha256: str) -> None:
    """Refuse a model or corpus whose content is not the run's (specs may differ: a path vs an alias).

    Raises:
        ActsparseError: the weights or the corpus differ from the run's, naming both.
    """
    if weights_sha256 != m.model.weights_sha256:
        raise ActsparseError(f"model {model} (weights sha256 {weights_sha256[:12]}) does not match run {m.run_id} "
                             f"(model {m.model_spec}, weights sha256 {m.model.weights_sha256[:12]})")
    if corpus_sha256 != m.corpus.sha256:
        raise ActsparseError(f"corpus {corpus} does not match run {m.run_id} (corpus {m.corpus.spec}); "
                             "an evaluation stored with a run uses the run's corpus")


@dataclass
class StoredEvaluation:
    """One evaluation stored with a run: its summary (one row per grid value) and critical-sparsity tables
    (polars DataFrames; ``critical`` is None when it cannot be read)."""

    eval_id: str
    summary: object
    critical: object | None


def read_evaluation(st, run_id: str, eval_id: str) -> StoredEvaluation | None:
    """The stored evaluation ``eval_id`` of a run, or None when it is absent or cannot be read."""
    import polars as pl

    base = fmt.result_base(run_id)
    frames = []
    for kind in (fmt.EVALUATION, fmt.EVALUATION_CRITICAL):
        try:
            with st.fs.open(st.path(base, fmt.result_file(kind, eval_id)), "rb") as f:
                frames.append(pl.read_parquet(f))
        except (OSError, pl.exceptions.PolarsError):
            frames.append(None)
    if frames[0] is None or not frames[0].height:
        return None
    return StoredEvaluation(eval_id, frames[0], frames[1])


def stored_evaluations(st, run_id: str) -> list[StoredEvaluation]:
    """Every readable evaluation stored with a run (``runs/<id>/analysis/evaluate-*.parquet``), by eval_id;
    [] where the store cannot be listed (a web server without listings)."""
    base = st.path(fmt.result_base(run_id))
    try:
        paths = sorted(st.fs.glob(f"{base}/{fmt.EVALUATION.glob}"))
    except Exception:  # noqa: BLE001 - listings are optional on remote stores
        return []
    found = []
    for path in paths:
        eval_id = path.rsplit("/", 1)[-1].removeprefix(f"{fmt.EVALUATION.prefix}-").removesuffix(".parquet")
        if fmt.ID_RE.match(eval_id) and (ev := read_evaluation(st, run_id, eval_id)) is not None:
            found.append(ev)
    return found
