"""Collection benchmark: forward-only vs collection throughput, bytes on disk, peak RSS vs token count.

Run with ``make bench-collect``. SmolLM2-135M on wiki with the default sites; all timings in one run,
same windows and batches, same thread count, each in a fresh process with the model loaded before the
clock starts (so both time their first, cold batch), in interleaved rounds (the best of each is
reported, as ``timeit`` does: the run least disturbed by the rest of the machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import peak_rss_mib  # bench/, run as a script
from rounds import listed


def forward_child(tokens: int, seq_len: int, batch_size: int) -> None:
    """Time the forward passes alone (no hooks, no writing) over the same batches as collection, in a
    fresh process as collection runs, its first batch included as collection's is; prints seconds."""
    from actsparse.pipeline.collect import CollectConfig, _forward_batch, plan
    from actsparse.pipeline.models import load_model
    from actsparse.pipeline.windows import batches as window_batches
    from actsparse.pipeline.windows import pad_batch

    cfg = CollectConfig(model="smollm2-135m", corpus="wiki", max_tokens=tokens, seq_len=seq_len, batch_size=batch_size)
    p = plan(cfg)
    model = load_model(p.resolved)
    batches = [pad_batch(b, p.tokenizer.pad_token_id or 0) for b in window_batches(p.windows, batch_size)]
    t0 = time.perf_counter()
    for ids, mask in batches:
        _forward_batch(model, ids, mask)
    print(json.dumps(dict(forward_s=time.perf_counter() - t0)))


def collect_child(store: str, tokens: int, seq_len: int, batch_size: int, stats: int = 1) -> None:
    from actsparse.analyze.token_stats import TOKEN_STATS
    from actsparse.pipeline.collect import CollectConfig, collect

    cfg = CollectConfig(model="smollm2-135m", corpus="wiki", max_tokens=tokens, seq_len=seq_len, batch_size=batch_size)
    res = collect(cfg, store, statistics=TOKEN_STATS if stats else None, log=lambda m: None)
    m = res.manifest.to_dict()
    print(json.dumps(m["stats"] | dict(n_tokens=res.n_tokens, arrays=m["arrays"], peak_rss_mib=peak_rss_mib())))


def _child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, *map(str, args)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(store: str, tokens: int, seq_len: int, batch_size: int, stats: int = 1) -> tuple[dict, float]:
    """Collect in a fresh process; return its stats and its peak RSS in MiB."""
    result = _child("--child", store, tokens, seq_len, batch_size, stats)
    return result, result["peak_rss_mib"]


def timed_forward(tokens: int, seq_len: int, batch_size: int) -> float:
    """Forward-only seconds, measured in a fresh process (``forward_child``)."""
    return _child("--forward-child", tokens, seq_len, batch_size)["forward_s"]


def plain_writes(directory: str, n_bytes: int, file_bytes: int = 64 * 2**20) -> tuple[float, float]:
    """Wall and kernel seconds to write ``n_bytes`` of incompressible data into fresh files: the floor
    that writing the store's bytes puts under collection on this machine."""
    import os

    data = os.urandom(file_bytes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    t0 = time.perf_counter()
    for k in range(-(-n_bytes // file_bytes)):
        with open(f"{directory}/plain-{k}", "wb") as f:
            f.write(data[: min(file_bytes, n_bytes - k * file_bytes)])
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before


def stats_paths(store: str) -> tuple[float, float, bool]:
    """ns per entry of the per-token statistics on the stored bf16 blocks of every site and layer: the
    histogram kernel collection uses, the sort path on the same values widened to float32, and whether
    every statistic agrees (l2 to 1e-6: its float64 sum runs in another order)."""
    import numpy as np

    from actsparse.analyze.token_stats import STAT_COLUMNS, _sorted_stats, token_stats
    from actsparse.pipeline.reader import StoreReader

    run = StoreReader(store).run()
    token_stats(run.read(run.sites[0], 0, 0, 2, to="native"))  # warm-up: numba's cached kernel
    t_hist = t_sort = 0.0
    n, same = 0, True
    for site in run.sites:
        for layer in range(run.n_layers):
            block = run.read(site, layer, to="native")
            t0 = time.perf_counter()
            fast = token_stats(block)
            t1 = time.perf_counter()
            slow = _sorted_stats(block.float())
            t_sort += time.perf_counter() - t1
            t_hist += t1 - t0
            n += block.numel()
            same &= all(np.allclose(fast[c], slow[c], rtol=1e-6, equal_nan=True) if c == "l2"
                        else np.array_equal(fast[c], slow[c], equal_nan=True) for c in STAT_COLUMNS)
    return t_hist / n * 1e9, t_sort / n * 1e9, same


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--large", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", nargs=5)
    ap.add_argument("--forward-child", nargs=3, type=int)
    a = ap.parse_args()
    if a.child:
        collect_child(a.child[0], *map(int, a.child[1:]))
        return
    if a.forward_child:
        forward_child(*a.forward_child)
        return
    with tempfile.TemporaryDirectory(prefix="actsparse-bench-") as tmp:
        # rounds interleave the three measurements, so that a slow spell of the machine hits all of them
        fwd, coll, bare, rss4k = [], [], [], []
        for r in range(a.rounds):
            stats, rss = run_child(f"{tmp}/s4k-{r}", a.tokens, a.seq_len, a.batch_size)
            rss4k.append(rss)
            fwd.append(timed_forward(a.tokens, a.seq_len, a.batch_size))
            nostats, _ = run_child(f"{tmp}/s4k-nostats-{r}", a.tokens, a.seq_len, a.batch_size, stats=0)
            coll.append((stats["loop_s"], stats["write_s"]))
            bare.append((nostats["loop_s"], nostats["write_s"]))
        values = sum(spec["shape"][0] * spec["shape"][1] * spec["shape"][2] for spec in stats["arrays"].values())
        act_bytes = sum(p.stat().st_size for p in Path(tmp, "s4k-0").glob("runs/*/activations.zarr/**/*") if p.is_file())
        io_wall, io_sys = plain_writes(tmp, act_bytes)
        stats_big, rss_big = run_child(f"{tmp}/s32k", a.large, a.seq_len, a.batch_size)
        ns_hist, ns_sort, same = stats_paths(f"{tmp}/s4k-0")
    n = stats["n_tokens"]
    f, (c, cw), (b, bw), rss_small = min(fwd), min(coll), min(bare), max(rss4k)

    print(f"SmolLM2-135M x wiki, sites input,gate,intermediate, bf16, seq_len {a.seq_len}, batch {a.batch_size}; "
          f"best of {a.rounds} interleaved rounds")
    print(f"forward-only      {n / f:8.0f} tok/s  ({f:.2f} s for {n} tokens; rounds {listed(fwd)} s)")
    print(f"collection        {n / c:8.0f} tok/s  ({c:.2f} s, writer busy {cw:.2f} s; rounds {listed(x for x, _ in coll)} s)")
    print(f"ratio collection/forward wall time: {c / f:.3f}  (target <= 1.3; per round "
          f"{listed(x / y for (x, _), y in zip(coll, fwd))})")
    print(f"collection without per-token stats {n / b:8.0f} tok/s  (ratio {b / f:.3f}; writer busy {bw:.2f} s; "
          f"rounds {listed(x for x, _ in bare)} s)")
    print(f"bytes on disk per stored 16-bit value: {act_bytes / values:.3f}  (target <= 1.8)")
    print(f"plain writes of the same {act_bytes / 2**20:.0f} MiB to fresh files: {io_wall:.2f} s wall, {io_sys:.2f} s kernel "
          f"({io_wall / f:.2f} of the forward-only time)")
    print(f"per-token statistics, one core: histogram kernel {ns_hist:.2f} ns/entry, sort path {ns_sort:.2f} ns/entry "
          f"(x{ns_sort / ns_hist:.1f}); identical on every token, site and layer: {same}")
    print(f"peak RSS: {rss_small:.0f} MiB at {n} tokens (highest of the rounds), {rss_big:.0f} MiB at {stats_big['n_tokens']} tokens "
          f"(ratio {rss_big / rss_small:.2f}; target: independent of token count)")


if __name__ == "__main__":
    main()
