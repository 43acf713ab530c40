"""Observe diffusion_gemma's own block-diffusion sampler (transformers ``generation_diffusion_gemma.py``) step by
step: which forward pass is a denoising step, which canvas positions are noise, which rows still denoise."""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.diffusion.kinds import DiffusionStep, StepCallback, refuse_non_diffusion


class _StopObserver:
    """Wraps diffusion_gemma's adaptive stopping criterion and keeps the rows it has stopped."""

    def __init__(self, inner):
        self.inner = inner
        self.stopped: torch.Tensor | None = None

    def __call__(self, argmax_canvas: torch.Tensor, logits: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.inner(argmax_canvas, logits, **kwargs)
        self.stopped = out.clone() if self.stopped is None else self.stopped | out
        return out

    def reset(self) -> None:
        self.inner.reset()
        self.stopped = None


class BlockDiffusionSteps:
    """Context manager that reports every denoising step of ``DiffusionGemmaForBlockDiffusion.generate``.

    Where the boundaries are (transformers 5.24, ``generation_diffusion_gemma.py``): each canvas
    starts with one call of ``model.model.encoder`` (the prompt, then the previous canvas) and each
    denoising step is exactly one call of ``model.model.decoder`` with ``decoder_input_ids`` = the
    current canvas. A forward pre-hook / hook on the decoder bracket the step; one on the encoder
    starts a new block. Which canvas positions are noise is the sampler's state: at a canvas's first
    step every position is random; afterwards the positions the sampler did not accept at the
    previous step were renoised (``EntropyBoundSampler.accepted_token_mask``; the sampler accepts
    anew from all positions at every step, so a token can be renoised after being accepted). Rows
    that met the adaptive stop keep their canvas frozen (and their ``noised`` state), and rows
    that produced EOS in an earlier canvas go on being denoised while their output is replaced by
    padding; both still run through the decoder and are flagged ``active=False``, exactly the rows
    that generate's ``decoder_forward_passes`` does not count.

    To read the sampler and the stopping criterion, ``_prepare_sampler`` and
    ``_prepare_diffusion_stopping_criteria`` are wrapped on the instance while the context is
    open. Compiled generation (a static cache) is refused: hooks are skipped under
    ``torch.compile`` (docs/pitfalls.md P11).

    Raises:
        ActsparseError: the model is not a diffusion_gemma block-diffusion LM, or its generation
            code lacks the methods observed here (another transformers version).
    """

    _WRAPPED = ("_prepare_sampler", "_prepare_diffusion_stopping_criteria")

    def __init__(self, model: nn.Module, *, before_step: StepCallback | None = None,
                 after_step: StepCallback | None = None):
        refuse_non_diffusion(model, "block")
        missing = [n for n in self._WRAPPED if not callable(getattr(model, n, None))]
        if missing:
            raise ActsparseError(f"{type(model).__name__} lacks {', '.join(missing)}: unsupported transformers version")
        self.model = model
        self._before, self._after = before_step, after_step
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._reset(None)

    def _reset(self, generation_config) -> None:
        self.steps = 0
        self._block, self._step_in_block = -1, 0
        self._sampler = None
        self._stop: _StopObserver | None = None
        self._eos = torch.tensor(_as_list(getattr(generation_config, "eos_token_id", None)), dtype=torch.long)
        self._ended: torch.Tensor | None = None  # rows that produced EOS in an earlier canvas
        self._noised: torch.Tensor | None = None
        self._frozen: torch.Tensor | None = None  # rows stopped when the previous step began
        self._info: DiffusionStep | None = None

    def _prepare_sampler(self, generation_config):
        if generation_config.cache_implementation in ("static", "offloaded_static"):
            raise ActsparseError("compiled diffusion_gemma generation (static cache) skips hooks "
                                 "(docs/pitfalls.md P11); use the default dynamic cache")
        self._reset(generation_config)
        self._sampler = type(self.model)._prepare_sampler(self.model, generation_config)
        return self._sampler

    def _prepare_diffusion_stopping_criteria(self, generation_config):
        inner = type(self.model)._prepare_diffusion_stopping_criteria(self.model, generation_config)
        self._stop = None if inner is None else _StopObserver(inner)
        return self._stop

    def _on_encode(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self._block >= 0 and ids is not None and self._eos.numel():
            ended = torch.isin(ids, self._eos).any(dim=1)
            self._ended = ended if self._ended is None else self._ended | ended
        self._block += 1
        self._step_in_block = 0

    def _on_decode(self, module, args, kwargs) -> None:
        canvas = kwargs["decoder_input_ids"].detach().cpu()
        rows = canvas.shape[0]
        # rows stopped by the adaptive criterion so far in this canvas (generate's finished_denoising)
        stopped = torch.zeros(rows, dtype=torch.bool)
        if self._stop is not None and self._stop.stopped is not None:
            stopped = self._stop.stopped.detach().cpu()
        ended = self._ended.cpu() if self._ended is not None else torch.zeros(rows, dtype=torch.bool)
        if self._step_in_block == 0:
            noised = torch.ones_like(canvas, dtype=torch.bool)
        else:
            # the previous step renoised what its sampler did not accept, except in rows already
            # stopped when it began: their canvas stayed frozen
            renoised = ~self._sampler.accepted_token_mask.detach().cpu()
            noised = torch.where(self._frozen[:, None], self._noised, renoised)
        self._noised, self._frozen = noised, stopped
        self._info = DiffusionStep(step=self.steps, block=self._block, step_in_block=self._step_in_block,
                                   block_span=(0, canvas.shape[1]), token_ids=canvas, noised=noised,
                                   sample=torch.arange(rows), cfg_half=torch.zeros(rows, dtype=torch.long),
                                   active=~(stopped | ended))
        if self._before is not None:
            self._before(self._info)

    def _on_decoded(self, module, args, kwargs, output) -> None:
        if self._after is not None:
            self._after(self._info)
        self.steps += 1
        self._step_in_block += 1

    def __enter__(self) -> BlockDiffusionSteps:
        if self._handles:
            raise ActsparseError("this BlockDiffusionSteps is already active")
        enc, dec = self.model.model.encoder, self.model.model.decoder
        self._handles = [enc.register_forward_pre_hook(self._on_encode, with_kwargs=True),
                         dec.register_forward_pre_hook(self._on_decode, with_kwargs=True),
                         dec.register_forward_hook(self._on_decoded, with_kwargs=True)]
        for name in self._WRAPPED:
            setattr(self.model, name, getattr(self, name))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in self._WRAPPED:
            self.model.__dict__.pop(name, None)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@torch.no_grad()
def block_diffusion_generate(model: nn.Module, input_ids: torch.Tensor, *, seed: int = 0,
                             before_step: StepCallback | None = None, after_step: StepCallback | None = None,
                             **generate_kwargs):
    """Run diffusion_gemma's own ``generate`` under :class:`BlockDiffusionSteps`, seeded.

    Its sampler draws from the global torch RNG (``torch.randint`` canvases, ``torch.multinomial``),
    so the call runs inside ``torch.random.fork_rng`` seeded with ``seed``: reproducible, and the
    caller's RNG state is left as it was. ``generate_kwargs`` go to ``model.generate``
    (``max_new_tokens``, ``max_denoising_steps``, ``attention_mask``, ...).

    Returns ``(output, steps)``: generate's ``DiffusionGemmaGenerationOutput`` and the number of
    denoising forward passes.
    """
    with torch.random.fork_rng(devices=[input_ids.device] if input_ids.device.type == "cuda" else []):
        torch.manual_seed(seed)
        with BlockDiffusionSteps(model, before_step=before_step, after_step=after_step) as tracker:
            out = model.generate(input_ids, **generate_kwargs)
    if tracker.steps == 0:
        raise ActsparseError("no denoising step was observed: compiled generation skips hooks "
                             "(docs/pitfalls.md P11)")
    return out, tracker.steps
