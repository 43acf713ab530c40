"""Batch collection jobs from a TOML file.

Format::

    store = "stores/main"            # optional; --store overrides
    [defaults]                       # optional; any CollectConfig field
    max_tokens = 4096
    sites = ["input", "gate", "intermediate"]

    [[jobs]]                         # a list value in a job expands to the product of all lists
    model = ["smollm2-135m", "gemma3-270m"]
    corpus = "wiki"

Completed runs are skipped (the run id is a content hash), a failed job does not stop the others, and
failures are reported at the end.
"""

from __future__ import annotations

import dataclasses
import itertools
import tomllib
from collections.abc import Callable
from pathlib import Path

from actsparse.core.errors import ActsparseError
from actsparse.core.parsing import names
from actsparse.core.progress import ProgressFactory
from actsparse.pipeline.collect import CollectConfig, ShardStatistics, collect

# Generation and diffusion runs (``decoding``) are collected one command each, not from a jobs file.
_FIELDS = {f.name for f in dataclasses.fields(CollectConfig)} - {"decoding"}
# The TOML type each CollectConfig field takes (sites: a list of names, or one comma-separated string)
_KINDS = {"model": str, "corpus": str, "max_tokens": int, "seq_len": int, "batch_size": int, "dtype": str,
          "compute_dtype": str, "chunk_tokens": int, "split": str, "text_field": str, "add_bos": bool,
          "trust_remote_code": bool}
assert set(_KINDS) | {"sites"} == _FIELDS, "every CollectConfig field has a TOML type"
_KIND_WORDS = {str: "a string", int: "an integer", bool: "true or false"}


def _checked(key: str, value, where: str):
    """``value`` of field ``key`` as CollectConfig takes it; ActsparseError naming ``where`` otherwise."""
    if key == "sites":
        if isinstance(value, str):
            return names(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ActsparseError(f"{where}: sites must be a list of site names, got {value!r}")
    kind = _KINDS[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ActsparseError(f"{where}: {key} must be {_KIND_WORDS[kind]}, got {value!r}")
    return value


def load_jobs(path: Path) -> tuple[str | None, list[CollectConfig]]:
    """Parse a jobs file into ``(store, configs)``.

    Raises:
        ActsparseError: missing or invalid TOML, unknown keys, a value of the wrong type, a job without
            model or corpus (before any job runs).
    """
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ActsparseError(f"jobs file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ActsparseError(f"jobs file {path} is not valid TOML: {e}") from None
    unknown = set(doc) - {"store", "defaults", "jobs"}
    if unknown:
        raise ActsparseError(f"jobs file {path}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    defaults = doc.get("defaults", {})
    jobs = doc.get("jobs", [])
    if not isinstance(jobs, list) or not jobs:
        raise ActsparseError(f"jobs file {path} has no [[jobs]] entries")
    configs = []
    for i, job in enumerate(jobs, 1):
        merged = defaults | job
        bad = set(merged) - _FIELDS
        if bad:
            raise ActsparseError(f"jobs file {path}, job {i}: unknown key(s) {', '.join(sorted(bad))}")
        if "model" not in merged or "corpus" not in merged:
            raise ActsparseError(f"jobs file {path}, job {i}: needs model and corpus")
        where = f"jobs file {path}, job {i}"
        axes = {k: [_checked(k, x, where) for x in v] for k, v in merged.items()
                if isinstance(v, list) and k != "sites"}
        fixed = {k: _checked(k, v, where) for k, v in merged.items() if k not in axes}
        for combo in itertools.product(*axes.values()):
            configs.append(CollectConfig(**fixed, **dict(zip(axes, combo))))
    return doc.get("store"), configs


def jobs_store(path: Path, file_store, store: str | Path | None) -> str | Path:
    """Where the jobs of ``path`` go: ``store`` (``--store``) if given, else the file's ``store`` (a path
    relative to the file's directory unless absolute).

    Raises:
        ActsparseError: the file's store is not a string, or neither names a store.
    """
    if file_store is not None and not isinstance(file_store, str):
        raise ActsparseError(f"jobs file {path}: store must be a string, got {file_store!r}")
    if store is not None:
        return store
    if file_store is None:
        raise ActsparseError(f"jobs file {path} names no store; pass --store")
    return str(Path(path).parent / file_store) if not Path(file_store).is_absolute() else file_store


def run_jobs(path: Path, *, store: Path | None = None, statistics: ShardStatistics | None = None,
             progress: ProgressFactory | None = None, log: Callable[[str], None] = print,
             device: str = "cpu") -> list[tuple[CollectConfig, str]]:
    """Run every job of a jobs file in order (``collect`` with ``statistics``, ``progress`` and ``device``);
    return the failed ones as ``(config, one-line reason)``.

    Raises:
        ActsparseError: the jobs file is invalid or names no store (before any job runs).
    """
    file_store, configs = load_jobs(path)
    target = jobs_store(path, file_store, store)
    failed = []
    for i, cfg in enumerate(configs, 1):
        log(f"[{i}/{len(configs)}] {cfg.model} x {cfg.corpus} ({','.join(cfg.sites)})")
        try:
            collect(cfg, target, statistics=statistics, progress=progress, log=log, device=device)
        except ActsparseError as e:
            log(f"  failed: {e}")
            failed.append((cfg, str(e)))
    ok = len(configs) - len(failed)
    log(f"{ok} of {len(configs)} job(s) done" + (f"; {len(failed)} failed:" if failed else ""))
    for cfg, why in failed:
        log(f"  {cfg.model} x {cfg.corpus}: {why}")
    return failed
