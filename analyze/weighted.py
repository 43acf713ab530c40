"""Weight-aware rules: WINA's score and the CETT threshold, from a layer's stored FFN weights.

* **WINA** (Chen et al. 2025, arXiv 2505.19427): rank entry i of a vector by ``|x_i| * ||W[:, i]||_2``, W the
  weight that consumes the vector, then keep the top k (``wina-top-k``, value = fraction kept) or the top p of
  the score's L1 mass (``wina-top-p``). The masks are ``analyze.rules.wina_mask``; which W is
  :func:`consumer_norms`'s table:

  =============  ==================================================================================
  target         W (the weight whose columns the dropped entries would multiply)
  =============  ==================================================================================
  input          W_gate and W_up stacked ([2 d_ff, d_model]; W_gate alone without an up projection)
  intermediate   W_down
  gate, up       W_down: dropping entry i of act(W_g x) or of W_u x drops h_i, which W_down consumes
  =============  ==================================================================================

* **CETT** (Sparsing Law, Luo et al. 2024, arXiv 2411.02335: "cumulative errors of tail truncation"): one
  threshold tau per layer on |v|, the largest whose mean relative FFN-output error ``||y - y'|| / ||y||`` over
  the calibration windows stays at the target (the rule value). Calibrated like the ``threshold`` rule
  (docs/paper-notes.md §8: every ``CALIBRATION_EVERY``-th window calibrates, the others are evaluated), then
  applied as a fixed threshold. :func:`calibrate_cett` evaluates the error at a grid of candidate thresholds
  (quantiles of |v|; one ``linear_target_errors`` pass for the linear targets, one FFN recomputation per
  candidate for ``input``) and interpolates the quantile between the two candidates that bracket the target.
  For ``all-inputs`` each hook is calibrated to the target on its own (x against the dense h, then h against W_down).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from actsparse.analyze.linear_errors import linear_target_errors
from actsparse.core.errors import ActsparseError

# Candidate quantiles of |v| at which the CETT error is measured (then interpolated between).
CETT_CANDIDATES = 65
# Calibration tokens per layer: linear targets take one gather-accumulate pass for all candidates; input
# needs one FFN recomputation per candidate, so it uses fewer tokens.
CETT_TOKENS = 1024
CETT_TOKENS_INPUT = 256


def consumer_norms(weights: Mapping[str, torch.Tensor], site: str) -> torch.Tensor:
    """Column norms ``||W[:, i]||_2`` of the weight that consumes a site's vector: float32 [width].

    weights: a layer's FFN weights in nn.Linear layout (``gate`` [d_ff, d_model], ``up``, ``down``
    [d_model, d_ff]); site: ``input`` (norms over the stacked W_gate and W_up) or one of ``intermediate``,
    ``act``, ``gate``, ``up`` (norms of W_down's columns). See the module table.

    Raises:
        ActsparseError: a site with no consuming FFN weight.
    """
    if site == "input":
        sq = weights["gate"].float().pow(2).sum(0)
        if "up" in weights:
            sq = sq + weights["up"].float().pow(2).sum(0)
        return sq.sqrt()
    if site in ("intermediate", "act", "gate", "up"):
        return weights["down"].float().norm(dim=0)
    raise ActsparseError(f"no FFN weight consumes site {site!r}")


def quantile_taus(a: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Thresholds reaching sparsities ``qs`` on the pooled |a|, as ``rules.calibrate_threshold`` gives one
    each (the (k+1)-th smallest |a|, k = round(q * n); 0 at k = 0, just above max|a| at k = n), from one sort."""
    from actsparse.analyze.rules import calibrate_threshold

    s = a.detach().reshape(-1).abs().float().sort().values
    n = s.numel()
    out = []
    for q in qs:
        k = int(np.floor(float(q) * n + 0.5))
        out.append(float(s[k]) if 0 < k < n else calibrate_threshold(a, float(q)))
    return out


def _linear_error_curve(rank: torch.Tensor, h: torch.Tensor, w_down: torch.Tensor, taus: list[float]) -> np.ndarray:
    """Mean relative FFN-output error of dropping h's entries where |rank| < tau, for every tau: float64 [C]."""
    from actsparse.analyze.rules import threshold_in_dtype

    s = rank.abs()
    thr = torch.stack([threshold_in_dtype(t, s.dtype) for t in taus]).expand(s.shape[0], len(taus))
    ascending = torch.from_numpy(np.argsort(s.float().numpy(), axis=1, kind="stable"))
    below = torch.searchsorted(s.gather(1, ascending), thr.contiguous())  # entries < tau per token
    counts = s.shape[1] - below
    rel = linear_target_errors(h, ascending, counts, w_down)["rel_err"]
    return rel.mean(0).numpy()


def _input_error_curve(x: torch.Tensor, weights, activation: str, taus: list[float]) -> np.ndarray:
    """Mean relative FFN-output error of dropping x's entries where |x| < tau, for every tau: float64 [C]."""
    from actsparse.analyze.rules import threshold_mask
    from actsparse.pipeline.ffn import ffn_recompute

    y = ffn_recompute(weights, activation, x, ("output",))["output"]
    y_norm = y.norm(dim=1).double()
    out = []
    for tau in taus:
        y2 = ffn_recompute(weights, activation, x * threshold_mask(x, tau), ("output",))["output"]
        d = (y - y2).norm(dim=1).double()
        out.append(float(torch.where(y_norm > 0, d / y_norm.clamp_min(1e-30), torch.zeros_like(d)).mean()))
    return np.asarray(out)


def calibrate_cett(site: str, a: torch.Tensor, targets: Sequence[float], *, weights: Mapping[str, torch.Tensor],
                   activation: str, h: torch.Tensor | None = None) -> list[float]:
    """Per-layer CETT thresholds: for each target relative error, the tau on |a| reaching it (module docstring).

    site: ``input`` (a is x [T, d_model]; the error is the recomputed FFN output's) or a d_ff site ranking h's
    entries (``intermediate``, ``act``, ``up``: a [T, d_ff], h the intermediate [T, d_ff], default a itself);
    targets: relative errors in [0, 1]; weights, activation: the layer's stored FFN. Returns one tau per
    target (a threshold for ``rules.threshold_mask``). The error is made monotone in tau (running max)
    before the bracketing, and the sparsity quantile is interpolated linearly between candidates.

    Raises:
        ActsparseError: a target outside [0, 1] or an empty calibration block.
    """
    if a.shape[0] == 0:
        raise ActsparseError("cett: no calibration tokens")
    for e in targets:
        if not 0.0 <= float(e) <= 1.0:
            raise ActsparseError(f"cett values are target relative errors in [0, 1], got {e}")
    qs = np.linspace(0.0, 1.0, CETT_CANDIDATES)
    if site == "input":
        a = a[:CETT_TOKENS_INPUT]
        taus = quantile_taus(a, qs)
        err = _input_error_curve(a.float(), weights, activation, taus)
    else:
        a = a[:CETT_TOKENS]
        hh = a if h is None else h[:CETT_TOKENS]
        taus = quantile_taus(a, qs)
        err = _linear_error_curve(a, hh, weights["down"], taus)
    err = np.maximum.accumulate(np.nan_to_num(err, nan=np.inf))
    out = []
    for e in targets:
        j = int(np.searchsorted(err, float(e), side="right")) - 1  # last candidate with error <= e
        if j < 0:
            out.append(0.0)
            continue
        if j >= len(qs) - 1:
            out.append(taus[-1])
            continue
        lo, hi = err[j], err[j + 1]
        q = qs[j] + (qs[j + 1] - qs[j]) * ((float(e) - lo) / (hi - lo) if hi > lo else 0.0)
        out.append(quantile_taus(a, [q])[0])
    return out
