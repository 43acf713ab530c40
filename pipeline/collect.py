"""Collection: stream FFN activations of one model over one corpus into a run of the store.

The forward pass runs on the main thread; a writer thread compresses and writes whole shards
(``chunk_tokens`` tokens x all layers) while the next batches run, so writing overlaps compute and
memory stays bounded by ``batch_size x seq_len`` plus two shards in flight, whatever the token count.

Resume: the token stream (windows, batches, shard boundaries) is a pure function of the run config,
and a shard's token part is written last, so a killed run restarts at the first shard without a token
part and re-computes exactly the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import json
import platform
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from actsparse.errors import ActsparseError
from actsparse.share import write_checksums
from pipeline import store as fmt
from pipeline.corpora import Window, iter_windows, open_corpus
from pipeline.models import ResolvedModel, load_model, load_tokenizer, resolve_model
from pipeline.sites import SITES, FFNArchitecture, SiteRecorder, ffn_weights, resolve_ffn

DEFAULT_SITES = ("input", "gate", "intermediate")


@dataclass(frozen=True)
class CollectConfig:
    """Everything that determines a run's content (hashed into the run id, with model and corpus hashes).

    Attributes:
        model: alias, HF id or local checkpoint path.
        corpus: ``wiki``, ``shakespeare`` or a file path (.txt, .jsonl, .parquet).
        sites: FFN sites to store (subset of ``pipeline.sites.SITES``).
        max_tokens: stop after this many tokens (None: the whole split).
        seq_len: window length in tokens, BOS included.
        batch_size: windows per forward pass (fixed: batch composition changes float results).
        dtype: stored dtype, ``bfloat16`` | ``float16`` | ``float32``.
        compute_dtype: model dtype for the forward pass.
        chunk_tokens: tokens per chunk/shard along the token axis.
        split: corpus split, ``collect`` (default) or ``heldout``.
        text_field: jsonl field or parquet column holding the text.
        add_bos: start every window with BOS where the tokenizer has one.
    """

    model: str
    corpus: str
    sites: tuple[str, ...] = DEFAULT_SITES
    max_tokens: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    dtype: str = "bfloat16"
    compute_dtype: str = "float32"
    chunk_tokens: int = 1024
    split: str = "collect"
    text_field: str | None = None
    add_bos: bool = True
    trust_remote_code: bool = False

    def validate(self) -> None:
        """Raise ActsparseError on values that cannot work, before anything is loaded."""
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise ActsparseError(f"unknown site(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SITES)}")
        if len(set(self.sites)) != len(self.sites):
            raise ActsparseError(f"site listed twice in {', '.join(self.sites)}")
        if self.dtype not in fmt.STORED_DTYPES:
            raise ActsparseError(f"unknown --dtype '{self.dtype}' (choose {', '.join(fmt.STORED_DTYPES)})")
        if self.compute_dtype not in fmt.STORED_DTYPES:
            raise ActsparseError(f"unknown --compute-dtype '{self.compute_dtype}' (choose {', '.join(fmt.STORED_DTYPES)})")
        for name in ("seq_len", "batch_size", "chunk_tokens"):
            if getattr(self, name) < (2 if name == "seq_len" else 1):
                raise ActsparseError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ActsparseError(f"--max-tokens must be positive (got {self.max_tokens})")
        if self.split not in ("collect", "heldout"):
            raise ActsparseError(f"unknown split '{self.split}' (choose collect or heldout)")


@dataclass
class CollectResult:
    run_id: str
    path: Path
    status: str  # "complete" (written now) or "already-complete"
    n_tokens: int
    elapsed_s: float = 0.0
    forward_s: float = 0.0
    manifest: dict = field(default_factory=dict)


def _versions() -> dict:
    import duckdb
    import polars
    import pyarrow
    import torch
    import transformers
    import zarr

    from actsparse import __version__

    return dict(actsparse=__version__, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, zarr=zarr.__version__, numpy=np.__version__,
                pyarrow=pyarrow.__version__, duckdb=duckdb.__version__, polars=polars.__version__)


def _model_info(resolved: ResolvedModel, model, tok, arch: FFNArchitecture) -> dict:
    cfg = model.config
    return dict(
        spec=resolved.spec, name=resolved.name, source=resolved.source, license=resolved.license,
        weights_sha256=resolved.weights_sha256, architecture=type(model).__name__, model_type=cfg.model_type,
        max_position_embeddings=getattr(cfg, "max_position_embeddings", None),
        vocab_size=getattr(cfg, "vocab_size", None), ffn=arch.describe(),
        tokenizer=dict(cls=type(tok).__name__, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, special_ids=sorted(tok.all_special_ids)),
    )


def _weights_id(weights_sha256: str, arch: FFNArchitecture, compute_dtype: str) -> str:
    return fmt.content_hash(dict(weights=weights_sha256, ffn=arch.describe(), dtype=compute_dtype))


def _write_weights(paths: fmt.StorePaths, weights_id: str, arch: FFNArchitecture) -> None:
    """Store the FFN weights of every layer once per model (atomic: temporary directory, then rename)."""
    import zarr

    target = paths.weights_dir(weights_id)
    with fmt.blocking_lock(target.parent / ".lock"):
        if (target / "zarr.json").is_file():
            return
        tmp = target.with_name(target.name + ".tmp")
        fmt.remove_tree(tmp)
        group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3)
        first = ffn_weights(arch, 0)
        for name, w in first.items():
            arr = group.create_array(name, shape=(len(arch.layers), *w.shape), dtype="float32",
                                     chunks=(1, *w.shape), compressors=_compressor(4))
            for layer in range(len(arch.layers)):
                arr[layer] = ffn_weights(arch, layer)[name].float().numpy()
        group.attrs.update(dict(activation=arch.activation, pattern=arch.pattern, d_model=arch.d_model, d_ff=arch.d_ff,
                                layout="nn.Linear [out, in]; gate/up [d_ff, d_model], down [d_model, d_ff]"))
        tmp.rename(target)
        write_checksums(target.parent)


@contextlib.contextmanager
def _single_threaded_blosc():
    """One blosc thread per encode while collecting, restored afterwards.

    zarr already encodes a shard's chunks concurrently; blosc's own threads on top of that, beside
    the forward pass's, cost 1.7x the CPU time per shard on 2 cores (BENCHMARKS.md).
    """
    from numcodecs import blosc

    n = blosc.get_nthreads()
    blosc.set_nthreads(1)
    try:
        yield
    finally:
        blosc.set_nthreads(n)


def _compressor(typesize: int):
    from zarr.codecs import BloscCodec

    # blosc-lz4 with bit shuffle: the sign/exponent bits of activations compress, mantissa bits barely do.
    # On real SmolLM2 bf16 activations: 1.55 bytes/value at ~1.6 GB/s, against zstd-1 with byte shuffle
    # at 1.58 bytes/value and ~0.5 GB/s (BENCHMARKS.md), so writing keeps up with the forward pass.
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=typesize)


def _create_arrays(act_dir: Path, cfg: CollectConfig, arch: FFNArchitecture, n_tokens: int) -> dict:
    import zarr

    group = zarr.open_group(zarr.storage.LocalStore(act_dir), mode="a", zarr_format=3)
    nd = fmt.numpy_dtype(cfg.dtype)
    arrays, spec = {}, {}
    n_layers = len(arch.layers)
    t = min(cfg.chunk_tokens, max(n_tokens, 1))
    for site in cfg.sites:
        width = arch.d_model if site in ("input", "output") else arch.d_ff
        shape = (n_layers, n_tokens, width)
        if site in group:
            arr = group[site]
            if arr.shape != shape:
                raise ActsparseError(f"existing array {site} has shape {arr.shape}, expected {shape}: the run directory is corrupt")
        else:
            arr = group.create_array(
                site, shape=shape, dtype=nd, chunks=(1, t, width), shards=(n_layers, t, width),
                compressors=_compressor(np.dtype(nd).itemsize), fill_value=0,
                dimension_names=("layer", "token", "feature"), attributes=dict(logical_dtype=cfg.dtype, site=site),
            )
        # activations are never all fill value: skip zarr's per-chunk "is it empty" scan (~2x the encode time)
        arrays[site] = arr.with_config({"write_empty_chunks": True})
        spec[site] = dict(shape=list(shape), chunks=[1, t, width], shards=[n_layers, t, width], numpy_dtype=nd,
                          logical_dtype=cfg.dtype, width=width)
    return arrays, spec


def _shard_writes(arrays: dict, act_dir: Path, chunk_tokens: int) -> dict:
    """``{site: write(k, block)}``: shard k of a site from ``block`` ``[layers, n, width]``, through
    ``pipeline.shards.ShardWriter`` (the same bytes for about half zarr's CPU) where the array's
    layout is the one it reproduces, else through zarr."""
    from pipeline.shards import ShardWriter

    def via_zarr(arr):
        def write(k: int, block: np.ndarray) -> None:
            arr[:, k * chunk_tokens:k * chunk_tokens + block.shape[1], :] = block
        return write

    writes = {}
    for site, arr in arrays.items():
        fast = ShardWriter.for_array(arr, act_dir / site)
        writes[site] = fast.write if fast is not None else via_zarr(arr)
    return writes


class _ShardPool:
    """Shard buffers ``{site: [layers, chunk_tokens, width]}`` recycled between the main and writer threads.

    ``size`` sets are allocated up front and touched, so memory is bounded whatever the token count and
    the loop never page-faults on them: first-touch faults of fresh buffers cost ~1 s per 4,096
    SmolLM2-135M tokens on a 2-core VM (BENCHMARKS.md). :meth:`take` blocks until the writer
    releases a set.
    """

    def __init__(self, shapes: dict[str, tuple[int, int, int]], dtype: str, size: int):
        self._free: queue.Queue = queue.Queue()
        for _ in range(size):
            bufs = {s: np.empty(shape, dtype=dtype) for s, shape in shapes.items()}
            for b in bufs.values():
                b.fill(0)  # touch every page now (np.zeros would map them lazily)
            self._free.put(bufs)

    def take(self, block: bool = True) -> dict[str, np.ndarray]:
        """A free set; raises ``queue.Empty`` when ``block`` is False and none is free."""
        return self._free.get(block=block)

    def release(self, bufs: dict[str, np.ndarray]) -> None:
        self._free.put(bufs)


class _Writer(threading.Thread):
    """Writes whole shards from a queue (bounded by the pool); the first exception is kept for the main thread.

    ``writes`` maps a site to ``write(k, block)`` for shard k (``_shard_writes``). Shards are
    independent files, and a run's completed shards are counted as a contiguous prefix of token parts
    (``store.completed_parts``), so two threads may write shards in any order.
    """

    def __init__(self, run_dir: Path, writes: dict, pool: _ShardPool):
        super().__init__(daemon=True, name="actsparse-writer")
        self.q: queue.Queue = queue.Queue()
        self.run_dir, self.writes, self.pool = run_dir, writes, pool
        self.error: BaseException | None = None
        self.write_s = 0.0
        self._lock = threading.Lock()

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            self._write(item)

    def _write(self, item) -> None:
        import pyarrow as pa

        k, blocks, token_rows, bufs, extra = item
        t0 = time.perf_counter()
        try:
            if self.error is None:
                for site, block in blocks.items():
                    self.writes[site](k, block)
                if extra is not None:
                    extra()
                fmt.atomic_write_parquet(self.run_dir / "tokens" / fmt.part_name(k), pa.table(token_rows))
        except BaseException as e:  # re-raised on the main thread
            self.error = e
        finally:
            self.pool.release(bufs)
        with self._lock:
            self.write_s += time.perf_counter() - t0

    def write_one(self) -> bool:
        """Write one queued shard on the calling thread (False when none is queued): a thread that would
        otherwise wait for the writer uses its core instead, e.g. once the forward passes are over."""
        try:
            item = self.q.get_nowait()
        except queue.Empty:  # the stop marker is only queued after the main thread's last call
            return False
        self._write(item)
        return True

    def put(self, item) -> None:
        self.raise_if_failed()
        self.q.put(item)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def _warm_up_statistics() -> threading.Thread:
    """Import and compile (or load from numba's cache) the statistics kernel while the model loads."""

    def warm() -> None:
        import torch

        from analyze.token_stats import token_stats

        token_stats(torch.zeros((1, 2), dtype=torch.bfloat16))

    thread = threading.Thread(target=warm, daemon=True, name="actsparse-warm-up")
    thread.start()
    return thread


def _token_texts(tok, ids: np.ndarray) -> list[str]:
    return [tok.decode([int(i)]) for i in ids]


def _batches(windows: list[Window], batch_size: int):
    for b in range(0, len(windows), batch_size):
        yield windows[b:b + batch_size]


def _batch_tensors(batch: list[Window], pad_id: int):
    """Right-padded ``(input_ids, attention_mask)``, both int64 ``[batch, max_len]``."""
    import torch

    width = max(len(w.token_ids) for w in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, w in enumerate(batch):
        ids[i, : len(w.token_ids)] = torch.from_numpy(w.token_ids)
        mask[i, : len(w.token_ids)] = 1
    return ids, mask


def _forward_batch(model, ids, mask) -> None:
    import torch

    body = getattr(model, "base_model", model)  # skip the LM head: only FFN activations are needed
    with torch.inference_mode():
        body(input_ids=ids, attention_mask=mask, use_cache=False)


def plan(cfg: CollectConfig, *, progress: bool = False):
    """Resolve model, tokenizer and corpus and compute the run id without running the model.

    Returns ``(resolved, tokenizer, corpus, windows, run_id, identity)``.
    """
    cfg.validate()
    resolved = resolve_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tok, mcfg = load_tokenizer(resolved, seq_len=cfg.seq_len)
    corpus = open_corpus(cfg.corpus, text_field=cfg.text_field)
    windows = list(iter_windows(corpus.split(cfg.split), tok, cfg.seq_len, max_tokens=cfg.max_tokens, add_bos=cfg.add_bos))
    if not windows:
        raise ActsparseError(f"corpus {cfg.corpus} split '{cfg.split}' yields no tokens")
    import torch
    import transformers

    identity = dict(
        format_version=fmt.FORMAT_VERSION, config=dataclasses.asdict(cfg) | dict(model=None, corpus=None),
        weights_sha256=resolved.weights_sha256, model_type=mcfg.model_type, corpus_sha256=corpus.sha256,
        torch=torch.__version__, transformers=transformers.__version__,
    )
    return resolved, tok, corpus, windows, fmt.content_hash(identity), identity


def collect(cfg: CollectConfig, store: str | Path, *, progress: bool = True,
            on_shard: Callable[[int, dict, dict], None] | None = None, log: Callable[[str], None] = print) -> CollectResult:
    """Collect one run (model x corpus x sites) into ``store``; resume it if it was interrupted.

    Args:
        cfg: the run configuration.
        store: local store directory (created if missing).
        progress: show a progress bar with tokens/s.
        on_shard: work per complete shard ``(k, blocks, token_rows)``, run on the main thread between
            forward passes (so it may use every core); ``blocks[site]`` is the stored numpy array
            ``[layers, T, width]``. It may return a callable, which the writer thread runs after the
            shard's arrays and before its token part. None (the default) computes and writes the
            per-token statistics (``analyze.token_stats.stats_writer``); a callable replaces them.
        log: where one-line messages go.

    Returns:
        CollectResult; ``status`` is ``already-complete`` (a no-op) when the run exists and is complete.

    Raises:
        ActsparseError: bad config, model, corpus or store; another writer holds this run; disk errors.
    """
    t_start = time.perf_counter()
    resolved, tok, corpus, windows, run_id, identity = plan(cfg)  # bad input fails before the store exists
    paths = fmt.create_store(store)
    run_dir = paths.run_dir(run_id)
    manifest_path = run_dir / fmt.MANIFEST
    n_tokens = sum(len(w.token_ids) for w in windows)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fmt.disk_error(e, f"creating run {run_id}") from e
    with fmt.exclusive_lock(run_dir / ".lock", f"run {run_id}"):
        if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("status") == "complete":
            log(f"run {run_id} is already complete ({n_tokens} tokens); nothing to do")
            return CollectResult(run_id, run_dir, "already-complete", n_tokens, manifest=json.loads(manifest_path.read_text()))
        try:
            with _single_threaded_blosc():
                return _collect_locked(cfg, paths, run_dir, resolved, tok, corpus, windows, run_id, identity,
                                       n_tokens, progress, on_shard, log, t_start)
        except OSError as e:
            raise fmt.disk_error(e, f"writing run {run_id}") from e


def _collect_locked(cfg, paths, run_dir, resolved, tok, corpus, windows, run_id, identity, n_tokens,
                    progress, on_shard, log, t_start) -> CollectResult:
    import pyarrow as pa

    warm = _warm_up_statistics() if on_shard is None else None
    model = load_model(resolved, cfg.compute_dtype)
    arch = resolve_ffn(model)
    unsupported = [s for s in cfg.sites if s not in arch.sites]
    if unsupported:
        raise ActsparseError(f"site(s) {', '.join(unsupported)} do not exist in {type(model).__name__} "
                             f"({arch.pattern} FFN has {', '.join(arch.sites)})")
    weights_id = _weights_id(resolved.weights_sha256, arch, cfg.compute_dtype)
    _write_weights(paths, weights_id, arch)
    act_dir = run_dir / fmt.ACTIVATIONS
    arrays, array_spec = _create_arrays(act_dir, cfg, arch, n_tokens)
    manifest = dict(
        format="actsparse-run", format_version=fmt.FORMAT_VERSION, run_id=run_id, status="incomplete",
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        config=dataclasses.asdict(cfg), identity=identity,
        model=_model_info(resolved, model, tok, arch) | dict(weights_id=weights_id),
        corpus=dict(spec=corpus.spec, name=corpus.name, sha256=corpus.sha256, license=corpus.license,
                    description=corpus.description, n_documents=len(corpus.split(cfg.split))),
        tokenization=dict(seq_len=cfg.seq_len, add_bos=cfg.add_bos and tok.bos_token_id is not None,
                          padding="none stored (right-padded batches, attention-mask selected)",
                          special="BOS and tokenizer special ids flagged in tokens.special"),
        arrays=array_spec, n_tokens=n_tokens, n_sequences=len(windows), chunk_tokens=cfg.chunk_tokens,
        versions=_versions(),
    )
    if (run_dir / fmt.MANIFEST).is_file():
        manifest["created"] = json.loads((run_dir / fmt.MANIFEST).read_text()).get("created", manifest["created"])
    fmt.atomic_write_json(run_dir / fmt.MANIFEST, manifest)
    docs = corpus.split(cfg.split)
    fmt.atomic_write_parquet(run_dir / "documents.parquet", pa.table(dict(
        document_id=pa.array([d.doc_id for d in docs], pa.int32()), key=[d.key for d in docs],
        split=[d.split for d in docs], n_chars=pa.array([len(d.text) for d in docs], pa.int64()))))

    T = cfg.chunk_tokens
    done = fmt.completed_parts(run_dir)
    start_token = min(done * T, n_tokens)
    if done:
        log(f"resuming run {run_id} at token {start_token} of {n_tokens}")
    elif cfg.max_tokens is not None and n_tokens < cfg.max_tokens:
        log(f"corpus {corpus.name} split '{cfg.split}' holds {n_tokens} tokens, fewer than --max-tokens {cfg.max_tokens}: "
            f"collecting all of them")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    if on_shard is None:
        from analyze.token_stats import stats_writer

        on_shard = stats_writer(run_dir, manifest)
    n_layers = len(arch.layers)
    max_batch = max(sum(len(w.token_ids) for w in batch) for batch in _batches(windows, cfg.batch_size))
    # a batch fills at most ceil(max_batch / T) + 1 shards at once (one carried over); that many sets
    # always progress, as the writer releases every set the main thread does not hold
    pool = _ShardPool({s: (n_layers, T, array_spec[s]["width"]) for s in cfg.sites}, fmt.numpy_dtype(cfg.dtype),
                      size=-(-max_batch // T) + 1)
    writer = _Writer(run_dir, _shard_writes(arrays, act_dir, T), pool)
    writer.start()
    filling: dict[int, dict[str, np.ndarray]] = {}  # shard index -> its buffers {site: [layers, T, width]}
    buf_rows: dict[str, list] = {c: [] for c in fmt.TOKEN_COLUMNS}
    segments: list[tuple[dict, int, int, int]] = []  # (shard buffers, batch row, shard row, rows) per batch
    keep_rows = None

    def sink(site: str, layer: int, t) -> None:
        # [batch, seq, w] (or OPT's flattened [batch * seq, w]) -> the valid rows, converted and copied
        # into their shards' buffers in one pass
        rows = t.reshape(-1, t.shape[-1])
        if keep_rows is not None:
            rows = rows.index_select(0, keep_rows)
        for bufs, src, dst, n in segments:
            fmt.encode(rows[src:src + n], cfg.dtype, where=f"site {site} layer {layer}", out=bufs[site][layer, dst:dst + n])

    def ship(upto: int) -> None:
        """Hand every shard whose tokens all lie before ``upto`` to the writer, in order."""
        for k in sorted(filling):
            n = min(T, n_tokens - k * T)
            if k * T + n > upto:
                break
            bufs = filling.pop(k)
            rows = {c: v[:n] for c, v in buf_rows.items()}
            for c in buf_rows:
                buf_rows[c] = buf_rows[c][n:]
            blocks, typed = {s: bufs[s][:, :n] for s in cfg.sites}, _typed_rows(rows)
            # between forward passes, not on the writer: beside the forward pass, extra CPU work costs
            # about twice its time, as the forward's OpenMP threads spin at barriers (BENCHMARKS.md)
            extra = on_shard(k, blocks, typed)
            writer.put((k, blocks, typed, bufs, extra))

    def free_set() -> dict[str, np.ndarray]:
        """A free set of shard buffers; while none is, write queued shards here rather than wait."""
        while True:
            try:
                return pool.take(block=False)
            except queue.Empty:
                if not writer.write_one():  # the writer thread holds the set that frees next
                    return pool.take()

    if warm is not None:
        warm.join()
    forward_s = 0.0
    t_loop = time.perf_counter()
    bar = _progress(progress, n_tokens, start_token, f"{resolved.name} × {corpus.name}")
    token_cursor = 0
    # The model, tokenizer and libraries are millions of long-lived objects; the cyclic GC would scan
    # them on every full collection the loop's allocations trigger (~8% of collection CPU, measured).
    gc.freeze()
    try:
        with SiteRecorder(arch, cfg.sites, sink) as rec:
            for batch in _batches(windows, cfg.batch_size):
                batch_tokens = sum(len(w.token_ids) for w in batch)
                lo, hi = max(token_cursor, start_token), token_cursor + batch_tokens
                if hi <= start_token:
                    token_cursor = hi
                    continue
                segments = []
                for k in range(lo // T, (hi - 1) // T + 1):
                    if k not in filling:
                        filling[k] = free_set()
                    first, last = max(lo, k * T), min(hi, (k + 1) * T)
                    segments.append((filling[k], first - token_cursor, first - k * T, last - first))
                t0 = time.perf_counter()
                rec.reset_counts()
                ids, attn = _batch_tensors(batch, pad_id)
                # attention-mask positions, never `ids != pad_id` (pitfall P3)
                valid = attn.reshape(-1).bool()
                keep_rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
                _forward_batch(model, ids, attn)
                rec.check_fired(1)
                forward_s += time.perf_counter() - t0
                for w in batch:
                    n = len(w.token_ids)
                    buf_rows["token_index"].extend(range(token_cursor, token_cursor + n))
                    buf_rows["sequence"].extend([w.sequence] * n)
                    buf_rows["position"].extend(range(n))
                    buf_rows["token_id"].extend(w.token_ids.tolist())
                    buf_rows["token_text"].extend(_token_texts(tok, w.token_ids))
                    buf_rows["document_id"].extend([w.doc_id] * n)
                    buf_rows["special"].extend(w.special.tolist())  # BOS and tokenizer special ids (iter_windows)
                    token_cursor += n
                skip = lo - (hi - batch_tokens)  # only in the batch that straddles the resume point
                if skip:
                    for c in buf_rows:
                        buf_rows[c] = buf_rows[c][skip:]
                ship(hi)
                bar.advance(hi - lo)
        while writer.write_one():
            pass
    finally:
        writer.q.put(None)
        writer.join()
        bar.close()
        gc.unfreeze()
    writer.raise_if_failed()
    loop_s = time.perf_counter() - t_loop

    parts = fmt.completed_parts(run_dir)
    expected = -(-n_tokens // T)
    if parts != expected:
        raise ActsparseError(f"run {run_id}: {parts} token parts written, expected {expected}; run left incomplete")
    elapsed = time.perf_counter() - t_start
    write_checksums(run_dir)
    manifest.update(status="complete", completed=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    stats=dict(elapsed_s=round(elapsed, 3), forward_s=round(forward_s, 3), loop_s=round(loop_s, 3),
                               write_s=round(writer.write_s, 3),
                               bytes_on_disk=_du(run_dir), tokens_per_s=round((n_tokens - start_token) / max(elapsed, 1e-9), 1)))
    fmt.atomic_write_json(run_dir / fmt.MANIFEST, manifest)
    fmt.write_catalogue(paths)
    log(f"run {run_id} complete: {n_tokens} tokens, {len(cfg.sites)} sites x {len(arch.layers)} layers -> {run_dir}")
    return CollectResult(run_id, run_dir, "complete", n_tokens, elapsed, forward_s, manifest)


def _typed_rows(rows: dict) -> dict:
    import pyarrow as pa

    return dict(
        token_index=pa.array(rows["token_index"], pa.int64()), sequence=pa.array(rows["sequence"], pa.int64()),
        position=pa.array(rows["position"], pa.int32()), token_id=pa.array(rows["token_id"], pa.int32()),
        token_text=pa.array(rows["token_text"], pa.string()), document_id=pa.array(rows["document_id"], pa.int32()),
        special=pa.array(rows["special"], pa.bool_()),
    )


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _progress:
    """A rich progress bar with tokens/s, or nothing."""

    def __init__(self, enabled: bool, total: int, done: int, label: str):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(), transient=False)
            self.p.start()
            self.task = self.p.add_task(label, total=total, completed=done, rate="-")
            self.t0, self.n = time.perf_counter(), 0

    def advance(self, n: int) -> None:
        if self.p is not None:
            self.n += n
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            self.p.update(self.task, advance=n, rate=f"{rate:,.0f}")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
