"""The read-only store reader (``actsparse.pipeline.reader``): runs by id or prefix, damaged runs left out of
listings, arrays and tokens read back, weights read lazily."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.reader import StoreReader


def test_runs_by_id_or_prefix_and_their_contents(two_model_store):
    path, a, b = two_model_store
    st = StoreReader(str(path))
    assert st.run_ids() == sorted([a, b]) and st.run(a[:5]).run_id == a
    run = st.run(a)
    assert run.n_parts == -(-600 // 128) and run.tokens().height == 600
    assert run.read("gate", 0, 10, 20).shape == (10, run.manifest.ffn.d_ff)
    blocks = list(run.blocks("input", 1, 256))
    assert [s for s, _ in blocks] == [0, 256, 512] and sum(len(t) for _, t in blocks) == 600
    assert np.array_equal(run.special_mask(), run.tokens()["special"].to_numpy())
    w = run.weights(1)
    assert set(w) == {"gate", "up", "down"} and not w._loaded  # listing reads nothing
    assert w["down"].shape == (run.manifest.ffn.d_model, run.manifest.ffn.d_ff) and set(w._loaded) == {"down"}
    with pytest.raises(ActsparseError, match="has no site 'act'"):
        run.read("act", 0)


def test_errors_name_the_run(two_model_store, tmp_path):
    path, a, b = two_model_store
    st = StoreReader(str(path))
    with pytest.raises(ActsparseError, match="unknown run 'ffff'"):
        st.run("ffff")
    with pytest.raises(ActsparseError, match="unknown run ''"):
        st.run("")
    with pytest.raises(ActsparseError, match="store holds 2 complete runs"):
        st.run(None)
    with pytest.raises(ActsparseError, match="not an actsparse store"):
        StoreReader(str(tmp_path))


def test_a_damaged_run_is_left_out_of_listings_and_named_when_opened(two_model_store, tmp_path):
    path, a, b = two_model_store
    copy = Path(shutil.copytree(path, tmp_path / "S"))
    manifest = copy / fmt.run_path(b, fmt.MANIFEST)
    m = json.loads(manifest.read_text())
    m["n_tokens"] = 10**400  # sized to loop forever if trusted
    manifest.write_text(json.dumps(m))
    st = StoreReader(str(copy))
    assert list(st.manifests()) == [a]
    with pytest.raises(ActsparseError, match=f"run {b}: manifest field 'n_tokens'"):
        st.run(b)
    (copy / fmt.run_path(a, fmt.token_part(1))).unlink()
    with pytest.raises(ActsparseError, match="tokens/part-000001.parquet is missing"):
        st.run(a).tokens()


def test_damaged_zarr_metadata_is_one_error_naming_the_run(two_model_store, tmp_path):
    # found by `make fuzz`: a flipped activations.zarr/zarr.json made `report` end in zarr's JSONDecodeError
    path, a, b = two_model_store
    copy = Path(shutil.copytree(path, tmp_path / "S"))
    group = copy / fmt.run_path(a, fmt.ACTIVATIONS) / "zarr.json"
    group.write_bytes(b"\x00" + group.read_bytes()[1:])
    with pytest.raises(ActsparseError, match=f"run {a}: cannot open its gate array \\(JSONDecodeError"):
        StoreReader(str(copy)).run(a).read("gate", 0)
    group.unlink()
    with pytest.raises(ActsparseError, match=f"run {a}: cannot open its gate array"):
        StoreReader(str(copy)).run(a).read("gate", 0)


def test_damaged_weights_are_one_error_naming_them(two_model_store, tmp_path):
    # found by `make fuzz`: a flipped chunk of the stored down projection made `report` end in a blosc traceback
    path, a, b = two_model_store
    copy = Path(shutil.copytree(path, tmp_path / "S"))
    run = StoreReader(str(copy)).run(a)
    chunk = copy / fmt.weights_path(run.manifest.weights_id, fmt.WEIGHTS) / "down" / "c" / "0" / "0" / "0"
    chunk.write_bytes(bytes([chunk.read_bytes()[0] ^ 1]) + chunk.read_bytes()[1:])
    w = run.weights(0)
    assert "down" in w  # listing reads nothing
    with pytest.raises(ActsparseError, match=f"weights {run.manifest.weights_id} of run {a}: cannot read down of "
                                             "layer 0 \\(RuntimeError"):
        w["down"]
    meta = chunk.parents[3] / "zarr.json"  # found by the next `make fuzz`: a damaged array's metadata
    meta.write_bytes(b"\x00" + meta.read_bytes()[1:])
    with pytest.raises(ActsparseError, match=f"weights {run.manifest.weights_id} of run {a}: cannot list them"):
        StoreReader(str(copy)).run(a).weights(0)
    meta.unlink()  # found by the last `make fuzz`: metadata replaced by a directory, which zarr skips silently
    meta.mkdir()
    with pytest.raises(ActsparseError, match=f"weights {run.manifest.weights_id} of run {a}: array\\(s\\) down missing"):
        StoreReader(str(copy)).run(a).weights(0)
