"""Read-only access to a store, local or remote (any fsspec URL: ``file://``, ``http(s)://``, ``s3://``).

Nothing here writes: analysis and queries can run on a store on a read-only filesystem or a web server.
Nothing here depends on directory listings either, which plain web servers may not offer: run ids come
from ``catalogue.parquet`` (plus a listing of ``runs/`` where one is available, for incomplete runs), and
the token parts of a run are named from its manifest (``ceil(n_tokens / chunk_tokens)`` parts).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from threading import Lock

import numpy as np

from actsparse.core import format as fmt
from actsparse.core.codec import decode
from actsparse.core.errors import ActsparseError
from actsparse.core.files import NotRegularFile, read_regular


def _fs(url: str):
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(str(url))
    except ImportError as e:
        # fsspec's HTTP filesystem needs aiohttp, an optional dependency (the ``http`` extra).
        raise ActsparseError(f"reading {url} needs a package that is not installed ({e}); "
                             "for http(s) stores: pip install aiohttp") from None
    return fs, root.rstrip("/")


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


class StoreReader:
    """A store opened read-only.

    Args:
        url: a local path or fsspec URL of the store root.

    Raises:
        ActsparseError: not an actsparse store, or a newer format version.
    """

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = _fs(url)
        marker = f"{self.root}/{fmt.STORE_FILE}"
        try:
            meta = json.loads(self.read(fmt.STORE_FILE, fmt.MAX_METADATA_BYTES))
        except FileNotFoundError:
            raise ActsparseError(f"{url} is not an actsparse store (no {fmt.STORE_FILE})") from None
        except NotADirectoryError:
            raise ActsparseError(f"store path {url} is a file, not a directory") from None
        except (OSError, ValueError, RecursionError) as e:
            raise ActsparseError(f"cannot read {marker}: {str(e).splitlines()[0][:200] if str(e) else e!r}") from None
        self.format_version: int = fmt.check_store_marker(meta, str(url))
        if not _is_local(self.fs):
            self._check_ranges(marker)

    def _check_ranges(self, marker: str) -> None:
        """Refuse servers that ignore HTTP Range requests (``python -m http.server`` does).

        zarr reads shard indexes and chunks as byte ranges; fsspec returns the whole body when a server
        ignores the range, which would be decoded as garbage rather than failing.
        """
        try:
            head = self.fs.cat_file(marker, start=0, end=8)
        except (OSError, ValueError) as e:
            raise ActsparseError(f"cannot read {marker}: {e}") from None
        if len(head) != 8:
            raise ActsparseError(f"{self.url} ignores byte-range requests (asked for 8 bytes, got {len(head)}); "
                                 "serve the store with a server that supports HTTP Range (nginx, caddy, S3, ...)")

    @property
    def is_local(self) -> bool:
        """True for a store on the local filesystem (the only kind results are written back into)."""
        return _is_local(self.fs)

    def path(self, *parts: str) -> str:
        """The URL (or local path) of a store-relative path given in ``parts`` (joined with ``/``)."""
        return "/".join([self.root, *parts])

    def read(self, rel: str, limit: int, what: str = "store file") -> bytes:
        """The bytes of a store file (``rel``, store-relative) of at most ``limit`` bytes.

        Local files are opened as regular files only (``actsparse.core.files.open_regular``: a FIFO would
        block, a symbolic link lead outside the store), and no more than ``limit + 1`` bytes are read
        anywhere, so a huge or endless file is refused at the cost of a small one.

        Raises:
            FileNotFoundError, NotADirectoryError: no such file.
            ActsparseError: not a regular file, larger than ``limit``, or unreadable.
        """
        url = self.path(rel)
        if self.is_local:
            try:
                return read_regular(url, limit, what)
            except NotRegularFile as e:
                raise ActsparseError(f"{rel} in {self.url} is {e.what}; a store holds regular files only") from None
            except (FileNotFoundError, NotADirectoryError):
                raise
            except OSError as e:
                raise ActsparseError(f"cannot read {rel} in {self.url}: {e.strerror or e}") from None
        with self.fs.open(url, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ActsparseError(f"{url}: larger than the {limit} bytes a {what} may hold")
        return data

    def listed_run_ids(self) -> list[str] | None:
        """Run ids found by listing ``runs/``, or None where the filesystem cannot list it."""
        try:
            entries = self.fs.ls(self.path(fmt.RUNS), detail=False)
        except FileNotFoundError:
            return [] if _is_local(self.fs) else None
        except Exception:  # noqa: BLE001 - listing is optional for remote stores (403, HTML without links, ...)
            if _is_local(self.fs):
                raise
            return None
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return sorted(i for i in names if fmt.ID_RE.match(i))

    def catalogue_run_ids(self) -> list[str]:
        """Run ids of ``catalogue.parquet`` (complete runs when it was last rebuilt); [] without one."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            raw = self.read(fmt.CATALOGUE, fmt.MAX_CATALOGUE_BYTES, "catalogue")
        except FileNotFoundError:
            return []
        try:
            ids = pq.read_table(pa.BufferReader(raw), columns=["run_id"]).column("run_id").to_pylist()
        except (pa.ArrowException, KeyError, ValueError) as e:
            raise ActsparseError(f"{self.path(fmt.CATALOGUE)} is not a readable catalogue ({e})") from None
        return sorted({i for i in ids if isinstance(i, str) and fmt.ID_RE.match(i)})

    def run_ids(self, *, include_incomplete: bool = False) -> list[str]:
        """Ids of the runs (complete ones unless asked), sorted.

        A listing of ``runs/`` (where the filesystem offers one) and the catalogue are combined, so a
        remote store served without directory listings still shows its complete runs.
        """
        if include_incomplete and _is_local(self.fs):
            return self.listed_run_ids()  # a local listing is authoritative: catalogue rows of deleted runs are stale
        return list(self.manifests(include_incomplete=include_incomplete))

    def manifests(self, *, include_incomplete: bool = False) -> dict[str, fmt.Manifest]:
        """``{run id: manifest}`` of the runs (complete ones unless asked), in id order: one read per run.

        A run whose manifest cannot be read or does not validate is left out, so one damaged run does not
        hide the others (``actsparse runs`` lists it as damaged; opening it by id raises).
        """
        listed = self.listed_run_ids()
        try:
            catalogued = self.catalogue_run_ids()
        except ActsparseError:
            if listed is None:
                raise  # without a listing the catalogue is all there is
            catalogued = []  # a damaged catalogue: the listing finds every run (`actsparse verify` reports it)
        found = {}
        for i in sorted(set(listed or ()) | set(catalogued)):
            try:
                m = self.manifest(i, missing_ok=True)
            except ActsparseError:
                continue
            if m is not None and (include_incomplete or m.complete):
                found[i] = m
        return found

    def manifest(self, run_id: str, *, missing_ok: bool = False) -> fmt.Manifest | None:
        """The validated manifest of a run (None for a run without one when ``missing_ok``).

        Raises:
            ActsparseError: an invalid run id, no manifest, or one that does not validate
                (``actsparse.core.format.Manifest.from_dict`` names the field).
        """
        where = f"run {fmt.check_id(run_id)}"
        try:
            raw = self.read(fmt.run_path(run_id, fmt.MANIFEST), fmt.MAX_METADATA_BYTES, "manifest")
        except (FileNotFoundError, NotADirectoryError):  # runs/<id> may be a file
            if missing_ok:
                return None
            raise ActsparseError(f"{where} has no manifest") from None
        m = fmt.Manifest.from_json(raw, where)
        if m.run_id != run_id:
            raise ActsparseError(f"{where}: manifest says run_id {m.run_id}")
        return m

    def run(self, ref: str | None = None) -> Run:
        """Open one complete run by id or unique id prefix (or the only run when ``ref`` is None).

        Raises:
            ActsparseError: no run, ambiguous prefix, or the run is incomplete.
        """
        ids = self.run_ids(include_incomplete=True)
        if ref is None:
            complete = list(self.manifests())
            if len(complete) != 1:
                raise ActsparseError(f"store holds {len(complete)} complete runs; choose one with --run "
                                     f"({', '.join(complete) or 'none'})")
            ref = complete[0]
        run_id = fmt.match_run(ref, ids)
        m = self.manifest(run_id)
        if not m.complete:
            raise ActsparseError(f"run {run_id} is incomplete; resume it with the same `actsparse collect` command")
        return Run(self, m)

    def runs(self) -> list[Run]:
        return [Run(self, m) for m in self.manifests().values()]

    @cached_property
    def async_fs(self):
        """An instance of the filesystem created with ``asynchronous=True``, for zarr's own event loop.

        The synchronous instance keeps its HTTP session on fsspec's loop; sharing it with zarr's loop
        fails, so zarr gets a separate instance (or a wrapper around a synchronous filesystem).
        """
        if getattr(self.fs, "async_impl", False):
            return type(self.fs)(**{**self.fs.storage_options, "asynchronous": True})
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        return AsyncFileSystemWrapper(self.fs, asynchronous=True)


@dataclass
class Run:
    """One complete run: token table, dense arrays ``[layers, tokens, width]`` and FFN weights."""

    store: StoreReader
    manifest: fmt.Manifest

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @property
    def sites(self) -> tuple[str, ...]:
        return self.manifest.sites

    @property
    def n_layers(self) -> int:
        return self.manifest.n_layers

    @property
    def n_tokens(self) -> int:
        return self.manifest.n_tokens

    @property
    def activation(self) -> str:
        return self.manifest.ffn.activation

    @property
    def chunk_tokens(self) -> int:
        return self.manifest.chunk_tokens

    @property
    def n_parts(self) -> int:
        """Number of token parts (shards) of the run."""
        return self.manifest.n_parts

    def _zarr_store(self, *parts: str):
        import zarr

        if _is_local(self.store.fs):
            return zarr.storage.LocalStore(self.store.path(*parts), read_only=True)
        return zarr.storage.FsspecStore(self.store.async_fs, path=self.store.path(*parts), read_only=True)

    @cached_property
    def _arrays(self):
        import zarr

        return zarr.open_group(self._zarr_store(fmt.run_path(self.run_id, fmt.ACTIVATIONS)), mode="r", zarr_format=3)

    def array(self, site: str):
        """The zarr array of a stored site, ``[layers, tokens, width]``, or of a mixture-of-experts array
        (``routed/gate``: ``actsparse.core.format.MoELayout.array_specs``).

        Raises:
            ActsparseError: the site was not stored in this run.
        """
        if site in self.manifest.moe_arrays:
            return self._open(site)
        if site not in self.sites:
            raise ActsparseError(f"run {self.run_id} has no site '{site}' (stored: {', '.join(self.sites)}); "
                                 f"collect it with --sites {','.join(sorted(set(self.sites) | {site}))}")
        return self._open(site)

    def _open(self, name: str):
        """The zarr array ``name`` of the run's activations group.

        Raises:
            ActsparseError: the group's or the array's ``zarr.json`` is missing, not JSON or not zarr metadata
                (zarr raises JSONDecodeError, KeyError or its own errors for these).
        """
        try:
            return self._arrays[name]
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
            raise ActsparseError(f"run {self.run_id}: cannot open its {name} array ({_why(e)}); "
                                 "`actsparse verify` checks the store") from None

    def read(self, site: str, layer: int, start: int = 0, stop: int | None = None, *, to: str = "float32"):
        """Dense activations of one layer as a torch tensor ``[stop-start, width]`` (float32 by default).

        Raises:
            ActsparseError: a shard cannot be read or decoded (a truncated or damaged file: the checksum
                or the codec refuses it), naming the run, site, layer and tokens.
        """
        arr = self.array(site)
        try:
            block = arr[layer, start:stop]
        except (ValueError, RuntimeError, OSError) as e:  # zarr's crc32c check, blosc, the filesystem
            raise ActsparseError(f"run {self.run_id}: cannot read {site} layer {layer} "
                                 f"tokens {start}:{stop or self.n_tokens} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
                                 "`actsparse verify` checks the store") from e
        return decode(block, self.manifest.arrays[site].logical_dtype, to=to)

    @property
    def moe(self) -> fmt.MoELayout | None:
        """The mixture-of-experts layout of the run's model, or None for a dense model."""
        return self.manifest.moe

    def read_moe(self, name: str, layer: int, start: int = 0, stop: int | None = None, *, to: str = "float32"):
        """One decoder layer's tokens ``[start, stop)`` of a mixture-of-experts array (``routed/gate``,
        ``routed/expert_id``, ``shared/weight``, ``dense/intermediate``; ``actsparse.core.format.MoELayout``) as a
        torch tensor ``[n, *inner]``: float32 by default, ``native`` for the stored dtype; expert ids as int64.

        Raises:
            ActsparseError: not a mixture-of-experts run, no such array (naming the stored ones), a layer the
                array does not cover (e.g. a dense layer of a routed array), or a shard that cannot be read.
        """
        if self.moe is None or name not in self.manifest.moe_arrays:
            stored = ", ".join(self.manifest.moe_arrays) or "none: not a mixture-of-experts run"
            raise ActsparseError(f"run {self.run_id} has no array '{name}' (mixture-of-experts arrays: {stored})")
        group, index = self.moe.position(layer)
        if (group == fmt.DENSE) != (name.split("/")[0] == fmt.DENSE):  # routed and shared arrays: MoE layers
            raise ActsparseError(f"run {self.run_id}: layer {layer} is a {'dense' if group == fmt.DENSE else 'MoE'} "
                                 f"layer; array {name} does not cover it")
        try:
            block = self._open(name)[index, start:stop]
        except (ValueError, RuntimeError, OSError) as e:  # zarr's crc32c check, blosc, the filesystem
            raise ActsparseError(f"run {self.run_id}: cannot read {name} layer {layer} tokens {start}:"
                                 f"{stop or self.n_tokens} ({type(e).__name__}); `actsparse verify` checks the store"
                                 ) from e
        logical = self.manifest.moe_arrays[name].logical_dtype
        if logical == fmt.INDEX_DTYPE:
            import torch

            return torch.from_numpy(np.asarray(block).astype(np.int64))
        return decode(block, logical, to=to)

    def blocks(self, site: str, layer: int, block_tokens: int | None = None) -> Iterator[tuple[int, object]]:
        """Yield ``(start, tensor [n, width])`` over the tokens, one stored chunk at a time."""
        step = block_tokens or self.chunk_tokens
        for start in range(0, self.n_tokens, step):
            yield start, self.read(site, layer, start, min(start + step, self.n_tokens))

    @cached_property
    def _weights(self):
        import zarr

        try:
            group = zarr.open_group(self._zarr_store(fmt.weights_path(self.manifest.weights_id, fmt.WEIGHTS)),
                                    mode="r", zarr_format=3)
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
            raise ActsparseError(f"{self._weights_name}: cannot open them ({_why(e)}); "
                                 "`actsparse verify` checks the store") from None
        return group

    @property
    def _weights_name(self) -> str:
        return f"weights {self.manifest.weights_id} of run {self.run_id}"

    def weights(self, layer: int) -> LayerWeights:
        """FFN weights of a layer: a read-only mapping of name (``gate``, ``up``, ``down``, biases) to a
        float32 torch tensor in nn.Linear ``[out, in]`` layout, each read on first access (a sweep
        of the intermediate target needs ``down`` only, a sweep without error none).

        Raises:
            ActsparseError: the stored weights lack an array the FFN has (a damaged store: zarr skips an array
                whose metadata is unreadable), naming the weights and the run.
        """
        keys = self._weight_keys()
        if self.moe is None:
            need = ("gate", "up", "down") if self.manifest.ffn.glu else ("gate", "down")
            missing = [n for n in need if n not in keys]
            if missing:
                raise ActsparseError(f"{self._weights_name}: array(s) {', '.join(missing)} missing or unreadable; "
                                     "`actsparse verify` checks the store")
        return LayerWeights(self._weights, layer, {n: n for n in keys}, where=self._weights_name)

    def _weight_keys(self) -> list[str]:
        """The names of the stored weight arrays (reading each one's ``zarr.json``).

        Raises:
            ActsparseError: a metadata file is missing or damaged, naming the weights and the run.
        """
        try:
            return list(self._weights.array_keys())
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
            raise ActsparseError(f"{self._weights_name}: cannot list them ({_why(e)}); "
                                 "`actsparse verify` checks the store") from None

    def expert_weights(self, layer: int) -> LayerWeights:
        """The stored FFN weights of one decoder layer of a mixture-of-experts run, read lazily
        (``pipeline.moe_weights``): for a MoE layer ``gate``/``up`` ``[E, d_moe, d_model]``, ``down``
        ``[E, d_model, d_moe]``, ``router`` and, with a shared expert, ``shared_gate``/``shared_up``/
        ``shared_down``/``shared_expert_gate``; for a dense layer ``gate``/``up``/``down`` as a dense GLU.

        Raises:
            ActsparseError: not a mixture-of-experts run, or not one of its decoder layers.
        """
        if self.moe is None:
            raise ActsparseError(f"run {self.run_id} is not a mixture-of-experts run; its weights: Run.weights")
        group, index = self.moe.position(layer)
        prefix = "dense_" if group == fmt.DENSE else ""
        names = {n.removeprefix(prefix): n for n in self._weight_keys()
                 if n.startswith(prefix) and (prefix or not n.startswith("dense_"))}
        return LayerWeights(self._weights, index, names, where=self._weights_name)

    def tokens(self):
        """The token table as a polars DataFrame (the columns of the run's kind: ``Manifest.token_columns``).

        Raises:
            ActsparseError: a token part is missing (a damaged store: ``actsparse verify`` names it).
        """
        import polars as pl
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for k in range(self.n_parts):
            rel = fmt.run_path(self.run_id, fmt.token_part(k))
            try:
                raw = self.store.read(rel, fmt.MAX_PART_BYTES, "token part")
            except FileNotFoundError:
                raise ActsparseError(f"{rel} is missing from {self.store.url}; "
                                     "check the store with `actsparse verify`") from None
            try:
                table = pq.read_table(pa.BufferReader(raw), schema=fmt.arrow_schema(self.manifest.token_columns))
            except (pa.ArrowException, ValueError) as e:
                why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise ActsparseError(f"{rel} in {self.store.url} is not a readable token part ({why}); "
                                     "check the store with `actsparse verify`") from None
            start, stop = fmt.shard_tokens(k, self.chunk_tokens, self.n_tokens)
            if table.num_rows != stop - start:
                raise ActsparseError(f"{rel} in {self.store.url} holds {table.num_rows} rows, not the "
                                     f"{stop - start} tokens of its shard; check the store with `actsparse verify`")
            tables.append(table)
        return pl.from_arrow(pa.concat_tables(tables))

    def special_mask(self) -> np.ndarray:
        """Bool ``[tokens]``: BOS and other special tokens (excluded from statistics by default)."""
        return self.tokens()["special"].to_numpy()


def _why(e: BaseException) -> str:
    """An exception as ``Type: first line`` for a one-line error."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}"


class LayerWeights(Mapping):
    """One layer's stored FFN weights, read lazily and kept: ``w["down"]`` is float32 ``[d_model, d_ff]``.

    Thread-safe (analysis workers share one per layer); ``in``, ``get`` and iteration list the stored
    names without reading anything. ``where`` names the weights in errors.

    Raises:
        ActsparseError: a stored array cannot be read or decoded (damaged metadata or chunk), naming ``where``.
    """

    def __init__(self, group, layer: int, names: Mapping[str, str] | None = None, where: str = "weights"):
        self._group, self._layer, self._where = group, layer, where
        # the names this mapping offers -> the stored array names (a dense layer of a MoE run: dense_gate -> gate)
        self._stored = dict(names) if names is not None else {n: n for n in group.array_keys()}
        self._names = tuple(sorted(self._stored))
        self._loaded: dict = {}
        self._lock = Lock()

    def __getitem__(self, name: str):
        import torch

        with self._lock:
            if name not in self._loaded:
                if name not in self._stored:
                    raise KeyError(name)
                try:
                    data = np.asarray(self._group[self._stored[name]][self._layer])
                except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:  # crc32c, blosc, metadata
                    raise ActsparseError(f"{self._where}: cannot read {name} of layer "
                                         f"{self._layer} ({_why(e)}); `actsparse verify` checks the store") from None
                self._loaded[name] = torch.from_numpy(data)
            return self._loaded[name]

    def __contains__(self, name: object) -> bool:  # Mapping's own would read the array
        return name in self._stored

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
