"""Read-only access to a store, local or remote (any fsspec URL: ``file://``, ``http(s)://``, ``s3://``).

Nothing here writes: analysis and queries can run on a store on a read-only filesystem or a web server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np

from actsparse.errors import ActsparseError
from pipeline import store as fmt


def _fs(url: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url))
    return fs, root.rstrip("/")


def _check_manifest(m: object, where: str) -> dict:
    """Validate the parts of a manifest that readers rely on (never trust it as a path source)."""
    if not isinstance(m, dict):
        raise ActsparseError(f"{where}: manifest is not a JSON object")
    fmt._check_version(m, where)
    required = {"run_id": str, "status": str, "config": dict, "model": dict, "corpus": dict, "arrays": dict,
                "n_tokens": int}
    for key, typ in required.items():
        if not isinstance(m.get(key), typ):
            raise ActsparseError(f"{where}: manifest field '{key}' is missing or not a {typ.__name__}")
    if not fmt.RUN_ID_RE.match(m["run_id"]):
        raise ActsparseError(f"{where}: manifest run_id {m['run_id']!r} is not a valid run id")
    for site in m["arrays"]:
        if site not in ("input", "gate", "act", "up", "intermediate", "output"):
            raise ActsparseError(f"{where}: manifest names unknown site {site!r}")
    wid = m["model"].get("weights_id")
    if not isinstance(wid, str) or not fmt.WEIGHTS_ID_RE.match(wid):
        raise ActsparseError(f"{where}: manifest weights_id {wid!r} is not a valid id")
    return m


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
            meta = json.loads(self.fs.cat_file(marker))
        except FileNotFoundError:
            raise ActsparseError(f"{url} is not an actsparse store (no {fmt.STORE_FILE})") from None
        except (OSError, ValueError) as e:
            raise ActsparseError(f"cannot read {marker}: {e}") from None
        fmt._check_version(meta, str(url))

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def run_ids(self, *, include_incomplete: bool = False) -> list[str]:
        """Ids of the runs (complete ones unless asked), sorted."""
        try:
            entries = self.fs.ls(self.path("runs"), detail=False)
        except FileNotFoundError:
            return []
        ids = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        ids = [i for i in ids if fmt.RUN_ID_RE.match(i)]
        if include_incomplete:
            return ids
        return [i for i in ids if self.manifest(i, missing_ok=True).get("status") == "complete"]

    def manifest(self, run_id: str, *, missing_ok: bool = False) -> dict:
        if not fmt.RUN_ID_RE.match(run_id):
            raise ActsparseError(f"invalid run id {run_id!r}")
        where = f"run {run_id}"
        try:
            raw = self.fs.cat_file(self.path("runs", run_id, fmt.MANIFEST))
        except FileNotFoundError:
            if missing_ok:
                return {}
            raise ActsparseError(f"{where} has no manifest") from None
        try:
            m = json.loads(raw)
        except ValueError as e:
            raise ActsparseError(f"{where}: manifest is not valid JSON ({e})") from None
        m = _check_manifest(m, where)
        if m["run_id"] != run_id:
            raise ActsparseError(f"{where}: manifest says run_id {m['run_id']}")
        return m

    def run(self, ref: str | None = None) -> "Run":
        """Open one complete run by id or unique id prefix (or the only run when ``ref`` is None).

        Raises:
            ActsparseError: no run, ambiguous prefix, or the run is incomplete.
        """
        ids = self.run_ids(include_incomplete=True)
        if ref is None:
            complete = [i for i in ids if self.manifest(i, missing_ok=True).get("status") == "complete"]
            if len(complete) != 1:
                raise ActsparseError(f"store holds {len(complete)} complete runs; choose one with --run ({', '.join(complete) or 'none'})")
            ref = complete[0]
        matches = [i for i in ids if i.startswith(ref)]
        if not matches:
            raise ActsparseError(f"unknown run '{ref}' (runs: {', '.join(ids) or 'none'})")
        if len(matches) > 1:
            raise ActsparseError(f"run prefix '{ref}' is ambiguous: {', '.join(matches)}")
        m = self.manifest(matches[0])
        if m["status"] != "complete":
            raise ActsparseError(f"run {matches[0]} is incomplete; resume it with the same `actsparse collect` command")
        return Run(self, m)

    def runs(self) -> list["Run"]:
        return [Run(self, self.manifest(i)) for i in self.run_ids()]


@dataclass
class Run:
    """One complete run: token table, dense arrays ``[layers, tokens, width]`` and FFN weights."""

    store: StoreReader
    manifest: dict

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.manifest["arrays"])

    @property
    def n_layers(self) -> int:
        return int(self.manifest["model"]["ffn"]["n_layers"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def activation(self) -> str:
        return self.manifest["model"]["ffn"]["activation"]

    @property
    def chunk_tokens(self) -> int:
        return int(self.manifest["chunk_tokens"])

    def _zarr_store(self, *parts: str):
        import zarr

        protocols = self.store.fs.protocol if isinstance(self.store.fs.protocol, tuple) else (self.store.fs.protocol,)
        if "file" in protocols:
            return zarr.storage.LocalStore(self.store.path(*parts), read_only=True)
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = self.store.fs if getattr(self.store.fs, "async_impl", False) else AsyncFileSystemWrapper(self.store.fs)
        return zarr.storage.FsspecStore(fs, path=self.store.path(*parts), read_only=True)

    @cached_property
    def _arrays(self):
        import zarr

        return zarr.open_group(self._zarr_store("runs", self.run_id, fmt.ACTIVATIONS), mode="r", zarr_format=3)

    def array(self, site: str):
        """The zarr array of a stored site, ``[layers, tokens, width]``.

        Raises:
            ActsparseError: the site was not stored in this run.
        """
        if site not in self.sites:
            raise ActsparseError(f"run {self.run_id} has no site '{site}' (stored: {', '.join(self.sites)}); "
                                 f"collect it with --sites {','.join(sorted(set(self.sites) | {site}))}")
        return self._arrays[site]

    def read(self, site: str, layer: int, start: int = 0, stop: int | None = None, *, to: str = "float32"):
        """Dense activations of one layer as a torch tensor ``[stop-start, width]`` (float32 by default)."""
        arr = self.array(site)
        return fmt.decode(arr[layer, start:stop], self.manifest["arrays"][site]["logical_dtype"], to=to)

    def blocks(self, site: str, layer: int, block_tokens: int | None = None) -> Iterator[tuple[int, object]]:
        """Yield ``(start, tensor [n, width])`` over the tokens, one stored chunk at a time."""
        step = block_tokens or self.chunk_tokens
        for start in range(0, self.n_tokens, step):
            yield start, self.read(site, layer, start, min(start + step, self.n_tokens))

    @cached_property
    def _weights(self):
        import zarr

        wid = self.manifest["model"]["weights_id"]
        return zarr.open_group(self._zarr_store("models", wid, fmt.WEIGHTS), mode="r", zarr_format=3)

    def weights(self, layer: int) -> dict:
        """FFN weights of a layer (float32 torch tensors, nn.Linear ``[out, in]`` layout)."""
        import torch

        return {name: torch.from_numpy(np.asarray(self._weights[name][layer])) for name in self._weights.array_keys()}

    def tokens(self):
        """The token table as a polars DataFrame (columns ``pipeline.store.TOKEN_COLUMNS``)."""
        import polars as pl
        import pyarrow.parquet as pq

        files = sorted(self.store.fs.glob(self.store.path("runs", self.run_id, "tokens", "part-*.parquet")))
        tables = [pq.read_table(f, filesystem=self.store.fs) for f in files]
        import pyarrow as pa

        return pl.from_arrow(pa.concat_tables(tables))

    def special_mask(self) -> np.ndarray:
        """Bool ``[tokens]``: BOS and other special tokens (excluded from statistics by default)."""
        return self.tokens()["special"].to_numpy()
