"""Allocation benchmark: per-layer allocation for 30 layers x 26 grid values, once the curves exist.

Run with ``make bench-allocate``. Times ``analyze.allocate.allocate`` on a curves table of 30 layers and the
paper's 26 top-p values (SmolLM2-135M's shape: one target, one rule), one model-level sparsity per call,
best of several rounds, beside the pure solver alone. The curves are synthetic (monotone sparsity and error
per layer at per-layer rates): the solver's time depends on the table's shape, not on its numbers.
Target: under a second.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
from rounds import listed  # bench/, run as a script


def curves_table(n_layers: int = 30, grid=None):
    from actsparse.analyze.rules import DEFAULT_TOPP_GRID

    grid = grid or DEFAULT_TOPP_GRID
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(n_layers):
        rate, scale = rng.uniform(0.5, 3.0), rng.uniform(0.05, 1.0)
        for p in grid:
            s = (1 - p) ** (1 / rate)
            rows.append(dict(run_id="0" * 16, target="intermediate", rule="top-p", value=p, layer=layer, width=1536,
                             n_tokens=4096, sparsity_mean=s, rel_err_mean=scale * s**2))
    return pl.DataFrame(rows)


def main() -> None:
    from actsparse.analyze.allocate import allocate

    df = curves_table()
    allocate(df, "intermediate", "top-p", [0.5])  # warm-up
    calls, many = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        allocate(df, "intermediate", "top-p", [0.5])
        calls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        allocate(df, "intermediate", "top-p", list(np.linspace(0.1, 0.8, 15)))
        many.append(time.perf_counter() - t0)
    print("allocation of 30 layers x 26 values (one target, one rule) from a curves table; best of 5 rounds")
    print(f"one sparsity      {min(calls) * 1e3:8.2f} ms   (target < 1000 ms)")
    print(f"15 sparsities     {min(many) * 1e3:8.2f} ms")
    print(f"rounds: one {listed([c * 1e3 for c in calls])} ms; 15 {listed([c * 1e3 for c in many])} ms")


if __name__ == "__main__":
    main()
