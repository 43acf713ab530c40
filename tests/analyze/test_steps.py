"""Per-step analysis of stored generation and diffusion runs (``actsparse.analyze.steps``): the Jaccard computed
offline from the store equals the Jaccard of masks recorded inside the denoising loop, sparsity per step agrees
with the per-token statistics, frames of block diffusion, caching, bad input."""

from __future__ import annotations

import shutil
from collections import defaultdict

import numpy as np
import polars as pl
import pytest
import torch

from actsparse.analyze.flat_topp import flat_topp_segments
from actsparse.analyze.sparsifier import keep_and_count
from actsparse.analyze.stability import StepMaskTracker
from actsparse.analyze.steps import StepConfig, analyze_steps, stability_summary
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import FLAT_TOPP


@pytest.fixture
def store(decoded_store, tmp_path):
    path, ids = decoded_store
    return shutil.copytree(path, tmp_path / "S"), ids


def _in_loop(model_path, run, rule: str, value: float) -> dict:
    """The run's denoising loop again, masks of the bf16 intermediate of every layer recorded at every step (the
    authors' in-loop way) into one tracker per (layer, batch); Jaccard counts summed over batches per
    (layer, kind, delta, step, ref_step)."""
    from actsparse.pipeline.corpora import open_corpus
    from actsparse.pipeline.decoding import DiffusionSpec, plan_decoder
    from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig
    from actsparse.pipeline.models import load_tokenizer, resolve_model
    from actsparse.pipeline.recorder import SiteRecorder
    from actsparse.pipeline.windows import batches, iter_windows

    cfg = run.manifest.config
    resolved = resolve_model(str(model_path), trust_remote_code=True)
    tok, mcfg = load_tokenizer(resolved)
    spec = DiffusionSpec(MaskedDiffusionConfig(**cfg["decoding"]["sampler"]))
    decoder = plan_decoder(spec, tok, mcfg, "tiny", cfg["seq_len"])
    model, arch = decoder.load(resolved, "float32")
    windows = list(iter_windows(open_corpus(run.manifest.corpus.spec).split("collect"), tok, cfg["seq_len"],
                                max_tokens=cfg["max_tokens"]))
    trackers: dict = {}
    state = {}

    class Sink:
        def begin(self, keep, rows, shape):
            state.update(keep=keep, rows=rows)

        def end(self):
            pass

    def record(site, layer, t):
        x = t.reshape(-1, t.shape[-1])[state["keep"]].bfloat16()
        rows = state["rows"]
        if rule == FLAT_TOPP:
            key = rows["sequence"] * 2 + rows["cfg_half"]
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            keep = flat_topp_segments(x, starts, np.r_[starts[1:], len(key)], value)
        else:
            keep = keep_and_count(rule, x, value)[0]
        trackers.setdefault((layer, state["batch"]), StepMaskTracker()).update(int(rows["step"][0]), keep)

    with SiteRecorder(arch, ("intermediate",), record), torch.inference_mode():
        for b, batch in enumerate(batches(windows, cfg["batch_size"])):
            state["batch"] = b
            decoder.run_batch(model, batch, b, Sink())
    pooled = defaultdict(lambda: np.zeros(4))
    for (layer, _), tracker in trackers.items():
        t = tracker.table()
        for j in range(len(t["step"])):
            pooled[(layer, t["kind"][j], int(t["delta"][j]), int(t["step"][j]), int(t["ref_step"][j]))] += (
                t["n_intersection"][j], t["n_union"][j], t["token_jaccard_sum"][j], t["n_tokens"][j])
    return pooled


@pytest.mark.parametrize("rule, value", [(FLAT_TOPP, 0.9), ("top-k", 0.4)])
def test_offline_jaccard_equals_the_masks_recorded_in_the_loop(store, tiny_llada_ckpt, rule, value):
    path, ids = store
    res = analyze_steps(path, ids["llada"], StepConfig(rule=rule, value=value))
    from actsparse.pipeline.reader import StoreReader

    loop = _in_loop(tiny_llada_ckpt, StoreReader(str(path)).run(ids["llada"]), rule, value)
    stab = res.stability.filter(pl.col("layer") >= 0)
    assert stab.height == len(loop) > 0
    assert set(stab["delta"].filter(stab["kind"] == "interval").to_list()) == {4}  # 8 steps: only the interval 4
    for row in stab.iter_rows(named=True):
        want = loop[(row["layer"], row["kind"], row["delta"], row["step"], row["ref_step"])]
        assert (row["n_intersection"], row["n_union"], row["n_tokens"]) == (want[0], want[1], want[3])
        assert row["token_jaccard_sum"] == pytest.approx(want[2], rel=1e-12)
    summary = stability_summary(res.stability)
    assert set(summary) == {("consecutive", 1), ("drift", 0), ("interval", 4)}
    assert all(0 < g <= 1 and 0 < t <= 1 for g, t in summary.values())


def test_sparsity_per_step_agrees_with_the_per_token_statistics(store):
    """Per-token top-p 0.9 of a generation run: dropped / entries per layer and step equals the mean of the stored
    per-token ``sparsity_p90`` over the step's tokens."""
    from actsparse.queries import Store

    path, ids = store
    res = analyze_steps(path, ids["generation"], StepConfig(rule="top-p", value=0.9))
    with Store(path) as st:
        stats = st.sql("SELECT s.layer, k.step, avg(s.sparsity_p90) AS s FROM token_stats s JOIN tokens k "
                       "USING (run_id, token_index) WHERE s.site = 'intermediate' AND s.run_id = $run "
                       "GROUP BY ALL", run=ids["generation"])
    mine = res.sparsity.filter(pl.col("layer") >= 0).join(stats, on=["layer", "step"])
    assert mine.height == res.sparsity.filter(pl.col("layer") >= 0).height > 3
    np.testing.assert_allclose(mine["sparsity"].to_numpy(), mine["s"].to_numpy(), rtol=1e-6)
    assert res.stability.height == 0  # generation steps feed new tokens: nothing to compare
    assert res.sparsity["block"].null_count() == res.sparsity.height


def test_block_diffusion_compares_steps_within_a_canvas(store):
    path, ids = store
    res = analyze_steps(path, ids["dgemma"], StepConfig(target="all-inputs", rule="top-p", value=0.8))
    blocks = dict(res.sparsity.filter(pl.col("layer") == -1).select("step", "block").iter_rows())
    stab = res.stability
    assert stab.height and set(stab["site"].to_list()) == {"input", "intermediate", "model"}
    assert all(blocks[s] == blocks[r] for s, r in stab.select("step", "ref_step").iter_rows())
    model = res.sparsity.filter(pl.col("layer") == -1)
    assert (model["width"] == 32 + 64).all()  # every hook of all-inputs, weighted by width


def test_results_are_cached_in_the_run(store):
    path, ids = store
    first = analyze_steps(path, ids["llada"], StepConfig())
    base = path / fmt.result_base(ids["llada"])
    files = sorted(p.name for p in base.glob("step_*.parquet"))
    assert files == [fmt.result_file(k, first.analysis_id) for k in (fmt.STEP_SPARSITY, fmt.STEP_STABILITY)]
    again = analyze_steps(path, ids["llada"], StepConfig())
    assert again.sparsity.equals(first.sparsity) and again.stability.equals(first.stability)


def test_bad_input(store, two_model_store):
    path, ids = store
    with pytest.raises(ActsparseError, match="holds teacher-forced text, not generation or diffusion steps"):
        analyze_steps(two_model_store[0], two_model_store[1], StepConfig())
    with pytest.raises(ActsparseError, match="top-p-flat value is the kept mass fraction"):
        analyze_steps(path, ids["llada"], StepConfig(value=90))
    with pytest.raises(ActsparseError, match="unknown rule 'top-q'"):
        analyze_steps(path, ids["llada"], StepConfig(rule="top-q"))
    with pytest.raises(ActsparseError, match="--deltas must be step intervals >= 1"):
        analyze_steps(path, ids["llada"], StepConfig(deltas=(0,)))


@pytest.mark.slow
def test_cli_steps(store):
    from tests.helpers import run_cli

    path, ids = store
    r = run_cli("steps", str(path), "--run", ids["llada"], "-q")
    assert r.returncode == 0, r.stderr
    assert "sparsity per step, intermediate / top-p-flat 0.9" in r.stdout and "| consecutive | 1" in r.stdout
    csv = run_cli("steps", str(path), "--run", ids["llada"], "--format", "csv")
    frame = pl.read_csv(csv.stdout.encode())
    assert set(frame["table"].unique().to_list()) == {"step_sparsity", "step_stability"}
    bad = run_cli("steps", str(path), "--run", ids["llada"], "--rule", "top-p-flat", "--value", "90")
    assert bad.returncode == 2 and "error: top-p-flat value is the kept mass fraction" in bad.stderr
