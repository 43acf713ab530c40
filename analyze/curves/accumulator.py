"""Streaming sums of one (layer, target, rule) over the blocks of a run: the rows of a curves result."""

from __future__ import annotations

import math

import numpy as np
import torch

# Per-token relative error quantiles come from a log-spaced histogram (bounded memory):
# 100 bins per decade from 1e-6 to 1e2; a quantile is reported as its bin's upper edge (at most 2.3 %
# above the exact value), or 0 below 1e-6.
_ERR_BINS = np.logspace(-6, 2, 801)


class Accumulator:
    """Streaming sums for one (layer, target, rule): per grid value, exact sparsity histogram over
    kept counts, sums of kept L1 fraction, error and cosine, and a log histogram of errors."""

    def __init__(self, n_values: int, width: int):
        self.width = width
        self.n = 0
        self.count_hist = np.zeros((n_values, width + 1), dtype=np.int64)
        self.kept_l1 = np.zeros(n_values)
        self.err = np.zeros(n_values)
        self.cos = np.zeros(n_values)
        self.err_in = np.zeros(n_values)
        self.err_hist = np.zeros((n_values, len(_ERR_BINS) + 1), dtype=np.int64)
        self.has_err = False

    def add(self, counts: torch.Tensor, kept_l1: torch.Tensor, errs: dict | None, x_norm: torch.Tensor | None) -> None:
        c = counts.numpy()
        self.n += c.shape[0]
        for j in range(c.shape[1]):
            self.count_hist[j] += np.bincount(c[:, j], minlength=self.width + 1)
        self.kept_l1 += kept_l1.sum(0).numpy()
        if errs is not None:
            self.has_err = True
            rel = errs["rel_err"].numpy()
            self.err += rel.sum(0)
            self.cos += errs["cos"].sum(0).numpy()
            for j in range(rel.shape[1]):
                self.err_hist[j] += np.bincount(np.searchsorted(_ERR_BINS, rel[:, j]), minlength=len(_ERR_BINS) + 1)
            if x_norm is not None:
                dn = errs["dropped_norm"]
                self.err_in += (dn / x_norm.clamp_min(1e-30)[:, None]).sum(0).numpy()
            else:
                self.err_in[:] = np.nan

    def rows(self) -> list[dict]:
        out = []
        sparsity_of_count = 1.0 - np.arange(self.width + 1) / self.width
        for j in range(self.count_hist.shape[0]):
            hist = self.count_hist[j]
            mean_sparsity = float((hist * sparsity_of_count).sum() / max(self.n, 1))
            # quantiles of per-token sparsity: exact, from the histogram of kept counts
            order = np.argsort(sparsity_of_count, kind="stable")
            cum = np.cumsum(hist[order])
            q = {p: float(sparsity_of_count[order][np.searchsorted(cum, p * self.n)]) if self.n else math.nan
                 for p in (0.1, 0.5, 0.9)}
            r = dict(n_tokens=self.n, sparsity_mean=mean_sparsity, sparsity_p10=q[0.1], sparsity_p50=q[0.5],
                     sparsity_p90=q[0.9], kept_l1_mean=float(self.kept_l1[j] / max(self.n, 1)))
            if self.has_err:
                ecum = np.cumsum(self.err_hist[j])
                k = int(np.searchsorted(ecum, 0.9 * self.n))
                r |= dict(rel_err_mean=float(self.err[j] / self.n), cos_mean=float(self.cos[j] / self.n),
                          rel_err_p90=0.0 if k == 0 else float(_ERR_BINS[min(k, len(_ERR_BINS) - 1)]),
                          err_vs_input_mean=float(self.err_in[j] / self.n))
            else:
                r |= dict(rel_err_mean=math.nan, cos_mean=math.nan, rel_err_p90=math.nan, err_vs_input_mean=math.nan)
            out.append(r)
        return out
