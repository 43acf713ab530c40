"""Collection of mixture-of-experts models: the stored routing, per-slot sites, shared-expert and dense-layer arrays
and expert weights; exact resume after SIGKILL; a run resumed with another top-k refused (an unsupported layout:
tests/pipeline/test_collect.py, case ``arch``).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from actsparse import CollectConfig, collect
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.reader import StoreReader
from tests.helpers import MOE_KINDS
from tests.pipeline.test_collect import _collect_cmd, kill_while_collecting


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_stored_arrays_are_a_fresh_capture_and_the_weights_the_models(kind, moe_store, moe_checkpoints):
    from transformers import AutoModelForCausalLM

    from actsparse.pipeline.moe import resolve_moe
    from actsparse.pipeline.moe_recorder import MoERecorder
    from actsparse.pipeline.moe_weights import moe_weights

    path, ids = moe_store
    run = StoreReader(str(path)).run(ids[kind])
    m = run.manifest
    model = AutoModelForCausalLM.from_pretrained(moe_checkpoints[kind]).eval()
    arch = resolve_moe(model)
    assert m.moe == arch.layout and m.ffn.pattern == "moe" and m.sites == ("input", "output")
    assert m.catalogue_row()["top_k"] == 2 and m.catalogue_row()["n_experts"] == 4
    n_moe, T = len(arch.moe_layers), m.n_tokens
    assert m.moe_arrays["routed/gate"].shape == (n_moe, T, 2, 16)
    assert m.moe_arrays["routed/expert_id"].logical_dtype == "int16"
    assert ("shared/weight" in m.moe_arrays) == (kind == "qwen2moe")
    assert ("dense/gate" in m.moe_arrays) == (kind == "qwen3moe")

    tok = run.tokens()
    seq = tok.filter(tok["sequence"] == 2)
    window = torch.tensor(seq["token_id"].to_list())[None]
    fresh = {}
    with torch.inference_mode(), MoERecorder(arch, m.config["sites"], lambda n, i, t: fresh.__setitem__((n, i), t)):
        model(window)
    lo, hi = seq["token_index"].min(), seq["token_index"].max() + 1
    for (name, layer), t in fresh.items():
        stored = run.read(name, layer, lo, hi) if name in m.arrays else run.read_moe(name, layer, lo, hi)
        assert torch.equal(stored, t.reshape(stored.shape).to(stored.dtype)), (name, layer)
    for la in arch.layers:
        stored_w, model_w = run.expert_weights(la.index), moe_weights(arch, la.index)
        assert sorted(stored_w) == sorted(model_w)
        assert all(torch.equal(stored_w[n], model_w[n]) for n in model_w)


def test_a_run_without_input_or_output_is_valid(moe_checkpoints, text_corpus, tmp_path):
    res = collect(CollectConfig(model=str(moe_checkpoints["olmoe"]), corpus=str(text_corpus), max_tokens=100,
                                seq_len=32, sites=("intermediate",)), tmp_path / "S", progress=False, log=lambda m: None)
    m = StoreReader(str(tmp_path / "S")).run(res.run_id).manifest
    assert m.arrays == {} and set(m.moe_arrays) == {"routed/expert_id", "routed/weight", "routed/intermediate"}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_bytes(moe_checkpoints, text_corpus, tmp_path):
    model = moe_checkpoints["qwen3moe"]  # a dense first layer: every kind of array
    sites = ("input", "gate", "intermediate", "output")
    cfg = CollectConfig(model=str(model), corpus=str(text_corpus), max_tokens=1000, seq_len=64, batch_size=1,
                        chunk_tokens=64, sites=sites)  # what _collect_cmd asks the CLI for
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    collect(cfg, ref, progress=False, log=lambda m: None)
    cmd = _collect_cmd(model, text_corpus, killed, "--sites", ",".join(sites), "--max-tokens", "1000")
    kill_while_collecting(cmd, killed, (1, 9))
    messages = []
    collect(cfg, killed, progress=False, log=messages.append)
    assert any("resuming run" in m for m in messages)
    (a,), (b,) = StoreReader(str(ref)).runs(), StoreReader(str(killed)).runs()
    assert a.run_id == b.run_id and a.tokens().equals(b.tokens())
    activations = ref / fmt.run_path(a.run_id, fmt.ACTIVATIONS)
    arrays = sorted(p.relative_to(ref) for p in activations.rglob("*") if p.is_file())
    names = {p.parent.relative_to(activations).as_posix() for p in activations.rglob(fmt.ZARR_META)}
    assert {"input", "routed/gate", "routed/expert_id", "routed/weight", "dense/gate"} <= names
    for rel in arrays:
        assert (ref / rel).read_bytes() == (killed / rel).read_bytes(), rel


def test_resuming_with_another_top_k_is_refused(moe_checkpoints, text_corpus, tmp_path):
    from actsparse.pipeline.collect import plan, prepare_run
    from actsparse.pipeline.store_root import create_store

    model = tmp_path / "model"
    shutil.copytree(moe_checkpoints["mixtral"], model)
    cfg = CollectConfig(model=str(model), corpus=str(text_corpus), max_tokens=100, seq_len=32)
    p = plan(cfg)
    prepare_run(p, create_store(tmp_path / "S"))  # an interrupted run: manifest written, no shard
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"num_experts_per_tok": 3}))
    assert plan(cfg).run_id == p.run_id  # the run id hashes the weights, not config.json's routing
    with pytest.raises(ActsparseError, match=r"collected with another MoE layout \(top_k: stored 2, model 3\)"):
        collect(cfg, tmp_path / "S", progress=False, log=lambda m: None)
