"""The device logic of collection, on the CPU: resolving ``--device``, the forward dtype, the run identity of a
CUDA run, and the staged copy off the device (what CUDA runs) against the direct one (what the CPU runs).

No GPU is at hand on these machines: the staged path runs here on CPU tensors, which exercises everything but
the asynchronous copy itself (README, Running on a cluster: the CUDA path is untested on hardware)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.collect import CollectConfig, plan
from actsparse.pipeline.device import ShardCopier, forward_dtype, resolve_device
from actsparse.pipeline.recorder import SiteRecorder
from actsparse.pipeline.sites import resolve_ffn


def test_resolve_device():
    gpu = torch.cuda.is_available()
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if gpu else "cpu")
    with pytest.raises(ActsparseError, match=r"unknown --device 'tpu' \(choose auto, cpu, cuda\)"):
        resolve_device("tpu")
    if not gpu:
        with pytest.raises(ActsparseError, match="--device cuda, but torch sees no GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("requested, device, declared, expected", [
    ("auto", "cpu", "bfloat16", "float32"),  # the CPU is unchanged: float32 whatever the checkpoint says
    ("auto", "cuda", "bfloat16", "bfloat16"),
    ("auto", "cuda", "float16", "float16"),
    ("auto", "cuda", "float32", "bfloat16"),  # GGUF conversions declare float32
    ("auto", "cuda", None, "bfloat16"),
    ("float32", "cuda", "bfloat16", "float32"),
    ("bfloat16", "cpu", None, "bfloat16"),
])
def test_forward_dtype(requested, device, declared, expected):
    assert forward_dtype(requested, device, declared) == expected


def test_a_cuda_run_has_its_own_identity_and_the_cpu_run_keeps_its_id(tiny_llama, text_corpus):
    cfg = CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=200, seq_len=64)
    cpu = plan(cfg)
    assert cpu.cfg.compute_dtype == "float32" and "device" not in cpu.identity
    assert cpu.run_id == plan(CollectConfig(**{**cfg.__dict__, "compute_dtype": "float32"})).run_id
    cuda = plan(cfg, device="cuda")  # planning loads nothing onto the device
    assert cuda.device == "cuda" and cuda.identity["device"] == "cuda"
    assert cuda.cfg.compute_dtype == "bfloat16" and cuda.identity["config"]["compute_dtype"] == "bfloat16"
    assert cuda.run_id != cpu.run_id


def _captures(model_dir, sites=("input", "gate", "intermediate")):
    """The rows every hook of a tiny Llama sees for a right-padded batch of two windows (16 and 11 tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    arch = resolve_ffn(model)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    keep = mask.reshape(-1).bool().nonzero().squeeze(1)
    return model, arch, ids, mask, keep, sites


def _fill(copier: ShardCopier, model_dir, dtype: str) -> dict[str, np.ndarray]:
    """Run the batch through ``copier`` into two shard buffers of 20 tokens (the batch's 27 rows straddle
    them: rows 0-19 into shard 0 from its row 0, rows 20-26 into shard 1 from its row 0)."""
    model, arch, ids, mask, keep, sites = _captures(model_dir)
    width = {"input": arch.d_model, "gate": arch.d_ff, "intermediate": arch.d_ff}
    from actsparse.core.format import numpy_dtype

    bufs = [{s: np.zeros((len(arch.layers), 20, width[s]), numpy_dtype(dtype)) for s in sites} for _ in range(2)]
    segments = [(bufs[0], 0, 0, 20), (bufs[1], 20, 0, 7)]

    def sink(site, layer, t):
        copier(site, layer, t.reshape(-1, t.shape[-1]).index_select(0, keep), segments)

    with SiteRecorder(arch, sites, sink) as rec, torch.inference_mode():
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        copier.flush()
        rec.check_fired(1)
    return {f"{s}/{k}": b[s] for k, b in enumerate(bufs) for s in sites}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_staged_copy_writes_the_bytes_of_the_direct_copy(tiny_llama, dtype):
    direct = _fill(ShardCopier(dtype, staged=False), tiny_llama, dtype)
    staged = _fill(ShardCopier(dtype, staged=True), tiny_llama, dtype)
    assert direct.keys() == staged.keys()
    for key in direct:
        assert direct[key].any(), key  # the buffers were written
        np.testing.assert_array_equal(direct[key], staged[key], err_msg=key)


def test_staged_copy_defers_the_conversion_until_flush(tiny_llama):
    copier = ShardCopier("bfloat16", staged=True)
    buf = {"gate": np.zeros((1, 4, 3), np.uint16)}
    rows = torch.tensor([[1.0, 2.0, 3.0]] * 4, dtype=torch.bfloat16)
    copier("gate", 0, rows, [(buf, 0, 0, 4)])
    rows.zero_()  # the forward pass may reuse the hook's tensor: the staged copy holds its own
    assert not buf["gate"].any()
    copier.flush()
    assert (buf["gate"][0] == np.array([1.0, 2.0, 3.0], np.float32).view(np.uint32) >> 16).all()
    copier.flush()  # nothing pending: a no-op


def test_staged_copy_checks_float16_overflow_with_the_true_peak():
    copier = ShardCopier("float16", staged=True)
    buf = {"gate": np.zeros((2, 1, 2), np.float16)}
    copier("gate", 1, torch.tensor([[1.0, 1e6]], dtype=torch.bfloat16), [(buf, 0, 0, 1)])
    with pytest.raises(ActsparseError, match=r"site gate layer 1 has \|x\| up to 9.9\d+e\+05, beyond float16"):
        copier.flush()
