"""Generation and diffusion benchmark: generation collection vs generation without hooks; offline mask stability
vs the denoising loop re-run with mask recording.

Run with ``make bench-decoding``. Measured side by side in one run:

* **generation**: SmolLM2-135M, ``--prompts`` wiki windows of ``--prompt-len`` tokens as one batch of prompts,
  ``--new`` new tokens, greedy. Collection (``collect --generate``: hooks on the default sites, shard writes,
  per-token statistics) against the same generation loop (``pipeline.generate.generate``, same prompts, stop and
  pad ids, KV cache) without hooks, and Hugging Face ``generate`` as a reference; each in a fresh process with
  the model loaded before the clock starts, in interleaved rounds (the best of each is reported, as ``timeit``
  does);
* **diffusion**: a random-init LLaDA-layout masked-diffusion LM (``pipeline.diffusion.tiny_llada``, widened to
  ``SHAPE``, as LLaDA's d_ff / d_model of 3) on wiki prompts, one stored run of every denoising step (intermediate
  site, bf16). The offline analysis (``analyze.steps.analyze_steps``: the authors' flattened top-p at 0.9, sparsity
  per step, Jaccard consecutive / drift / intervals 4, 8, 16, 32, global and token-aware, every step and layer, no
  cache) against the paper's way: re-running the denoising loop with the same masks recorded inside it
  (``analyze.stability.StepMaskTracker`` per layer and batch); and the loop alone, without recording, which says
  how much of the re-run is the model's forward passes.

Torch runs on ``--threads`` threads (default 1, children included): on the shared 2-core machine, with the load
above the core count, two OpenMP threads stall at every op's barrier (the generation above took 62-110 s on 2
threads against 11-12 s on 1 at load 8), which would time the machine's other tenants, not actsparse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rounds import listed  # bench/, run as a script

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(d_model=768, n_heads=12, n_layers=6, mlp_hidden_size=2304, max_sequence_length=256)
RULE, VALUE = "top-p-flat", 0.9


# --------------------------------------------------------------------------------------------
# Generation on SmolLM2-135M


def gen_config(prompts: int, prompt_len: int, new: int):
    from actsparse.pipeline.collect import CollectConfig
    from actsparse.pipeline.decoding import GenerationSpec

    return CollectConfig(model="smollm2-135m", corpus="wiki", max_tokens=prompts * prompt_len, seq_len=prompt_len,
                         batch_size=prompts, decoding=GenerationSpec(new))


def collect_child(store: str, prompts: int, prompt_len: int, new: int) -> None:
    from actsparse.analyze.token_stats import TOKEN_STATS
    from actsparse.pipeline.collect import collect

    res = collect(gen_config(prompts, prompt_len, new), store, statistics=TOKEN_STATS, progress=None,
                  log=lambda m: None)
    print(json.dumps(res.manifest.stats | dict(n_tokens=res.n_tokens)))


def generate_child(way: str, prompts: int, prompt_len: int, new: int) -> None:
    """The generation of the collection run without hooks (``way`` ``own``: ``pipeline.generate``; ``hf``: Hugging
    Face ``generate``, greedy, same stop ids), in a fresh process; prints seconds and the tokens generated."""
    import torch

    from actsparse.pipeline.collect import plan
    from actsparse.pipeline.generate import generate, left_pad
    from actsparse.pipeline.windows import batches

    p = plan(gen_config(prompts, prompt_len, new))
    model, _ = p.decoder.load(p.resolved, p.cfg.compute_dtype)
    dec = p.decoder
    (batch,) = list(batches(p.windows, p.cfg.batch_size))
    ids = [w.token_ids.tolist() for w in batch]
    t0 = time.perf_counter()
    if way == "own":
        out = generate(model, ids, new, stop_token_ids=dec.stop_ids, pad_token_id=dec.pad)
        n = int(out.n_generated.sum())
    else:
        x, attn = left_pad(ids, dec.pad)
        with torch.no_grad():
            seqs = model.generate(input_ids=x, attention_mask=attn, max_new_tokens=new, do_sample=False,
                                  eos_token_id=dec.stop_ids, pad_token_id=dec.pad)
        n = int((seqs[:, x.shape[1]:] != dec.pad).sum())
    print(json.dumps(dict(generate_s=time.perf_counter() - t0, n_generated=n)))


def _child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Diffusion on a LLaDA-layout model


def build_llada(out: Path) -> Path:
    """Save the random-init LLaDA-layout model of ``SHAPE`` with the tests' byte-level tokenizer (``<mask>``)."""
    sys.path.insert(0, str(ROOT))
    from actsparse.pipeline.diffusion.tiny_llada import build_tiny_llada, save_tiny_llada
    from tests.helpers import build_tokenizer

    tok = build_tokenizer(out, mask=True)
    return save_tiny_llada(build_tiny_llada(0, vocab_size=len(tok), mask_token_id=tok.mask_token_id, **SHAPE), out)


def diff_config(model: str, a):
    from actsparse.pipeline.collect import CollectConfig
    from actsparse.pipeline.decoding import DiffusionSpec
    from actsparse.pipeline.diffusion.masked import MaskedDiffusionConfig

    sampler = MaskedDiffusionConfig(steps=a.steps, gen_length=a.gen_length, block_length=a.block_length)
    return CollectConfig(model=model, corpus="wiki", sites=("intermediate",),
                         max_tokens=a.diff_prompts * a.diff_prompt_len, seq_len=a.diff_prompt_len, batch_size=a.diff_batch, trust_remote_code=True,
                         decoding=DiffusionSpec(sampler))


def offline(store: str) -> float:
    from actsparse.analyze.steps import StepConfig, analyze_steps

    t0 = time.perf_counter()
    analyze_steps(store, cfg=StepConfig(rule=RULE, value=VALUE), use_cache=False)
    return time.perf_counter() - t0


def in_loop(p, model, arch, record: bool) -> tuple[float, int]:
    """The run's denoising loop again, with the flattened top-p masks of every layer's bf16 intermediate recorded
    at every step into one ``StepMaskTracker`` per (layer, batch) (or, ``record`` false, the loop alone); returns
    seconds and the Jaccard rows recorded."""
    import torch

    from actsparse.analyze.flat_topp import flat_topp_segments
    from actsparse.analyze.stability import StepMaskTracker
    from actsparse.pipeline.recorder import SiteRecorder
    from actsparse.pipeline.windows import batches

    trackers: dict = {}
    state: dict = {}

    class Sink:  # the decoder's row announcements: which rows of the hooked tensor are real, their sequences
        def begin(self, keep, rows, shape):
            seq = rows["sequence"]
            starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
            state.update(keep=keep, step=int(rows["step"][0]), starts=starts, stops=np.r_[starts[1:], len(seq)])

        def end(self):
            pass

    def hook(site, layer, t):
        x = t.reshape(-1, t.shape[-1])[state["keep"]].bfloat16()  # the values the store holds
        keep = flat_topp_segments(x, state["starts"], state["stops"], VALUE)
        trackers.setdefault((layer, state["batch"]), StepMaskTracker()).update(state["step"], keep)

    t0 = time.perf_counter()
    with SiteRecorder(arch, ("intermediate",), hook) if record else contextlib.nullcontext(), torch.inference_mode():
        for b, batch in enumerate(batches(p.windows, p.cfg.batch_size)):
            state["batch"] = b
            p.decoder.run_batch(model, batch, b, Sink())
    return time.perf_counter() - t0, sum(len(t.table()["step"]) for t in trackers.values())


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--diff-prompts", type=int, default=2)
    ap.add_argument("--diff-prompt-len", type=int, default=16)
    ap.add_argument("--diff-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--diff-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--generate-child", nargs=4)
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # before torch is imported, here and in the children
    if a.child:
        collect_child(a.child[0], *map(int, a.child[1:]))
        return
    if a.generate_child:
        generate_child(a.generate_child[0], *map(int, a.generate_child[1:]))
        return
    import torch

    from actsparse.pipeline.collect import collect, plan
    from actsparse.pipeline.reader import StoreReader

    gen_args = (a.prompts, a.prompt_len, a.new)
    with tempfile.TemporaryDirectory(prefix="actsparse-bench-decoding-") as tmp:
        coll, own, hf = [], [], []
        for r in range(a.rounds):  # interleaved: a slow spell of the machine hits all three
            coll.append(_child("--child", f"{tmp}/g-{r}", *gen_args))
            own.append(_child("--generate-child", "own", *gen_args))
            hf.append(_child("--generate-child", "hf", *gen_args))

        model_dir = str(build_llada(Path(tmp) / "llada"))
        cfg = diff_config(model_dir, a)
        t0 = time.perf_counter()
        res = collect(cfg, f"{tmp}/d", progress=None, log=lambda m: None)
        t_collect = time.perf_counter() - t0
        run = StoreReader(f"{tmp}/d").run()
        stored = run.manifest.stats["bytes_on_disk"]
        p = plan(cfg)
        model, arch = p.decoder.load(p.resolved, p.cfg.compute_dtype)
        offl, loop, bare = [], [], []
        for _ in range(a.diff_rounds):
            offl.append(offline(f"{tmp}/d"))
            t, n_pairs = in_loop(p, model, arch, record=True)
            loop.append(t)
            bare.append(in_loop(p, model, arch, record=False)[0])
        n_diff = res.n_tokens
    c = min(x["loop_s"] for x in coll)
    o, h = min(x["generate_s"] for x in own), min(x["generate_s"] for x in hf)
    n_gen = own[0]["n_generated"]
    print(f"SmolLM2-135M x wiki, {a.prompts} prompts of {a.prompt_len} tokens, {a.new} new tokens greedy "
          f"({n_gen} generated, {coll[0]['n_tokens']} rows stored), default sites, bf16, "
          f"{torch.get_num_threads()} threads; best of {a.rounds} interleaved rounds")
    print(f"generation without hooks (pipeline.generate)  {o:6.2f} s  (rounds {listed(x['generate_s'] for x in own)})")
    print(f"Hugging Face generate (reference)             {h:6.2f} s  (rounds {listed(x['generate_s'] for x in hf)})")
    print(f"collection --generate {a.new:<3d} (hooks, writes, stats) {c:6.2f} s  "
          f"(rounds {listed(x['loop_s'] for x in coll)})")
    print(f"ratio collection / generation without hooks: {c / o:.3f}  (target <= 1.3; per round "
          f"{listed(x['loop_s'] / y['generate_s'] for x, y in zip(coll, own))})")
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items() if k != "max_sequence_length")
    print(f"\nrandom-init LLaDA-layout ({shape}), masked diffusion: {a.diff_prompts} wiki prompts of "
          f"{a.diff_prompt_len} tokens, batch {a.diff_batch}, gen-length {a.gen_length}, block-length {a.block_length}, {a.steps} steps; "
          f"intermediate site, bf16: {n_diff} rows stored ({stored / 2**20:.0f} MiB), collected in {t_collect:.1f} s; best of {a.diff_rounds} rounds")
    print(f"denoising loop alone (no recording)                {min(bare):7.2f} s  (rounds {listed(bare)})")
    print(f"denoising loop re-run with in-loop mask recording  {min(loop):7.2f} s  (rounds {listed(loop)}; "
          f"{n_pairs} Jaccard rows)")
    print(f"offline analyze_steps ({RULE} {VALUE}, every step and layer) {min(offl):7.2f} s  (rounds {listed(offl)})")
    print(f"speed-up offline vs re-run with recording: {min(loop) / min(offl):.1f}x  (target >= 10x); "
          f"the forward passes alone take {min(bare) / min(offl):.1f}x the offline analysis")


if __name__ == "__main__":
    main()
