"""The per-expert table of a mixture-of-experts evaluation (``actsparse.core.format.EVALUATION_EXPERTS``):
realized sparsity and load of every expert, shared expert and dense FFN of every layer, per grid value."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def expert_table(windows, hooks: Sequence[dict], meta: dict):
    """One row per (value, layer, unit, expert, hook site) from an evaluation's per-window sums.

    Args:
        windows: polars DataFrame with ``value``, ``n_valid``, ``hook_sparse`` and ``hook_rows`` per window
            (``analyze.evaluate.evaluation``); hooks: ``[{"layer", "unit", "expert", "site", "width"}]``
            (``analyze.moe_sparsifier.MoEHookPoint.describe``), in the lists' order; meta: columns repeated
            on every row.

    Returns:
        polars DataFrame: meta, value, layer, unit, expert, hook, width, n_positions (counted input
        positions), rows (the rows the hook saw: routed to the expert), load (rows / n_positions; a layer's
        experts sum to top-k), sparsity (zeroed / (rows · width), the authors' count; NaN without rows).
    """
    import polars as pl

    out = []
    for (value,), g in windows.group_by("value", maintain_order=True):
        zeroed = np.asarray(g["hook_sparse"].to_list(), dtype=np.int64).sum(axis=0)
        rows = np.asarray(g["hook_rows"].to_list(), dtype=np.int64).sum(axis=0)
        positions = int(g["n_valid"].sum())
        for h, hook in enumerate(hooks):
            n = int(rows[h])
            out.append(dict(meta, value=float(value), layer=int(hook["layer"]), unit=hook["unit"],
                            expert=int(hook["expert"]), hook=hook["site"], width=int(hook["width"]),
                            n_positions=positions, rows=n, load=n / positions if positions else math.nan,
                            sparsity=float(zeroed[h] / (n * hook["width"])) if n else math.nan))
    return pl.DataFrame(out, schema_overrides=dict(run_id=pl.String)).sort(
        ["value", "layer", "unit", "expert", "hook"], descending=[True, False, False, False, False])
