"""Scale-out benchmark: ``collect --config jobs.toml --executor ray --workers 2`` against ``--executor local`` (job
after job) on the same cores, the same jobs file: 2 real models x 2 corpora, 2,048 tokens each.

Run with ``make bench-scale``. Each executor runs the real command in a fresh process into a fresh store (the
wall time includes everything a user waits for: imports, Ray's start and the workers' imports, model loads), in
interleaved rounds; the stores are checked to hold the same bytes. Per-worker throughput comes from the Ray
run's manifests (tokens over the seconds each worker spent in its pieces), and the arithmetic for N workers from
the measured start-up and per-worker rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("smollm2-135m", "gemma3-270m")
CORPORA = ("wiki", "shakespeare")


def jobs_toml(tokens: int) -> str:
    models = ", ".join(f'"{m}"' for m in MODELS)
    corpora = ", ".join(f'"{c}"' for c in CORPORA)
    return f"[defaults]\nmax_tokens = {tokens}\n\n[[jobs]]\nmodel = [{models}]\ncorpus = [{corpora}]\n"


def run(executor: str, jobs: Path, store: Path) -> float:
    """Wall seconds of the whole command."""
    exe = Path(sys.executable).with_name("actsparse")
    extra = ["--executor", "ray", "--workers", "2"] if executor == "ray" else []
    t0 = time.perf_counter()
    r = subprocess.run([str(exe), "collect", "--config", str(jobs), "--store", str(store), "-q", *extra],
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{executor} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return wall


def manifests(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(store.glob("runs/*/manifest.json"))]


def same_bytes(a: Path, b: Path) -> bool:
    """The same runs with the same checksum lists (every array, table and weights file) in both stores."""
    def sums(root: Path) -> dict:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.glob("*/*/checksums.json")}

    return sums(a) == sums(b) and len(sums(a)) > 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        jobs = root / "jobs.toml"
        jobs.write_text(jobs_toml(args.tokens))
        walls: dict[str, list[float]] = {"local": [], "ray": []}
        for i in range(args.rounds):
            order = ("local", "ray") if i % 2 == 0 else ("ray", "local")
            for executor in order:
                store = root / f"{executor}-{i}"
                walls[executor].append(run(executor, jobs, store))
                print(f"round {i + 1} {executor:5s} {walls[executor][-1]:7.1f} s   load {os.getloadavg()[0]:.2f}",
                      flush=True)
        identical = same_bytes(root / "local-0", root / "ray-0")
        runs = manifests(root / f"ray-{min(range(args.rounds), key=lambda i: walls['ray'][i])}")
        local_runs = manifests(root / f"local-{min(range(args.rounds), key=lambda i: walls['local'][i])}")
    best = {k: min(v) for k, v in walls.items()}
    n_runs, tokens = len(runs), sum(m["n_tokens"] for m in runs)
    busy: dict[str, list[float]] = {}
    for m in runs:
        for worker in m["stats"]["workers"]:
            busy.setdefault(worker, [0.0, 0])
            busy[worker][0] += m["stats"]["loop_s"]
            busy[worker][1] += m["n_tokens"]
    per_worker = {w: n / s for w, (s, n) in busy.items()}
    rate = sum(per_worker.values()) / len(per_worker)
    busiest = max(s for s, _ in busy.values())
    startup = best["ray"] - busiest
    local_loop = sum(m["stats"]["loop_s"] for m in local_runs)

    print(f"\n{len(MODELS)} models x {len(CORPORA)} corpora ({', '.join(MODELS)} x {', '.join(CORPORA)}), "
          f"{args.tokens} tokens each, default sites; best of {args.rounds} interleaved rounds; "
          f"load average now {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"local, job after job        {best['local']:7.1f} s  (rounds {', '.join(f'{w:.1f}' for w in walls['local'])})")
    print(f"ray --workers 2             {best['ray']:7.1f} s  (rounds {', '.join(f'{w:.1f}' for w in walls['ray'])})")
    print(f"ratio ray/local wall time: {best['ray'] / best['local']:.3f}  (target <= 1.15; per round "
          f"{', '.join(f'{r / lo:.2f}' for r, lo in zip(walls['ray'], walls['local']))})")
    print(f"stores byte-identical (every checksum list): {identical}")
    for w, (s, n) in sorted(busy.items()):
        print(f"worker {w}: {n} tokens in {s:.1f} s of pieces = {n / s:.0f} tok/s (1 CPU)")
    print(f"local: {local_loop:.1f} s in the collection loops ({tokens / local_loop:.0f} tok/s on 2 threads), "
          f"{best['local'] - local_loop:.1f} s outside them (imports, plans, 4 model loads, weights)")
    print(f"ray: {busiest:.1f} s in the busiest worker's pieces, {startup:.1f} s outside them (Ray and its workers "
          f"starting, their imports, 2 model loads per worker at most, preparing runs, finishing)")
    shards = sum(-(-m["n_tokens"] // m["chunk_tokens"]) for m in runs)
    print(f"N workers of one core each: wall ~ {startup:.1f} s + {tokens} tokens / (N x {rate:.0f} tok/s) while "
          f"N <= {shards} (the batch's shards; runs are split by whole shards when N > {n_runs} runs)")
    for n in (1, 2, 4, shards):
        wall = startup + tokens / (n * rate)
        print(f"  N = {n:3d}: {wall:7.1f} s for this batch ({tokens / wall:5.0f} tok/s)")
    print(f"a study of 10M tokens: {1e7 / (16 * rate) / 3600:.1f} h on 16 workers, {1e7 / (64 * rate) / 3600:.2f} h on "
          f"64 ({rate:.0f} tok/s per CPU worker; start-up {startup:.0f} s once)")


if __name__ == "__main__":
    main()
