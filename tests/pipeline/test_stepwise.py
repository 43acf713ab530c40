"""Collection of generation and diffusion runs (``pipeline.decoding``, ``pipeline.stepwise``): the token axis and
its columns, the stored activations of every forward pass, byte-identical resume from every state a kill can
leave, and bad input."""

from __future__ import annotations

import hashlib
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
from actsparse.core.codec import encode
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.decoding import DiffusionSpec, GenerationSpec
from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig
from actsparse.pipeline.reader import StoreReader
from tests.helpers import ROOT, build_tiny_llada, run_cli


def _quiet(_):
    pass


def _run(store, run_id):
    return StoreReader(str(store)).run(run_id)


def test_a_generation_run_stores_prompt_and_generated_tokens(decoded_store, tiny_llama):
    path, ids = decoded_store
    run = _run(path, ids["generation"])
    assert run.manifest.kind == "generation" and run.manifest.token_columns == fmt.token_columns("generation")
    tok = run.tokens()
    stop = set(run.manifest.tokenization["decoding"]["stop_token_ids"])
    n_windows = run.manifest.n_sequences
    prefill = tok.filter(tok["phase"] == "prefill")
    assert prefill["step"].unique().to_list() == [0] and prefill.height == 72  # every prompt token, BOS included
    for _, g in tok.sort("token_index").group_by(["sequence"], maintain_order=True):
        gen = g.filter(g["phase"] == "generation")
        plen = g.filter(g["phase"] == "prefill").height
        # one row per fed generated token, steps 1..k at positions after the prompt, at most 8 - 1 fed
        assert gen["step"].to_list() == list(range(1, gen.height + 1)) and gen.height <= 7
        assert gen["position"].to_list() == [plen + s - 1 for s in gen["step"].to_list()]
        fed = gen["token_id"].to_list()
        assert not any(t in stop for t in fed[:-1])  # counting stops at the first stop token
    assert sorted(tok["sequence"].unique().to_list()) == list(range(n_windows))
    assert tok["token_index"].to_list() == list(range(run.n_tokens))
    assert run.array("gate").shape == (3, run.n_tokens, 64)


def test_generated_rows_hold_the_activations_of_their_forward_pass(decoded_store, tiny_llama):
    """Batch 0 generated again with a recorder: its forward passes, valid rows in order, are the stored rows."""
    from actsparse.pipeline.decoding import plan_decoder
    from actsparse.pipeline.models import load_tokenizer, resolve_model
    from actsparse.pipeline.recorder import SiteRecorder

    path, ids = decoded_store
    run = _run(path, ids["generation"])
    resolved = resolve_model(str(tiny_llama))
    tok, mcfg = load_tokenizer(resolved)
    decoder = plan_decoder(GenerationSpec(8), tok, mcfg, "tiny", 24)
    model, arch = decoder.load(resolved, "float32")
    rows, keep = [], {}

    class Sink:
        def begin(self, k, cols, shape):
            keep["k"] = k

        def end(self):
            pass

    def sink(site, layer, t):
        if layer == 1:
            rows.append(encode(t.reshape(-1, t.shape[-1])[keep["k"]], "bfloat16"))

    from actsparse.pipeline.corpora import open_corpus
    from actsparse.pipeline.windows import iter_windows

    corpus = open_corpus(run.manifest.corpus.spec)
    windows = list(iter_windows(corpus.split("collect"), tok, 24, max_tokens=72))[:2]
    with SiteRecorder(arch, ("intermediate",), sink), torch.inference_mode():
        decoder.run_batch(model, windows, 0, Sink())
    got = np.concatenate(rows)
    np.testing.assert_array_equal(np.asarray(run.array("intermediate")[1, :len(got)]), got)


def test_a_masked_diffusion_run_stores_every_step(decoded_store):
    import polars as pl

    path, ids = decoded_store
    run = _run(path, ids["llada"])
    tok = run.tokens()
    assert run.manifest.kind == "diffusion" and run.manifest.tokenization["decoding"]["sampler"] == "masked"
    first_step = tok.filter((tok["step"] == 0) & (tok["cfg_half"] == 0)).group_by("sequence").len().sort("sequence")
    lengths = [n - 8 for n in first_step["len"].to_list()]  # prompt + 8 answer positions per row
    assert sum(lengths) == 72 and run.n_tokens == 8 * 2 * sum(n + 8 for n in lengths)  # steps x halves x rows
    assert tok.group_by("cfg_half").len().sort("cfg_half")["len"].to_list() == [run.n_tokens // 2] * 2
    first = tok.filter((tok["sequence"] == 0) & (tok["cfg_half"] == 0))
    # blocks of 4 answer positions, 4 steps per block: one position unmasked per step
    noised = first.filter(first["position"] >= lengths[0]).group_by("step").agg(n=pl.col("noised").sum())
    assert noised.sort("step")["n"].to_list() == [8, 7, 6, 5, 4, 3, 2, 1]
    assert first.group_by("step").agg(b=pl.col("block").first()).sort("step")["b"].to_list() == [0] * 4 + [1] * 4
    uncond = tok.filter((tok["cfg_half"] == 1) & (tok["position"] < lengths[0]) & (tok["sequence"] == 0))
    assert uncond["noised"].all() and not uncond["special"].any()  # the unconditional half masks the prompt
    assert tok.filter(tok["phase"] != "denoising").height == 0 and tok["active"].all()


def test_a_block_diffusion_run_stores_the_canvas_of_every_step(decoded_store):
    path, ids = decoded_store
    run = _run(path, ids["dgemma"])
    tok = run.tokens()
    assert run.manifest.tokenization["decoding"]["sampler"] == "block"
    assert run.manifest.ffn.layers_path == "model.decoder.layers"
    per_step = tok.group_by("step", "block").len()
    assert set(per_step["len"].to_list()) <= {8, 16, 24}  # the canvas (8) of each row of the batches still running
    start = tok.filter(tok["step"] == 0)
    first = start.filter(start["sequence"] == 0)["position"].to_list()
    assert start["noised"].all() and first == list(range(first[0], first[0] + 8)) and first[0] > 0
    assert tok["cfg_half"].max() == 0 and run.n_tokens <= 3 * 6 * 8


def _files(store: Path) -> dict[str, str]:
    return {p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name not in (fmt.MANIFEST, fmt.CATALOGUE) and not p.name.startswith(".")}


def _interrupt(run_dir: Path, parts: list[int]) -> None:
    """The state a kill leaves: the manifest incomplete, the given shards without token part and statistics."""
    manifest = json.loads((run_dir / fmt.MANIFEST).read_text())
    manifest["status"] = "incomplete"
    (run_dir / fmt.MANIFEST).write_text(json.dumps(manifest))
    (run_dir / fmt.CHECKSUMS).unlink()
    for k in parts:
        (run_dir / fmt.token_part(k)).unlink()
        for p in run_dir.glob(f"{fmt.TOKEN_STATS}/site=*/{fmt.part_name(k)}"):
            p.unlink()


@pytest.mark.parametrize("kind", ["generation", "llada"])
def test_resume_from_any_state_gives_identical_bytes(kind, tiny_llama, tiny_llada_ckpt, text_corpus, tmp_path):
    """Shards missing from the middle, from the end, or none (killed after the last shard, before the run was
    sealed, with the arrays already of their final length): the resumed run is byte-identical."""
    from actsparse.analyze.token_stats import TOKEN_STATS

    if kind == "generation":
        cfg = CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=100, seq_len=20, batch_size=2,
                            chunk_tokens=32, decoding=GenerationSpec(6))
    else:
        cfg = CollectConfig(model=str(tiny_llada_ckpt), corpus=str(text_corpus), max_tokens=30, seq_len=10,
                            batch_size=2, chunk_tokens=32, trust_remote_code=True,
                            decoding=DiffusionSpec(MaskedDiffusionConfig(steps=4, gen_length=4, block_length=2)))
    ref = tmp_path / "ref"
    res = collect(cfg, ref, statistics=TOKEN_STATS, progress=None, log=_quiet)
    n = res.manifest.n_parts
    assert n >= 4
    want = _files(ref)
    for parts in ([n // 2], list(range(n // 2, n)), [n - 1], []):
        store = tmp_path / f"resume-{len(parts)}-{parts[:1]}"
        shutil.copytree(ref, store)
        _interrupt(store / fmt.run_path(res.run_id), parts)
        msgs = []
        again = collect(cfg, store, statistics=TOKEN_STATS, progress=None, log=msgs.append)
        assert again.status == "complete" and again.n_tokens == res.n_tokens
        assert _files(store) == want, parts


def _generate_cmd(model, corpus, store):
    return [str(Path(sys.executable).with_name("actsparse")), "collect", "--model", str(model), "--corpus", str(corpus),
            "--store", str(store), "--max-tokens", "600", "--seq-len", "24", "--batch-size", "1", "--chunk-tokens",
            "32", "--generate", "6", "-q"]


@pytest.mark.slow
def test_sigkill_then_resume_a_generation_run(tiny_llama, text_corpus, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_generate_cmd(tiny_llama, text_corpus, ref), check=True, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    for stop_after in (1, 8):
        proc = subprocess.Popen(_generate_cmd(tiny_llama, text_corpus, killed), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(list(killed.glob("runs/*/tokens/part-*.parquet"))) >= stop_after:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads(next(killed.glob("runs/*/manifest.json")).read_text())["status"] == "incomplete"
    out = subprocess.run(_generate_cmd(tiny_llama, text_corpus, killed), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "resuming run" in out.stdout
    assert _files(ref) == _files(killed)


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(tiny_llama, text_corpus, tmp_path):
    r = run_cli("collect", "-m", str(tiny_llama), "-c", str(text_corpus), "-s", str(tmp_path / "S"), "--seq-len", "32",
                "--diffusion", "--steps", "4", "--gen-length", "8", "--block-length", "4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "(model_type llama) is not a diffusion LM" in r.stderr, r.stderr
    assert not (tmp_path / "S").exists()


@pytest.mark.parametrize("options, message", [
    (dict(generate=4, diffusion=True), "--generate and --diffusion exclude each other"),
    (dict(generate=4, steps=4), "--steps applies to the other mode, not --generate"),
    (dict(diffusion=True, steps=4, gen_length=8, block_length=4, sampling="top-p"), "--sampling applies to the other"),
    (dict(sampling="top-p", top_p=0.5), "--sampling, --top-p apply to --generate or --diffusion"),
    (dict(diffusion=True, steps=4), "--diffusion needs --gen-length, --block-length"),
])
def test_decoding_options_are_checked(options, message):
    from actsparse.cli.options import decoding_spec

    with pytest.raises(ActsparseError, match=message):
        decoding_spec(options.pop("generate", None), options.pop("diffusion", False), **options)


def _plan(model, corpus, decoding, **kw):
    from actsparse.pipeline.collect import plan

    return plan(CollectConfig(model=str(model), corpus=str(corpus), seq_len=kw.pop("seq_len", 16), decoding=decoding,
                              **kw))


@pytest.mark.parametrize("decoding, message", [
    (DiffusionSpec(MaskedDiffusionConfig(4, 8, 4)), r"\(model_type llama\) is not a diffusion LM"),
    (GenerationSpec(0), r"--generate must be in \[1, 65536\]"),
    (GenerationSpec(200), "prompts of 16 tokens and 199 new ones exceed the context"),
])
def test_a_text_model_refuses(decoding, message, tiny_llama, text_corpus):
    with pytest.raises(ActsparseError, match=message):
        _plan(tiny_llama, text_corpus, decoding)


@pytest.mark.parametrize("decoding, message", [
    (DiffusionSpec(MaskedDiffusionConfig(6, 8, 2)), "--steps 6 is not divisible by the number of blocks 4"),
    (DiffusionSpec(MaskedDiffusionConfig(4, 8, 3)), "--gen-length 8 is not a multiple of --block-length 3"),
    (GenerationSpec(4), "is a diffusion LM: collect its denoising steps with --diffusion, not --generate"),
])
def test_a_diffusion_model_refuses(decoding, message, tiny_llada_ckpt, text_corpus):
    with pytest.raises(ActsparseError, match=message):
        _plan(tiny_llada_ckpt, text_corpus, decoding, trust_remote_code=True)


def test_a_masked_diffusion_lm_without_a_mask_token_is_refused(text_corpus, tmp_path):
    model = build_tiny_llada(tmp_path / "no-mask", mask=False)
    with pytest.raises(ActsparseError, match="has no mask token .* pass --mask-token-id"):
        collect(CollectConfig(model=str(model), corpus=str(text_corpus), seq_len=16, trust_remote_code=True,
                              decoding=DiffusionSpec(MaskedDiffusionConfig(steps=4, gen_length=4, block_length=4))),
                tmp_path / "S", log=_quiet)
    assert not (tmp_path / "S").exists()


def test_diffusion_gemma_refuses_options_of_masked_diffusion(tiny_dgemma_ckpt, text_corpus, tmp_path):
    base = dict(model=str(tiny_dgemma_ckpt), corpus=str(text_corpus), seq_len=16)
    with pytest.raises(ActsparseError, match="--block-length must be 8"):
        collect(CollectConfig(**base, decoding=DiffusionSpec(MaskedDiffusionConfig(4, 8, 4))), tmp_path / "S")
    with pytest.raises(ActsparseError, match="--cfg-scale apply to masked diffusion"):
        collect(CollectConfig(**base, decoding=DiffusionSpec(MaskedDiffusionConfig(4, 8, 8, cfg_scale=1.0))),
                tmp_path / "S")
