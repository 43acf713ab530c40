"""LLaDA's masked-diffusion sampler (GSAI-ML/LLaDA ``generate.py``), one callback pair per denoising forward.

The answer starts as ``gen_length`` mask tokens after the prompt and is unmasked block by block
(semi-autoregressive): per step one full bidirectional forward over prompt + answer, then the most confident
predictions among the still-masked positions of the current block are committed. Dream (also a masked-diffusion
LM) runs through the same schedule with its logits shifted by one position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.diffusion.kinds import (
    MASKED_DIFFUSION_TYPES,
    DiffusionStep,
    StepCallback,
    mask_token_id,
    model_type,
    refuse_non_diffusion,
)

REMASKING = ("low_confidence", "random")


@dataclass(frozen=True)
class MaskedDiffusionConfig:
    """LLaDA sampling (GSAI-ML/LLaDA ``generate.py``; defaults seen there: 128/128/128).

    Attributes:
        steps: denoising steps in total, split evenly over the blocks.
        gen_length: answer length in tokens (mask tokens appended to the prompt).
        block_length: semi-autoregressive block length; divides ``gen_length``.
        temperature: Gumbel-noise temperature, 0 = argmax.
        cfg_scale: classifier-free guidance scale, 0 = off (else the batch is doubled).
        remasking: ``low_confidence`` (keep the most probable predictions) or ``random``.
        mask_token_id: None = the model's (:func:`mask_token_id`).
        seed: seed of the Gumbel noise and random remasking.
    """

    steps: int = 128
    gen_length: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    mask_token_id: int | None = None
    seed: int = 0

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def validate(self) -> None:
        """Raise ActsparseError where LLaDA's ``generate`` would assert or misbehave."""
        for name in ("steps", "gen_length", "block_length"):
            if getattr(self, name) < 1:
                raise ActsparseError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.gen_length % self.block_length:
            raise ActsparseError(f"--gen-length {self.gen_length} is not a multiple of "
                                 f"--block-length {self.block_length}")
        if self.steps % self.num_blocks:
            raise ActsparseError(f"--steps {self.steps} is not divisible by the number of blocks {self.num_blocks} "
                                 f"(gen-length {self.gen_length} / block-length {self.block_length})")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ActsparseError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale)):
            raise ActsparseError(f"cfg scale must be finite and >= 0, got {self.cfg_scale}")
        if self.remasking not in REMASKING:
            raise ActsparseError(f"unknown remasking '{self.remasking}' (choose {', '.join(REMASKING)})")


@dataclass(frozen=True)
class MaskedDiffusionResult:
    """``sequences`` int64 [B, P + gen_length] (prompt + answer); ``steps`` forward passes run;
    ``unmasked_at`` int64 [B, P + gen_length], the step that unmasked each answer position (-1 in
    the prompt and where a position was never unmasked)."""

    sequences: torch.Tensor
    steps: int
    unmasked_at: torch.Tensor = field(repr=False)


def num_transfer_tokens(block_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to unmask per row and step, int64 [B, steps]: the block's masked count split evenly,
    the remainder going to the first steps (LLaDA ``get_num_transfer_tokens``)."""
    n = block_masked.sum(dim=1, keepdim=True)
    base, rem = n // steps, n % steps
    return base + (torch.arange(steps)[None, :] < rem).long()


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """LLaDA ``add_gumbel_noise``: ``exp(logits) / (-log u)**temperature`` in float64 (u uniform),
    whose argmax samples softmax(logits / temperature); ``logits`` unchanged at temperature 0."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
    return logits.exp() / (-torch.log(u)) ** temperature


@torch.no_grad()
def masked_diffusion_generate(model: nn.Module, prompts: torch.Tensor, config: MaskedDiffusionConfig, *,
                              attention_mask: torch.Tensor | None = None, before_step: StepCallback | None = None,
                              after_step: StepCallback | None = None) -> MaskedDiffusionResult:
    """LLaDA's semi-autoregressive masked-diffusion sampler, one callback pair per forward pass.

    Per block b (positions ``[P + b*block_length, P + (b+1)*block_length)``), per step: one
    forward over the whole sequence (prompt + answer; with CFG also a copy whose prompt is masked,
    rows ``[B:2B]``, mixed as ``un + (scale + 1) * (cond - un)``); ``x0 = argmax(logits + Gumbel)``;
    confidence = softmax probability of x0 (float64) or uniform random; positions beyond the block
    get -inf; among the still-masked positions the ``num_transfer_tokens`` most confident are
    unmasked (as in the reference, a prediction of the mask token itself leaves the position
    masked). Differences from the reference: noise comes from a seeded ``torch.Generator``; Dream
    (``MASKED_DIFFUSION_TYPES``) gets its logits shifted by one position, but keeps LLaDA's
    schedule, not Dream's own ``diffusion_generate`` algorithms.

    Args:
        model: a masked-diffusion LM whose ``forward(input_ids, attention_mask=...)`` returns an
            object with ``logits`` [rows, T, vocab].
        prompts: int64 [B, P], equal length (left-pad with ``attention_mask`` for ragged prompts).
        config: :class:`MaskedDiffusionConfig`.
        attention_mask: optional int/bool [B, P] over the prompt (answer positions are attended).
        before_step, after_step: called with the :class:`DiffusionStep` of each forward pass.

    Raises:
        ActsparseError: not a masked-diffusion LM, no mask token, bad config (steps not divisible by
            the number of blocks, ...), prompts that are not a 2-D int tensor or contain the mask token.
    """
    refuse_non_diffusion(model, "masked")
    config.validate()
    mask_id = mask_token_id(model, config.mask_token_id)
    if prompts.ndim != 2 or prompts.dtype != torch.long:
        raise ActsparseError(f"prompts must be an int64 tensor [batch, length], got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
    if bool((prompts == mask_id).any()):
        raise ActsparseError(f"a prompt contains the mask token {mask_id}")
    shift = MASKED_DIFFUSION_TYPES[model_type(model)]
    batch, plen = prompts.shape
    total = plen + config.gen_length
    x = torch.full((batch, total), mask_id, dtype=torch.long)
    x[:, :plen] = prompts
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :plen] = True
    attn = None
    if attention_mask is not None:
        attn = torch.cat([attention_mask.long(), torch.ones((batch, config.gen_length), dtype=torch.long)], dim=1)
    cfg = config.cfg_scale > 0
    rows = 2 * batch if cfg else batch
    sample = torch.arange(rows) % batch
    cfg_half = (torch.arange(rows) >= batch).long()
    generator = torch.Generator().manual_seed(config.seed)
    unmasked_at = torch.full_like(x, -1)
    per_block = config.steps // config.num_blocks
    step = 0
    for blk in range(config.num_blocks):
        b0, b1 = plen + blk * config.block_length, plen + (blk + 1) * config.block_length
        transfer = num_transfer_tokens(x[:, b0:b1] == mask_id, per_block)
        for i in range(per_block):
            masked = x == mask_id
            inp = torch.cat([x, x.masked_fill(prompt_index, mask_id)]) if cfg else x.clone()
            info = DiffusionStep(step=step, block=blk, step_in_block=i, block_span=(b0, b1), token_ids=inp,
                                 noised=inp == mask_id, sample=sample, cfg_half=cfg_half,
                                 active=torch.ones(rows, dtype=torch.bool))
            if before_step is not None:
                before_step(info)
            kwargs = {} if attn is None else {"attention_mask": torch.cat([attn, attn]) if cfg else attn}
            logits = model(inp, **kwargs).logits
            if after_step is not None:
                after_step(info)
            if shift:
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            if cfg:
                cond, un = logits.chunk(2, dim=0)
                logits = un + (config.cfg_scale + 1) * (cond - un)
            x0 = add_gumbel_noise(logits, config.temperature, generator).argmax(dim=-1)
            if config.remasking == "low_confidence":
                conf = F.softmax(logits.to(torch.float64), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                conf = torch.rand(x0.shape, generator=generator, dtype=torch.float64)
            conf[:, b1:] = -math.inf
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, -math.inf)
            chosen = torch.zeros_like(masked)
            for j in range(batch):
                chosen[j, torch.topk(conf[j], k=int(transfer[j, i])).indices] = True
            x[chosen] = x0[chosen]
            unmasked_at[chosen] = step
            step += 1
    return MaskedDiffusionResult(sequences=x, steps=step, unmasked_at=unmasked_at)
