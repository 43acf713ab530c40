"""Shared fixtures: tiny random-init models and corpora, real-model stores, a loopback HTTP server.

Tiny models give fast unit tests of the pipeline mechanics; the real packaged models (SmolLM2-135M,
Gemma 3 270M) are used by the tests marked ``real``. Plain helpers are in ``tests/helpers.py``.
"""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from tests.helpers import (
    MOE_KINDS,
    TEXT,
    RangeHandler,
    build_tiny,
    build_tiny_diffusion_gemma,
    build_tiny_llada,
    tiny_diffusion_gemma,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llada_ckpt(tmp_path_factory) -> Path:
    """A tiny LLaDA-layout masked-diffusion LM saved as a remote-code checkpoint with a ``<mask>`` token."""
    return build_tiny_llada(tmp_path_factory.mktemp("tiny-llada"))


@pytest.fixture(scope="session")
def tiny_dgemma_ckpt(tmp_path_factory) -> Path:
    """A tiny random-init diffusion_gemma checkpoint (canvas 8)."""
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("tiny-dgemma"))


@pytest.fixture(scope="session")
def tiny_llada():
    """A tiny LLaDA-layout model in memory (vocab 64, mask id 63, d_model 32, d_ff 64, 2 layers)."""
    from actsparse.pipeline.diffusion.tiny_llada import build_tiny_llada as build

    return build()


@pytest.fixture(scope="session")
def tiny_dgemma():
    """A tiny random-init diffusion_gemma in memory (vocab 300, canvas 8, bos 2, eos 1, pad 0)."""
    return tiny_diffusion_gemma()


@pytest.fixture(scope="session")
def decoded_store(tmp_path_factory, tiny_llama, tiny_llada_ckpt, tiny_dgemma_ckpt, text_corpus):
    """A store with a generation run (tiny Llama, 8 new tokens), a masked-diffusion run (tiny LLaDA, guidance on)
    and a block-diffusion run (tiny diffusion_gemma), collected with per-token statistics:
    ``(path, {"generation": id, "llada": id, "dgemma": id})``. Tests that change it work on a copy."""
    from actsparse import CollectConfig, collect
    from actsparse.analyze.token_stats import TOKEN_STATS
    from actsparse.pipeline.decoding import DiffusionSpec, GenerationSpec
    from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig

    path = tmp_path_factory.mktemp("decoded") / "S"
    common = dict(corpus=str(text_corpus), max_tokens=72, seq_len=24, batch_size=2, chunk_tokens=96)
    configs = {
        "generation": CollectConfig(model=str(tiny_llama), decoding=GenerationSpec(8), **common),
        "llada": CollectConfig(model=str(tiny_llada_ckpt), trust_remote_code=True, decoding=DiffusionSpec(
            MaskedDiffusionConfig(steps=8, gen_length=8, block_length=4, cfg_scale=1.0)), **common),
        "dgemma": CollectConfig(model=str(tiny_dgemma_ckpt), decoding=DiffusionSpec(
            MaskedDiffusionConfig(steps=6, gen_length=16, block_length=8)), **common),
    }
    ids = {k: collect(cfg, path, statistics=TOKEN_STATS, progress=None, log=lambda m: None).run_id
           for k, cfg in configs.items()}
    return path, ids


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small multi-document jsonl corpus (real English sentences repeated with variations)."""
    import json

    d = tmp_path_factory.mktemp("corpus")
    p = d / "docs.jsonl"
    with open(p, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Document {i}. " + TEXT * (1 + i % 4), "id": i}) + "\n")
    return p


@pytest.fixture(scope="session")
def smollm2_store(tmp_path_factory):
    """A real SmolLM2-135M run: 1,024 wiki tokens, all six sites (session-scoped: collected once)."""
    from actsparse import CollectConfig, collect

    store = tmp_path_factory.mktemp("smollm2-store")
    cfg = CollectConfig(model="smollm2-135m", corpus="wiki", max_tokens=1024, seq_len=256, batch_size=4,
                        sites=("input", "gate", "act", "up", "intermediate", "output"), chunk_tokens=512)
    res = collect(cfg, store, progress=False, log=lambda m: None)
    return store, res


@pytest.fixture(scope="session")
def analysis_store(tmp_path_factory, tiny_llama, text_corpus):
    """One tiny-Llama run (600 tokens, sites input, act, up, intermediate, float32) shared by the analyses beyond
    the paper (rank, weight-aware rules, allocation, deployment): ``(path, run_id)``. They add results to it."""
    from actsparse import CollectConfig, collect

    path = tmp_path_factory.mktemp("analysis-store")
    res = collect(CollectConfig(model=str(tiny_llama), corpus=str(text_corpus), max_tokens=600, seq_len=64,
                                batch_size=2, chunk_tokens=128, sites=("input", "act", "up", "intermediate"),
                                dtype="float32"), path, progress=False, log=lambda m: None)
    return path, res.run_id


@pytest.fixture(scope="session")
def two_model_store(tmp_path_factory, tiny_llama, text_corpus):
    """Two complete runs of two tiny models (a Llama and a GPT-2: different depths and widths) in one store:
    ``(path, llama_run_id, gpt2_run_id)``. Tests that change it work on a copy."""
    from actsparse import CollectConfig, collect

    gpt2 = build_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")
    path = tmp_path_factory.mktemp("two-models") / "S"
    ids = [collect(CollectConfig(model=str(model), corpus=str(text_corpus), max_tokens=n, seq_len=64, batch_size=2,
                                 chunk_tokens=128), path, progress=False, log=lambda m: None).run_id
           for model, n in ((tiny_llama, 600), (gpt2, 300))]
    return path, ids[0], ids[1]


@pytest.fixture
def serve(tmp_path):
    """Serve a directory over HTTP on loopback; yields ``start(directory, handler) -> base URL``."""
    servers = []

    def start(directory: Path, handler=RangeHandler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
        server.timeout = 5
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory) -> dict:
    """Tiny random-init checkpoints of the mixture-of-experts families (``tests.helpers.MOE_KINDS``): Qwen2-MoE
    with a shared expert, Qwen3-MoE with a dense first layer, OLMoE and Mixtral."""
    root = tmp_path_factory.mktemp("moe-models")
    return {kind: build_tiny(root / kind, kind) for kind in MOE_KINDS}


@pytest.fixture(scope="session")
def moe_store(tmp_path_factory, moe_checkpoints, text_corpus):
    """One store with a float32 run of every MoE family, all six sites: ``(path, {kind: run_id})``. Tests that
    change it work on a copy."""
    from actsparse import CollectConfig, collect

    path = tmp_path_factory.mktemp("moe-store") / "S"
    ids = {kind: collect(CollectConfig(model=str(model), corpus=str(text_corpus), max_tokens=400, seq_len=64,
                                       batch_size=2, chunk_tokens=128, dtype="float32",
                                       sites=("input", "gate", "act", "up", "intermediate", "output")),
                         path, progress=False, log=lambda m: None).run_id
           for kind, model in moe_checkpoints.items()}
    return path, ids
