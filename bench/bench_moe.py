"""Mixture-of-experts benchmark: collection vs forward-only, bytes per stored value, the offline sweep vs the paper's way.

Run with ``make bench-moe``. A random-init Mixtral-layout MoE of realistic shape ratios (8 experts, top-2, 8 layers,
d_model 512, d_moe 1024; a byte-level BPE tokenizer of 1,024 tokens trained on the wiki corpus, so that the LM
head does not dominate) over wiki text, default sites (input, gate, intermediate), bf16. Measured in one run:

* collection (capture through actsparse's experts implementation, shard writes, per-token statistics) against
  forward-only passes of the default ``grouped_mm`` path over the same batches, each in a fresh process with the
  model loaded before the clock starts, in interleaved rounds (the best of each is reported, as ``timeit`` does);
* bytes on disk per stored 16-bit value, with the same measure for a real dense model (SmolLM2-135M, 1,024 wiki
  tokens) and the entropy of every bit of the stored bf16 values of both, which says why random weights
  compress worse;
* the offline 26-point top-p sweep with error (intermediate target, every layer, per expert and per layer)
  against the paper's way: one forward pass per grid value with top-p applied inside every expert
  (``analyze.moe_sparsifier``), over the same windows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rounds import listed  # bench/, run as a script

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2,
             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
VOCAB = 1024
SITES = ("input", "gate", "intermediate")


def build_model(out: Path) -> Path:
    """Save the random-init MoE and its tokenizer (trained on the wiki corpus's collection split) as a checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast

    from actsparse.pipeline.corpora import open_corpus

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([d.text for d in open_corpus("wiki").split("collect")], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.save_pretrained(out)
    cfg = MixtralConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def config(model: str, tokens: int, batch_size: int):
    from actsparse.pipeline.collect import CollectConfig

    return CollectConfig(model=model, corpus="wiki", max_tokens=tokens, seq_len=256, batch_size=batch_size,
                         sites=SITES)


def forward_child(model: str, tokens: int, batch_size: int) -> None:
    """Forward passes alone (the model's default experts path, no hooks, no writing) over the batches collection
    runs, in a fresh process as collection runs, its first batch included; prints seconds."""
    from actsparse.pipeline.collect import _forward_batch, plan
    from actsparse.pipeline.models import load_model
    from actsparse.pipeline.windows import batches as window_batches
    from actsparse.pipeline.windows import pad_batch

    p = plan(config(model, tokens, batch_size))
    m = load_model(p.resolved)
    batches = [pad_batch(b, p.tokenizer.pad_token_id or 0) for b in window_batches(p.windows, batch_size)]
    t0 = time.perf_counter()
    for ids, mask in batches:
        _forward_batch(m, ids, mask)
    print(json.dumps(dict(forward_s=time.perf_counter() - t0)))


def collect_child(model: str, store: str, tokens: int, batch_size: int) -> None:
    from actsparse.analyze.token_stats import TOKEN_STATS
    from actsparse.pipeline.collect import collect

    res = collect(config(model, tokens, batch_size), store, statistics=TOKEN_STATS, log=lambda m: None)
    print(json.dumps(res.manifest.stats | dict(n_tokens=res.n_tokens)))


def _child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def stored_bytes(store: str) -> tuple[float, float, np.ndarray]:
    """(bytes on disk per stored 16-bit value, per value of every array, entropy in bits of each of the 16
    bits of the stored bf16 values) of the store's only run."""
    from actsparse.pipeline.reader import StoreReader

    run = StoreReader(store).run()
    act = Path(store) / "runs" / run.run_id / "activations.zarr"
    m = run.manifest
    bits16 = b16 = total_bytes = total_values = 0
    ones = np.zeros(16)
    for name in m.array_names:
        spec = m.array_spec(name)
        size = sum(p.stat().st_size for p in (act / name / "c").rglob("*") if p.is_file())
        values = int(np.prod(spec.shape))
        total_bytes, total_values = total_bytes + size, total_values + values
        if spec.logical_dtype == "bfloat16":
            b16, bits16 = b16 + size, bits16 + values
            data = np.asarray(run.array(name)[:]).view(np.uint16)
            ones += [(data >> (15 - i) & 1).mean() * values for i in range(16)]
    p = np.clip(ones / bits16, 1e-12, 1 - 1e-12)
    return b16 / bits16, total_bytes / total_values, -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def sweep(store: str) -> float:
    from actsparse.analyze.curves import compute_curves

    t0 = time.perf_counter()
    compute_curves(store, targets=("intermediate",), use_cache=False)
    return time.perf_counter() - t0


def paper_way(model_dir: str, store: str, grid, batch_size: int) -> float:
    """One forward pass per grid value over the run's windows with top-p on the intermediate of every expert."""
    import torch
    from transformers import AutoModelForCausalLM

    from actsparse.analyze.moe_sparsifier import MoESparsifier
    from actsparse.pipeline.moe import resolve_moe
    from actsparse.pipeline.reader import StoreReader

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    arch = resolve_moe(model)
    tok = StoreReader(store).run().tokens()
    seqs = [torch.tensor(s["token_id"].to_list()) for _, s in tok.group_by("sequence", maintain_order=True)]
    batches = []
    for i in range(0, len(seqs), batch_size):
        b = seqs[i:i + batch_size]
        ids = torch.zeros(len(b), max(len(s) for s in b), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(b):
            ids[j, :len(s)], mask[j, :len(s)] = s, 1
        batches.append((ids, mask))
    t0 = time.perf_counter()
    for p in grid:
        with torch.inference_mode(), MoESparsifier(arch, "intermediate", "top-p", p) as sp:
            for ids, mask in batches:
                sp.begin_batch(mask.bool())
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                sp.end_batch()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--forward-child", nargs=3)
    a = ap.parse_args()
    if a.child:
        collect_child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
        return
    if a.forward_child:
        forward_child(a.forward_child[0], int(a.forward_child[1]), int(a.forward_child[2]))
        return
    import torch

    from actsparse.analyze.rules import DEFAULT_TOPP_GRID
    from actsparse.pipeline.collect import CollectConfig, collect

    with tempfile.TemporaryDirectory(prefix="actsparse-bench-moe-") as tmp:
        model = str(build_model(Path(tmp) / "model"))
        fwd, coll = [], []
        for r in range(a.rounds):  # interleaved: a slow spell of the machine hits both
            stats = _child("--child", model, f"{tmp}/s-{r}", a.tokens, a.batch_size)
            coll.append((stats["loop_s"], stats["write_s"]))
            fwd.append(_child("--forward-child", model, a.tokens, a.batch_size)["forward_s"])
        per16, per_value, entropy = stored_bytes(f"{tmp}/s-0")
        collect(CollectConfig(model="smollm2-135m", corpus="wiki", max_tokens=1024, sites=SITES), f"{tmp}/real",
                progress=False, log=lambda m: None)
        real16, _, real_entropy = stored_bytes(f"{tmp}/real")
        store = f"{tmp}/s-0"
        from actsparse.analyze.curves import compute_curves

        compute_curves(store, targets=("intermediate",), use_cache=False, layers=[0])  # warm-up: numba's kernels
        sweeps = [sweep(store) for _ in range(a.rounds)]
        t_paper = paper_way(model, store, DEFAULT_TOPP_GRID, a.batch_size)
    n = stats["n_tokens"]
    f, (c, cw), s = min(fwd), min(coll), min(sweeps)
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items() if k != "max_position_embeddings")
    print(f"random-init Mixtral MoE ({shape}, vocab {VOCAB}) x wiki, {n} tokens, sites {','.join(SITES)}, bf16, "
          f"seq_len 256, batch {a.batch_size}, {torch.get_num_threads()} threads; best of {a.rounds} interleaved rounds")
    print(f"forward-only (grouped_mm)  {n / f:7.0f} tok/s  ({f:.2f} s; rounds {listed(fwd)} s)")
    print(f"collection                 {n / c:7.0f} tok/s  ({c:.2f} s, writer busy {cw:.2f} s; rounds "
          f"{listed(x for x, _ in coll)} s)")
    print(f"ratio collection/forward wall time: {c / f:.3f}  (target <= 1.5; per round "
          f"{listed(x / y for (x, _), y in zip(coll, fwd))})")
    print(f"bytes on disk per stored 16-bit value: {per16:.3f}  (target <= 1.8); per value of every array "
          f"(int16 expert ids, float32 routing weights included): {per_value:.3f}")
    print(f"same codec on a real dense model (SmolLM2-135M, 1024 wiki tokens, same sites): {real16:.3f} bytes/value")
    print("entropy of each bf16 bit (sign, 8 exponent bits, 7 mantissa bits), random MoE:  "
          + " ".join(f"{e:.2f}" for e in entropy))
    print("                                                              SmolLM2-135M: "
          + " ".join(f"{e:.2f}" for e in real_entropy))
    print(f"paper's way (26 forward passes, top-p in every expert)  {t_paper:8.2f} s")
    print(f"offline sweep with error (26 top-p values, intermediate) {s:8.2f} s   speed-up {t_paper / s:6.1f}x  "
          f"(target >= 10x; rounds {listed(sweeps)} s)")


if __name__ == "__main__":
    main()
