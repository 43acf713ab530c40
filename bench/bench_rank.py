"""Effective-rank benchmark: the entropy effective rank of every layer and site against its FLOP floor.

Run with ``make bench-rank``. On a SmolLM2-135M store of 4,096 wiki tokens with all six sites (30 layers),
measured side by side in one process, same tokens, interleaved rounds, best of each:

* ``actsparse rank`` (``analyze.rank.rank_run``) at one token count, 4,096;
* reading the same blocks and forming their Gram products A^T A in float32 (torch's threads, as a caller would):
  the computation's floor, since the rank needs every eigenvalue of that product;
* reading alone.

Target: effective rank <= 2x the Gram products (issue 18). ``--store`` reuses an existing store's only run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from rounds import listed  # bench/, run as a script

SITES = ("input", "gate", "act", "up", "intermediate", "output")


def make_store(path: str, tokens: int) -> None:
    from actsparse.pipeline.collect import CollectConfig, collect

    collect(CollectConfig(model="smollm2-135m", corpus="wiki", max_tokens=tokens, sites=SITES), path,
            progress=False, log=lambda m: None)


def blocks(run, rows, stop):
    sel = torch.from_numpy(rows)
    for site in run.sites:
        for layer in range(run.n_layers):
            yield run.read(site, layer, 0, stop, to="float32")[sel]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--store")
    a = ap.parse_args()
    import numpy as np

    from actsparse.analyze.rank import rank_run
    from actsparse.pipeline.reader import StoreReader

    with tempfile.TemporaryDirectory(prefix="actsparse-bench-") as tmp:
        path = a.store or f"{tmp}/store"
        if a.store is None:
            make_store(path, a.tokens + 64)  # room for the BOS tokens left out
        run = StoreReader(path).run()
        rows = np.nonzero(~run.special_mask())[0][: a.tokens]
        stop = int(rows[-1]) + 1
        rank_run(run, ("input",), (a.tokens,), layers=[0])  # warm-up: imports, first reads
        ranks, grams, reads = [], [], []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            for _ in blocks(run, rows, stop):
                pass
            reads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for x in blocks(run, rows, stop):
                x.T @ x
            grams.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            df = rank_run(run, run.sites, (a.tokens,))
            ranks.append(time.perf_counter() - t0)
    t_rank, t_gram, t_read = min(ranks), min(grams), min(reads)
    print(f"SmolLM2-135M x wiki, {len(rows)} tokens, {run.n_layers} layers x {len(run.sites)} sites "
          f"({df.height} matrices), {torch.get_num_threads()} threads; best of {a.rounds} interleaved rounds")
    print(f"effective rank (read + Gram + eigenvalues)   {t_rank:7.2f} s   rank/gram {t_rank / t_gram:5.2f}x  "
          f"(target <= 2x)")
    print(f"read + Gram products A^T A in float32        {t_gram:7.2f} s")
    print(f"read alone                                   {t_read:7.2f} s   (rank - read)/(gram - read) "
          f"{(t_rank - t_read) / max(t_gram - t_read, 1e-9):5.2f}x")
    print(f"rounds: rank {listed(ranks)} s; gram {listed(grams)} s; read {listed(reads)} s")


if __name__ == "__main__":
    main()
