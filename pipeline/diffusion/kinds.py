"""Which diffusion LM a model is, its mask token, how to load it, and what one denoising step looks like."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from actsparse.core.errors import ActsparseError

# config.model_type (lower-cased) of masked-diffusion LMs -> whether logits are shifted by one position. Dream
# is initialised from an autoregressive model and predicts position i from the output at i - 1 (Dream's
# ``generation_utils.py``: logits = cat([logits[:, :1], logits[:, :-1]])).
MASKED_DIFFUSION_TYPES = {"llada": False, "dream": True}
BLOCK_DIFFUSION_TYPES = ("diffusion_gemma",)
DIFFUSION_TYPES = (*MASKED_DIFFUSION_TYPES, *BLOCK_DIFFUSION_TYPES)


def model_type(model_or_config) -> str:
    """``config.model_type`` lower-cased, of a model or of a config ("" when it has none)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return str(getattr(cfg, "model_type", "") or "").lower()


def diffusion_kind(model_or_config, name: str | None = None) -> str:
    """``masked`` (LLaDA, Dream) or ``block`` (diffusion_gemma), from ``config.model_type``.

    Raises:
        ActsparseError: any other model, naming it (``name``, else its class) and its model type.
    """
    mtype = model_type(model_or_config)
    if mtype in MASKED_DIFFUSION_TYPES:
        return "masked"
    if mtype in BLOCK_DIFFUSION_TYPES:
        return "block"
    raise ActsparseError(f"{name or type(model_or_config).__name__} (model_type {mtype or 'unknown'}) is not a "
                         f"diffusion LM; --diffusion supports model types {', '.join(DIFFUSION_TYPES)}")


def mask_token_id(model_or_config, override: int | None = None, tokenizer=None, *, name: str | None = None) -> int:
    """The [MASK] id: ``override``, else ``config.mask_token_id``, ``generation_config.mask_token_id`` or the
    tokenizer's ``mask_token_id``; ``name`` names the model in the error (default: its class).

    Raises:
        ActsparseError: none of them is set.
    """
    if override is not None:
        return int(override)
    cfg = getattr(model_or_config, "config", model_or_config)
    for source in (cfg, getattr(model_or_config, "generation_config", None), tokenizer):
        value = getattr(source, "mask_token_id", None)
        if value is not None:
            return int(value)
    raise ActsparseError(f"{name or type(model_or_config).__name__} has no mask token (neither its config nor its "
                         "tokenizer sets mask_token_id); masked diffusion needs one: pass --mask-token-id")


def load_diffusion_model(resolved, dtype: str = "float32"):
    """Load a diffusion LM in eval mode on the CPU: diffusion_gemma through its image-text-to-text auto class
    (``DiffusionGemmaForBlockDiffusion``, which carries ``generate``), others as ``pipeline.models.load_model``
    (LLaDA and Dream through their remote code's auto map).

    Raises:
        ActsparseError: the checkpoint cannot be loaded.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    from actsparse.pipeline.models import load_model, quiet_transformers

    cfg = AutoConfig.from_pretrained(resolved.path, trust_remote_code=resolved.trust_remote_code)
    if model_type(cfg) not in BLOCK_DIFFUSION_TYPES:
        return load_model(resolved, dtype)
    quiet_transformers()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = AutoModelForImageTextToText.from_pretrained(resolved.path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ActsparseError(f"cannot load model {resolved.spec}: {str(e).strip().splitlines()[0]}") from e
    return model.eval()


@dataclass(frozen=True)
class DiffusionStep:
    """The input rows of one denoising forward pass (CPU tensors).

    Attributes:
        step: denoising step within the call, 0-based, counted over all blocks.
        block: LLaDA semi-autoregressive block / diffusion_gemma canvas, 0-based.
        step_in_block: step within the block, 0-based.
        block_span: ``(start, end)`` positions of the block being denoised, in the forward's input.
        token_ids: int64 [rows, T], the forward's input.
        noised: bool [rows, T], position still a [MASK] (masked) or random noise (block) in the input.
        sample: int64 [rows], index of the prompt each row belongs to.
        cfg_half: int64 [rows], 0 conditional, 1 unconditional half of classifier-free guidance (all 0 without it).
        active: bool [rows], the row is still denoising (block diffusion: False once the row met the adaptive
            stop of this canvas or ended with EOS; masked diffusion: always True).
    """

    step: int
    block: int
    step_in_block: int
    block_span: tuple[int, int]
    token_ids: torch.Tensor
    noised: torch.Tensor
    sample: torch.Tensor
    cfg_half: torch.Tensor
    active: torch.Tensor


StepCallback = Callable[[DiffusionStep], None]


def refuse_non_diffusion(model: nn.Module, wanted: str) -> None:
    """Raise ActsparseError unless ``model`` is a diffusion LM of kind ``wanted`` (``masked`` or ``block``)."""
    kind = diffusion_kind(model)
    if kind != wanted:
        raise ActsparseError(f"{type(model).__name__} is a {kind}-diffusion LM, not a {wanted}-diffusion one: "
                             + ("it denoises with its own sampler (block_diffusion_generate)" if kind == "block"
                                else "it has no block sampler (masked_diffusion_generate)"))
