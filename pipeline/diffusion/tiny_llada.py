"""A tiny random-init masked-diffusion LM with LLaDA's module layout, for tests and benchmarks.

LLaDA itself ships as remote code (``trust_remote_code``); so does this model: :func:`save_tiny_llada` writes a
checkpoint whose ``config.json`` maps the auto classes to a copy of this file, and ``pipeline.models`` loads it
as it would load LLaDA. The file therefore imports nothing but torch and transformers.

Layout as ``LLaDAModelLM`` (GSAI-ML/LLaDA ``modeling_llada.py``): ``model.transformer.{wte, blocks, ln_f,
ff_out}``, each block pre-norm bidirectional attention, then ``ff_out(act(ff_proj(x)) * up_proj(x))`` with
``x = ff_norm(h)`` and no MLP submodule. Positions are a learned absolute embedding (LLaDA uses RoPE; it does
not matter for the layout); ``model_type`` is ``llada`` and the config carries ``mask_token_id``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class TinyLLaDAConfig(PretrainedConfig):
    """Shape of :class:`TinyLLaDAModelLM`; ``model_type`` and ``mask_token_id`` as in LLaDA's config."""

    model_type = "llada"

    def __init__(self, vocab_size: int = 64, d_model: int = 32, n_heads: int = 4, n_layers: int = 2,
                 mlp_hidden_size: int = 64, max_sequence_length: int = 256, mask_token_id: int | None = 63, **kwargs):
        self.vocab_size, self.d_model, self.n_heads, self.n_layers = vocab_size, d_model, n_heads, n_layers
        self.mlp_hidden_size, self.max_sequence_length = mlp_hidden_size, max_sequence_length
        self.max_position_embeddings = max_sequence_length
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)


class SiLU(nn.Module):
    """LLaDA's own activation class (remote code): F.silu, not a transformers class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class TinyLLaDABlock(nn.Module):
    """LLaDA's ``LLaDALlamaBlock`` layout (module docstring)."""

    def __init__(self, cfg: TinyLLaDAConfig):
        super().__init__()
        d, h = cfg.d_model, cfg.mlp_hidden_size
        self.n_heads = cfg.n_heads
        self.attn_norm = nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = nn.RMSNorm(d)
        self.ff_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.act = SiLU()
        self.ff_out = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(self.attn_norm(x)).view(b, t, self.n_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)  # bidirectional
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        h = self.ff_norm(x)
        return x + self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h))


@dataclass
class MaskedLMOutput(ModelOutput):
    """``logits`` float32 [batch, seq, vocab], as LLaDA's output carries them."""

    logits: torch.Tensor | None = None


class TinyLLaDAModelLM(PreTrainedModel):
    """``forward(input_ids [B, T], attention_mask [B, T] | None)`` -> :class:`MaskedLMOutput`."""

    config_class = TinyLLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config: TinyLLaDAConfig):
        super().__init__(config)
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),
            wpe=nn.Embedding(config.max_sequence_length, config.d_model),
            blocks=nn.ModuleList(TinyLLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=nn.RMSNorm(config.d_model),
            ff_out=nn.Linear(config.d_model, config.vocab_size, bias=False),  # LLaDA's LM head is also ff_out
        ))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """torch's default initialisation is kept (the weights are random by design)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> MaskedLMOutput:
        tr = self.model.transformer
        x = tr.wte(input_ids) + tr.wpe(torch.arange(input_ids.shape[1], device=input_ids.device))
        bias = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for block in tr.blocks:
            x = block(x, bias)
        return MaskedLMOutput(logits=tr.ff_out(tr.ln_f(x)).float())


def build_tiny_llada(seed: int = 0, **config) -> TinyLLaDAModelLM:
    """A random-init :class:`TinyLLaDAModelLM` in eval mode; ``config`` overrides :class:`TinyLLaDAConfig`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyLLaDAModelLM(TinyLLaDAConfig(**config)).eval()


def save_tiny_llada(model: TinyLLaDAModelLM, out: Path) -> Path:
    """Save ``model`` as a remote-code checkpoint at ``out`` (weights, config with an ``auto_map``, this file);
    load it with ``trust_remote_code=True``."""
    out = Path(out)
    model.save_pretrained(out)
    shutil.copyfile(__file__, out / "tiny_llada.py")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoConfig": "tiny_llada.TinyLLaDAConfig", "AutoModel": "tiny_llada.TinyLLaDAModelLM",
                       "AutoModelForCausalLM": "tiny_llada.TinyLLaDAModelLM"}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out
