"""Generation and diffusion runs: what they are (:class:`GenerationSpec`, :class:`DiffusionSpec`, the
``decoding`` field of a collection config) and how each kind runs a batch of prompts forward pass by forward
pass, telling collection which rows to store (:class:`Decoder`).

The prompts are the windows collection cuts from the corpus split (``pipeline.windows``: BOS first, at most
``seq_len`` tokens), taken ``batch_size`` at a time in corpus order. Every forward pass is announced to a
:class:`RowSink` (``pipeline.stepwise``) before it runs, with the rows of its hooked tensors to store (their
flat indices into ``[rows, positions]``) and their token-table columns (``core.format.token_columns``):

* **generation** (:class:`GenerationDecoder`, ``pipeline.generate``): the prefill forward over the left-padded
  prompts stores every prompt token (``phase`` prefill, ``step`` 0); the forward that feeds generated token
  k stores one row per sequence still generating (``phase`` generation, ``step`` k), up to and including the
  sequence's first stop token (docs/paper-notes.md §1.4); padding is never stored;
* **masked diffusion** (:class:`MaskedDiffusionDecoder`, LLaDA and Dream, ``pipeline.diffusion.masked``): every
  denoising step stores every real position of every row (prompt and answer, both halves of classifier-free
  guidance), as the authors count (docs/paper-notes.md §1.7);
* **block diffusion** (:class:`BlockDiffusionDecoder`, diffusion_gemma, ``pipeline.diffusion.block``): every
  denoising step stores the canvas of every row, rows that stopped early or ended flagged ``active`` false.

Randomness is seeded per prompt (generation: ``(seed, sequence)``) or per batch (diffusion: ``(seed, batch)``),
so a resumed run that regenerates a batch reproduces it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.diffusion.kinds import DIFFUSION_TYPES, DiffusionStep, diffusion_kind, mask_token_id
from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig
from actsparse.pipeline.generate import ForwardInfo, Sampling, left_pad
from actsparse.pipeline.windows import Window

MAX_NEW_TOKENS = 1 << 16


@dataclass(frozen=True)
class GenerationSpec:
    """``collect --generate N``: ``max_new_tokens`` tokens generated after each prompt with a KV cache, chosen by
    ``sampling`` (``pipeline.generate.Sampling``); generation of a prompt stops at its first stop token (the
    tokenizer's and the generation config's EOS ids)."""

    max_new_tokens: int
    sampling: Sampling = Sampling()
    kind: str = field(default="generation", init=False)

    def validate(self) -> None:
        """Raise ActsparseError on values that cannot work."""
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ActsparseError(f"--generate must be in [1, {MAX_NEW_TOKENS}] new tokens (got {self.max_new_tokens})")
        self.sampling.validate()


@dataclass(frozen=True)
class DiffusionSpec:
    """``collect --diffusion``: the model's denoising loop over ``sampler.gen_length`` answer tokens in blocks of
    ``sampler.block_length``, ``sampler.steps`` denoising steps in all (``pipeline.diffusion.masked``'s
    :class:`MaskedDiffusionConfig`; for diffusion_gemma the block is its canvas and the steps per block its
    ``max_denoising_steps``)."""

    sampler: MaskedDiffusionConfig = MaskedDiffusionConfig()
    kind: str = field(default="diffusion", init=False)

    def validate(self) -> None:
        """Raise ActsparseError on values that cannot work (LLaDA's sampler asserts the same)."""
        self.sampler.validate()


class RowSink(Protocol):
    """Where a decoder announces each forward pass (``pipeline.stepwise.StepStream``)."""

    def begin(self, keep: torch.Tensor, rows: dict[str, np.ndarray], shape: tuple[int, int]) -> None:
        """Before a forward: the flat indices into its ``shape`` ``(rows, positions)`` of the rows to store
        (int64 [n]) and their token columns (each [n])."""

    def end(self) -> None:
        """After the forward."""


class Decoder(Protocol):
    """One kind of generation or diffusion run (module docstring)."""

    kind: str

    def n_bound(self, windows: Sequence[Window]) -> int:
        """An upper bound on the rows the run stores (the exact count for masked diffusion)."""

    def forward_rows(self, windows: Sequence[Window]) -> int:
        """The most rows one forward pass of the batch of ``windows`` stores."""

    def load(self, resolved, dtype: str):
        """``(model, FFN architecture)`` of the run's model."""

    def describe(self) -> dict:
        """What the manifest records about the decoding (stop ids, mask id, ...)."""

    def run_batch(self, model, windows: Sequence[Window], batch: int, sink: RowSink) -> list[list[int]]:
        """Run batch number ``batch`` (its ``windows``), announcing every forward pass to ``sink``; returns the
        tokens generated after each window (generation: up to and including its first stop token; diffusion:
        the whole answer)."""


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``'s random draws (numpy ``SeedSequence`` of ``(seed, batch)``)."""
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Texts:
    """Token id -> decoded text (``token_text``) and special flag, cached: one decode per distinct id."""

    def __init__(self, tok):
        self.tok = tok
        self.special = np.array(sorted(set(tok.all_special_ids)), dtype=np.int64)

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one instance per run, dropped with it
    def text(self, token_id: int) -> str:
        return self.tok.decode([token_id])

    def rows(self, token_ids: np.ndarray, **cols) -> dict[str, np.ndarray]:
        """Token columns of rows with ``token_ids``: text, special flag, and ``cols`` as given."""
        return dict(token_id=token_ids, token_text=np.array([self.text(int(t)) for t in token_ids], dtype=object),
                    special=np.isin(token_ids, self.special), **cols)


def _document_ids(windows: Sequence[Window]) -> dict[int, int]:
    return {w.sequence: w.doc_id for w in windows}


def _refuse_diffusion_model(mcfg, name: str) -> None:
    from actsparse.pipeline.diffusion.kinds import model_type

    if model_type(mcfg) in DIFFUSION_TYPES:
        raise ActsparseError(f"{name} (model_type {model_type(mcfg)}) is a diffusion LM: collect its denoising steps "
                             "with --diffusion, not --generate")


class GenerationDecoder:
    """Autoregressive generation with a KV cache (module docstring); one prompt per window."""

    kind = "generation"

    def __init__(self, spec: GenerationSpec, tok, mcfg, name: str):
        _refuse_diffusion_model(mcfg, name)
        self.spec, self.texts = spec, _Texts(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        stops = {tok.eos_token_id} | set(_as_ids(getattr(mcfg, "eos_token_id", None)))
        self.stop_ids = sorted(int(t) for t in stops if t is not None)

    def n_bound(self, windows: Sequence[Window]) -> int:
        return sum(len(w.token_ids) + self.spec.max_new_tokens - 1 for w in windows)

    def forward_rows(self, windows: Sequence[Window]) -> int:
        return sum(len(w.token_ids) for w in windows)  # the prefill

    def load(self, resolved, dtype: str):
        from actsparse.pipeline.models import load_model
        from actsparse.pipeline.sites import resolve_ffn

        model = load_model(resolved, dtype)
        if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
            raise ActsparseError(f"{resolved.spec} has no language-model head; --generate needs a causal LM")
        return model, resolve_ffn(model)

    def describe(self) -> dict:
        return dict(stop_token_ids=self.stop_ids, pad_token_id=self.pad,
                    layout="per batch of prompts, forward by forward: the prefill's prompt tokens, then one row per "
                           "sequence still generating at each step; rows in batch order, positions ascending")

    def run_batch(self, model, windows: Sequence[Window], batch: int, sink: RowSink) -> list[list[int]]:
        from actsparse.pipeline.generate import generate

        docs = _document_ids(windows)

        def before(info: ForwardInfo) -> None:
            keep = info.valid.reshape(-1).nonzero().squeeze(1)
            seq = info.sequence.reshape(-1)[keep].numpy()
            n = len(keep)
            sink.begin(keep, self.texts.rows(
                info.token_ids.reshape(-1)[keep].numpy(), sequence=seq,
                position=info.positions.reshape(-1)[keep].numpy(),
                document_id=np.array([docs[int(s)] for s in seq], dtype=np.int64),
                phase=np.full(n, info.phase, dtype=object), step=np.full(n, info.step, dtype=np.int64)),
                tuple(info.valid.shape))

        gen = generate(model, [w.token_ids.tolist() for w in windows], self.spec.max_new_tokens,
                       stop_token_ids=self.stop_ids, pad_token_id=self.pad, sampling=self.spec.sampling,
                       row_ids=[w.sequence for w in windows], before_forward=before,
                       after_forward=lambda info: sink.end())
        return [gen.continuation(i) for i in range(len(windows))]


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _diffusion_rows(texts: _Texts, info: DiffusionStep, valid: torch.Tensor, positions: torch.Tensor,
                    windows: Sequence[Window]) -> tuple[torch.Tensor, dict[str, np.ndarray], tuple[int, int]]:
    """Flat indices, token columns and shape ``(rows, T)`` of the stored rows of one denoising step: ``valid`` bool
    [rows, T] (real positions), ``positions`` int64 [rows, T] (in each row's own sequence)."""
    flat = valid.reshape(-1)
    keep = flat.nonzero().squeeze(1)
    rows_t = valid.shape[1]
    expand = {name: t[:, None].expand(-1, rows_t).reshape(-1)[keep].numpy()
              for name, t in (("sample", info.sample), ("cfg_half", info.cfg_half), ("active", info.active))}
    seq = np.array([windows[int(i)].sequence for i in expand["sample"]], dtype=np.int64)
    docs = np.array([windows[int(i)].doc_id for i in expand["sample"]], dtype=np.int64)
    noised = info.noised.reshape(-1)[keep].numpy()
    rows = texts.rows(info.token_ids.reshape(-1)[keep].numpy(), sequence=seq,
                      position=positions.reshape(-1)[keep].numpy(), document_id=docs,
                      phase=np.full(len(keep), "denoising", dtype=object),
                      step=np.full(len(keep), info.step, dtype=np.int64),
                      block=np.full(len(keep), info.block, dtype=np.int64), noised=noised,
                      cfg_half=expand["cfg_half"].astype(np.int64), active=expand["active"].astype(bool))
    rows["special"] &= ~noised  # mask tokens and noise are the sampler's state, flagged by `noised`
    return keep, rows, tuple(valid.shape)


class MaskedDiffusionDecoder:
    """LLaDA's masked-diffusion sampler (module docstring); one prompt per window, left-padded in a batch."""

    kind = "diffusion"

    def __init__(self, spec: DiffusionSpec, tok, mcfg, name: str):
        self.cfg = spec.sampler
        self.mask_id = mask_token_id(mcfg, self.cfg.mask_token_id, tok, name=name)
        self.texts = _Texts(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def n_bound(self, windows: Sequence[Window]) -> int:
        halves = 2 if self.cfg.cfg_scale > 0 else 1
        return self.cfg.steps * halves * sum(len(w.token_ids) + self.cfg.gen_length for w in windows)

    def forward_rows(self, windows: Sequence[Window]) -> int:
        return self.n_bound(windows) // self.cfg.steps

    def load(self, resolved, dtype: str):
        from actsparse.pipeline.diffusion.kinds import load_diffusion_model
        from actsparse.pipeline.diffusion.sites import resolve_diffusion_ffn

        model = load_diffusion_model(resolved, dtype)
        return model, resolve_diffusion_ffn(model)

    def describe(self) -> dict:
        return dict(mask_token_id=self.mask_id, pad_token_id=self.pad, sampler="masked",
                    layout="per batch of prompts, step by step: every real position (prompt and answer) of every "
                           "row, the unconditional half of classifier-free guidance after the conditional one")

    def run_batch(self, model, windows: Sequence[Window], batch: int, sink: RowSink) -> list[list[int]]:
        import dataclasses

        from actsparse.pipeline.diffusion.masked import masked_diffusion_generate

        ids, attn = left_pad([w.token_ids.tolist() for w in windows], self.pad)
        answer = torch.ones((len(windows), self.cfg.gen_length), dtype=torch.long)
        full = torch.cat([attn, answer], dim=1).bool()
        cfg = dataclasses.replace(self.cfg, mask_token_id=self.mask_id, seed=batch_seed(self.cfg.seed, batch))

        def before(info: DiffusionStep) -> None:
            valid = full[info.sample]
            sink.begin(*_diffusion_rows(self.texts, info, valid, valid.long().cumsum(dim=1) - 1, windows))

        res = masked_diffusion_generate(model, ids, cfg, attention_mask=None if bool(attn.all()) else attn,
                                        before_step=before, after_step=lambda info: sink.end())
        return res.sequences[:, ids.shape[1]:].tolist()


class BlockDiffusionDecoder:
    """diffusion_gemma's own sampler (module docstring); the block is its canvas."""

    kind = "diffusion"

    def __init__(self, spec: DiffusionSpec, tok, mcfg, name: str):
        cfg = spec.sampler
        canvas = int(getattr(mcfg, "canvas_length", 0) or 0)
        if cfg.block_length != canvas:
            raise ActsparseError(f"{name} denoises canvases of {canvas} tokens (config.canvas_length): "
                                 f"--block-length must be {canvas} (got {cfg.block_length})")
        default = MaskedDiffusionConfig()
        own = [f"--{n.replace('_', '-')}" for n in ("temperature", "cfg_scale", "remasking", "mask_token_id")
               if getattr(cfg, n) != getattr(default, n)]
        if own:
            raise ActsparseError(f"{name} is a block-diffusion LM with its own sampler: {', '.join(own)} "
                                 "apply to masked diffusion (LLaDA, Dream) only")
        self.cfg, self.texts = cfg, _Texts(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def n_bound(self, windows: Sequence[Window]) -> int:
        return len(windows) * self.cfg.steps * self.cfg.block_length

    def forward_rows(self, windows: Sequence[Window]) -> int:
        return len(windows) * self.cfg.block_length

    def load(self, resolved, dtype: str):
        from actsparse.pipeline.diffusion.kinds import load_diffusion_model
        from actsparse.pipeline.diffusion.sites import resolve_diffusion_ffn

        model = load_diffusion_model(resolved, dtype)
        return model, resolve_diffusion_ffn(model)

    def describe(self) -> dict:
        return dict(pad_token_id=self.pad, sampler="block", steps_per_block=self.cfg.steps // self.cfg.num_blocks,
                    layout="per batch of prompts, step by step: the canvas of every row (rows stopped or ended "
                           "flagged active = false)")

    def run_batch(self, model, windows: Sequence[Window], batch: int, sink: RowSink) -> list[list[int]]:
        from actsparse.pipeline.diffusion.block import block_diffusion_generate

        ids, attn = left_pad([w.token_ids.tolist() for w in windows], self.pad)
        lengths = attn.sum(dim=1)
        canvas = self.cfg.block_length

        def before(info: DiffusionStep) -> None:
            valid = torch.ones_like(info.noised)
            positions = (lengths[info.sample] + info.block * canvas)[:, None] + torch.arange(canvas)[None, :]
            sink.begin(*_diffusion_rows(self.texts, info, valid, positions, windows))

        kwargs = {} if bool(attn.all()) else {"attention_mask": attn}
        out, _ = block_diffusion_generate(model, ids, seed=batch_seed(self.cfg.seed, batch), before_step=before,
                                          after_step=lambda info: sink.end(), max_new_tokens=self.cfg.gen_length,
                                          max_denoising_steps=self.cfg.steps // self.cfg.num_blocks, **kwargs)
        return out.sequences[:, ids.shape[1]:].tolist()


def plan_decoder(spec: GenerationSpec | DiffusionSpec, tok, mcfg, name: str, seq_len: int) -> Decoder:
    """The decoder of a generation or diffusion run on prompts of up to ``seq_len`` tokens, checked against the
    model's config and tokenizer.

    Raises:
        ActsparseError: ``--generate`` on a diffusion LM, ``--diffusion`` on a model that is not one, a masked
            diffusion LM without a mask token, diffusion_gemma with a block length other than its canvas or with
            options of masked diffusion, prompt and new tokens beyond the model's context.
    """
    if spec.kind == "generation":
        decoder, new = GenerationDecoder(spec, tok, mcfg, name), spec.max_new_tokens - 1
    else:
        kind = diffusion_kind(mcfg, name)
        decoder = (MaskedDiffusionDecoder if kind == "masked" else BlockDiffusionDecoder)(spec, tok, mcfg, name)
        new = spec.sampler.gen_length
    text = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    ctx = next((v for v in (getattr(text, a, None) for a in ("max_position_embeddings", "n_positions",
                                                           "max_sequence_length")) if v), None)
    if ctx is not None and seq_len + new > ctx:
        raise ActsparseError(f"prompts of {seq_len} tokens and {new} new ones exceed the context of {name} "
                             f"({ctx} positions); lower --seq-len")
    return decoder
