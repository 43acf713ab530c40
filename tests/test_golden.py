"""A small run pinned to its digests: the same ``collect`` gives the same run id and the same bytes.

``tests/data/golden_run.json`` holds the run id and the sha256 of every file of a small run (tiny Llama, all six
sites, 160 tokens over two shards) as collected by actsparse before its restructuring; ``golden_run.npz`` holds
its arrays. Where the environment that recorded them is the one running (library versions and machine), every
file must be byte-identical. Elsewhere float kernels may round differently, so the arrays are compared value by
value (at most one bf16 step apart, on a tiny share of entries) and the files that hold no floats must still be
identical. Regenerate with ``python -m tests.test_golden`` after an intended format change.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

from tests.helpers import TEXT, build_tiny

DATA = Path(__file__).parent / "data"
# Absolute on purpose: a corpus spec holds its path, and the corpus hash (so the run id) holds the spec.
BASE = Path("/tmp/actsparse-golden")
# Files whose bytes do not depend on float arithmetic (given the library versions).
FLOAT_FREE = ("documents.parquet", "/tokens/", "zarr.json")


def _environment() -> dict:
    import numcodecs
    import pyarrow
    import torch
    import transformers
    import zarr

    return dict(torch=torch.__version__, transformers=transformers.__version__, zarr=zarr.__version__,
                numcodecs=numcodecs.__version__, pyarrow=pyarrow.__version__, numpy=np.__version__,
                machine=platform.machine())


def collect_golden() -> tuple[str, dict[str, str], dict[str, np.ndarray]]:
    """Collect the pinned run afresh: ``(run id, {store-relative path: sha256}, {site: stored array})``."""
    from actsparse import CollectConfig, collect
    from actsparse.pipeline.reader import StoreReader

    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    model = build_tiny(BASE / "model", "llama")
    corpus = BASE / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}. " + TEXT * (1 + i % 3)}) + "\n" for i in range(12)))
    cfg = CollectConfig(model=str(model), corpus=str(corpus), max_tokens=160, seq_len=64, batch_size=2,
                        chunk_tokens=128, sites=("input", "gate", "act", "up", "intermediate", "output"))
    root = BASE / "S"
    res = collect(cfg, root, progress=None, log=lambda m: None)
    # the manifest and the catalogue hold times and durations; everything else is content
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
             if p.is_file() and p.name not in ("manifest.json", "catalogue.parquet") and not p.name.startswith(".")}
    run = StoreReader(str(root)).run(res.run_id)
    return res.run_id, files, {s: np.asarray(run.array(s)[:]) for s in run.sites}


def test_a_small_run_is_pinned_to_its_digests():
    golden = json.loads((DATA / "golden_run.json").read_text())
    arrays = np.load(DATA / "golden_run.npz")
    run_id, files, got = collect_golden()
    assert set(files) == set(golden["files"])
    same_env = golden["environment"] == _environment()
    for rel, sha in golden["files"].items():
        if same_env or any(part in rel for part in FLOAT_FREE):
            assert files[rel] == sha, rel
    if same_env:
        assert run_id == golden["run_id"]
    for site, want in arrays.items():
        a = (got[site].astype(np.int32) if got[site].dtype == np.uint16 else got[site].view(np.int32))
        b = (want.astype(np.int32) if want.dtype == np.uint16 else want.view(np.int32))
        steps = np.abs(a - b)
        assert steps.max() <= 1 and (steps > 0).mean() <= 1e-3, site


if __name__ == "__main__":
    run_id, files, got = collect_golden()
    (DATA / "golden_run.json").write_text(json.dumps(dict(run_id=run_id, environment=_environment(), files=files),
                                                     indent=1) + "\n")
    np.savez_compressed(DATA / "golden_run.npz", **got)
    print(f"pinned run {run_id}: {len(files)} files", file=sys.stderr)
