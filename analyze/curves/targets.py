"""One target over one block: kept counts, kept L1 mass and FFN-output error for every value of every rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from actsparse.analyze import rules as R
from actsparse.analyze import sweep as S
from actsparse.analyze.curves.blocks import SiteBlock
from actsparse.analyze.curves.config import LINEAR, CurveConfig
from actsparse.analyze.linear_errors import linear_target_errors
from actsparse.analyze.weighted import calibrate_cett, consumer_norms
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import CALIBRATED_RULES, WEIGHTED_RULES
from actsparse.pipeline.ffn import ffn_recompute, linear

BASE_RULE = {"wina-top-k": "top-k", "wina-top-p": "top-p"}  # the rule each WINA rule applies to its score


def _intermediate(x: torch.Tensor, w, activation: str) -> torch.Tensor:
    """h = act(W_g x) * W_u x (GLU) or act(W_g x) (non-GLU), [tokens, d_ff]."""
    return ffn_recompute(w, activation, x, ("intermediate",))["intermediate"]


def _values_for(rule: str, grid: Sequence[float], taus: dict | None, key) -> list[float]:
    """The values a rule is applied with: its grid, or for a calibrated rule the per-layer taus of ``key``
    ``(layer, target, rule)``."""
    return [taus[key][j] for j in range(len(grid))] if rule in CALIBRATED_RULES else list(grid)


def ranked_dtype(sites: SiteBlock, site: str) -> torch.Tensor:
    """A site's block in the dtype the model held it in, as the authors rank it (docs/paper-notes.md §1.2):
    a stored site in its stored dtype; a recomputed one (e.g. ``act`` from a stored ``gate``) rounded to the
    run's compute dtype when that is 16-bit, else float32."""
    if sites.stored(site):
        return sites.native(site)
    dtype = getattr(torch, sites.run.manifest.compute_dtype, torch.float32)
    return sites[site].to(dtype) if dtype in (torch.bfloat16, torch.float16) else sites[site]


def rank_block(a: torch.Tensor, rule: str, values: Sequence[float], power: float = 1.0, *, with_order: bool,
               norms: torch.Tensor | None = None):
    """Kept counts int64 [T, P], kept L1 fractions float64 [T, P] and (if asked) the ascending rank order
    int64 or int32 [T, W] of a block ``a`` [T, W] (as ``linear_errors.linear_target_errors`` takes it) for
    every value of ``rule`` (threshold: the taus).

    The block is ranked in the dtype it comes in (``ranked_dtype``: the dtype the model held it in), so
    thresholds (max-p's ``p * max``, top-p's ``sorted[idx]``, a calibrated tau) are compared in that dtype,
    as the authors do. Plain top-p on a 16-bit block takes the histogram path (``sweep.topp_histogram``: no
    sort, the order is a counting partition by the thresholds found); the WINA rules sort by
    ``rules.wina_score`` with ``norms``, the consuming weight's column norms float32 [W] (kept L1 stays
    |a|'s mass); everything else one ``sort_block``.

    Raises:
        ActsparseError: a WINA rule without ``norms``.
    """
    if rule == "top-p" and power == 1.0:
        fast = S.topp_histogram(a, values, with_order=with_order)
        if fast is not None:
            return fast if with_order else (*fast, None)
    if rule in WEIGHTED_RULES:
        if norms is None:
            raise ActsparseError(f"rule {rule} needs the consuming weight's column norms")
        sb = S.sort_block(R.wina_score(a, norms), with_order=True)
        l1_cum = a.abs().gather(1, sb.order).cumsum(dim=-1, dtype=torch.float64)
        sb = dataclasses.replace(sb, l1_cum=l1_cum)
        counts = S.kept_counts(BASE_RULE[rule], sb, values)
        return counts, S.kept_l1(sb, counts), (sb.order.flip(-1) if with_order else None)
    sb = S.sort_block(a, power, with_order=with_order)
    counts = S.kept_counts("threshold" if rule in CALIBRATED_RULES else rule, sb, values)
    return counts, S.kept_l1(sb, counts), (sb.order.flip(-1) if with_order else None)


def _ranked(sites: SiteBlock, site: str, rule: str, cfg: CurveConfig, taus: dict, key, with_order: bool):
    """:func:`rank_block` of ``sites[site]`` in the dtype the model held it in, for every value of ``rule``'s
    grid (a calibrated rule: the taus of ``key``)."""
    power = cfg.power if rule == "top-p" else 1.0
    values = _values_for(rule, cfg.grid(rule), taus, key)
    norms = consumer_norms(sites.w, site) if rule in WEIGHTED_RULES else None
    return rank_block(ranked_dtype(sites, site), rule, values, power, with_order=with_order, norms=norms)


def _mask(rule: str, a: torch.Tensor, value: float, power: float, norms: torch.Tensor) -> torch.Tensor:
    """Keep mask of one rule value (a calibrated rule's value is its tau)."""
    if rule in CALIBRATED_RULES:
        return R.threshold_mask(a, value)
    return R.rule_mask(rule, a, value, power=power, norms=norms if rule in WEIGHTED_RULES else None)


def target_block(target: str, sites: SiteBlock, cfg: CurveConfig, taus: dict, layer: int, emit) -> None:
    """Compute every (rule, value) of one target over one block of tokens; ``emit(key, counts, kept_l1,
    errs, x_norm)`` receives the per-token results for the accumulators (``Accumulator.add``)."""
    w, activation = sites.w, sites.run.activation
    x_norm = sites["input"].norm(dim=1) if cfg.with_error and sites.stored("input") else None
    if target in LINEAR:
        rank_site = {"intermediate": "intermediate", "gate": "act", "up": "up"}[target]
        for rule in cfg.rules:
            counts, kept, order = _ranked(sites, rank_site, rule, cfg, taus, (layer, target, rule),
                                          with_order=cfg.with_error)
            # the stored dtype when stored: widened block by block inside, not as a whole float32 copy
            h = sites.native("intermediate") if sites.stored("intermediate") else sites["intermediate"]
            errs = linear_target_errors(h, order, counts, w["down"]) if cfg.with_error else None
            emit((layer, target, rule), counts, kept, errs, x_norm)
        return
    if not cfg.with_error and target == "input":
        for rule in cfg.rules:
            counts, kept, _ = _ranked(sites, "input", rule, cfg, taus, (layer, target, rule), with_order=False)
            emit((layer, target, rule), counts, kept, None, None)
        return
    x, x_ranked = sites["input"], ranked_dtype(sites, "input")
    y = linear(_intermediate(x, w, activation), w["down"])
    y_norm = y.norm(dim=1)
    weighted = any(r in WEIGHTED_RULES for r in cfg.rules)
    x_norms = consumer_norms(w, "input") if weighted else None
    h_norms = consumer_norms(w, "intermediate") if weighted and target == "all-inputs" else None
    for rule in cfg.rules:
        power = cfg.power if rule == "top-p" else 1.0
        values = _values_for(rule, cfg.grid(rule), taus, (layer, target, rule))
        counts, kept, _ = _ranked(sites, "input", rule, cfg, taus, (layer, target, rule), with_order=False)
        rel, cos, dn, h_counts, h_l1 = [], [], [], [], []
        for j, v in enumerate(values):
            h2 = _intermediate(x * _mask(rule, x_ranked, v, power, x_norms), w, activation)
            if target == "all-inputs":
                hv = values[j] if rule not in CALIBRATED_RULES else taus[(layer, "all-inputs/h", rule)][j]
                h_mask = _mask(rule, h2, hv, power, h_norms)
                hc = h_mask.sum(1, keepdim=True)
                h_counts.append(hc[:, 0])
                l1 = h2.abs().sum(1, dtype=torch.float64)
                kept_h = (h2.abs() * h_mask).sum(1, dtype=torch.float64)
                h_l1.append(torch.where(l1 > 0, kept_h / l1.clamp_min(1e-300), torch.ones_like(l1)))
                h2 = h2 * h_mask
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
    """Per-layer thresholds of the calibrated rules on the calibration windows: ``threshold`` (TEAL-style:
    tau reaching each target sparsity) and ``cett`` (tau reaching each target relative FFN-output error,
    ``analyze.weighted.calibrate_cett``).

    Returns ``{(layer, target, rule): [tau per grid value]}`` (all-inputs also ``(layer, "all-inputs/h", rule)``).
    """
    if not len(calib_rows):
        raise ActsparseError("calibrated rules: no calibration windows (need at least 4 windows in the run)")
    taus = {}
    lo, hi = int(calib_rows.min()), int(calib_rows.max()) + 1
    sites = SiteBlock(run, layer, lo, hi, torch.from_numpy(calib_rows - lo), w)
    for rule in (r for r in cfg.rules if r in CALIBRATED_RULES):
        grid = cfg.grid(rule)
        for target in cfg.targets:
            site = {"input": "input", "all-inputs": "input", "intermediate": "intermediate", "gate": "act",
                    "up": "up"}[target]
            a = ranked_dtype(sites, site)
            if rule == "threshold":
                taus[(layer, target, rule)] = [R.calibrate_threshold(a, s) for s in grid]
            else:
                taus[(layer, target, rule)] = calibrate_cett(site, a, grid, weights=w, activation=run.activation,
                                                             h=sites["intermediate"] if site != "input" else None)
            if target == "all-inputs":
                x = sites["input"]
                if rule == "threshold":
                    hs = [R.calibrate_threshold(_intermediate(R.threshold_mask(x, tau) * x, w, run.activation), s)
                          for tau, s in zip(taus[(layer, target, rule)], grid)]
                else:  # each hook on its own: h's tau against the dense h (module docstring of analyze.weighted)
                    hs = calibrate_cett("intermediate", _intermediate(x, w, run.activation), grid, weights=w,
                                        activation=run.activation)
                taus[(layer, "all-inputs/h", rule)] = hs
    return taus
