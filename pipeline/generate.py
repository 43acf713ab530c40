"""Autoregressive generation with a KV cache, forward by forward, for FFN-activation capture.

One call generates up to ``max_new_tokens`` tokens for a batch of prompts and tells two optional
callbacks about every forward pass, before and after it runs, with a :class:`ForwardInfo` that
labels each of the forward's input rows. FFN hooks that are active around the call (a
``pipeline.recorder.SiteRecorder``, an ``analyze.sparsifier.Sparsifier``) then fire once per forward, and
the callbacks say which rows they saw: ``begin_batch(info.valid)`` / ``end_batch()`` of a
Sparsifier fit ``before_forward`` / ``after_forward`` directly.

Counting follows the paper's harness (docs/paper-notes.md §1.4; the authors' ``models/huggingface.py``):

* forward 0 is the **prefill** over the prompts; every later forward feeds **one** token per
  row with the KV cache and is **generation** step k (k = 1, 2, ...), the token fed being the
  k-th generated token g_k;
* as in Hugging Face ``generate``, a token is only fed when another one must be predicted: the
  last generated token (at ``max_new_tokens``, or when every row has stopped) gets no forward
  pass, so ``max_new_tokens`` tokens cost 1 prefill + at most ``max_new_tokens - 1`` generation
  forwards;
* a row's rows are ``valid`` up to and including its first stop token; after it, the row is fed
  ``pad_token_id`` (its activations are computed, as in a batched ``generate``, and flagged
  invalid). Left padding is invalid too.

Batching: prompts are **left-padded** to the longest one, with an attention mask and explicit
``position_ids`` (cumulative sum of the mask, as ``GenerationMixin`` computes them), so a
row's positions are those of its own unpadded sequence and the KV-cache activations match a full
forward over the same prefix within float tolerance (tested on SmolLM2-135M).

Sampling: ``greedy`` (argmax) or ``top-p`` (nucleus, Hugging Face ``TopPLogitsWarper``
semantics after dividing by ``temperature``). Every row draws from its own ``torch.Generator``
seeded from ``(seed, row_id)``, so a row's continuation does not depend on the other rows of
its batch or on the order of the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from actsparse.core.errors import ActsparseError

PHASES = ("prefill", "generation")
SAMPLING_METHODS = ("greedy", "top-p")


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Attributes:
        method: ``greedy`` (argmax of the logits) or ``top-p`` (nucleus sampling).
        top_p: nucleus mass in (0, 1]; only for ``top-p``.
        temperature: logits are divided by it before top-p, > 0; only for ``top-p``.
        seed: base seed of the per-row generators (``top-p`` only; greedy draws nothing).
    """

    method: str = "greedy"
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ActsparseError on an unknown method or a value out of range."""
        if self.method not in SAMPLING_METHODS:
            raise ActsparseError(f"unknown sampling '{self.method}' (choose {', '.join(SAMPLING_METHODS)})")
        if not 0.0 < self.top_p <= 1.0:
            raise ActsparseError(f"top-p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise ActsparseError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class ForwardInfo:
    """The input rows of one forward pass. All tensors are CPU tensors of shape [batch, n].

    ``n`` is the padded prompt length for the prefill and 1 for a generation step, so
    ``reshape(-1)`` orders the rows as a hooked activation ``[batch, n, width].reshape(-1, width)``.

    Attributes:
        index: forward number within the call, 0 for the prefill.
        phase: ``prefill`` or ``generation``.
        step: generation step: 0 for the prefill, k for the forward that feeds generated token k.
        sequence: int64, the caller's row id of each row.
        token_ids: int64, the tokens fed.
        positions: int64, position in the row's own unpadded sequence; -1 at left padding.
        valid: bool, counted rows: not padding, not after the row's first stop token.
    """

    index: int
    phase: str
    step: int
    sequence: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


ForwardCallback = Callable[[ForwardInfo], None]


@dataclass(frozen=True)
class Generation:
    """The result of :func:`generate` for a batch of B prompts.

    Attributes:
        tokens: int64 [B, max_new_tokens], generated ids; ``pad_token_id`` after a row's first stop
            token and after the loop ended.
        n_generated: int64 [B], tokens generated up to and including the first stop token.
        stopped: bool [B], the row produced a stop token.
        prompt_lengths: int64 [B], unpadded prompt lengths.
        forwards: the :class:`ForwardInfo` of every forward pass, in order.
    """

    tokens: torch.Tensor
    n_generated: torch.Tensor
    stopped: torch.Tensor
    prompt_lengths: torch.Tensor
    forwards: tuple[ForwardInfo, ...] = field(repr=False)

    def continuation(self, row: int) -> list[int]:
        """Row ``row``'s generated tokens, up to and including its first stop token."""
        return self.tokens[row, : int(self.n_generated[row])].tolist()

    def token_table(self) -> dict[str, np.ndarray]:
        """One entry per input row of every forward, in hook order (forward, batch row, position).

        Columns: ``sequence`` int64, ``position`` int64 (-1 at padding), ``phase`` str,
        ``step`` int32 (generation step, 0 = prefill), ``forward`` int32, ``token_id`` int64,
        ``valid`` bool.
        """
        return token_table(self.forwards)


def token_table(forwards: Sequence[ForwardInfo]) -> dict[str, np.ndarray]:
    """Columns of :meth:`Generation.token_table` for any sequence of forwards."""
    if not forwards:
        raise ActsparseError("no forward passes to tabulate")
    cols: dict[str, list[np.ndarray]] = {c: [] for c in ("sequence", "position", "phase", "step", "forward",
                                                        "token_id", "valid")}
    for f in forwards:
        n = f.token_ids.numel()
        cols["sequence"].append(f.sequence.reshape(-1).numpy())
        cols["position"].append(f.positions.reshape(-1).numpy())
        cols["phase"].append(np.full(n, f.phase))
        cols["step"].append(np.full(n, f.step, dtype=np.int32))
        cols["forward"].append(np.full(n, f.index, dtype=np.int32))
        cols["token_id"].append(f.token_ids.reshape(-1).numpy())
        cols["valid"].append(f.valid.reshape(-1).numpy())
    return {c: np.concatenate(v) for c, v in cols.items()}


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask)``, both int64 [B, max prompt length].

    Raises:
        ActsparseError: no prompts, or an empty prompt.
    """
    if len(prompts) == 0:
        raise ActsparseError("no prompts to generate from")
    lengths = [len(p) for p in prompts]
    if min(lengths) < 1:
        raise ActsparseError(f"prompt {lengths.index(min(lengths))} is empty; every prompt needs at least one token")
    width = max(lengths)
    ids = torch.full((len(prompts), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(np.asarray(p, dtype=np.int64))
        mask[i, width - len(p):] = 1
    return ids, mask


def row_generators(seed: int, row_ids: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded from ``(seed, row_id)`` through numpy's ``SeedSequence``."""
    gens = []
    for r in row_ids:
        state = np.random.SeedSequence([int(seed), int(r)]).generate_state(1, dtype=np.uint64)[0]
        gens.append(torch.Generator().manual_seed(int(state)))
    return gens


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the nucleus to -inf; logits [B, V] float, returns a new tensor.

    Source: transformers ``TopPLogitsWarper.__call__``: sort ascending, drop every token whose
    cumulative probability is <= 1 - top_p, always keep the most likely token.
    """
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator],
                rows: torch.Tensor) -> torch.Tensor:
    """Next token of each row in ``rows`` (int64 [n]) from last-position logits [B, V]; int64 [n]."""
    if sampling.method == "greedy":
        return logits[rows].argmax(dim=-1)
    scores = top_p_filter(logits[rows].float() / sampling.temperature, sampling.top_p)
    probs = scores.softmax(dim=-1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=generators[int(r)])[0]
                        for i, r in enumerate(rows.tolist())])


def _forward_kwargs(model) -> dict:
    """``logits_to_keep=1`` where the model's forward takes it (only the last position's logits are used)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop_token_ids: Collection[int],
             pad_token_id: int, sampling: Sampling = Sampling(), row_ids: Sequence[int] | None = None,
             before_forward: ForwardCallback | None = None,
             after_forward: ForwardCallback | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens per prompt with a KV cache, one forward per token.

    Args:
        model: a Hugging Face causal LM in eval mode whose forward takes ``input_ids``,
            ``attention_mask``, ``position_ids``, ``cache`` and ``use_cache`` (transformers 5).
        prompts: token ids of each prompt (B >= 1 prompts, each non-empty, no padding).
        max_new_tokens: at least 1.
        stop_token_ids: ids that end a row's generation (included in its count); may be empty.
        pad_token_id: fed at left padding and after a row stopped.
        sampling: :class:`Sampling`.
        row_ids: the caller's id of each row (``ForwardInfo.sequence``, generator seeds);
            default ``0..B-1``.
        before_forward, after_forward: called with the :class:`ForwardInfo` of each forward pass,
            right before and right after it.

    Returns:
        :class:`Generation`.

    Raises:
        ActsparseError: bad prompts, ``max_new_tokens < 1``, bad sampling values, ``row_ids`` of the
            wrong length, a model whose forward does not return ``logits``.
    """
    sampling.validate()
    if max_new_tokens < 1:
        raise ActsparseError(f"--generate must be at least 1 new token, got {max_new_tokens}")
    ids, attn = left_pad(prompts, pad_token_id)
    batch = ids.shape[0]
    row_ids = list(range(batch)) if row_ids is None else [int(r) for r in row_ids]
    if len(row_ids) != batch:
        raise ActsparseError(f"{len(row_ids)} row ids for {batch} prompts")
    sequence = torch.tensor(row_ids, dtype=torch.long)
    generators = row_generators(sampling.seed, row_ids) if sampling.method == "top-p" else []
    stops = torch.tensor(sorted({int(t) for t in stop_token_ids}), dtype=torch.long)
    prompt_lengths = attn.sum(dim=1)
    tokens = torch.full((batch, max_new_tokens), int(pad_token_id), dtype=torch.long)
    n_generated = torch.zeros(batch, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    cache = DynamicCache(config=model.config)
    extra = _forward_kwargs(model)
    forwards: list[ForwardInfo] = []

    def run(info: ForwardInfo, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if before_forward is not None:
            before_forward(info)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, cache=cache,
                    use_cache=True, **extra)
        if after_forward is not None:
            after_forward(info)
        forwards.append(info)
        logits = getattr(out, "logits", None)
        if logits is None:
            raise ActsparseError(f"{type(model).__name__} returned no logits: generation needs a causal LM head")
        return logits[:, -1, :]

    positions = (attn.cumsum(dim=1) - 1).masked_fill(attn == 0, -1)
    prefill = ForwardInfo(0, "prefill", 0, sequence[:, None].expand_as(ids).clone(), ids, positions, attn.bool())
    logits = run(prefill, ids, positions.clamp(min=0))
    for k in range(1, max_new_tokens + 1):
        active = (~finished).nonzero().squeeze(1)
        g = torch.full((batch,), int(pad_token_id), dtype=torch.long)
        g[active] = next_tokens(logits, sampling, generators, active)
        tokens[:, k - 1] = g
        n_generated[active] = k
        # rows that generate g_k now: g_k is theirs (valid), even when it is their stop token
        valid = ~finished
        finished = finished | torch.isin(g, stops)
        if k == max_new_tokens or bool(finished.all()):
            break
        attn = torch.cat([attn, torch.ones((batch, 1), dtype=attn.dtype)], dim=1)
        pos = (prompt_lengths + k - 1)[:, None]
        info = ForwardInfo(k, "generation", k, sequence[:, None].clone(), g[:, None], pos, valid[:, None])
        logits = run(info, g[:, None], pos)
    return Generation(tokens=tokens, n_generated=n_generated, stopped=finished, prompt_lengths=prompt_lengths,
                      forwards=tuple(forwards))
