"""``actsparse.pipeline.shards.ShardWriter`` writes the very bytes zarr writes, and zarr reads them back."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from actsparse.core.format import ArraySpec
from actsparse.pipeline.arrays import create_arrays, shard_writes
from actsparse.pipeline.shards import ShardWriter

T = 64  # tokens per shard


def arrays_in(directory: Path, n_tokens: int, dtype: str = "bfloat16"):
    specs = {site: ArraySpec.for_site(3, n_tokens, T, width, dtype) for site, width in (("input", 24), ("intermediate", 40))}
    return create_arrays(directory, specs)


def activation_bits(shape, seed: int) -> np.ndarray:
    """bf16 bit patterns of heavy-tailed activations (compressible like real ones, not constant)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3
    return a.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_shards_are_byte_identical_to_zarrs_edge_shard_included(tmp_path, dtype):
    n_tokens = 3 * T + 17  # the last shard is an edge shard, padded with the fill value
    ours, theirs = arrays_in(tmp_path / "ours", n_tokens, dtype), arrays_in(tmp_path / "zarr", n_tokens, dtype)
    for site, arr in ours.items():
        writer = ShardWriter.for_array(arr, tmp_path / "ours" / site)
        assert writer is not None
        data = activation_bits(arr.shape, seed=len(site))
        if dtype == "float32":
            data = data.astype(np.uint32) << 16
            data = data.view(np.float32)
        for k in range(-(-n_tokens // T)):
            block = data[:, k * T:(k + 1) * T]
            writer.write(k, block)
            theirs[site][:, k * T:(k + 1) * T] = block
        files = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours" / site).rglob("*") if p.is_file())
        assert len(files) == 1 + -(-n_tokens // T)  # zarr.json and one file per shard
        for rel in files:
            assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "zarr" / rel).read_bytes(), rel
        back = zarr.open_array(tmp_path / "ours" / site, mode="r")
        np.testing.assert_array_equal(back[:], data)


def test_other_layouts_go_through_zarr(tmp_path):
    """An array this writer does not reproduce (here: no sharding) gets zarr's own write path."""
    arr = zarr.create_array(tmp_path / "x", shape=(3, 2 * T, 8), chunks=(1, T, 8), dtype="uint16", fill_value=0)
    assert ShardWriter.for_array(arr, tmp_path / "x") is None
    write = shard_writes({"x": arr}, tmp_path, T)["x"]
    block = activation_bits((3, T, 8), seed=1)
    files = write(1, block)
    np.testing.assert_array_equal(arr[:, T:], block)
    assert not arr[:, :T].any()
    # every chunk file the write touched, with the crc32c and size of what is on disk
    assert sorted(files) == [f"x/c/{layer}/1/0" for layer in range(3)]
    for rel, (crc, size) in files.items():
        data = (tmp_path / rel).read_bytes()
        assert (crc, size) == (f"{google_crc32c.value(data):08x}", len(data))


def test_a_block_of_the_wrong_shape_is_refused(tmp_path):
    arr = arrays_in(tmp_path, 2 * T)["input"]
    writer = ShardWriter.for_array(arr, tmp_path / "input")
    for shape in [(2, T, 24), (3, T + 1, 24), (3, 0, 24), (3, T, 23)]:
        with pytest.raises(ValueError, match=r"a shard block is \[3, <= 64, 24\]"):
            writer.write(0, np.zeros(shape, np.uint16))
    with pytest.raises(ValueError, match="is uint16, got float32"):
        writer.write(0, np.zeros((3, T, 24), np.float32))
    assert not (tmp_path / "input" / "c").exists()  # nothing half-written


def test_mixture_of_experts_arrays_are_byte_identical_to_zarrs(tmp_path):
    """The routed slot arrays [layers, T, k, d_moe], the ids [layers, T, k] (int16) and the shared gate
    [layers, T, 1] (float32) of a MoE run: a shard file per T tokens, chunk keys c/0/K/0[/0]."""
    from actsparse.core import format as fmt

    layout = fmt.MoELayout(model_class="M", block_class="B", experts_class="E", activation="silu", n_layers=3,
                           moe_layers=(1, 2), dense_layers=(0,), n_experts=4, top_k=2, d_model=8, d_moe=6,
                           d_shared=5, shared_gate="sigmoid", d_ff_dense=7)
    n_tokens = 2 * T + 9
    specs = layout.array_specs(("gate",), n_tokens, T, "bfloat16")
    assert set(specs) == {"routed/expert_id", "routed/weight", "routed/gate", "shared/gate", "shared/weight",
                          "dense/gate"}
    ours, theirs = create_arrays(tmp_path / "ours", specs), create_arrays(tmp_path / "zarr", specs)
    rng = np.random.default_rng(0)
    for name, arr in ours.items():
        writer = ShardWriter.for_array(arr, tmp_path / "ours" / name)
        assert writer is not None, name
        if arr.dtype == np.int16:
            data = rng.integers(0, 4, arr.shape).astype(np.int16)
        elif arr.dtype == np.float32:
            data = rng.random(arr.shape, dtype=np.float32)
        else:
            data = activation_bits(arr.shape, seed=len(name))
        for k in range(-(-n_tokens // T)):
            writer.write(k, data[:, k * T:(k + 1) * T])
            theirs[name][:, k * T:(k + 1) * T] = data[:, k * T:(k + 1) * T]
        files = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours" / name).rglob("*") if p.is_file())
        assert len(files) == 1 + 3 and all((tmp_path / "zarr" / rel).is_file() for rel in files)
        for rel in files:
            assert (tmp_path / "ours" / rel).read_bytes() == (tmp_path / "zarr" / rel).read_bytes(), rel
        np.testing.assert_array_equal(zarr.open_array(tmp_path / "ours" / name, mode="r")[:], data)
        assert zarr.open_array(tmp_path / "ours" / name, mode="r").metadata.dimension_names == \
            fmt.dimension_names(name)
