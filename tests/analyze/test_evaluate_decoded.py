"""Closed loop on generation and diffusion (``actsparse.analyze.evaluate.decoded``): keeping everything reproduces the
dense output, counted positions per phase and step, realized sparsity and agreement with intervals, the flattened
top-p inside the loop, storage and reuse, bad input."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from actsparse.analyze.evaluate.decoded import DecodedEvalConfig, continuation_agreement, evaluate_decoded
from actsparse.analyze.flat_topp import flat_topp_mask
from actsparse.analyze.sparsifier import DIFFUSION_RULES, Sparsifier
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.decoding import DiffusionSpec, GenerationSpec
from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig

LLADA = DiffusionSpec(MaskedDiffusionConfig(steps=4, gen_length=8, block_length=4, cfg_scale=0.5))


def _quiet(_):
    pass


def test_continuation_agreement():
    agree, exact = continuation_agreement([[5, 6, 7, 2], [5, 6, 7, 8], [2], [], []],
                                          [[5, 9, 7, 2], [5, 6, 2], [2], [], [4]])
    assert agree.tolist() == [0.75, 0.5, 1.0, 1.0, 0.0]
    assert exact.tolist() == [False, False, True, True, False]
    with pytest.raises(ActsparseError, match="2 dense and 1 sparse continuations"):
        continuation_agreement([[1], [2]], [[1]])


def test_generation_sparsity_per_phase_and_agreement(tiny_llama, text_corpus, tmp_path):
    from actsparse.pipeline.corpora import open_corpus
    from actsparse.pipeline.models import load_tokenizer, resolve_model
    from actsparse.pipeline.windows import iter_windows

    cfg = DecodedEvalConfig(GenerationSpec(5), model=str(tiny_llama), corpus=str(text_corpus), rule="top-k",
                            grid=(1.0, 0.3), max_tokens=96, seq_len=24, batch_size=3)
    res = evaluate_decoded(cfg, tmp_path / "S", n_boot=40, log=_quiet)
    t = res.table.sort("value", descending=True)
    assert t.columns == [c for c, _ in fmt.GENERATION_EVALUATION.columns]
    dense, sparse = t.row(0, named=True), t.row(1, named=True)
    tok, _ = load_tokenizer(resolve_model(str(tiny_llama)))
    prompts = list(iter_windows(open_corpus(str(text_corpus)).split("heldout"), tok, 24, max_tokens=96))
    assert dense["n_prompts"] == len(prompts) and dense["n_prefill"] == sum(len(w.token_ids) for w in prompts)
    assert 0 < dense["n_generation"] <= len(prompts) * 4  # at most 5 - 1 fed tokens per prompt
    # top-k keeping every entry: nothing zeroed but exact zeros, the dense continuation reproduced
    assert dense["sparsity_total"] < 1e-3 and dense["token_agreement"] == dense["exact_match"] == 1.0
    # top-k 0.3 keeps 30% of each token: 70% zeroed in both phases, whatever was generated
    assert sparse["sparsity_prefill"] == pytest.approx(1 - int(64 * 0.3) / 64, abs=1e-3)
    assert sparse["sparsity_generation"] == pytest.approx(1 - int(64 * 0.3) / 64, abs=1e-3)
    for c in ("sparsity_total", "token_agreement", "exact_match"):
        assert sparse[f"{c}_lo"] <= sparse[c] <= sparse[f"{c}_hi"]
    again = evaluate_decoded(cfg, tmp_path / "S", n_boot=40, log=_quiet)
    assert again.reused and again.table.equals(res.table) and again.path.name == fmt.result_file(
        fmt.GENERATION_EVALUATION, res.eval_id)


def test_diffusion_sparsity_per_step(tiny_llada_ckpt, text_corpus, tmp_path):
    cfg = DecodedEvalConfig(LLADA, model=str(tiny_llada_ckpt), corpus=str(text_corpus), rule="top-p-flat",
                            grid=(1.0, 0.6), max_tokens=48, seq_len=16, batch_size=2, trust_remote_code=True)
    res = evaluate_decoded(cfg, tmp_path / "S", n_boot=40, log=_quiet)
    t = res.table
    assert t.columns == [c for c, _ in fmt.DIFFUSION_EVALUATION.columns]
    whole = t.filter(pl.col("step") == -1).sort("value", descending=True)
    assert whole["token_agreement"].to_list()[0] == 1.0 and whole["sparsity"].to_list()[0] == 0.0
    for v in (1.0, 0.6):
        steps = t.filter((pl.col("value") == v) & (pl.col("step") >= 0)).sort("step")
        assert steps["step"].to_list() == [0, 1, 2, 3] and steps["block"].to_list() == [0, 0, 1, 1]
        total = whole.filter(pl.col("value") == v).row(0, named=True)
        # every step runs over the same positions: the whole generation's sparsity is the mean over steps
        assert total["sparsity"] == pytest.approx(float(steps["sparsity"].mean()), rel=1e-12)
        assert total["n_positions"] == steps["n_positions"].sum() and steps["token_agreement"].null_count() == 4
    assert 0.2 < whole["sparsity"].to_list()[1] < 0.95
    assert 0.0 <= whole["token_agreement"].to_list()[1] <= 1.0


def test_the_flattened_top_p_inside_the_loop(tiny_llada):
    """The Sparsifier's top-p-flat zeroes exactly what the offline rule drops, one budget per row."""
    from actsparse.pipeline.diffusion.sites import resolve_diffusion_ffn
    from actsparse.pipeline.recorder import SiteRecorder

    arch = resolve_diffusion_ffn(tiny_llada)
    ids = torch.tensor([[5, 6, 7, 63, 63], [9, 8, 7, 6, 63]])
    seen = {}
    with torch.no_grad():
        with SiteRecorder(arch, ("intermediate",), lambda s, i, t: seen.setdefault(i, t.clone())):
            tiny_llada(ids)
        dense = seen.pop(0)
        with Sparsifier(arch, "intermediate", "top-p-flat", 0.7, rules=DIFFUSION_RULES) as sp:
            with SiteRecorder(arch, ("intermediate",), lambda s, i, t: seen.setdefault(i, t.clone())):
                sp.begin_batch(torch.ones(2, 5, dtype=torch.bool))
                tiny_llada(ids)
                counts = sp.end_batch()
    assert torch.equal(seen[0] != 0, flat_topp_mask(dense, 0.7) & (dense != 0))
    assert counts[0].tolist() == (~flat_topp_mask(dense, 0.7)).sum(dim=(1, 2)).tolist()


@pytest.mark.parametrize("decoding, rule, message", [
    (GenerationSpec(4), "top-p-flat", "unknown rule 'top-p-flat' \\(choose top-p, top-k, max-p, wina-top-k, wina-top-p\\)"),
    (LLADA, "threshold", "needs a per-layer calibrated tau"),
    (GenerationSpec(4), "top-p", "grid is empty"),
])
def test_bad_settings_fail_before_any_model_load(decoding, rule, message):
    grid = () if message == "grid is empty" else (0.5,)
    with pytest.raises(ActsparseError, match=message):
        evaluate_decoded(DecodedEvalConfig(decoding, model="nope", corpus="nope", rule=rule, grid=grid), log=_quiet)


@pytest.mark.slow
def test_cli_evaluate_diffusion(tiny_llada_ckpt, text_corpus, tmp_path):
    from tests.helpers import run_cli

    r = run_cli("evaluate", "-m", str(tiny_llada_ckpt), "-c", str(text_corpus), "--trust-remote-code", "--diffusion",
                "--steps", "4", "--gen-length", "8", "--block-length", "4", "--rule", "top-p-flat", "--grid", "0.7",
                "--max-tokens", "32", "--seq-len", "16", "--boot", "20", "-s", str(tmp_path / "S"), "-q")
    assert r.returncode == 0, r.stderr
    assert "closed loop on diffusion: sparsity per denoising step" in r.stdout and "| -1 " in r.stdout
    assert len(list((tmp_path / "S" / fmt.EVALUATIONS).glob("evaluate_diffusion-*.parquet"))) == 1
