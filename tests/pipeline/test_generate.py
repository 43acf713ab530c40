"""KV-cache generation (``actsparse.pipeline.generate``): the activations of generated tokens equal a full forward
over the same prefix (real SmolLM2-135M, and a tiny sliding-window Gemma 3 with left padding), counting stops at
the first stop token, sampling is seeded per row; bad input."""

from __future__ import annotations

import pytest
import torch

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES
from actsparse.pipeline.generate import (
    ForwardInfo,
    Sampling,
    generate,
    left_pad,
    next_tokens,
    row_generators,
    top_p_filter,
)
from actsparse.pipeline.recorder import SiteRecorder
from actsparse.pipeline.sites import resolve_ffn

PROMPTS = ("The capital of France is", "Once upon a time, in a small village near the sea,", "1, 2, 3,")


@pytest.fixture(scope="module")
def smol():
    from actsparse.pipeline.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model("smollm2-135m")
    model = load_model(resolved)
    tok, _ = load_tokenizer(resolved)
    return model, tok, resolve_ffn(model)


def prompt_ids(tok, texts=PROMPTS) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in texts]


class Capture:
    """Sink + after_forward callback: the hooked tensors of each forward, keyed by forward index."""

    def __init__(self):
        self.current: dict[tuple[str, int], torch.Tensor] = {}
        self.by_forward: dict[int, dict[tuple[str, int], torch.Tensor]] = {}
        self.infos: list[ForwardInfo] = []

    def sink(self, site: str, layer: int, t: torch.Tensor) -> None:
        self.current[(site, layer)] = t.clone()

    def after(self, info: ForwardInfo) -> None:
        self.by_forward[info.index] = self.current
        self.current = {}
        self.infos.append(info)


def full_forward(model, arch, ids: list[int]) -> dict[tuple[str, int], torch.Tensor]:
    cap: dict[tuple[str, int], torch.Tensor] = {}
    with SiteRecorder(arch, SITES, lambda s, i, t: cap.__setitem__((s, i), t[0].clone())), torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False)
    return cap


@pytest.mark.real
@pytest.mark.slow
def test_kv_cache_activations_equal_a_full_forward_over_the_same_prefix(smol):
    model, tok, arch = smol
    prompts = prompt_ids(tok)
    cap = Capture()
    with SiteRecorder(arch, SITES, cap.sink) as rec:
        gen = generate(model, prompts, 8, stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                       after_forward=cap.after)
        assert rec.counts[("input", 0)] == len(gen.forwards) == 8  # prefill + 7 generation forwards
    assert [f.phase for f in gen.forwards] == ["prefill"] + ["generation"] * 7
    assert [f.step for f in gen.forwards] == list(range(8))
    worst = 0.0
    for b, prompt in enumerate(prompts):
        fed = prompt + gen.continuation(b)[:7]  # the 8th token is generated but never fed
        ref = full_forward(model, arch, fed)
        for f in gen.forwards:
            for j in range(f.token_ids.shape[1]):
                if not f.valid[b, j]:
                    continue
                p = int(f.positions[b, j])
                assert int(f.token_ids[b, j]) == fed[p]
                for key, t in cap.by_forward[f.index].items():
                    got, want = t[b, j], ref[key][p]
                    worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp(min=1e-6)))
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert worst < 1e-4


@pytest.mark.real
@pytest.mark.slow
def test_counting_stops_at_the_first_stop_token(smol):
    model, tok, _ = smol
    prompts = prompt_ids(tok)
    free = generate(model, prompts, 10, stop_token_ids=[], pad_token_id=tok.pad_token_id)
    # a stop token that row 0 first produces at step 3 and that row 2 does not produce at all
    stop = free.continuation(0)[2]
    assert stop not in free.continuation(0)[:2] and stop not in free.continuation(2)
    first_in_1 = free.continuation(1).index(stop) + 1 if stop in free.continuation(1) else None
    gen = generate(model, prompts, 10, stop_token_ids=[stop], pad_token_id=tok.pad_token_id)
    assert gen.n_generated[0] == 3 and bool(gen.stopped[0])
    assert gen.continuation(0) == free.continuation(0)[:3]
    assert (gen.tokens[0, 3:] == tok.pad_token_id).all()
    assert gen.n_generated[2] == 10 and not bool(gen.stopped[2])
    if first_in_1 is not None:
        assert gen.n_generated[1] == first_in_1
    table = gen.token_table()
    for f in gen.forwards[1:]:
        # row 0 feeds g_1, g_2 and its stop token g_3 (valid), then padding (invalid)
        assert bool(f.valid[0, 0]) == (f.step <= 3)
        assert bool(f.valid[2, 0])
    gen_rows = (table["phase"] == "generation") & (table["sequence"] == 0)
    assert table["valid"][gen_rows].sum() == 3
    assert set(table["position"][gen_rows & table["valid"]]) == {len(prompts[0]) + k for k in range(3)}


@pytest.mark.real
@pytest.mark.slow
def test_the_loop_ends_when_every_row_stopped(smol):
    model, tok, _ = smol
    prompts = prompt_ids(tok, PROMPTS[:1])
    free = generate(model, prompts, 6, stop_token_ids=[], pad_token_id=tok.pad_token_id)
    stop = free.continuation(0)[1]
    gen = generate(model, prompts, 6, stop_token_ids=[stop], pad_token_id=tok.pad_token_id)
    assert gen.n_generated.tolist() == [2]
    assert len(gen.forwards) == 2  # prefill + the forward feeding g_1; the stop token g_2 is never fed


@pytest.mark.real
@pytest.mark.slow
def test_top_p_is_seeded_per_row_and_independent_of_batch_order(smol):
    model, tok, _ = smol
    prompts = prompt_ids(tok)
    sampling = Sampling("top-p", top_p=0.9, temperature=1.0, seed=7)
    kw = dict(stop_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, sampling=sampling)
    a = generate(model, prompts, 6, row_ids=[10, 11, 12], **kw)
    b = generate(model, prompts[::-1], 6, row_ids=[12, 11, 10], **kw)
    for i in range(3):
        assert a.continuation(i) == b.continuation(2 - i)
    c = generate(model, prompts, 6, row_ids=[10, 11, 12], **(kw | dict(sampling=Sampling("top-p", 0.9, 1.0, 8))))
    assert any(a.continuation(i) != c.continuation(i) for i in range(3))


def test_top_p_filter_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_next_tokens_greedy_and_seeded_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    rows = torch.tensor([0, 1])
    assert next_tokens(logits, Sampling(), [], rows).tolist() == [1, 0]
    s = Sampling("top-p", top_p=1.0, temperature=5.0, seed=1)
    draws = [next_tokens(logits, s, row_generators(1, [0, 1]), rows).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    only_top = Sampling("top-p", top_p=0.01, seed=1)
    assert next_tokens(logits, only_top, row_generators(1, [0, 1]), rows).tolist() == [1, 0]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ActsparseError, match="no prompts"):
        left_pad([], 0)
    with pytest.raises(ActsparseError, match="prompt 1 is empty"):
        left_pad([[1], []], 0)


@pytest.mark.parametrize("sampling, msg", [
    (Sampling("beam"), "unknown sampling"),
    (Sampling("top-p", top_p=0.0), "top-p must be in"),
    (Sampling("top-p", temperature=0.0), "temperature must be > 0"),
])
def test_bad_sampling_is_refused(sampling, msg):
    with pytest.raises(ActsparseError, match=msg):
        generate(None, [[1]], 2, stop_token_ids=[], pad_token_id=0, sampling=sampling)


def test_bad_lengths_are_refused():
    with pytest.raises(ActsparseError, match="at least 1 new token"):
        generate(None, [[1]], 0, stop_token_ids=[], pad_token_id=0)
    with pytest.raises(ActsparseError, match="2 row ids for 1 prompts"):
        generate(None, [[1]], 2, stop_token_ids=[], pad_token_id=0, row_ids=[0, 1])


def test_kv_cache_path_on_a_sliding_window_model():
    """Gemma 3 (sliding-window layers, window 4) with left padding: KV-cache activations == full forward."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=64, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])).eval()
    arch = resolve_ffn(model)
    prompts = [[3, 9, 4, 7, 1, 8], [5, 2]]
    cap = Capture()
    with SiteRecorder(arch, SITES, cap.sink):
        gen = generate(model, prompts, 6, stop_token_ids=[], pad_token_id=0, after_forward=cap.after)
    for b, prompt in enumerate(prompts):
        cap_full = full_forward(model, arch, prompt + gen.continuation(b)[:5])
        for f in gen.forwards:
            for j in range(f.token_ids.shape[1]):
                if f.valid[b, j]:
                    p = int(f.positions[b, j])
                    for key, t in cap.by_forward[f.index].items():
                        torch.testing.assert_close(t[b, j], cap_full[key][p], rtol=1e-5, atol=1e-5)
