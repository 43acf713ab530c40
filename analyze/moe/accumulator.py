"""Streaming sums per expert of one (layer, target, rule) over the blocks of a run: the rows of an ``expert_curves``
result (``actsparse.core.format.EXPERT_CURVES``)."""

from __future__ import annotations

import math

import numpy as np
import torch


class UnitAccumulator:
    """Per unit (``expert``, ``shared``, ``dense``) and expert id: the rows counted, the entries zeroed per grid
    value (over the target's hook sites), the sum of the rows' own output error per grid value, and the sum of
    their scales in the block output (routing weight, shared gate, 1)."""

    def __init__(self, n_experts: int, n_values: int):
        self.n_values = n_values
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.n_experts = n_experts
        self.has_err = False

    def _of(self, unit: str) -> dict[str, np.ndarray]:
        if unit not in self.sums:
            n = self.n_experts if unit == "expert" else 1
            self.sums[unit] = dict(rows=np.zeros(n, np.int64), zeroed=np.zeros((n, self.n_values), np.int64),
                                   err=np.zeros((n, self.n_values)), weight=np.zeros(n))
        return self.sums[unit]

    def add(self, unit: str, experts: torch.Tensor, zeroed: torch.Tensor, own_err: torch.Tensor | None,
            weight: torch.Tensor) -> None:
        """Add R rows: their experts int64 [R], entries zeroed int64 [R, P], own output error float64 [R, P] (or
        None without errors) and scales [R]."""
        s, ids = self._of(unit), experts.numpy()
        s["rows"] += np.bincount(ids, minlength=len(s["rows"]))
        np.add.at(s["zeroed"], ids, zeroed.numpy())
        np.add.at(s["weight"], ids, weight.double().numpy())
        if own_err is not None:
            self.has_err = True
            np.add.at(s["err"], ids, own_err.numpy())

    def rows(self, values, width_of: dict[str, int], n_tokens: int) -> list[dict]:
        """One row per unit, expert and grid value: ``unit``, ``expert`` (-1 for shared and dense), ``width``
        (entries per row over the hook sites), ``rows``, ``load`` (rows per counted token; the experts of a
        layer sum to k), ``weight_mean``, ``sparsity`` (zeroed / (rows · width), the authors' count) and
        ``rel_err_mean`` (the mean own output error of its rows; NaN without errors or rows)."""
        out = []
        for unit, s in self.sums.items():
            width = width_of[unit]
            for e in range(len(s["rows"])):
                n = int(s["rows"][e])
                for j, v in enumerate(values):
                    out.append(dict(value=float(v), unit=unit, expert=e if unit == "expert" else -1, width=width,
                                    rows=n, load=n / n_tokens if n_tokens else math.nan,
                                    weight_mean=s["weight"][e] / n if n else math.nan,
                                    sparsity=s["zeroed"][e, j] / (n * width) if n else math.nan,
                                    rel_err_mean=s["err"][e, j] / n if n and self.has_err else math.nan))
        return out
