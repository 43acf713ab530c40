"""Collection: store layout, provenance, exact resume after SIGKILL, locking, batch jobs, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actsparse import CollectConfig, collect
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.jobs import load_jobs
from actsparse.pipeline.reader import StoreReader
from tests.helpers import ROOT, build_tiny, run_cli, tmpfs


def _cfg(model, corpus, **kw) -> CollectConfig:
    base = dict(max_tokens=700, seq_len=64, batch_size=2, chunk_tokens=128, sites=("input", "gate", "up", "act", "intermediate", "output"))
    return CollectConfig(model=str(model), corpus=str(corpus), **(base | kw))


def _quiet(*a, **k):
    return None


def test_run_layout_tokens_and_arrays(tiny_llama, text_corpus, tmp_path):
    res = collect(_cfg(tiny_llama, text_corpus), tmp_path / "S", progress=False, log=_quiet)
    assert res.status == "complete" and res.n_tokens == 700
    st = StoreReader(str(tmp_path / "S"))
    run = st.run(res.run_id)
    m = run.manifest
    assert m.status == "complete" and m.format_version == fmt.FORMAT_VERSION
    assert m.n_layers == 3 and m.ffn.d_ff == 64
    assert m.model.weights_sha256 and m.corpus.sha256 and m.versions["torch"]
    assert m.stored_dtype == "bfloat16" and m.arrays["gate"].numpy_dtype == "uint16"

    tok = run.tokens()
    assert tok.height == 700 and tok["token_index"].to_list() == list(range(700))
    # docs/pitfalls.md P3/P4: no pad tokens stored, BOS starts every window and is flagged special
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(tiny_llama)
    assert tk.pad_token_id not in set(tok["token_id"].to_list())
    starts = tok.filter(tok["position"] == 0)
    assert set(starts["token_id"].to_list()) == {tk.bos_token_id} and starts["special"].all()
    assert tok.filter(tok["position"] > 0)["special"].sum() == 0
    assert run.array("gate").shape == (3, 700, 64) and run.array("input").shape == (3, 700, 32)

    # every site of every layer equals a fresh forward of the same window (bf16 storage tolerance)
    from transformers import AutoModelForCausalLM

    from actsparse.pipeline.recorder import SiteRecorder
    from actsparse.pipeline.sites import resolve_ffn

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    arch = resolve_ffn(model)
    seq = tok.filter(tok["sequence"] == 3)
    ids = torch.tensor(seq["token_id"].to_list())[None]
    got = {}
    with SiteRecorder(arch, arch.sites, lambda s, layer, t: got.__setitem__((s, layer), t[0].clone())):
        with torch.inference_mode():
            model(ids)
    lo, hi = seq["token_index"].min(), seq["token_index"].max() + 1
    for (site, layer), fresh in got.items():
        stored = run.read(site, layer, lo, hi)
        torch.testing.assert_close(stored, fresh.to(torch.bfloat16).float(), rtol=0, atol=0)
    # stored weights are the model's weights
    w = run.weights(1)
    assert sorted(w) == ["down", "gate", "up"] and "up" in w and w.get("down_bias") is None
    mlp = model.model.layers[1].mlp
    for name, module in (("down", mlp.down_proj), ("gate", mlp.gate_proj), ("up", mlp.up_proj)):
        torch.testing.assert_close(w[name], module.weight.detach())
    assert w["down"] is w["down"]  # read once, then kept


def test_float16_overflow_is_refused(tiny_llama, text_corpus, tmp_path):
    # docs/pitfalls.md P6: float16 only after an overflow check. Scale the weights so the gate output overflows.
    import shutil

    from transformers import AutoModelForCausalLM

    big = tmp_path / "big"
    shutil.copytree(tiny_llama, big)
    model = AutoModelForCausalLM.from_pretrained(big)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e6)
    model.save_pretrained(big)
    with pytest.raises(ActsparseError, match="beyond float16"):
        collect(_cfg(big, text_corpus, dtype="float16"), tmp_path / "S", progress=False, log=_quiet)
    m = json.loads(next((tmp_path / "S" / "runs").glob("*/manifest.json")).read_text())
    assert m["status"] == "incomplete"
    res = collect(_cfg(tiny_llama, text_corpus, dtype="float16"), tmp_path / "S2", progress=False, log=_quiet)
    assert StoreReader(str(tmp_path / "S2")).run(res.run_id).array("gate").dtype == np.float16


def test_completed_run_is_a_noop_and_run_id_is_content_hash(tiny_llama, text_corpus, tmp_path):
    cfg = _cfg(tiny_llama, text_corpus)
    first = collect(cfg, tmp_path / "S", progress=False, log=_quiet)
    msgs = []
    again = collect(cfg, tmp_path / "S", progress=False, log=msgs.append)
    assert again.status == "already-complete" and again.run_id == first.run_id
    assert any("already complete" in m for m in msgs)
    other = collect(_cfg(tiny_llama, text_corpus, max_tokens=300), tmp_path / "S", progress=False, log=_quiet)
    assert other.run_id != first.run_id
    cat = __import__("polars").read_parquet(tmp_path / "S" / fmt.CATALOGUE)
    assert sorted(cat["run_id"].to_list()) == sorted([first.run_id, other.run_id])


def test_second_writer_of_the_same_run_is_refused(tiny_llama, text_corpus, tmp_path):
    cfg = _cfg(tiny_llama, text_corpus)
    from actsparse.core.files import exclusive_lock
    from actsparse.pipeline.collect import plan
    from actsparse.pipeline.store_root import create_store

    run_id = plan(cfg).run_id
    paths = create_store(tmp_path / "S")
    with exclusive_lock(paths.run_dir(run_id) / fmt.LOCK, f"run {run_id}"):
        with pytest.raises(ActsparseError, match="another process"):
            collect(cfg, tmp_path / "S", progress=False, log=_quiet)


def _collect_cmd(model, corpus, store, *extra):
    return [str(Path(sys.executable).with_name("actsparse")), "collect", "--model", str(model), "--corpus", str(corpus),
            "--store", str(store), "--max-tokens", "2000", "--seq-len", "64", "--batch-size", "1",
            "--chunk-tokens", "64", "--sites", "input,gate,intermediate", "-q", *extra]


def kill_while_collecting(cmd: list[str], store: Path, stops: tuple[int, ...]) -> None:
    """Run the collect command ``cmd`` once per stop and SIGKILL it once that many shards of ``store`` are complete;
    the run must be left incomplete."""
    for stop_after in stops:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(store.glob("runs/*/tokens/part-*.parquet"))) >= stop_after:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    manifest = json.loads(next(store.glob("runs/*/manifest.json")).read_text())
    assert manifest["status"] == "incomplete", "the run finished before it could be killed"


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_content(tiny_llama, text_corpus, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_collect_cmd(tiny_llama, text_corpus, ref), check=True, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    # kill at several points: after the first shard, mid-run, and late
    kill_while_collecting(_collect_cmd(tiny_llama, text_corpus, killed), killed, (1, 12, 25))
    out = subprocess.run(_collect_cmd(tiny_llama, text_corpus, killed), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "resuming run" in out.stdout
    a, b = StoreReader(str(ref)), StoreReader(str(killed))
    assert a.run_ids() == b.run_ids()
    ra, rb = a.run(), b.run()
    assert ra.tokens().equals(rb.tokens())
    for site in ra.sites:
        np.testing.assert_array_equal(ra.array(site)[:], rb.array(site)[:])


@pytest.mark.slow
def test_different_runs_write_into_one_store_concurrently(tiny_llama, text_corpus, tmp_path):
    store = tmp_path / "S"
    procs = [subprocess.Popen(_collect_cmd(tiny_llama, text_corpus, store, "--seq-len", str(n)), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (32, 48)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    st = StoreReader(str(store))
    assert len(st.run_ids()) == 2
    for run in st.runs():
        assert run.tokens().height == 2000


@pytest.mark.slow
def test_batch_jobs_skip_completed_and_continue_past_failures(tiny_llama, text_corpus, tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f"""
store = "S"
[defaults]
max_tokens = 300
seq_len = 64
batch_size = 2
chunk_tokens = 128
[[jobs]]
model = ["{tiny_llama}", "no-such-model"]
corpus = "{text_corpus}"
[[jobs]]
model = "{tiny_llama}"
corpus = "{text_corpus}"
sites = ["output"]
""")
    r = run_cli("collect", "--config", str(jobs), "-q")
    assert r.returncode == 1
    assert "2 of 3 job(s) done; 1 failed" in r.stdout and "no-such-model" in r.stdout
    assert len(StoreReader(str(tmp_path / "S")).run_ids()) == 2
    r2 = run_cli("collect", "--config", str(jobs), "-q")
    assert r2.stdout.count("already complete") == 2


@pytest.mark.parametrize("line, words", [
    ('max_tokens = "lots"', "job 1: max_tokens must be an integer, got 'lots'"),
    ("text_field = 5", "job 1: text_field must be a string, got 5"),
    ("add_bos = 1", "job 1: add_bos must be true or false, got 1"),
    ("sites = [1, 2]", "job 1: sites must be a list of site names"),
    ('seq_len = ["x", 64]', "job 1: seq_len must be an integer, got 'x'"),
])
def test_a_jobs_file_with_a_wrong_type_is_refused_before_any_job_runs(line, words, tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'store = "S"\n[[jobs]]\nmodel = "m"\ncorpus = "c"\n{line}\n[[jobs]]\nmodel = "m2"\ncorpus = "c"\n')
    r = run_cli("collect", "--config", str(jobs), "-q")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "S").exists()


def test_job_options_beside_a_jobs_file_are_refused_not_ignored(tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('store = "S"\n[[jobs]]\nmodel = "m"\ncorpus = "c"\n')
    r = run_cli("collect", "--config", str(jobs), "--model", "smollm2-135m", "--seq-len", "64", "-q")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "also given: --model, --seq-len (put them in its [defaults])" in r.stderr
    assert not (tmp_path / "S").exists()


def test_jobs_sites_may_be_one_comma_separated_string(tmp_path):
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[jobs]]\nmodel = "m"\ncorpus = "c"\nsites = "input, gate"\n')
    assert load_jobs(jobs)[1][0].sites == ("input", "gate")


# ------------------------------------------------------------------ bad input: one line, non-zero, nothing complete


def _one_line_error(r, *words):
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def _no_complete_run(store: Path):
    for m in store.glob("runs/*/manifest.json"):
        assert json.loads(m.read_text())["status"] != "complete"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["alias", "path", "arch", "empty", "undecodable", "field", "seqlen", "seqlen1", "site",
                                  "storefile", "pickle"])
def test_bad_input_gets_one_line_error(case, tiny_llama, text_corpus, tmp_path):
    store = tmp_path / "S"
    model, corpus, extra = str(tiny_llama), str(text_corpus), []
    if case == "alias":
        model, words = "smollm3-9b", ["unknown model", "smollm2-135m"]
    elif case == "path":
        model, words = str(tmp_path / "nope"), ["unknown model"]
    elif case == "arch":
        # a mixture-of-experts layout actsparse does not capture (GPT-OSS), named with its layout
        model, words = str(build_tiny(tmp_path / "moe", "gptoss")), ["unsupported MoE layout", "GptOssExperts",
                                                                      "is_transposed=True"]
    elif case == "empty":
        (tmp_path / "e.txt").write_text("  \n\n ")
        corpus, words = str(tmp_path / "e.txt"), ["empty"]
    elif case == "undecodable":
        (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world")
        corpus, words = str(tmp_path / "bad.txt"), ["UTF-8"]
    elif case == "field":
        extra, words = ["--text-field", "body"], ["body"]
    elif case == "seqlen":
        extra, words = ["--seq-len", "4096"], ["exceeds the context"]
    elif case == "seqlen1":  # once "must be positive"
        extra, words = ["--seq-len", "1"], ["--seq-len must be at least 2 (BOS and one token; got 1)"]
    elif case == "site":
        extra, words = ["--sites", "input,gates"], ["unknown site"]
    elif case == "pickle":  # once a traceback (torch refuses the pickle, rightly); never loaded at all now
        from safetensors.torch import load_file

        pickled = Path(shutil.copytree(tiny_llama, tmp_path / "pickled"))
        torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
        (pickled / "model.safetensors").unlink()
        model, words = str(pickled), ["holds pickle weights only (pytorch_model.bin); actsparse never loads pickle"]
    else:
        store.write_text("not a dir")
        words = ["is a file"]
    r = run_cli("collect", "--model", model, "--corpus", corpus, "--store", str(store), "--max-tokens", "200",
                "--seq-len", "64", "-q", *extra)
    _one_line_error(r, *words)
    if store.is_dir():
        _no_complete_run(store)


@pytest.mark.slow
def test_read_only_store_is_refused(tiny_llama, text_corpus, tmp_path):
    with tmpfs(tmp_path / "ro", ro=True) as ro:
        r = run_cli("collect", "--model", str(tiny_llama), "--corpus", str(text_corpus), "--store", str(ro / "S"),
                    "--max-tokens", "200", "--seq-len", "64", "-q")
    _one_line_error(r, "read-only")


@pytest.mark.slow
def test_disk_full_leaves_run_incomplete(tiny_llama, text_corpus, tmp_path):
    with tmpfs(tmp_path / "small", size="3m") as small:
        r = run_cli("collect", "--model", str(tiny_llama), "--corpus", str(text_corpus), "--store", str(small / "S"),
                    "--max-tokens", "20000", "--seq-len", "64", "--dtype", "float32", "-q",
                    "--sites", "input,gate,act,up,intermediate,output")
        _one_line_error(r, "disk full")
        _no_complete_run(small / "S")


# ------------------------------------------------------------------ real model (acceptance)


@pytest.mark.real
def test_real_smollm2_decodes_to_source_and_reconstructs_ffn_output(smollm2_store):
    """>= 1,024 real tokens; stored intermediate @ W_down^T equals the model's FFN output for every layer."""
    store, res = smollm2_store
    run = StoreReader(str(store)).run(res.run_id)
    assert run.n_tokens >= 1024 and run.n_layers == 30
    tok = run.tokens()
    from actsparse.pipeline.corpora import open_corpus

    docs = {d.doc_id: d.text for d in open_corpus("wiki").documents}
    from transformers import AutoTokenizer

    from actsparse.pipeline.models import resolve_model

    tk = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    for doc_id, part in tok.filter(~tok["special"]).group_by("document_id", maintain_order=True):
        text = tk.decode(part["token_id"].to_list())
        assert docs[doc_id[0]].startswith(text), (doc_id, text[:80])
    # a fresh forward pass over the first window gives the FFN outputs to compare with
    from transformers import AutoModelForCausalLM

    from actsparse.pipeline.recorder import SiteRecorder
    from actsparse.pipeline.sites import resolve_ffn

    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m").path).eval()
    seq = tok.filter(tok["sequence"] == 0)
    fresh = {}
    with SiteRecorder(resolve_ffn(model), ["output"], lambda s, layer, t: fresh.__setitem__(layer, t[0].clone())):
        with torch.inference_mode():
            model(torch.tensor(seq["token_id"].to_list())[None])
    n = seq.height
    for layer in range(run.n_layers):
        y = run.read("intermediate", layer, 0, n) @ run.weights(layer)["down"].T
        rel = (y - fresh[layer]).norm() / fresh[layer].norm()
        assert rel < 1e-2, (layer, float(rel))  # bf16 storage of h: ~2^-9 relative per entry
        torch.testing.assert_close(run.read("output", layer, 0, n), fresh[layer].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_a_corpus_shorter_than_max_tokens_is_said(tiny_llama, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("A short text of a few words.\n\nAnd a second document, also short.\n")
    said = []
    res = collect(CollectConfig(model=str(tiny_llama), corpus=str(corpus), max_tokens=5000, seq_len=16),
                  tmp_path / "S", progress=False, log=said.append)
    assert res.n_tokens < 5000
    assert any(f"holds {res.n_tokens} tokens, fewer than --max-tokens 5000" in m for m in said), said
