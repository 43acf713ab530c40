"""Plain helpers the tests share: tiny random-init models saved as checkpoints, the real console script in a
subprocess, small tmpfs mounts, and an HTTP server with byte ranges. Fixtures built on them live in
``tests/conftest.py``."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The quick brown fox jumps over the lazy dog. Activation sparsity in large language models is a property "
    "of the feed-forward layers. Many small activations can be dropped with little loss of quality. "
)


def build_tokenizer(out: Path, *, mask: bool = False):
    """A byte-level BPE tokenizer with a BOS token (and a ``<mask>`` token), trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    if mask:
        tok.add_special_tokens({"mask_token": "<mask>"})
    tok.save_pretrained(out)
    return tok


def build_tiny(out: Path, kind: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random-init causal LM (+ tokenizer) as a local HF checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    tok = build_tokenizer(out)
    vocab = len(tok)
    if kind == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16, vocab_size=vocab, max_position_embeddings=128,
                               sliding_window=16)
    elif kind == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128)
    elif kind in MOE_KINDS or kind == "gptoss":
        cfg = moe_config(kind, vocab)
    else:
        raise ValueError(kind)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    return out


MOE_KINDS = ("qwen2moe", "qwen3moe", "olmoe", "mixtral")
"""Tiny mixture-of-experts families: Qwen2-MoE (a shared expert), Qwen3-MoE (a dense first layer), OLMoE, Mixtral."""


def moe_config(kind: str, vocab: int, top_k: int = 2, **extra):
    """A tiny random-init mixture-of-experts config of ``kind`` (:data:`MOE_KINDS`, or ``gptoss``: a layout
    actsparse refuses): 3 layers, d_model 32, 4 experts of width 16, top-``top_k`` routing."""
    from transformers import GptOssConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=vocab, max_position_embeddings=128, initializer_range=0.2) | extra
    if kind == "qwen2moe":
        return Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=top_k,
                              shared_expert_intermediate_size=24, **common)
    if kind == "qwen3moe":
        return Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=top_k,
                              mlp_only_layers=[0], head_dim=8, norm_topk_prob=True, **common)
    if kind == "olmoe":
        return OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=top_k, **common)
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=top_k, **common)
    if kind == "gptoss":
        # its YaRN rope (factor 32 over 4,096 positions) expects 131,072 positions; fewer only draw a warning
        return GptOssConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=top_k, head_dim=8,
                            **common | dict(num_hidden_layers=2, max_position_embeddings=131072))
    raise ValueError(kind)


def build_tiny_llada(out: Path, seed: int = 0, *, mask: bool = True) -> Path:
    """Save a tiny random-init LLaDA-layout masked-diffusion LM as a remote-code checkpoint (load it with
    ``trust_remote_code``), with a tokenizer holding ``<mask>`` (or, with ``mask=False``, no mask token at all)."""
    from actsparse.pipeline.diffusion.tiny_llada import build_tiny_llada as build
    from actsparse.pipeline.diffusion.tiny_llada import save_tiny_llada

    tok = build_tokenizer(out, mask=mask)
    save_tiny_llada(build(seed, vocab_size=len(tok), mask_token_id=tok.mask_token_id if mask else None,
                          max_sequence_length=128), out)
    return out


def tiny_diffusion_gemma(seed: int = 0, canvas_length: int = 8, vocab_size: int = 300, special=(2, 1, 0)):
    """A 2-layer ``DiffusionGemmaForBlockDiffusion`` from its config (d_model 32, d_ff 64, 4 fused experts), in eval
    mode; ``special`` = (bos, eos, pad) ids."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig

    bos, eos, pad = special
    text = DiffusionGemmaTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=16, num_experts=4, top_k_experts=2,
        moe_intermediate_size=16, max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=pad, eos_token_id=eos, bos_token_id=bos)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas_length,
                               image_token_id=vocab_size - 1, boi_token_id=vocab_size - 2, eoi_token_id=vocab_size - 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiffusionGemmaForBlockDiffusion(cfg).eval()


def build_tiny_diffusion_gemma(out: Path, seed: int = 0) -> Path:
    """Save a tiny random-init diffusion_gemma (:func:`tiny_diffusion_gemma`, canvas 8) with a tokenizer."""
    tok = build_tokenizer(out)
    special = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    tiny_diffusion_gemma(seed, vocab_size=len(tok) + 3, special=special).save_pretrained(out)
    return out


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``actsparse`` console script in a subprocess."""
    exe = Path(sys.executable).with_name("actsparse")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", ro: bool = False):
    """Mount a small tmpfs (disk-full and read-only tests); skip where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """http.server with single byte-range support (python's own ignores Range; real servers do not)."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if m is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        a, b = m.groups()
        start, end = (max(0, size - int(b)), size - 1) if a == "" else (int(a), min(int(b or size - 1), size - 1))
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


MANIFEST_VOLATILE = ("created", "completed", "stats")  # times, timings and hosts: not content
CATALOGUE_VOLATILE = ("created", "completed")


def store_diff(a: Path, b: Path) -> list[str]:
    """The differences between stores ``a`` and ``b`` (empty: identical), file by file.

    Every file must be byte-identical except lock files (their content is a pid), each run's ``manifest.json``
    (compared without times and ``stats``) and ``catalogue.parquet`` (compared row by row without times).
    """
    import json

    import pyarrow.parquet as pq

    def files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*")
                if p.is_file() and not p.name.endswith(".lock")}

    fa, fb = files(a), files(b)
    out = [f"only in {a}: {p}" for p in sorted(fa - fb)] + [f"only in {b}: {p}" for p in sorted(fb - fa)]
    for rel in sorted(fa & fb):
        if rel.endswith("manifest.json"):
            ma, mb = ({k: v for k, v in json.loads((root / rel).read_text()).items() if k not in MANIFEST_VOLATILE}
                      for root in (a, b))
            if ma != mb:
                out.append(f"{rel}: differs in {sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))}")
        elif rel == "catalogue.parquet":
            ra, rb = (pq.read_table(root / rel).drop_columns(list(CATALOGUE_VOLATILE)).to_pylist() for root in (a, b))
            if ra != rb:
                out.append(f"{rel}: rows differ: {ra} != {rb}")
        elif (a / rel).read_bytes() != (b / rel).read_bytes():
            out.append(f"{rel}: bytes differ")
    return out


def write_task(directory: Path, name: str, docs: list[dict], body: str) -> Path:
    """An lm-eval task YAML ``name`` over ``docs`` (a jsonl file beside it, the ``test`` split) with the given YAML
    ``body`` lines (output type, prompts, metrics); returns the YAML's path."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = directory / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                    f"test_split: test\n{body}")
    return path
