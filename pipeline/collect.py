"""Collection: stream FFN activations of one model over one corpus into a run of a store.

A run is collected in four steps, each a function of its own:

1. :func:`plan` resolves the model, tokenizer and corpus, cuts the token windows and computes the run id
   (a content hash of everything that determines the bytes), loading no weights and writing nothing, so
   bad input fails before a store exists;
2. :func:`prepare_run` (under the run's writer lock) loads the model, resolves its FFN sites, stores the
   FFN weights once per model, creates the arrays and writes the manifest (``incomplete``) and documents;
3. :func:`collect_shards` runs the forward passes that cover the shards asked for and writes those shards:
   the forward pass on the main thread, a writer thread compressing and writing whole shards
   (``actsparse.pipeline.writer``), the per-shard statistics between forward passes;
4. :func:`finish_run` lists every file in the run's checksums, marks the manifest ``complete`` and rebuilds
   the catalogue, once every shard is there.

Resume: windows, batches and shard boundaries are a pure function of the run config, and a shard's token
part is written last, after the shard's files are on disk and their digests recorded (``fmt.shard_record``),
so a killed run restarts with the shards that have no token part, checks the ones it keeps against their
records (a damaged one is written again: ``actsparse.pipeline.resume``), and re-computes exactly the same
bytes. Per-token statistics are not computed here: the caller passes them in (``statistics``, e.g.
``actsparse.analyze.token_stats.TOKEN_STATS``), which keeps this layer free of analysis.

Generation and diffusion runs (``CollectConfig.decoding``) take the same four steps; their windows are prompts,
their model and the rows each forward pass stores come from ``actsparse.pipeline.decoding``, and their shard
loop is ``actsparse.pipeline.stepwise`` (the token count is known only once every prompt has run).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import math
import platform
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from actsparse.core import format as fmt
from actsparse.core.checksums import parse_checksums, write_checksums
from actsparse.core.errors import ActsparseError
from actsparse.core.files import (
    NotRegularFile,
    atomic_write_json,
    atomic_write_parquet,
    disk_error,
    exclusive_lock,
    read_regular,
)
from actsparse.core.progress import ProgressFactory
from actsparse.core.vocab import SITES
from actsparse.pipeline.arrays import create_arrays, shard_writes, single_threaded_blosc
from actsparse.pipeline.capture import DenseCapture, MoECapture, check_resumable, resolve_capture
from actsparse.pipeline.corpora import Corpus, open_corpus
from actsparse.pipeline.decoding import Decoder, DiffusionSpec, GenerationSpec, plan_decoder
from actsparse.pipeline.device import AUTO, ShardCopier, declared_dtype, forward_dtype, resolve_device, to_device
from actsparse.pipeline.models import ResolvedModel, load_model, load_tokenizer, resolve_model
from actsparse.pipeline.resume import completed_shards, sweep_temporaries, verified_shards
from actsparse.pipeline.stepwise import collect_step_shards, reset_arrays
from actsparse.pipeline.store_root import create_store, write_catalogue
from actsparse.pipeline.windows import Window, batches, iter_windows, pad_batch
from actsparse.pipeline.writer import ShardJob, ShardPool, Writer

DEFAULT_SITES = ("input", "gate", "intermediate")
SPLITS = ("collect", "heldout")
COMPUTE_DTYPES = (AUTO, *fmt.STORED_DTYPES)


@dataclass(frozen=True)
class CollectConfig:
    """Everything that determines a run's content (hashed into the run id, with model and corpus hashes).

    Attributes:
        model: alias, HF id or local checkpoint path.
        corpus: ``wiki``, ``shakespeare`` or a file path (.txt, .jsonl, .parquet).
        sites: FFN sites to store (subset of ``actsparse.core.vocab.SITES``).
        max_tokens: stop after this many tokens (None: the whole split).
        seq_len: window length in tokens, BOS included.
        batch_size: windows per forward pass (fixed: batch composition changes float results).
        dtype: stored dtype, ``bfloat16`` | ``float16`` | ``float32``.
        compute_dtype: model dtype for the forward pass, or ``auto`` (float32 on the CPU, the model's half
            dtype on CUDA: ``actsparse.pipeline.device.forward_dtype``); :func:`plan` resolves it.
        chunk_tokens: tokens per chunk/shard along the token axis.
        split: corpus split, ``collect`` (default) or ``heldout``.
        text_field: jsonl field or parquet column holding the text.
        add_bos: start every window with BOS where the tokenizer has one.
        trust_remote_code: allow model code from the checkpoint.
        decoding: None for teacher-forced windows; else generation after each window (``GenerationSpec``) or a
            diffusion LM's denoising loop on it (``DiffusionSpec``), every forward pass stored.
    """

    model: str
    corpus: str
    sites: tuple[str, ...] = DEFAULT_SITES
    max_tokens: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    dtype: str = "bfloat16"
    compute_dtype: str = "auto"
    chunk_tokens: int = 1024
    split: str = "collect"
    text_field: str | None = None
    add_bos: bool = True
    trust_remote_code: bool = False
    decoding: GenerationSpec | DiffusionSpec | None = None

    def validate(self) -> None:
        """Raise ActsparseError on values that cannot work, before anything is loaded."""
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise ActsparseError(f"unknown site(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SITES)}")
        if len(set(self.sites)) != len(self.sites):
            raise ActsparseError(f"site listed twice in {', '.join(self.sites)}")
        if self.dtype not in fmt.STORED_DTYPES:
            raise ActsparseError(f"unknown --dtype '{self.dtype}' (choose {', '.join(fmt.STORED_DTYPES)})")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ActsparseError(f"unknown --compute-dtype '{self.compute_dtype}' "
                                 f"(choose {', '.join(COMPUTE_DTYPES)})")
        if self.seq_len < 2:
            raise ActsparseError(f"--seq-len must be at least 2 (BOS and one token; got {self.seq_len})")
        for name, limit in (("batch_size", 1 << 16), ("chunk_tokens", fmt.MAX_CHUNK_TOKENS)):
            if not 1 <= getattr(self, name) <= limit:
                raise ActsparseError(f"--{name.replace('_', '-')} must be in [1, {limit}] (got {getattr(self, name)})")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= fmt.MAX_TOKENS:
            raise ActsparseError(f"--max-tokens must be in [1, {fmt.MAX_TOKENS}] (got {self.max_tokens})")
        if self.split not in SPLITS:
            raise ActsparseError(f"unknown split '{self.split}' (choose {' or '.join(SPLITS)})")
        if self.decoding is not None:
            self.decoding.validate()


@dataclass
class CollectResult:
    """What :func:`collect` did: ``status`` is ``complete`` (written now) or ``already-complete`` (a no-op)."""

    run_id: str
    path: Path
    status: str
    n_tokens: int
    elapsed_s: float = 0.0
    forward_s: float = 0.0
    manifest: fmt.Manifest | None = None


OnShard = Callable[[int, dict, dict], Callable[[], list[Path]] | None]


class ShardStatistics(Protocol):
    """Per-shard work that collection runs between forward passes (the per-token statistics).

    ``warm_up()`` runs in a thread while the model loads (e.g. compiling a kernel); ``for_run(run_dir,
    manifest)`` returns ``on_shard(k, blocks, token_rows)``, called on the main thread with the stored numpy
    blocks ``{site: [layers, n, width]}`` and the shard's token rows, which may return a callable that the
    writer runs after the shard's arrays and before its token part, returning the paths of the files it wrote
    inside the run (recorded in the shard's digests and flushed to disk with its arrays).
    """

    def warm_up(self) -> None: ...

    def for_run(self, run_dir: Path, manifest: fmt.Manifest) -> OnShard: ...


@dataclass
class Plan:
    """A run before anything is loaded or written: see :func:`plan`."""

    cfg: CollectConfig
    resolved: ResolvedModel
    tokenizer: object
    corpus: Corpus
    windows: list[Window]
    run_id: str
    identity: dict
    device: str = "cpu"
    decoder: Decoder | None = None

    @property
    def n_tokens(self) -> int:
        """The run's tokens; for a generation or diffusion run, an upper bound (known once collected)."""
        if self.decoder is not None:
            return self.decoder.n_bound(self.windows)
        return sum(len(w.token_ids) for w in self.windows)


def plan(cfg: CollectConfig, *, device: str = "cpu") -> Plan:
    """Resolve model, tokenizer and corpus, cut the windows and compute the run id, without loading weights.

    ``device`` (``cpu`` or ``cuda``, see ``actsparse.pipeline.device.resolve_device``) resolves an ``auto``
    compute dtype, and a device other than the CPU is part of the run's identity (its kernels give other
    bytes); the plan's ``cfg`` is the resolved config.

    Raises:
        ActsparseError: a bad config, model or corpus, a corpus split without tokens, or decoding settings the
            model cannot run (``pipeline.decoding.plan_decoder``).
    """
    cfg.validate()
    resolved = resolve_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tok, mcfg = load_tokenizer(resolved, seq_len=cfg.seq_len)
    cfg = dataclasses.replace(cfg, compute_dtype=forward_dtype(cfg.compute_dtype, device, declared_dtype(mcfg)))
    corpus = open_corpus(cfg.corpus, text_field=cfg.text_field)
    windows = list(iter_windows(corpus.split(cfg.split), tok, cfg.seq_len, max_tokens=cfg.max_tokens,
                                add_bos=cfg.add_bos))
    if not windows:
        raise ActsparseError(f"corpus {cfg.corpus} split '{cfg.split}' yields no tokens")
    decoder = None if cfg.decoding is None else plan_decoder(cfg.decoding, tok, mcfg, resolved.spec, cfg.seq_len)
    if decoder is not None and device != "cpu":
        raise ActsparseError(f"generation and diffusion runs are collected on the CPU (got device {device}): "
                             "use --device cpu")
    import torch
    import transformers

    identity = dict(
        format_version=fmt.FORMAT_VERSION, config=_config_dict(cfg) | dict(model=None, corpus=None),
        weights_sha256=resolved.weights_sha256, model_type=mcfg.model_type, corpus_sha256=corpus.sha256,
        torch=torch.__version__, transformers=transformers.__version__,
    ) | (dict(device=device) if device != "cpu" else {})
    return Plan(cfg, resolved, tok, corpus, windows, fmt.content_hash(identity), identity, device, decoder)


def _config_dict(cfg: CollectConfig) -> dict:
    """The config as hashed and recorded; ``decoding`` only where set, so text runs keep their run ids."""
    d = dataclasses.asdict(cfg)
    if d["decoding"] is None:
        del d["decoding"]
    return d


def collect(cfg: CollectConfig, store: str | Path, *, statistics: ShardStatistics | None = None,
            progress: ProgressFactory | None = None, log: Callable[[str], None] = print,
            device: str = "cpu") -> CollectResult:
    """Collect one run (model x corpus x sites) into ``store``; resume it if it was interrupted.

    Args:
        cfg: the run configuration.
        store: local store directory (created if missing).
        statistics: per-shard work between forward passes (:class:`ShardStatistics`); None writes none.
        progress: progress display for the tokens collected.
        log: where one-line messages go.
        device: ``cpu``, ``cuda`` or ``auto`` (``actsparse.pipeline.device.resolve_device``).

    Returns:
        CollectResult; ``status`` is ``already-complete`` (a no-op) when the run exists and is complete.

    Raises:
        ActsparseError: bad config, model, corpus or store; another writer holds this run; disk errors.
    """
    t_start = time.perf_counter()
    p = plan(cfg, device=resolve_device(device))  # bad input fails before the store exists
    paths = create_store(store)
    run_dir = paths.run_dir(p.run_id)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, f"creating run {p.run_id}") from e
    with exclusive_lock(run_dir / fmt.LOCK, f"run {p.run_id}"):
        existing = read_manifest(run_dir)
        if existing is not None and existing.complete:
            log(f"run {p.run_id} is already complete ({existing.n_tokens} tokens); nothing to do")
            return CollectResult(p.run_id, run_dir, "already-complete", existing.n_tokens, manifest=existing)
        try:
            with single_threaded_blosc():
                warm = None
                if statistics is not None:
                    warm = threading.Thread(target=statistics.warm_up, daemon=True, name="actsparse-warm-up")
                    warm.start()
                run = prepare_run(p, paths, created=existing.created if existing is not None else None)
                if warm is not None:
                    warm.join()
                done = verified_shards(run_dir, run.manifest, with_stats=statistics is not None, log=log)
                if done:
                    log(f"resuming run {p.run_id}: {len(done)} of {run.manifest.n_parts} shards already written "
                        "and checked")
                elif cfg.max_tokens is not None and cfg.decoding is None and p.n_tokens < cfg.max_tokens:
                    log(f"corpus {p.corpus.name} split '{cfg.split}' holds {p.n_tokens} tokens, fewer than "
                        f"--max-tokens {cfg.max_tokens}: collecting all of them")
                wanted = set(range(run.manifest.n_parts)) - done
                timings = collect_shards(run, wanted, statistics=statistics, progress=progress)
                elapsed = time.perf_counter() - t_start
                n_tokens = run.manifest.n_tokens
                resumed_tokens = sum(min(cfg.chunk_tokens, n_tokens - k * cfg.chunk_tokens) for k in wanted
                                     if k * cfg.chunk_tokens < n_tokens)
                manifest = finish_run(run, dict(
                    elapsed_s=round(elapsed, 3), forward_s=round(timings.forward_s, 3), loop_s=round(timings.loop_s, 3),
                    write_s=round(timings.write_s, 3), tokens_per_s=round(resumed_tokens / max(elapsed, 1e-9), 1)))
        except OSError as e:
            raise disk_error(e, f"writing run {p.run_id}") from e
    log(f"run {p.run_id} complete: {manifest.n_tokens} tokens, {len(cfg.sites)} sites x {manifest.n_layers} layers "
        f"-> {run_dir}")
    return CollectResult(p.run_id, run_dir, "complete", manifest.n_tokens, time.perf_counter() - t_start,
                         timings.forward_s, manifest)


def read_manifest(run_dir: Path) -> fmt.Manifest | None:
    """The run's manifest, or None when it has none yet (read bounded: ``fmt.MAX_METADATA_BYTES``).

    Raises:
        ActsparseError: an invalid or oversized manifest, or one that is not a regular file.
    """
    try:
        data = read_regular(run_dir / fmt.MANIFEST, fmt.MAX_METADATA_BYTES, "manifest")
    except FileNotFoundError:
        return None
    except NotRegularFile as e:
        raise ActsparseError(f"run {run_dir.name}: {e}") from e
    return fmt.Manifest.from_json(data, f"run {run_dir.name}")


# ---------------------------------------------------------------- prepare


@dataclass
class PreparedRun:
    """A run ready for :func:`collect_shards`: its plan, store paths, loaded model, capture strategy (the resolved
    FFN: ``pipeline.capture``), manifest (as written, ``incomplete``) and open arrays. A run opened only to be
    finished (:func:`opened_for_finish`) has no model, capture or arrays."""

    plan: Plan
    paths: fmt.StorePaths
    run_dir: Path
    model: object
    capture: DenseCapture | MoECapture
    manifest: fmt.Manifest
    arrays: dict = field(repr=False, default_factory=dict)

    @property
    def arch(self):
        """The resolved FFN (``pipeline.sites.FFNArchitecture`` or ``pipeline.moe.MoEArchitecture``)."""
        return self.capture.arch


def prepare_run(p: Plan, paths: fmt.StorePaths, *, created: str | None = None, model=None) -> PreparedRun:
    """Load the model, store its FFN weights, create the arrays and write the manifest and documents.

    The caller holds the run's writer lock. ``created`` keeps the creation time of a run being resumed;
    ``model`` is the plan's model already loaded on its device (a cluster worker keeps one between runs).

    Raises:
        ActsparseError: the model cannot be loaded or resolved (an unsupported mixture-of-experts layout is
            named), lacks a site the config asks for, or is resumed with another MoE layout.
    """
    import pyarrow as pa

    cfg = p.cfg
    if p.decoder is not None:
        model, arch = p.decoder.load(p.resolved, cfg.compute_dtype)
        capture = DenseCapture(arch)
    else:
        if model is None:
            model = to_device(load_model(p.resolved, cfg.compute_dtype), p.device)
        capture = resolve_capture(model)
    capture.check_sites(cfg.sites, type(model).__name__)
    run_dir = paths.run_dir(p.run_id)
    check_resumable(read_manifest(run_dir), capture)
    wid = capture.weights_id(p.resolved.weights_sha256, cfg.compute_dtype)
    capture.write_weights(paths, wid)
    specs, moe_specs = capture.array_specs(cfg.sites, p.n_tokens, cfg.chunk_tokens, cfg.dtype)
    if p.decoder is not None:  # a resumed run's arrays may have their final token count: back to the bound
        reset_arrays(run_dir / fmt.ACTIVATIONS, cfg.sites)
    arrays = create_arrays(run_dir / fmt.ACTIVATIONS, specs | moe_specs)
    tok = p.tokenizer
    manifest = fmt.Manifest(
        run_id=p.run_id, status="incomplete", created=created or _now(), config=_config_dict(cfg),
        identity=p.identity, model=_model_info(p.resolved, model, tok, capture.ffn_info(), wid),
        corpus=fmt.CorpusInfo(spec=p.corpus.spec, name=p.corpus.name, sha256=p.corpus.sha256,
                              license=p.corpus.license, description=p.corpus.description,
                              n_documents=len(p.corpus.split(cfg.split))),
        tokenization=dict(seq_len=cfg.seq_len, add_bos=cfg.add_bos and tok.bos_token_id is not None,
                          padding="none stored (right-padded batches, attention-mask selected)",
                          special="BOS and tokenizer special ids flagged in tokens.special")
        | ({} if p.decoder is None else dict(decoding=p.decoder.describe())),
        arrays=specs, n_tokens=p.n_tokens, n_sequences=len(p.windows), chunk_tokens=cfg.chunk_tokens,
        versions=_versions(), moe=capture.moe, moe_arrays=moe_specs,
    )
    atomic_write_json(run_dir / fmt.MANIFEST, manifest.to_dict())
    docs = p.corpus.split(cfg.split)
    atomic_write_parquet(run_dir / fmt.DOCUMENTS, pa.table(dict(
        document_id=pa.array([d.doc_id for d in docs], pa.int32()), key=[d.key for d in docs],
        split=[d.split for d in docs], n_chars=pa.array([len(d.text) for d in docs], pa.int64())),
        schema=fmt.arrow_schema(fmt.DOCUMENTS_COLUMNS)))
    return PreparedRun(p, paths, run_dir, model, capture, manifest, arrays)


def ensure_prepared(p: Plan, paths: fmt.StorePaths, *, model=None) -> PreparedRun:
    """:func:`prepare_run` for a process that writes shards of a run whose writer lock another process holds
    (a cluster worker; its driver holds the lock): idempotent, it keeps the creation time, the weights and the
    arrays, and rewrites the manifest and documents with the same content. The driver has it run once before
    any shard is written, so that no two workers create the arrays at once.

    Raises:
        ActsparseError: as :func:`prepare_run`, or the run is already complete.
    """
    existing = read_manifest(paths.run_dir(p.run_id))
    if existing is not None and existing.complete:
        raise ActsparseError(f"run {p.run_id} is already complete; refusing to reopen it")
    return prepare_run(p, paths, created=existing.created if existing is not None else None, model=model)


def opened_for_finish(p: Plan, paths: fmt.StorePaths) -> PreparedRun:
    """A run prepared by another process, opened without its model for :func:`finish_run` (a cluster driver
    finishes the runs its workers wrote).

    Raises:
        ActsparseError: the run has no manifest (it was never prepared), or an invalid one.
    """
    run_dir = paths.run_dir(p.run_id)
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise ActsparseError(f"run {p.run_id} was never prepared (no {fmt.MANIFEST}); run left incomplete")
    return PreparedRun(p, paths, run_dir, None, None, manifest)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _versions() -> dict:
    import duckdb
    import polars
    import pyarrow
    import torch
    import transformers
    import zarr

    from actsparse.core import __version__

    return dict(actsparse=__version__, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, zarr=zarr.__version__, numpy=np.__version__,
                pyarrow=pyarrow.__version__, duckdb=duckdb.__version__, polars=polars.__version__)


def _model_info(resolved: ResolvedModel, model, tok, ffn: fmt.FFNInfo, wid: str) -> fmt.ModelInfo:
    cfg = model.config
    return fmt.ModelInfo(
        spec=resolved.spec, name=resolved.name, source=resolved.source, license=resolved.license,
        weights_sha256=resolved.weights_sha256, weights_id=wid, architecture=type(model).__name__,
        model_type=cfg.model_type, max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        vocab_size=getattr(cfg, "vocab_size", None), ffn=ffn,
        # parameters of the loaded model, tied embeddings counted once (parameters() skips shared tensors)
        n_params=sum(p.numel() for p in model.parameters()),
        tokenizer=dict(cls=type(tok).__name__, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, special_ids=sorted(tok.all_special_ids)),
    )


# ---------------------------------------------------------------- the loop


@dataclass
class LoopTimings:
    """Seconds spent in forward passes, in the whole loop, and writing shards (all threads)."""

    forward_s: float = 0.0
    loop_s: float = 0.0
    write_s: float = 0.0


def collect_shards(run: PreparedRun, wanted: set[int], *, statistics: ShardStatistics | None = None,
                   progress: ProgressFactory | None = None) -> LoopTimings:
    """Run the forward passes that cover the ``wanted`` shards and write exactly those shards.

    Batches are formed over the whole window stream as an uninterrupted run forms them (their composition
    changes float results), and a batch none of whose tokens lies in a wanted shard is skipped; the rows of
    a batch that fall into other shards are dropped. So any split of the shards between calls (a resumed run,
    or workers of a cluster) writes the bytes of one uninterrupted run.

    Raises:
        ActsparseError: a hook that did not fire once per batch, a float16 overflow, a shard not written.
    """
    sweep_temporaries(run.run_dir, wanted)
    if run.plan.decoder is not None:  # generation or diffusion: its own loop, the token count found as it runs
        return collect_step_shards(run, wanted, statistics=statistics, progress=progress)
    p, T, n_tokens = run.plan, run.plan.cfg.chunk_tokens, run.plan.n_tokens
    cfg, tok = p.cfg, p.tokenizer
    timings = LoopTimings()
    if not wanted:
        return timings
    on_shard = statistics.for_run(run.run_dir, run.manifest) if statistics is not None else None
    specs = run.manifest.arrays | run.manifest.moe_arrays
    logical = {name: spec.logical_dtype for name, spec in specs.items()}
    route = run.capture.route
    max_batch = max(sum(len(w.token_ids) for w in batch) for batch in batches(p.windows, cfg.batch_size))
    # a batch fills at most ceil(max_batch / T) + 1 shards at once (one carried over); that many sets
    # always progress, as the writer releases every set the main thread does not hold. A buffer holds an
    # array's shard as [index, T, row] (a MoE slot array's [k, d_moe] flattened), reshaped when written.
    pool = ShardPool({name: (spec.shape[0], T, math.prod(spec.inner)) for name, spec in specs.items()},
                     {name: spec.numpy_dtype for name, spec in specs.items()}, size=-(-max_batch // T) + 1)
    writer = Writer(run.run_dir, shard_writes(run.arrays, run.run_dir / fmt.ACTIVATIONS, T), pool)
    copier = ShardCopier(logical, staged=p.device != "cpu")
    writer.start()
    filling: dict[int, dict[str, np.ndarray]] = {}  # shard -> its buffers {site: [layers, T, width]}
    rows: dict[int, dict[str, list]] = {}  # shard -> its token rows so far
    segments: list[tuple[dict, int, int, int]] = []  # (shard buffers, batch row, shard row, rows) per batch
    keep_rows, n_rows = None, 0

    def sink(name: str, layer: int, t) -> None:
        # tokens first ([batch, seq, ...] or [batch * seq, ...]: OPT, MoE blocks) -> [batch * seq, row] -> the
        # valid rows, converted and copied into their shards' buffers in one pass (on CUDA: staged off the
        # device, see ShardCopier)
        key, index = route(name, layer)
        flat = t.reshape(n_rows, -1)
        if keep_rows is not None:
            flat = flat.index_select(0, keep_rows)
        copier(key, index, flat, segments, where=f"site {name} layer {layer}")

    def ship(upto: int) -> None:
        """Hand every filled shard whose tokens all lie before ``upto`` to the writer, in order."""
        for k in sorted(filling):
            n = min(T, n_tokens - k * T)
            if k * T + n > upto:
                break
            bufs = filling.pop(k)
            blocks = {name: bufs[name][:, :n].reshape(spec.shape[0], n, *spec.inner) for name, spec in specs.items()}
            typed = _typed_rows(rows.pop(k))
            # between forward passes, not on the writer: beside the forward pass, extra CPU work costs
            # about twice its time, as the forward's OpenMP threads spin at barriers (BENCHMARKS.md)
            extra = (on_shard(k, {s: blocks[s] for s in run.manifest.arrays}, typed) if on_shard is not None
                     else None)
            writer.put(ShardJob(k, blocks, typed, bufs, extra))

    def free_set() -> dict[str, np.ndarray]:
        """A free set of shard buffers; while none is, write queued shards here rather than wait."""
        while True:
            try:
                return pool.take(block=False)
            except queue.Empty:
                if not writer.write_one():  # the writer thread holds the set that frees next
                    return pool.take()

    total_wanted = sum(min(T, n_tokens - k * T) for k in wanted)
    advance = progress(f"{p.resolved.name} × {p.corpus.name}", n_tokens, n_tokens - total_wanted) if progress else None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    cursor = 0
    t_loop = time.perf_counter()
    # The model, tokenizer and libraries are millions of long-lived objects; the cyclic GC would scan
    # them on every full collection the loop's allocations trigger (~8% of collection CPU, measured).
    gc.freeze()
    try:
        with run.capture.recorder(cfg.sites, sink) as rec:
            for batch in batches(p.windows, cfg.batch_size):
                lo = cursor
                hi = cursor = lo + sum(len(w.token_ids) for w in batch)
                shards = [k for k in range(lo // T, (hi - 1) // T + 1) if k in wanted]
                if not shards:
                    continue
                segments = []
                for k in shards:
                    if k not in filling:
                        filling[k], rows[k] = free_set(), {c: [] for c, _ in fmt.TOKENS_COLUMNS}
                    first, last = max(lo, k * T), min(hi, (k + 1) * T)
                    segments.append((filling[k], first - lo, first - k * T, last - first))
                t0 = time.perf_counter()
                rec.reset_counts()
                ids, attn = pad_batch(batch, pad_id)
                # attention-mask positions, never `ids != pad_id` (docs/pitfalls.md P3)
                valid = attn.reshape(-1).bool()
                n_rows = valid.numel()
                keep_rows = None if bool(valid.all()) else valid.nonzero().squeeze(1).to(p.device)
                _forward_batch(run.model, ids.to(p.device), attn.to(p.device))
                copier.flush()
                rec.check_fired(1)
                timings.forward_s += time.perf_counter() - t0
                _add_token_rows(rows, batch, lo, T, shards, tok)
                ship(hi)
                if advance is not None:
                    advance(sum(seg[3] for seg in segments))
        while writer.write_one():
            pass
    finally:
        writer.q.put(None)
        writer.join()
        gc.unfreeze()
    writer.raise_if_failed()
    timings.loop_s, timings.write_s = time.perf_counter() - t_loop, writer.write_s
    missing = sorted(wanted - completed_shards(run.run_dir, run.manifest.n_parts))
    if missing:
        raise ActsparseError(f"run {p.run_id}: shard(s) {', '.join(map(str, missing[:5]))} not written; "
                             "run left incomplete")
    return timings


def _forward_batch(model, ids, mask) -> None:
    import torch

    body = getattr(model, "base_model", model)  # skip the LM head: only FFN activations are needed
    with torch.inference_mode():
        body(input_ids=ids, attention_mask=mask, use_cache=False)


def _add_token_rows(rows: dict[int, dict[str, list]], batch: list[Window], start: int, T: int, shards: list[int],
                    tok) -> None:
    """Append the token rows of ``batch`` (whose first token is token ``start`` of the run) to the rows of the
    ``shards`` being filled; rows of other shards are not built."""
    cursor = start
    for w in batch:
        n = len(w.token_ids)
        for k in shards:
            a, b = max(cursor, k * T) - cursor, min(cursor + n, (k + 1) * T) - cursor
            if a >= b:
                continue
            r = rows[k]
            ids = w.token_ids[a:b]
            r["token_index"].extend(range(cursor + a, cursor + b))
            r["sequence"].extend([w.sequence] * (b - a))
            r["position"].extend(range(a, b))
            r["token_id"].extend(ids.tolist())
            r["token_text"].extend(tok.decode([int(i)]) for i in ids)
            r["document_id"].extend([w.doc_id] * (b - a))
            r["special"].extend(w.special[a:b].tolist())  # BOS and tokenizer special ids (iter_windows)
        cursor += n


def _typed_rows(rows: dict[str, list]) -> dict:
    """Token rows as pyarrow arrays of the ``TOKENS_COLUMNS`` types."""
    import pyarrow as pa

    schema = fmt.arrow_schema(fmt.TOKENS_COLUMNS)
    return {c: pa.array(rows[c], schema.field(c).type) for c, _ in fmt.TOKENS_COLUMNS}


# ---------------------------------------------------------------- finish


def finish_run(run: PreparedRun, stats: dict) -> fmt.Manifest:
    """Seal a run whose shards are all written: checksums of every file, the manifest marked ``complete``
    (with ``stats`` and the bytes on disk), then the catalogue rebuilt.

    Raises:
        ActsparseError: a shard without its token part (the run stays incomplete).
    """
    n = run.manifest.n_parts
    missing = sorted(set(range(n)) - completed_shards(run.run_dir, n))
    if missing:
        raise ActsparseError(f"run {run.manifest.run_id}: {len(missing)} of {n} shards not written "
                             f"(first: {missing[0]}); run left incomplete")
    write_checksums(run.run_dir)
    manifest = dataclasses.replace(run.manifest, status="complete", completed=_now(),
                                   stats=stats | dict(bytes_on_disk=_listed_bytes(run.run_dir)))
    atomic_write_json(run.run_dir / fmt.MANIFEST, manifest.to_dict())
    write_catalogue(run.paths)
    return manifest


def _listed_bytes(run_dir: Path) -> int:
    """Bytes of the files the run's ``checksums.json`` lists: its data, the same wherever and by whom it was
    written (the lock file, which holds the writer's pid, is not listed)."""
    listed = parse_checksums((run_dir / fmt.CHECKSUMS).read_bytes(), f"run {run_dir.name}")
    return sum(size for _, size in listed.values())
