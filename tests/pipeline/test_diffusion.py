"""Diffusion LMs (``actsparse.pipeline.diffusion``) on a tiny LLaDA-layout model and a tiny random-init
diffusion_gemma: FFN sites by structure, LLaDA's sampler against the reference at temperature 0, one capture per
denoising step, offline Jaccard equal to the Jaccard of masks recorded inside the loop, diffusion_gemma's noised
positions and inactive rows; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from actsparse.analyze.stability import StepMaskTracker, mask_stability, step_masks
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES
from actsparse.pipeline.diffusion.block import BlockDiffusionSteps, block_diffusion_generate
from actsparse.pipeline.diffusion.kinds import DiffusionStep, diffusion_kind, mask_token_id
from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig, masked_diffusion_generate, num_transfer_tokens
from actsparse.pipeline.diffusion.sites import resolve_diffusion_ffn
from actsparse.pipeline.diffusion.tiny_llada import build_tiny_llada
from actsparse.pipeline.recorder import SiteRecorder
from tests.analyze.test_stability import assert_tables_equal
from tests.helpers import tiny_diffusion_gemma

PROMPTS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def reference_llada_generate(model, prompt, steps, gen_length, block_length, cfg_scale, mask_id):
    """GSAI-ML/LLaDA generate.py at temperature 0, low-confidence remasking (no randomness)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo, hi = prompt.shape[1] + num_block * block_length, prompt.shape[1] + (num_block + 1) * block_length
        block_mask_index = x[:, lo:hi] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps, mask_num % steps
        ntt = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
        for i in range(mask_num.size(0)):
            ntt[i, : remainder[i]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model(torch.cat([x, un_x], dim=0)).logits
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits
            x0 = torch.argmax(logits, dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, hi:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(ntt[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


# --------------------------------------------------------------------------------------------
# LLaDA layout


def test_llada_layout_is_resolved_by_structure(tiny_llada):
    arch = resolve_diffusion_ffn(tiny_llada)
    d = arch.describe()
    assert (d["pattern"], d["activation"], d["d_model"], d["d_ff"], d["n_layers"]) == ("glu", "silu", 32, 64, 2)
    assert d["layers_path"] == "model.transformer.blocks"
    assert d["layer0_modules"] == {r: f"model.transformer.blocks.0.{n}" for r, n in
                                   (("gate", "ff_proj"), ("up", "up_proj"), ("down", "ff_out"), ("act", "act"))}


def test_llada_sites_are_the_paper_tensors(tiny_llada):
    """input = ff_norm output, gate = ff_proj output, act = act(gate), up, intermediate = act * up."""
    arch = resolve_diffusion_ffn(tiny_llada)
    cap, norm_out = {}, {}
    block = tiny_llada.model.transformer.blocks[1]
    handle = block.ff_norm.register_forward_hook(lambda m, a, out: norm_out.__setitem__("x", out.clone()))
    with SiteRecorder(arch, SITES, lambda s, i, t: cap.__setitem__((s, i), t.clone())), torch.no_grad():
        tiny_llada(PROMPTS)
    handle.remove()
    x = norm_out["x"]
    assert torch.equal(cap[("input", 1)], x)
    assert torch.equal(cap[("gate", 1)], block.ff_proj(x))
    assert torch.equal(cap[("act", 1)], F.silu(block.ff_proj(x)))
    assert torch.equal(cap[("up", 1)], block.up_proj(x))
    assert torch.equal(cap[("intermediate", 1)], cap[("act", 1)] * cap[("up", 1)])
    assert torch.equal(cap[("output", 1)], block.ff_out(cap[("intermediate", 1)]))


# --------------------------------------------------------------------------------------------
# The masked-diffusion sampler


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("steps, gen, block", [(8, 8, 8), (8, 8, 4), (12, 12, 4), (4, 8, 4)])
def test_sampler_equals_the_reference_at_temperature_0(tiny_llada, cfg_scale, steps, gen, block):
    cfg = MaskedDiffusionConfig(steps=steps, gen_length=gen, block_length=block, cfg_scale=cfg_scale)
    ours = masked_diffusion_generate(tiny_llada, PROMPTS, cfg)
    ref = reference_llada_generate(tiny_llada, PROMPTS, steps, gen, block, cfg_scale, 63)
    assert torch.equal(ours.sequences, ref)
    assert ours.steps == steps


def test_steps_report_block_masked_positions_and_cfg_halves(tiny_llada):
    cfg = MaskedDiffusionConfig(steps=6, gen_length=6, block_length=3, cfg_scale=1.0, temperature=0.7, seed=5)
    infos: list[DiffusionStep] = []
    res = masked_diffusion_generate(tiny_llada, PROMPTS, cfg, before_step=infos.append)
    assert [(i.step, i.block, i.step_in_block) for i in infos] == [(s, s // 3, s % 3) for s in range(6)]
    assert [i.block_span for i in infos] == [(4, 7)] * 3 + [(7, 10)] * 3
    for info in infos:
        assert info.token_ids.shape == (4, 10)  # two prompts, doubled by CFG
        assert info.cfg_half.tolist() == [0, 0, 1, 1] and info.sample.tolist() == [0, 1, 0, 1]
        assert torch.equal(info.noised, info.token_ids == 63)
        assert info.noised[2:, :4].all() and not info.noised[:2, :4].any()  # unconditional half: prompt masked
        assert torch.equal(info.token_ids[2:, 4:], info.token_ids[:2, 4:])
    # one position of the current block is unmasked per step (3 masked positions, 3 steps per block)
    masked_answer = [int(i.noised[:2, 4:].sum()) for i in infos]
    assert masked_answer == [12, 10, 8, 6, 4, 2]
    assert not bool((res.sequences == 63).any())
    assert sorted(res.unmasked_at[0, 4:].tolist()) == list(range(6))
    assert (res.unmasked_at[:, 4:7] < 3).all() and (res.unmasked_at[:, 7:] >= 3).all()


def test_sampler_is_seeded(tiny_llada):
    cfg = MaskedDiffusionConfig(steps=8, gen_length=8, block_length=4, temperature=1.0, remasking="random", seed=1)
    a, b = (masked_diffusion_generate(tiny_llada, PROMPTS, cfg).sequences for _ in range(2))
    c = masked_diffusion_generate(tiny_llada, PROMPTS, MaskedDiffusionConfig(**{**cfg.__dict__, "seed": 2})).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_left_padded_prompts_use_the_attention_mask(tiny_llada):
    cfg = MaskedDiffusionConfig(steps=4, gen_length=4, block_length=4)
    alone = masked_diffusion_generate(tiny_llada, torch.tensor([[5, 6]]), cfg).sequences
    padded = masked_diffusion_generate(tiny_llada, torch.tensor([[0, 0, 5, 6]]), cfg,
                                       attention_mask=torch.tensor([[0, 0, 1, 1]])).sequences
    # positions differ (learned absolute embedding), so only check the pads are ignored by attention:
    # changing the pad ids leaves the result unchanged
    other = masked_diffusion_generate(tiny_llada, torch.tensor([[9, 9, 5, 6]]), cfg,
                                      attention_mask=torch.tensor([[0, 0, 1, 1]])).sequences
    assert torch.equal(padded[:, 2:], other[:, 2:]) and alone.shape == (1, 6)


def test_dream_logits_are_shifted_by_one_position(tiny_llada):
    """Dream predicts position i from the output at i - 1; same weights typed llada with shifted logits agree."""
    from torch import nn

    from actsparse.pipeline.diffusion.tiny_llada import MaskedLMOutput

    class Shifted(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None):
            logits = self.inner(input_ids, attention_mask).logits
            return MaskedLMOutput(torch.cat([logits[:, :1], logits[:, :-1]], dim=1))

    dream = build_tiny_llada()  # same seed: the same weights as tiny_llada
    dream.config.model_type = "dream"
    cfg = MaskedDiffusionConfig(steps=8, gen_length=8, block_length=4, temperature=0.5, cfg_scale=0.5)
    ours = masked_diffusion_generate(dream, PROMPTS, cfg).sequences
    assert torch.equal(ours, masked_diffusion_generate(Shifted(tiny_llada), PROMPTS, cfg).sequences)
    assert not torch.equal(ours, masked_diffusion_generate(tiny_llada, PROMPTS, cfg).sequences)


def test_num_transfer_tokens():
    masked = torch.tensor([[True] * 7 + [False], [True] * 3 + [False] * 5])
    assert num_transfer_tokens(masked, 3).tolist() == [[3, 2, 2], [1, 1, 1]]
    assert num_transfer_tokens(masked, 4).tolist() == [[2, 2, 2, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("kw, msg", [
    (dict(steps=6, gen_length=8, block_length=2), "--steps 6 is not divisible by the number of blocks 4"),
    (dict(steps=8, gen_length=8, block_length=3), "--gen-length 8 is not a multiple of --block-length 3"),
    (dict(steps=0), "--steps must be at least 1"),
    (dict(remasking="entropy"), "unknown remasking"),
    (dict(temperature=-1.0), "temperature must be"),
])
def test_bad_configs_are_refused(tiny_llada, kw, msg):
    with pytest.raises(ActsparseError, match=msg):
        masked_diffusion_generate(tiny_llada, PROMPTS, MaskedDiffusionConfig(**kw))


def test_a_model_without_mask_token_is_refused():
    model = build_tiny_llada(mask_token_id=None)
    with pytest.raises(ActsparseError, match="has no mask token"):
        masked_diffusion_generate(model, PROMPTS, MaskedDiffusionConfig(steps=4, gen_length=4, block_length=4))
    assert mask_token_id(model, 7) == 7  # an explicit id works


def test_non_diffusion_models_are_refused(tiny_dgemma):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ActsparseError, match=r"LlamaForCausalLM \(model_type llama\) is not a diffusion LM"):
        masked_diffusion_generate(llama, PROMPTS, MaskedDiffusionConfig())
    with pytest.raises(ActsparseError, match="is not a diffusion LM"):
        resolve_diffusion_ffn(llama)
    with pytest.raises(ActsparseError, match="is not a diffusion LM"):
        BlockDiffusionSteps(llama)
    with pytest.raises(ActsparseError, match="is a masked-diffusion LM, not a block-diffusion one"):
        BlockDiffusionSteps(build_tiny_llada())
    with pytest.raises(ActsparseError, match="is a block-diffusion LM, not a masked-diffusion one"):
        masked_diffusion_generate(tiny_dgemma, PROMPTS, MaskedDiffusionConfig())
    with pytest.raises(ActsparseError, match="contains the mask token"):
        masked_diffusion_generate(build_tiny_llada(), torch.tensor([[1, 63]]), MaskedDiffusionConfig())
    assert diffusion_kind(tiny_dgemma) == "block"


# --------------------------------------------------------------------------------------------
# Capture per step, and offline Jaccard == in-loop Jaccard


class PerStep:
    """Sink + step callbacks: one tensor per (site, layer) per step, hooks checked to fire once per step."""

    def __init__(self, arch, sites, rule=None, value=None):
        self.rec = SiteRecorder(arch, sites, self.sink)
        self.acts: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.infos: list[DiffusionStep] = []
        self.rule, self.value = rule, value
        self.trackers: dict[tuple[str, int], StepMaskTracker] = {}

    def sink(self, site, layer, t):
        self.acts.setdefault((site, layer), []).append(t.clone())
        if self.rule is not None:  # in-loop mask recording, the authors' way (mask of the whole [rows, T, H])
            keep = step_masks(t[None], self.rule, self.value)[0]
            self.trackers.setdefault((site, layer), StepMaskTracker()).update(self.infos[-1].step, keep)

    def before(self, info):
        self.infos.append(info)
        self.rec.reset_counts()

    def after(self, info):
        self.rec.check_fired(1)

    def stacked(self, site, layer):
        return torch.stack(self.acts[(site, layer)])  # [S, rows, T, H]


@pytest.mark.parametrize("rule, value", [("top-p", 0.7), ("top-p-flat", 0.6), ("top-k", 0.3)])
def test_llada_offline_jaccard_equals_in_loop(tiny_llada, rule, value):
    arch = resolve_diffusion_ffn(tiny_llada)
    cap = PerStep(arch, ("input", "intermediate"), rule, value)
    cfg = MaskedDiffusionConfig(steps=40, gen_length=8, block_length=4, cfg_scale=0.5, temperature=0.5)
    with cap.rec:
        res = masked_diffusion_generate(tiny_llada, PROMPTS, cfg, before_step=cap.before, after_step=cap.after)
    assert res.steps == len(cap.infos) == 40
    for key, tracker in cap.trackers.items():
        acts = cap.stacked(*key)
        assert acts.shape == (40, 4, 12, 32 if key[0] == "input" else 64)
        assert_tables_equal(mask_stability(step_masks(acts, rule, value)), tracker.table())


@pytest.mark.slow
def test_diffusion_gemma_capture_once_per_step_and_offline_jaccard(tiny_dgemma):
    arch = resolve_diffusion_ffn(tiny_dgemma)
    assert arch.describe()["layer0_modules"]["gate"] == "model.decoder.layers.0.mlp.gate_proj"
    assert arch.activation == "gelu_pytorch_tanh" and arch.d_ff == 64
    cap = PerStep(arch, ("input", "gate", "intermediate"), "top-p", 0.8)
    with cap.rec:
        out, steps = block_diffusion_generate(tiny_dgemma, PROMPTS + 10, seed=3, before_step=cap.before,
                                              after_step=cap.after, max_new_tokens=16, max_denoising_steps=5)
    assert steps == len(cap.infos) == 10  # 2 canvases x 5 steps, no early stop on a random model
    assert [(i.block, i.step_in_block) for i in cap.infos] == [(b, s) for b in range(2) for s in range(5)]
    assert out.sequences.shape == (2, 4 + 16)
    for key, tracker in cap.trackers.items():
        acts = cap.stacked(*key)
        assert acts.shape[:3] == (10, 2, 8)
        assert_tables_equal(mask_stability(step_masks(acts, "top-p", 0.8)), tracker.table())
    # no hook and no wrapper left behind
    assert "_prepare_sampler" not in tiny_dgemma.__dict__
    assert not tiny_dgemma.model.decoder._forward_pre_hooks and not tiny_dgemma.model.encoder._forward_pre_hooks


# --------------------------------------------------------------------------------------------
# diffusion_gemma: noised positions and active rows


def decoder_passes(out, prompt_len: int, pad: int = 0) -> list[int]:
    """generate's per-row decoder_forward_passes, recovered from its tokens_per_forward."""
    valid = (out.sequences[:, prompt_len:] != pad).sum(dim=1)
    return (valid / out.tokens_per_forward).round().long().tolist()


class RowScale:
    """A logits processor that sharpens each row's logits by its own factor, so rows differ in entropy."""

    def __init__(self, scales):
        self.scales = torch.tensor(scales)[:, None, None]

    def __call__(self, input_ids, scores, cur_step=None):
        return scores * self.scales


@pytest.mark.slow
def test_active_rows_match_generates_forward_pass_count():
    from transformers import LogitsProcessorList

    model = tiny_diffusion_gemma()
    prompts = torch.tensor([[2, 10, 11, 12], [2, 20, 21, 22], [2, 30, 31, 32], [2, 40, 41, 42]])
    frozen_pairs = 0
    # rows sharpened 1x..5x cross the confidence threshold at different steps; an entropy bound of 20
    # accepts ~4 of 8 positions per step, which positions varying
    for threshold in (5.66, 5.6, 5.5):
        infos: list[DiffusionStep] = []
        out, steps = block_diffusion_generate(
            model, prompts, seed=0, before_step=infos.append, max_new_tokens=8, max_denoising_steps=12,
            confidence_threshold=threshold, stability_threshold=0,
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=20.0),
            logits_processor=LogitsProcessorList([RowScale([1.0, 2.0, 3.0, 5.0])]))
        active = torch.stack([i.active for i in infos])
        assert active.sum(dim=0).tolist() == decoder_passes(out, prompts.shape[1])
        assert len(set(active.sum(dim=0).tolist())) > 2
        for a, b in zip(infos, infos[1:], strict=False):
            frozen = ~a.active  # stopped before step a began: step a left its canvas and noise as they were
            frozen_pairs += int(frozen.sum())
            assert torch.equal(b.token_ids[frozen], a.token_ids[frozen])
            assert torch.equal(b.noised[frozen], a.noised[frozen])
            moved = a.active
            assert not torch.equal(b.token_ids[moved], a.token_ids[moved])
    assert frozen_pairs > 20


def test_rows_that_ended_with_eos_are_inactive():
    model = tiny_diffusion_gemma()
    prompts = torch.tensor([[2, 10, 11, 12], [2, 20, 21, 22]])
    kw = dict(seed=0, max_new_tokens=24, max_denoising_steps=3)
    first, _ = block_diffusion_generate(model, prompts, **kw)
    eos = int(first.sequences[0, 4])  # row 0's first token, absent from row 1's first canvas
    assert eos not in first.sequences[1, 4:12].tolist()
    infos: list[DiffusionStep] = []
    out, _ = block_diffusion_generate(model, prompts, before_step=infos.append, eos_token_id=eos, pad_token_id=0, **kw)
    assert [i.active.tolist() for i in infos if i.block == 1] == [[False, True]] * 3
    assert torch.stack([i.active for i in infos]).sum(dim=0).tolist() == decoder_passes(out, 4)


def test_noised_positions_follow_the_sampler():
    model = tiny_diffusion_gemma()
    prompts = torch.tensor([[2, 10, 11, 12]])
    infos: list[DiffusionStep] = []
    block_diffusion_generate(model, prompts, seed=1, before_step=infos.append, max_new_tokens=8, max_denoising_steps=4)
    # a canvas starts as noise; this random model is so uncertain that the entropy bound (0.1) accepts one token a step
    assert infos[0].noised.all()
    assert [int(i.noised.sum()) for i in infos[1:]] == [7, 7, 7]
    infos = []
    block_diffusion_generate(model, prompts, seed=1, before_step=infos.append, max_new_tokens=8, max_denoising_steps=4,
                             sampler_config=EntropyBoundSamplerConfig(entropy_bound=1e9))
    assert infos[0].noised.all() and not any(bool(i.noised.any()) for i in infos[1:])  # everything accepted


def test_block_diffusion_is_seeded_and_leaves_the_global_rng_alone(tiny_dgemma):
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=8, max_denoising_steps=3)
    a, _ = block_diffusion_generate(tiny_dgemma, PROMPTS, seed=4, **kw)
    b, _ = block_diffusion_generate(tiny_dgemma, PROMPTS, seed=4, **kw)
    c, _ = block_diffusion_generate(tiny_dgemma, PROMPTS, seed=5, **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_tiny_llada_loads_as_remote_code(tiny_llada_ckpt):
    """The checkpoint loads through transformers' remote-code path as LLaDA's does, with the same outputs."""
    from actsparse.pipeline.diffusion.kinds import load_diffusion_model
    from actsparse.pipeline.models import resolve_model

    resolved = resolve_model(str(tiny_llada_ckpt), trust_remote_code=True)
    model = load_diffusion_model(resolved)
    assert type(model).__module__.startswith("transformers_modules.")
    arch = resolve_diffusion_ffn(model)
    assert arch.describe()["layer0_modules"]["down"] == "model.transformer.blocks.0.ff_out"
    again = load_diffusion_model(resolved)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert mask_token_id(model) == model.config.mask_token_id
