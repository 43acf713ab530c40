"""Closed-loop evaluation: hooks, fast top-p, metrics, critical sparsity, bootstrap, storage, CLI errors.

Tiny random-init models only (the real-model acceptance numbers are in README "Evaluation").
Exactness checks: the fast top-p mask is bit-identical to ``analyze.rules.topp_mask``; p = 1
leaves the logits bitwise unchanged; layer 0's sparsified FFN output equals an offline
recomputation from a float32 store; realized sparsity equals ``rules.sparsity`` of the rule's
mask on the activations the hooks saw.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import polars as pl
import pytest
import torch

from actsparse import CollectConfig, collect
from actsparse.analyze import rules
from actsparse.analyze.critical import critical_point
from actsparse.analyze.evaluate import EvalConfig, evaluate, proxy_check, spearman, stored_evaluations, summarize
from actsparse.analyze.evaluate.lm import LMHead, make_batch
from actsparse.analyze.sparsifier import Sparsifier, hook_points, keep_and_count, topp_mask_fast
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES, TARGETS
from actsparse.pipeline.corpora import open_corpus
from actsparse.pipeline.ffn import ffn_recompute
from actsparse.pipeline.models import load_model, load_tokenizer, resolve_model
from actsparse.pipeline.reader import StoreReader
from actsparse.pipeline.recorder import SiteRecorder
from actsparse.pipeline.sites import resolve_ffn
from actsparse.pipeline.windows import iter_windows
from tests.helpers import build_tiny, run_cli

SEQ, BATCH = 64, 4
P = 0.7


def quiet(_msg: str) -> None:
    pass


# ----------------------------------------------------------------------------- fast top-p


def block(tokens: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Heavy-tailed activations with zeros, exact ties, a huge entry and values that tie in bf16."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(tokens, width, generator=g, dtype=torch.float64) * torch.rand(tokens, width, generator=g,
                                                                                  dtype=torch.float64) ** 4
    a[0] = 0.0
    a[1, : width // 2] = -0.25
    a[2, 3] = 1e4
    a[3, :] = 1.0
    a[4, ::3] = -0.0
    return a.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("power", [1.0, 2.0])
def test_fast_topp_is_bit_identical(dtype, power):
    grid = list(rules.DEFAULT_TOPP_GRID) + [0.123, 0.999]
    for tokens, width, seed in ((7, 1, 0), (9, 24, 1), (600, 96, 2)):  # 600 rows: the threaded sort
        a = block(max(tokens, 7), width, dtype, seed) if width > 4 else torch.rand(tokens, width).to(dtype)
        for p in grid:
            ref = rules.topp_mask(a, p, power)
            keep, kept = keep_and_count("top-p", a, p, power)
            assert torch.equal(keep, ref) and torch.equal(kept, ref.sum(-1)), (tokens, width, p)
    # leading dimensions [batch, seq, width], as in a forward pass
    a = block(24, 40, dtype, 3).reshape(2, 12, 40)
    assert torch.equal(topp_mask_fast(a, 0.9, power), rules.topp_mask(a, 0.9, power))


def test_fast_topp_non_finite_rows_follow_the_reference():
    a = block(8, 16, torch.float32, 4)
    a[1, 2] = math.inf
    a[2, 5] = math.nan
    a[3, :] = -math.inf
    for p in (0.0, 0.5, 1.0):
        ref = rules.topp_mask(a, p)
        keep, kept = keep_and_count("top-p", a, p)
        assert torch.equal(topp_mask_fast(a, p), ref) and torch.equal(keep, ref) and torch.equal(kept, ref.sum(-1))


# ----------------------------------------------------------------------------- hooks in a model


@pytest.fixture(scope="module")
def tiny(tiny_llama, text_corpus):
    """(model, arch, head, batches) of the tiny Llama over the held-out split of the text corpus."""
    resolved = resolve_model(str(tiny_llama))
    model, (tok, _) = load_model(resolved), load_tokenizer(resolved)
    windows = list(iter_windows(open_corpus(str(text_corpus)).split("heldout"), tok, SEQ))
    batches = [make_batch(windows[b:b + BATCH], tok.pad_token_id, set(tok.all_special_ids))
               for b in range(0, len(windows), BATCH)]
    return model, resolve_ffn(model), LMHead(model, "tiny"), batches


def logits_of(head: LMHead, b) -> torch.Tensor:
    return head.logits(head.hidden(b.ids, b.attn)[b.rows, b.cols])


def test_head_reproduces_model_logits(tiny, text_corpus, tmp_path):
    model, _, head, batches = tiny
    b = batches[0]
    with torch.inference_mode():
        ref = model(input_ids=b.ids, attention_mask=b.attn).logits[b.rows, b.cols]
        assert torch.allclose(logits_of(head, b), ref, rtol=1e-5, atol=1e-5)
        # Gemma 3 (GeGLU, scaled embeddings, optional final soft-capping) through the same path
        resolved = resolve_model(str(build_tiny(tmp_path / "gemma", "gemma3")))
        gemma, (tok, _) = load_model(resolved), load_tokenizer(resolved)
        gemma.config.final_logit_softcapping = 0.05  # small enough to change every logit
        windows = list(iter_windows(open_corpus(str(text_corpus)).split("heldout"), tok, SEQ))[:2]
        g = make_batch(windows, tok.pad_token_id, set(tok.all_special_ids))
        gh = LMHead(gemma, "tiny-gemma")
        gh.check(g.ids[:1], g.attn[:1])
        ref = gemma(input_ids=g.ids, attention_mask=g.attn).logits[g.rows, g.cols]
        assert torch.allclose(logits_of(gh, g), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_p1_leaves_logits_bitwise_unchanged(tiny, target):
    _, arch, head, batches = tiny
    with torch.inference_mode():
        for b in batches[:2]:
            dense = logits_of(head, b)
            with Sparsifier(arch, target, "top-p", 1.0) as sp:
                sp.begin_batch(b.valid)
                sparse = logits_of(head, b)
                counts = sp.end_batch()
            assert torch.equal(dense, sparse)
            assert counts.shape == (len(sp.points), len(b.windows))


@pytest.mark.parametrize("target", TARGETS)
def test_realized_sparsity_equals_rule_on_the_activations_seen(tiny, target):
    """Every hook's count equals rules.sparsity(rule_mask(...)) of the tensor it received (closed loop)."""
    _, arch, head, batches = tiny
    b = batches[0]
    seen: dict = {}
    sites = {"input": "input", "gate": "act", "up": "up", "intermediate": "intermediate"}
    recorded = sorted({sites[p.site] for p in hook_points(arch, target)})
    with torch.inference_mode():
        # Registered first, so its hooks see each tensor before the sparsifier rewrites it.
        with SiteRecorder(arch, recorded, lambda s, i, t: seen.__setitem__((s, i), t.clone())):
            with Sparsifier(arch, target, "top-p", P) as sp:
                sp.begin_batch(b.valid)
                head.hidden(b.ids, b.attn)
                counts = sp.end_batch()
    assert counts.sum() > 0
    for k, point in enumerate(sp.points):
        a = seen[(sites[point.site], point.layer)]
        per_token = rules.sparsity(rules.rule_mask("top-p", a, P)) * point.width
        expected = (per_token.round().long() * b.valid).sum(dim=1)
        assert torch.equal(counts[k], expected), point


@pytest.fixture(scope="module")
def f32_store(tmp_path_factory, tiny_llama, text_corpus):
    """A float32 run of the tiny Llama over the held-out split with all six sites (same windows as evaluate)."""
    store = tmp_path_factory.mktemp("eval-store")
    cfg = CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), sites=SITES, seq_len=SEQ, batch_size=BATCH,
                        dtype="float32", split="heldout", chunk_tokens=256)
    return store, collect(cfg, store, progress=False, log=quiet)


@pytest.mark.parametrize("target", TARGETS)
def test_layer0_output_equals_offline_recompute(tiny, f32_store, target):
    """Layer 0's input is not affected by sparsification, so its sparsified FFN output is exact offline."""
    from actsparse.pipeline.reader import StoreReader

    _, arch, head, batches = tiny
    store, res = f32_store
    run = StoreReader(str(store)).run(res.run_id)
    w = run.weights(0)
    stored = {s: run.read(s, 0) for s in ("input", "act", "up", "intermediate")}

    def masked(a):
        return a * rules.rule_mask("top-p", a, P)

    if target in ("input", "all-inputs"):
        sites = ffn_recompute(w, arch.activation, masked(stored["input"]))
        h = masked(sites["intermediate"]) if target == "all-inputs" else sites["intermediate"]
    elif target == "gate":
        h = masked(stored["act"]) * stored["up"]
    elif target == "up":
        h = stored["act"] * masked(stored["up"])
    else:
        h = masked(stored["intermediate"])
    expected = torch.nn.functional.linear(h, w["down"])

    outputs = []
    hook = arch.layers[0].down.register_forward_hook(lambda m, args, out: outputs.append(out))
    try:
        with torch.inference_mode(), Sparsifier(arch, target, "top-p", P) as sp:
            for b in batches:
                sp.begin_batch(b.valid)
                head.hidden(b.ids, b.attn)
                sp.end_batch()
    finally:
        hook.remove()
    got = torch.cat([o[b.attn.bool()] for o, b in zip(outputs, batches)])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_up_target_needs_a_glu(tmp_path):
    model = load_model(resolve_model(str(build_tiny(tmp_path / "gpt2", "gpt2"))))
    arch = resolve_ffn(model)
    with pytest.raises(ActsparseError, match="non-GLU"):
        hook_points(arch, "up")
    assert [p.site for p in hook_points(arch, "all-inputs")][:2] == ["input", "intermediate"]


# ----------------------------------------------------------------------------- critical sparsity, bootstrap


def test_critical_crossing_on_a_synthetic_curve():
    s, r, v = [0.6, 0.0, 0.4, 0.2], [0.97, 1.0, 0.991, 0.995], [0.7, 1.0, 0.8, 0.9]  # unordered on purpose
    grid_s, grid_v, interp = critical_point(s, r, v, 0.99, higher_is_better=True)
    assert (grid_s, grid_v) == (0.4, 0.8)
    assert interp == pytest.approx(0.4 + (0.99 - 0.991) / (0.97 - 0.991) * 0.2)
    assert critical_point([0.1, 0.3], [1.0, 0.995], [0.9, 0.8], 0.99, higher_is_better=True) == (0.3, 0.8, 0.3)  # no extrapolation
    assert all(math.isnan(x) for x in critical_point([0.1, 0.3], [0.98, 0.97], [0.9, 0.8], 0.99, higher_is_better=True))
    assert all(math.isnan(x) for x in critical_point([0.1], [math.nan], [0.9], 0.99, higher_is_better=True))
    # a later point passing again does not extend the range
    assert critical_point([0.1, 0.2, 0.3], [1.0, 0.9, 1.0], [0.9, 0.8, 0.7], 0.99, higher_is_better=True)[0] == 0.1


def synthetic_windows(n_windows: int, seed: int = 0) -> pl.DataFrame:
    """Per-window sums for 4 grid values whose accuracy and NLL degrade with sparsity."""
    rng = np.random.default_rng(seed)
    dense_acc = rng.binomial(50, 0.5, n_windows)
    nll_dense = rng.gamma(20.0, 0.15, n_windows) * 50 / 3
    rows = []
    for value, drop, dnll in ((1.0, 0.0, 0.0), (0.9, 0.002, 0.005), (0.8, 0.02, 0.05), (0.7, 0.08, 0.2)):
        lost = rng.binomial(dense_acc, drop)
        sparse = (np.round((1.0 - value) * 2.5 * 96) + rng.integers(-3, 4, n_windows)).clip(0, 96) * 40
        extra = dnll * 50 * (1.0 + rng.normal(0.0, 1.0, n_windows))
        for i in range(n_windows):
            rows.append(dict(value=value, window=i, n_pred=50, n_valid=40, nll_sparse=nll_dense[i] + extra[i],
                             nll_dense=nll_dense[i], correct_sparse=int(dense_acc[i] - lost[i]),
                             correct_dense=int(dense_acc[i]), kl=dnll * 40.0, hook_sparse=[int(sparse[i]) // 2,
                                                                                            int(sparse[i]) // 2]))
    return pl.DataFrame(rows)


HOOKS = [dict(layer=0, site="intermediate", width=48), dict(layer=1, site="intermediate", width=48)]


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_data():
    widths = {}
    for n in (40, 2000):
        summary, layers, critical = summarize(synthetic_windows(n), HOOKS, dict(eval_id="x"), n_boot=200, seed=0)
        for row in summary.iter_rows(named=True):
            for k in ("acc_ratio", "dnll", "sparsity"):
                assert row[f"{k}_lo"] - 1e-12 <= row[k] <= row[f"{k}_hi"] + 1e-12, (n, k, row["value"])
        crit = critical.filter(pl.col("criterion") == "exp_neg_dnll").row(0, named=True)
        assert crit["critical_lo"] <= crit["critical_sparsity_interp"] <= crit["critical_hi"]
        at = summary.filter(pl.col("value") == 0.8).row(0, named=True)
        widths[n] = (at["acc_ratio_hi"] - at["acc_ratio_lo"], at["dnll_hi"] - at["dnll_lo"],
                     crit["critical_hi"] - crit["critical_lo"])
        model_level = layers.filter(pl.col("layer") == -1).sort("value", descending=True)["sparsity"].to_list()
        assert model_level == summary["sparsity"].to_list()
    assert all(big < small for big, small in zip(widths[2000], widths[40])), widths
    # same seed, same data: same intervals
    again = summarize(synthetic_windows(40), HOOKS, dict(eval_id="x"), n_boot=200, seed=0)[0]
    first = summarize(synthetic_windows(40), HOOKS, dict(eval_id="x"), n_boot=200, seed=0)[0]
    assert again.equals(first)


def test_too_few_windows_give_no_interval_rather_than_a_zero_width_one():
    """One held-out window made every resample the sample itself: "95% intervals" of width 0. Below
    MIN_WINDOWS the intervals are NaN (and the CLI says why); from MIN_WINDOWS on they are real."""
    from actsparse.analyze.evaluate.config import MIN_WINDOWS

    for n in (1, MIN_WINDOWS - 1):
        summary, _, critical = summarize(synthetic_windows(n), HOOKS, dict(eval_id="x"), n_boot=200, seed=0)
        assert summary["n_boot"].to_list() == [0] * summary.height and summary["n_windows"][0] == n
        for k in ("acc_ratio", "dnll", "sparsity"):
            assert summary[f"{k}_lo"].is_nan().all() and summary[f"{k}_hi"].is_nan().all(), (n, k)
            assert not summary[k].is_nan().any()  # the point estimates stay
        assert critical["critical_lo"].is_nan().all() and critical["boot_undefined"].is_nan().all()
    summary, _, _ = summarize(synthetic_windows(MIN_WINDOWS), HOOKS, dict(eval_id="x"), n_boot=200, seed=0)
    at = summary.filter(pl.col("value") == 0.7).row(0, named=True)
    assert at["dnll_lo"] < at["dnll_hi"] and summary["n_boot"][0] == 200


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert math.isnan(spearman([1, 2], [1, 2]))


# ----------------------------------------------------------------------------- storage and resume


def test_resume_skips_finished_values(tiny_llama, text_corpus, tmp_path):
    store = tmp_path / "store"
    cfg = EvalConfig(model=str(tiny_llama), corpus=str(text_corpus), target="intermediate", grid=(1.0, 0.5),
                     seq_len=SEQ, batch_size=BATCH)
    first = evaluate(cfg, store, n_boot=20, log=quiet)
    parts = store / "evaluations" / f"evaluate-{first.eval_id}"
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.glob("value-*.parquet")}
    assert sorted(mtimes) == ["value-0.5.parquet", "value-1.0.parquet"]

    class Killed(Exception):
        pass

    def kill_after_08(msg: str) -> None:  # "killed" right after value 0.8 was written
        if " 0.8:" in msg:
            raise Killed

    grid = (1.0, 0.8, 0.6, 0.5)
    with pytest.raises(Killed):
        evaluate(dataclass_replace(cfg, grid=grid), store, n_boot=20, log=kill_after_08)
    assert (parts / "value-0.8.parquet").is_file() and not (parts / "value-0.6.parquet").exists()

    res = evaluate(dataclass_replace(cfg, grid=grid), store, n_boot=20, log=quiet)
    assert res.eval_id == first.eval_id
    assert res.computed == [0.6] and res.reused == [1.0, 0.8, 0.5]
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("value-*.parquet") if p.name in mtimes} == mtimes
    assert res.summary["value"].to_list() == [1.0, 0.8, 0.6, 0.5]
    on_disk = pl.read_parquet(store / "evaluations" / f"evaluate-{res.eval_id}.parquet")
    assert on_disk.drop("label").equals(res.summary.drop("label"))
    for col in ("run_id", "target", "rule", "value", "sparsity", "nll", "ppl", "top1_acc", "kl", "n_tokens", "eval_id"):
        assert col in on_disk.columns
    # a fresh evaluation of the same values in memory gives the same numbers
    fresh = evaluate(dataclass_replace(cfg, grid=grid), None, n_boot=20, log=quiet)
    assert fresh.summary.select("value", "sparsity", "nll", "kl").equals(res.summary.select("value", "sparsity", "nll", "kl"))


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.slow
def test_evaluation_attached_to_a_run_and_proxy_check(f32_store, tiny_llama, text_corpus):
    """CLI with --run: results in the run's analysis/, listed in its checksums, proxy check printed."""
    from actsparse.share import verify

    store, res = f32_store
    r = run_cli("evaluate", "--store", str(store), "--run", res.run_id, "--target", "intermediate",
                "--grid", "1.0,0.9,0.7,0.5", "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--boot", "20", "-q")
    assert r.returncode == 0, r.stderr
    assert "closed-loop critical sparsity" in r.stdout and "open-loop (offline) vs closed-loop" in r.stdout
    analysis = store / "runs" / res.run_id / "analysis"
    (summary_file,) = analysis.glob("evaluate-*.parquet")
    eval_id = summary_file.stem.split("-", 1)[1]
    assert (analysis / f"evaluate_layers-{eval_id}.parquet").is_file()
    assert json.loads((analysis / f"evaluate-{eval_id}" / "config.json").read_text())["identity"]["split"] == "heldout"
    report = verify(str(store))
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    (stored,) = stored_evaluations(StoreReader(str(store)), res.run_id)
    assert stored.eval_id == eval_id and stored.summary["run_id"].unique().to_list() == [res.run_id]

    proxy = proxy_check(store, res.run_id, "intermediate", "top-p")
    row = proxy.row(0, named=True)
    assert row["eval_id"] == eval_id and row["n_values"] == 4
    r = run_cli("proxy", str(store), "--run", res.run_id)
    assert r.returncode == 0 and eval_id[:6] in r.stdout, r.stderr


def test_proxy_check_without_evaluation_is_an_error(f32_store):
    store, res = f32_store
    with pytest.raises(ActsparseError, match="no stored closed-loop evaluation"):
        proxy_check(store, res.run_id, "gate")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-other"), "llama", seed=1)


@pytest.mark.slow
def test_a_relative_store_path_records_results_and_one_window_gives_no_interval(f32_store, tmp_path):
    """`evaluate --store S` with a relative path once recorded nothing in the run's checksums.json (verify warned,
    pack left the results out); and one held-out window gave zero-width "95% intervals" (here: 128 tokens
    cut at document ends, fewer than 5 windows)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from actsparse import share
    from actsparse.core import format as fmt
    from actsparse.core.checksums import parse_checksums

    store, res = f32_store
    shutil.copytree(store, tmp_path / "S")
    exe = str(Path(sys.executable).with_name("actsparse"))
    r = subprocess.run([exe, "evaluate", "--run", res.run_id[:8], "--store", "S", "--target", "intermediate",
                        "--grid", "1,0.9", "--seq-len", "128", "--max-tokens", "128", "-q"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"note: [1-4] held-out window\(s\), fewer than the 5 a bootstrap interval needs: no intervals "
                     r"\(NaN\)", r.stdout), r.stdout
    run_dir = tmp_path / "S" / fmt.run_path(res.run_id)
    written = {p.relative_to(run_dir).as_posix() for p in (run_dir / fmt.ANALYSIS).rglob("*")
               if p.is_file() and p.name not in fmt.LOCKS}
    listed = parse_checksums((run_dir / fmt.CHECKSUMS).read_bytes(), "c")
    assert written and written <= set(listed), written - set(listed)
    report = share.verify(str(tmp_path / "S"))
    assert report.ok and not report.warnings, [str(w) for w in report.warnings + report.problems]
    # the shared store may hold other evaluations of the run: this one is the 128-token one
    [summary] = [e.summary for e in stored_evaluations(StoreReader(str(tmp_path / "S")), res.run_id)
                 if e.summary["n_tokens"].max() <= 128]
    assert summary["n_windows"].max() < 5 and summary["acc_ratio_lo"].is_nan().all()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["target", "grid", "grid-empty", "few-tokens", "mismatch"])
def test_bad_input_is_a_one_line_cli_error(case, tiny_llama, text_corpus, f32_store, other_model, tmp_path):
    store, res = f32_store
    base = ["evaluate", "--model", str(tiny_llama), "--corpus", str(text_corpus), "--seq-len", str(SEQ)]
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\nAnd a second line here.\n")
    args, expect = {
        "target": (base + ["--target", "attention"], "unknown target 'attention'"),
        "grid": (base + ["--grid", "1.0,1.5"], "top-p value must be in [0, 1], got 1.5"),
        "grid-empty": (base + ["--grid", " , "], "--grid has no values"),  # not the default grid
        "few-tokens": (["evaluate", "--model", str(tiny_llama), "--corpus", str(short), "--seq-len", str(SEQ)],
                       "needs at least 64"),
        "mismatch": (["evaluate", "--model", str(other_model), "--store", str(store), "--run", res.run_id,
                      "--seq-len", str(SEQ)], "does not match run"),
    }[case]
    r = run_cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.stderr


@pytest.mark.parametrize("case", ["rule", "threshold", "grid-empty", "power", "run-without-store", "no-model"])
def test_bad_input_errors_before_loading_anything(case, tiny_llama, text_corpus, f32_store):
    store, res = f32_store
    cfg = EvalConfig(model=str(tiny_llama), corpus=str(text_corpus), seq_len=SEQ)
    kw, expect, where = {
        "rule": (dict(rule="top-q"), "unknown rule 'top-q'", None),
        "threshold": (dict(rule="threshold"), "calibrates a tau per layer on a stored run", None),
        "grid-empty": (dict(grid=()), "grid is empty", None),
        "power": (dict(rule="top-k", grid=(0.5,), power=2.0), "power applies only to the top-p rule", None),
        "run-without-store": ({}, "--run needs --store", dict(run=res.run_id)),
        "no-model": (dict(model=None), "needs --model and --corpus", {}),
    }[case]
    with pytest.raises(ActsparseError, match=re.escape(expect)):
        evaluate(dataclass_replace(cfg, **kw), **(where or {}), log=quiet)


# ----------------------------------------------------------------------------- real model


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_closed_loop_against_open_loop(smollm2_store):
    """SmolLM2-135M: p = 1 is lossless, sparsity and damage grow as p falls, the offline proxy ranks the grid."""
    store, res = smollm2_store
    cfg = EvalConfig(target="intermediate", grid=(1.0, 0.95, 0.8, 0.6), max_tokens=512, seq_len=128, batch_size=4)
    ev = evaluate(cfg, store, run=res.run_id, n_boot=50, log=quiet)
    s = ev.summary.sort("value", descending=True)
    assert s["kl"][0] == 0.0 and s["dnll"][0] == 0.0 and s["acc_ratio"][0] == 1.0
    assert s["sparsity"].is_sorted() and s["kl"].is_sorted() and s["dnll"][-1] > s["dnll"][1] > 0
    row = proxy_check(store, res.run_id, "intermediate", "top-p", eval_id=ev.eval_id).row(0, named=True)
    assert row["spearman_err_dnll"] == pytest.approx(1.0)
    # open-loop sparsity (collect split, dense inputs) is close to closed-loop sparsity at the same p
    assert abs(row["sparsity_gap"]) < 0.05
