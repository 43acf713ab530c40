"""Curves and index through Ray tasks write exactly what the local executor writes (a real local Ray instance)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from actsparse.analyze.curves import compute_curves
from actsparse.analyze.token_stats import index_store
from actsparse.core import format as fmt
from actsparse.executors.ray_analysis import RayMaps
from actsparse.executors.ray_session import RayOptions
from tests.helpers import store_diff

OPTS = RayOptions(workers=2, deadline_s=300)


@pytest.mark.slow
def test_curves_through_ray_equal_the_local_result(ray_local, two_model_store, tmp_path):
    """Every layer in a task of its own; the threshold rule (a second analysis, calibrated per layer) and the
    all-inputs target (two hooks per layer in the model level) included: the same rows, the same Parquet."""
    src, llama, _ = two_model_store
    a, b = (Path(shutil.copytree(src, tmp_path / name)) for name in ("local", "ray"))
    kw = dict(targets=("intermediate", "all-inputs"), rules=("top-p", "threshold"),
              grids={"top-p": [1.0, 0.9, 0.5], "threshold": [0.0, 0.5, 0.9]})
    want = compute_curves(a, llama, **kw)
    done: list[int] = []
    with RayMaps(OPTS) as maps:
        got = compute_curves(b, llama, **kw, map_layers=maps.layers, progress=done.append)
    assert got.equals(want) and want.height == 2 * 2 * 3 * (3 + 1)  # targets x rules x values x (layers + model)
    assert len(maps.workers) >= 1 and len(done) == 2 * 3  # one task per layer, for each of the two analyses
    assert store_diff(a, b) == []
    assert len(list((b / fmt.run_path(llama, fmt.ANALYSIS)).glob("curves-*.parquet"))) == 2


@pytest.mark.slow
def test_index_through_ray_writes_the_local_parts(ray_local, two_model_store, tmp_path):
    """Runs whose statistics are gone, indexed locally and in Ray tasks (one per run and shard): the parts
    collection wrote, byte for byte, and the same checksums."""
    src, llama, gpt2 = two_model_store
    copies = [Path(shutil.copytree(src, tmp_path / name)) for name in ("local", "ray")]
    for store in copies:
        for stats in store.glob(f"runs/*/{fmt.TOKEN_STATS}"):
            shutil.rmtree(stats)
    want = index_store(copies[0], log=lambda m: None)
    with RayMaps(OPTS) as maps:
        got = index_store(copies[1], log=lambda m: None, map_parts=maps.parts)
    assert got == want == {llama: 5 * 3, gpt2: 3 * 3}  # shards x sites
    assert store_diff(copies[0], copies[1]) == [] and store_diff(src, copies[1]) == []
    with RayMaps(OPTS) as maps:  # nothing missing: no task, and Ray is not even reached
        assert index_store(copies[1], log=lambda m: None, map_parts=maps.parts) == {llama: 0, gpt2: 0}
    assert maps.workers == set()
