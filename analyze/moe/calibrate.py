"""TEAL-style thresholds for mixture-of-experts layers: one tau per layer, unit and grid value, calibrated on the
calibration windows (``analyze.curves.config.CALIBRATION_EVERY``) as for dense layers (docs/paper-notes.md §8).

Routed experts share one tau per layer (their rows pooled); the shared expert and a dense layer have their own.
``input`` (and the input of ``all-inputs``) is the same vector for every unit, so its tau is the layer's; the
intermediate of ``all-inputs`` is calibrated on h recomputed from the input sparsified at each value.
"""

from __future__ import annotations

import numpy as np
import torch

from actsparse.analyze.curves.config import CurveConfig
from actsparse.analyze.moe.blocks import MoEBlock
from actsparse.analyze.moe.grid import RANK_SITE
from actsparse.analyze.rules import calibrate_threshold, threshold_mask
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.expert_ffn import routed_sites, shared_sites


def calibrate(run, cfg: CurveConfig, layer: int, calib_rows: np.ndarray, weights) -> dict:
    """``{(layer, target, "threshold", unit): [tau per grid value]}`` for every target of ``cfg`` and unit of the
    layer (all-inputs also ``(layer, "all-inputs/h", "threshold", unit)``), from the calibration tokens
    ``calib_rows`` (token indices of the run).

    Raises:
        ActsparseError: no calibration tokens.
    """
    if not len(calib_rows):
        raise ActsparseError("threshold rule: no calibration windows (need at least 4 windows in the run)")
    lo, hi = int(calib_rows.min()), int(calib_rows.max()) + 1
    blk = MoEBlock(run, layer, lo, hi, torch.from_numpy(calib_rows - lo), weights)
    grid = cfg.grid("threshold")
    units = [blk.unit] + (["shared"] if blk.has_shared else [])
    taus = {}
    for target in cfg.targets:
        for unit in units:
            shared = unit == "shared"
            if target in ("input", "all-inputs"):
                a = blk.input()
            else:
                a = blk.shared(RANK_SITE[target]) if shared else blk.routed(RANK_SITE[target])
            taus[(layer, target, "threshold", unit)] = [calibrate_threshold(a, s) for s in grid]
            if target == "all-inputs":
                x, hs = blk.input(), []
                for tau, s in zip(taus[(layer, target, "threshold", unit)], grid):
                    xs = x * threshold_mask(x, tau)
                    h = (shared_sites(xs, blk.weights, run.moe.activation)["shared_intermediate"] if shared
                         else routed_sites(xs, blk.expert_ids, blk.weights, run.moe.activation)["intermediate"])
                    hs.append(calibrate_threshold(h, s))
                taus[(layer, "all-inputs/h", "threshold", unit)] = hs
    return taus
