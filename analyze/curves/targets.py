"""One target over one block: kept counts, kept L1 mass and FFN-output error for every value of every rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from actsparse.analyze import rules as R
from actsparse.analyze import sweep as S
from actsparse.analyze.curves.blocks import SiteBlock
from actsparse.analyze.curves.config import LINEAR, CurveConfig
from actsparse.analyze.linear_errors import linear_target_errors
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.ffn import ffn_recompute, linear


def _intermediate(x: torch.Tensor, w, activation: str) -> torch.Tensor:
    """h = act(W_g x) * W_u x (GLU) or act(W_g x) (non-GLU), [tokens, d_ff]."""
    return ffn_recompute(w, activation, x, ("intermediate",))["intermediate"]


def _values_for(rule: str, grid: Sequence[float], taus: dict | None, key) -> list[float]:
    return [taus[key][j] for j in range(len(grid))] if rule == "threshold" else list(grid)


def rank_block(a: torch.Tensor, rule: str, values: Sequence[float], power: float = 1.0, *, with_order: bool):
    """Kept counts int64 [T, P], kept L1 fractions float64 [T, P] and (if asked) the ascending rank order
    int64 or int32 [T, W] of a block ``a`` [T, W] (as ``linear_errors.linear_target_errors`` takes it) for
    every value of ``rule`` (threshold: the taus).

    Plain top-p on 16-bit values (stored bf16, or float32 holding them) takes the histogram path
    (``sweep.topp_histogram``: no sort, the order is a counting partition by the thresholds found);
    everything else one ``sort_block`` of the float32 values (the thresholds of max-p and threshold are
    float32 ones).
    """
    if rule == "top-p" and power == 1.0:
        fast = S.topp_histogram(a, values, with_order=with_order)
        if fast is not None:
            return fast if with_order else (*fast, None)
    sb = S.sort_block(a.float(), power, with_order=with_order)
    counts = S.kept_counts(rule, sb, values)
    return counts, S.kept_l1(sb, counts), (sb.order.flip(-1) if with_order else None)


def _ranked(sites: SiteBlock, site: str, rule: str, cfg: CurveConfig, taus: dict, key, with_order: bool):
    """:func:`rank_block` of ``sites[site]`` (as stored where it is) for every value of ``rule``'s grid."""
    power = cfg.power if rule == "top-p" else 1.0
    values = _values_for(rule, cfg.grid(rule), taus, key)
    a = sites.native(site) if sites.stored(site) and rule == "top-p" and power == 1.0 else sites[site]
    return rank_block(a, rule, values, power, with_order=with_order)


def target_block(target: str, sites: SiteBlock, cfg: CurveConfig, taus: dict, layer: int, emit) -> None:
    """Compute every (rule, value) of one target over one block of tokens; ``emit(key, counts, kept_l1,
    errs, x_norm)`` receives the per-token results for the accumulators (``Accumulator.add``)."""
    w, activation = sites.w, sites.run.activation
    x_norm = sites["input"].norm(dim=1) if cfg.with_error and sites.stored("input") else None
    if target in LINEAR:
        rank_site = {"intermediate": "intermediate", "gate": "act", "up": "up"}[target]
        for rule in cfg.rules:
            counts, kept, order = _ranked(sites, rank_site, rule, cfg, taus, (layer, target), with_order=cfg.with_error)
            # the stored dtype when stored: widened block by block inside, not as a whole float32 copy
            h = sites.native("intermediate") if sites.stored("intermediate") else sites["intermediate"]
            errs = linear_target_errors(h, order, counts, w["down"]) if cfg.with_error else None
            emit((layer, target, rule), counts, kept, errs, x_norm)
        return
    if not cfg.with_error and target == "input":
        for rule in cfg.rules:
            counts, kept, _ = _ranked(sites, "input", rule, cfg, taus, (layer, target), with_order=False)
            emit((layer, target, rule), counts, kept, None, None)
        return
    x = sites["input"]
    y = linear(_intermediate(x, w, activation), w["down"])
    y_norm = y.norm(dim=1)
    for rule in cfg.rules:
        power = cfg.power if rule == "top-p" else 1.0
        values = _values_for(rule, cfg.grid(rule), taus, (layer, target))
        counts, kept, _ = _ranked(sites, "input", rule, cfg, taus, (layer, target), with_order=False)
        rel, cos, dn, h_counts, h_l1 = [], [], [], [], []
        for j, v in enumerate(values):
            mask = R.rule_mask(rule, x, v, power=power) if rule != "threshold" else R.threshold_mask(x, v)
            h2 = _intermediate(x * mask, w, activation)
            if target == "all-inputs":
                hv = values[j] if rule != "threshold" else taus[(layer, "all-inputs/h")][j]
                sbh = S.sort_block(h2, power, with_order=False)
                hc = S.kept_counts(rule, sbh, [hv])
                h_counts.append(hc[:, 0])
                h_l1.append(S.kept_l1(sbh, hc)[:, 0])
                h2 = h2 * (R.rule_mask(rule, h2, hv, power=power) if rule != "threshold" else R.threshold_mask(h2, hv))
            y2 = linear(h2, w["down"])
            d = (y - y2).norm(dim=1).double()
            dn.append(d)
            rel.append(torch.where(y_norm > 0, d / y_norm.double().clamp_min(1e-30), torch.zeros_like(d)))
            cos.append(torch.nn.functional.cosine_similarity(y, y2, dim=1).double())
        errs = dict(rel_err=torch.stack(rel, 1), cos=torch.stack(cos, 1), dropped_norm=torch.stack(dn, 1))
        emit((layer, target, rule), counts, kept, errs, x_norm)
        if target == "all-inputs":
            emit((layer, "all-inputs/h", rule), torch.stack(h_counts, 1), torch.stack(h_l1, 1), None, None)


def calibrate(run, cfg: CurveConfig, layer: int, calib_rows: np.ndarray, w) -> dict:
    """TEAL-style per-layer thresholds: tau reaching each target sparsity on the calibration windows.

    Returns ``{(layer, target): [tau per grid value]}`` (all-inputs also ``(layer, "all-inputs/h")``).
    """
    if not len(calib_rows):
        raise ActsparseError("threshold rule: no calibration windows (need at least 4 windows in the run)")
    taus = {}
    lo, hi = int(calib_rows.min()), int(calib_rows.max()) + 1
    sites = SiteBlock(run, layer, lo, hi, torch.from_numpy(calib_rows - lo), w)
    grid = cfg.grid("threshold")
    for target in cfg.targets:
        a = sites[{"input": "input", "all-inputs": "input", "intermediate": "intermediate", "gate": "act",
                   "up": "up"}[target]]
        taus[(layer, target)] = [R.calibrate_threshold(a, s) for s in grid]
        if target == "all-inputs":
            x = sites["input"]
            hs = []
            for j, s in enumerate(grid):
                h2 = _intermediate(R.threshold_mask(x, taus[(layer, target)][j]) * x, w, run.activation)
                hs.append(R.calibrate_threshold(h2, s))
            taus[(layer, "all-inputs/h")] = hs
    return taus
