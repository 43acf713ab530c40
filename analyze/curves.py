"""Offline (open-loop) sparsity curves, simulated-sparsification error and critical sparsity.

Everything the paper sweeps by re-running the model once per threshold, computed from one stored pass:
for each run x layer x target x rule x grid value, the sparsity the rule induces on the stored dense
activations and the error it causes in that layer's FFN output, recomputed from the stored tensors
and the stored FFN weights. "Open-loop": one layer at a time against its dense stored inputs
(paper.md §8); closed-loop numbers come from ``analyze.evaluate``.

Targets (paper.md §1.1) and what they need (stored, or recomputed from ``input`` and the weights):

=============  ==========================  ===============================================================
target         ranks by                    output with the target sparsified
=============  ==========================  ===============================================================
input          |x|                         W_d(act(W_g(m*x)) * W_u(m*x))      (per grid value, nonlinear)
gate           |act(gate)|                 W_d((m*g) * u) = y - W_d((1-m)*h)  (linear: one-pass sweep)
up             |up|                        W_d(g * (m*u)) = y - W_d((1-m)*h)  (linear: one-pass sweep)
intermediate   |h|                         W_d(m*h)                           (linear: one-pass sweep)
all-inputs     |x|, then |h'|              W_d(m' * h'), h' from m*x          (per grid value)
=============  ==========================  ===============================================================

Linear targets use ``analyze.sweep``: one pass per token (a bit-pattern histogram for top-p on stored
bf16, else a sort) serves every grid value, and every value's error comes from one gather-accumulate of
the dropped part in rank order (the multiply-adds of one matmul).
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from actsparse.errors import ActsparseError
from analyze import rules as R
from analyze import sweep as S
from actsparse.vocab import TARGETS
from pipeline import store as fmt

LINEAR = ("gate", "up", "intermediate")
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "top-p": R.DEFAULT_TOPP_GRID,
    # top-k: fraction kept; max-p: fraction of the max; threshold: target sparsity of the calibration
    "top-k": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05, 0.02),
    "max-p": (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5),
    "threshold": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95),
}
# Offline critical sparsity: the largest model-level sparsity whose mean relative FFN-output error
# stays <= this. Chosen against closed-loop runs (README "Results"): with 0.1 the open-loop value falls
# inside, or at the upper edge of, the closed-loop 99%-accuracy interval for intermediate and input on
# both packaged models; it is optimistic for gate and up.
DEFAULT_TOLERANCE = 0.1
# Per-token relative error quantiles come from a log-spaced histogram (bounded memory):
# 100 bins per decade from 1e-6 to 1e2; a quantile is reported as its bin's upper edge (at most 2.3 %
# above the exact value), or 0 below 1e-6.
_ERR_BINS = np.logspace(-6, 2, 801)
# Blocks processed concurrently, one torch thread each: one more than the cores, as zarr serialises
# part of every read (measured on 2 cores: 3 workers sweep 15% faster than 2); at most 8 (memory).
MAX_WORKERS = 8
# Tokens per streamed block: four stored chunks per read, which zarr decodes concurrently (measured
# 15-20% faster sweeps than one chunk per block on SmolLM2-135M); ~150 MB per block in flight.
DEFAULT_BLOCK_TOKENS = 4096
CALIBRATION_EVERY = 4  # threshold rule: every 4th window calibrates tau, the others are evaluated
ANALYSIS_VERSION = 1


@dataclass(frozen=True)
class CurveConfig:
    """What determines a curves result (hashed into its ``analysis_id``)."""

    targets: tuple[str, ...] = ("intermediate",)
    rules: tuple[str, ...] = ("top-p",)
    grids: dict = field(default_factory=dict)
    power: float = 1.0
    include_special: bool = False
    with_error: bool = True
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def grid(self, rule: str) -> tuple[float, ...]:
        return tuple(self.grids.get(rule) or DEFAULT_GRIDS[rule])

    def validate(self) -> None:
        for t in self.targets:
            if t not in TARGETS:
                raise ActsparseError(f"unknown target '{t}' (choose {', '.join(TARGETS)})")
        for r in self.rules:
            if r not in R.RULES:
                raise ActsparseError(f"unknown rule '{r}' (choose {', '.join(R.RULES)})")
            grid = self.grid(r)
            if not grid:
                raise ActsparseError(f"empty grid for rule {r}")
            for v in grid:
                if r == "threshold":
                    if not 0.0 <= v <= 1.0:
                        raise ActsparseError(f"threshold grid values are target sparsities in [0, 1], got {v}")
                else:
                    R.check_rule_value(r, v, self.power if r == "top-p" else 1.0)
        if not self.targets or not self.rules:
            raise ActsparseError("need at least one target and one rule")

    def ident(self) -> dict:
        d = asdict(self)
        d["grids"] = {r: list(self.grid(r)) for r in self.rules}
        d.pop("block_tokens")
        return d | dict(version=ANALYSIS_VERSION)


# ---------------------------------------------------------------- accumulators


class _Acc:
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

            def q(p: float) -> float:
                return float(sparsity_of_count[order][np.searchsorted(cum, p * self.n)]) if self.n else math.nan

            r = dict(n_tokens=self.n, sparsity_mean=mean_sparsity, sparsity_p10=q(0.1), sparsity_p50=q(0.5),
                     sparsity_p90=q(0.9), kept_l1_mean=float(self.kept_l1[j] / max(self.n, 1)))
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


# ---------------------------------------------------------------- site access


class _Sites:
    """Blocks of one layer: stored sites (in their stored dtype, or as float32), or float32 tensors
    recomputed from ``input`` and the weights."""

    def __init__(self, run, layer: int, start: int, stop: int, keep: torch.Tensor | None, weights):
        self.run, self.layer, self.start, self.stop, self.keep, self.w = run, layer, start, stop, keep, weights
        self.cache: dict[str, torch.Tensor] = {}
        self.natives: dict[str, torch.Tensor] = {}
        from transformers.activations import ACT2FN

        self.act_fn = ACT2FN[run.activation]

    def stored(self, site: str) -> bool:
        return site in self.run.sites

    def native(self, site: str) -> torch.Tensor:
        """A stored site's selected tokens in the stored dtype (bfloat16 as stored: half the bytes of float32).

        Raises:
            ActsparseError: a non-finite value, naming the site, layer, token and feature.
        """
        if site not in self.natives:
            t = self.run.read(site, self.layer, self.start, self.stop, to="native")
            t = t[self.keep] if self.keep is not None else t
            bad = _first_nonfinite(t)
            if bad is not None:
                raise ActsparseError(f"run {self.run.run_id}: non-finite value in site {site}, layer {self.layer}, "
                                     f"token {self.start + int(self.keep[bad[0]] if self.keep is not None else bad[0])}, "
                                     f"feature {bad[1]}")
            self.natives[site] = t
        return self.natives[site]

    def __getitem__(self, site: str) -> torch.Tensor:
        """A site's selected tokens as float32 [tokens, width]."""
        if site not in self.cache:
            self.cache[site] = self._load(site)
        return self.cache[site]

    def _load(self, site: str) -> torch.Tensor:
        if self.stored(site):
            return self.native(site).float()
        w = self.w
        if site == "act" and self.stored("gate"):
            return self.act_fn(self["gate"])
        if not self.stored("input"):
            raise ActsparseError(f"run {self.run.run_id} has neither site '{site}' nor 'input' to recompute it from")
        x = self["input"]
        if site == "gate":
            return _linear(x, w["gate"], w.get("gate_bias"))
        if site == "up":
            if "up" not in w:
                raise ActsparseError(f"run {self.run.run_id}: the model has no up projection (non-GLU FFN)")
            return _linear(x, w["up"], w.get("up_bias"))
        if site == "act":
            return self.act_fn(self["gate"])
        if site == "intermediate":
            return self["act"] * self["up"] if "up" in w else self["act"]
        if site == "output":
            return _linear(self["intermediate"], w["down"], w.get("down_bias"))
        raise ActsparseError(f"unknown site {site}")


def _first_nonfinite(t: torch.Tensor) -> tuple[int, int] | None:
    """(token, feature) of the first NaN or inf in ``t`` [T, W], or None; 16-bit blocks are checked on
    their bit patterns (all exponent bits set), ~10x faster than ``torch.isfinite``."""
    if t.dtype in (torch.bfloat16, torch.float16):
        from analyze.bitstats import FORMATS

        inf_bits = FORMATS[str(t.dtype).removeprefix("torch.")][2]
        mag = t.view(torch.int16).numpy().view(np.uint16) & np.uint16(0x7FFF)
        if not mag.size or mag.max() < inf_bits:
            return None
        return tuple(int(i) for i in np.argwhere(mag >= inf_bits)[0])
    bad = ~torch.isfinite(t)
    return tuple(bad.nonzero()[0].tolist()) if bad.any() else None


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x @ w.T
    return y + b if b is not None else y


def _ffn(x: torch.Tensor, w: dict, act_fn) -> torch.Tensor:
    """Intermediate h = act(W_g x) * W_u x (GLU) or act(W_g x) (non-GLU), [tokens, d_ff]."""
    g = act_fn(_linear(x, w["gate"], w.get("gate_bias")))
    return g * _linear(x, w["up"], w.get("up_bias")) if "up" in w else g


def required_sites(target: str, run_sites: Sequence[str], glu: bool = True) -> tuple[str, ...]:
    """Stored sites a target needs: its own tensors, or ``input`` to recompute them from the weights.

    Raises:
        ActsparseError: naming the missing site(s).
    """
    have = set(run_sites)
    need = {"input": ("input",), "all-inputs": ("input",), "intermediate": ("intermediate",),
            "gate": ("gate", "intermediate") if "act" not in have else ("act", "intermediate"),
            "up": ("up", "intermediate")}[target]
    if target == "up" and not glu:
        raise ActsparseError("target 'up' needs a GLU FFN (this model has no up projection)")
    if set(need) <= have or "input" in have:
        return need
    missing = sorted(set(need) - have)
    raise ActsparseError(f"target '{target}' needs site(s) {', '.join(missing)} (or 'input' to recompute them); "
                         f"the run stored {', '.join(run_sites)}")


# ---------------------------------------------------------------- the sweep


def _values_for(rule: str, grid: Sequence[float], taus: dict | None, key) -> list[float]:
    return [taus[key][j] for j in range(len(grid))] if rule == "threshold" else list(grid)


def _ranked(sites: _Sites, site: str, rule: str, cfg: CurveConfig, taus: dict, key, with_order: bool):
    """Kept counts int64 [T, P], kept L1 fractions float64 [T, P] and (if asked) the ascending rank
    order int64 or int32 [T, W] of ``sites[site]`` [T, W] (as ``sweep.linear_target_errors`` takes
    it) for every value of ``rule``'s grid.

    Plain top-p on a site stored in 16 bits takes the histogram path (``sweep.topp_histogram`` on
    the stored values: no sort, the order is a counting partition by the thresholds found);
    everything else one ``sort_block`` of the float32 values (the thresholds of max-p and
    threshold are float32 ones).
    """
    power = cfg.power if rule == "top-p" else 1.0
    values = _values_for(rule, cfg.grid(rule), taus, key)
    if rule == "top-p" and power == 1.0:
        a = sites.native(site) if sites.stored(site) else sites[site]
        fast = S.topp_histogram(a, values, with_order=with_order)
        if fast is not None:
            return fast if with_order else (*fast, None)
    sb = S.sort_block(sites[site], power, with_order=with_order)
    counts = S.kept_counts(rule, sb, values)
    return counts, S.kept_l1(sb, counts), (sb.order.flip(-1) if with_order else None)


def _target_block(target: str, sites: _Sites, cfg: CurveConfig, w: dict, taus: dict, layer: int,
                  emit, act_fn) -> None:
    """Compute every (rule, value) of one target over one block of tokens; ``emit(key, counts, kept_l1,
    errs, x_norm)`` receives the per-token results for the accumulators."""
    x_norm = sites["input"].norm(dim=1) if cfg.with_error and sites.stored("input") else None
    if target in LINEAR:
        rank_site = {"intermediate": "intermediate", "gate": "act", "up": "up"}[target]
        for rule in cfg.rules:
            counts, kept, order = _ranked(sites, rank_site, rule, cfg, taus, (layer, target), with_order=cfg.with_error)
            # the stored dtype when stored: widened block by block inside, not as a whole float32 copy
            h = sites.native("intermediate") if sites.stored("intermediate") else sites["intermediate"]
            errs = S.linear_target_errors(h, order, counts, w["down"]) if cfg.with_error else None
            emit((layer, target, rule), counts, kept, errs, x_norm)
        return
    if not cfg.with_error and target == "input":
        for rule in cfg.rules:
            counts, kept, _ = _ranked(sites, "input", rule, cfg, taus, (layer, target), with_order=False)
            emit((layer, target, rule), counts, kept, None, None)
        return
    x = sites["input"]
    y = _linear(_ffn(x, w, act_fn), w["down"], None)
    y_norm = y.norm(dim=1)
    for rule in cfg.rules:
        power = cfg.power if rule == "top-p" else 1.0
        values = _values_for(rule, cfg.grid(rule), taus, (layer, target))
        counts, kept, _ = _ranked(sites, "input", rule, cfg, taus, (layer, target), with_order=False)
        rel, cos, dn, h_counts, h_l1 = [], [], [], [], []
        for j, v in enumerate(values):
            mask = R.rule_mask(rule, x, v, power=power) if rule != "threshold" else R.threshold_mask(x, v)
            h2 = _ffn(x * mask, w, act_fn)
            if target == "all-inputs":
                hv = values[j] if rule != "threshold" else taus[(layer, "all-inputs/h")][j]
                sbh = S.sort_block(h2, power, with_order=False)
                hc = S.kept_counts(rule, sbh, [hv])
                h_counts.append(hc[:, 0])
                h_l1.append(S.kept_l1(sbh, hc)[:, 0])
                h2 = h2 * (R.rule_mask(rule, h2, hv, power=power) if rule != "threshold" else R.threshold_mask(h2, hv))
            y2 = _linear(h2, w["down"], None)
            d = (y - y2).norm(dim=1).double()
            dn.append(d)
            rel.append(torch.where(y_norm > 0, d / y_norm.double().clamp_min(1e-30), torch.zeros_like(d)))
            cos.append(torch.nn.functional.cosine_similarity(y, y2, dim=1).double())
        errs = dict(rel_err=torch.stack(rel, 1), cos=torch.stack(cos, 1), dropped_norm=torch.stack(dn, 1))
        emit((layer, target, rule), counts, kept, errs, x_norm)
        if target == "all-inputs":
            emit((layer, "all-inputs/h", rule), torch.stack(h_counts, 1), torch.stack(h_l1, 1), None, None)


def _calibrate(run, cfg: CurveConfig, layer: int, calib_rows: np.ndarray, w: dict, act_fn) -> dict:
    """TEAL-style per-layer thresholds: tau reaching each target sparsity on the calibration windows."""
    if not len(calib_rows):
        raise ActsparseError("threshold rule: no calibration windows (need at least 4 windows in the run)")
    taus = {}
    lo, hi = int(calib_rows.min()), int(calib_rows.max()) + 1
    sites = _Sites(run, layer, lo, hi, torch.from_numpy(calib_rows - lo), w)
    grid = cfg.grid("threshold")
    for target in cfg.targets:
        a = sites[{"input": "input", "all-inputs": "input", "intermediate": "intermediate", "gate": "act",
                   "up": "up"}[target]]
        taus[(layer, target)] = [R.calibrate_threshold(a, s) for s in grid]
        if target == "all-inputs":
            x = sites["input"]
            hs = []
            for j, s in enumerate(grid):
                h2 = _ffn(R.threshold_mask(x, taus[(layer, target)][j]) * x, w, act_fn)
                hs.append(R.calibrate_threshold(h2, s))
            taus[(layer, "all-inputs/h")] = hs
    return taus


def _ordered_map(fn, items: Sequence, workers: int):
    """``fn`` over ``items`` on ``workers`` threads, results in order, at most ``workers + 1`` in flight
    (bounded memory). numpy sorts and torch kernels release the GIL, so the threads use both cores."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:
        pending: list = []
        for it in items:
            pending.append(ex.submit(fn, it))
            if len(pending) > workers:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()


class _one_torch_thread:
    """Run torch single-threaded per worker while the workers themselves use the cores."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def compute_curves(store, run_id: str | None = None, *, targets: Sequence[str] = ("intermediate",),
                   rules: Sequence[str] = ("top-p",), grids: dict | None = None, power: float = 1.0,
                   include_special: bool = False, with_error: bool = True, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                   layers: Sequence[int] | None = None, use_cache: bool = True, progress=None):
    """Open-loop sparsity curves of one run, as a polars DataFrame (cached in the store as Parquet).

    Args:
        store: store path/URL or an open ``pipeline.reader.StoreReader``.
        run_id: run id or unique prefix (None: the store's only run).
        targets: subset of ``TARGETS``; rules: subset of ``analyze.rules.RULES``.
        grids: ``{rule: values}``; default ``DEFAULT_GRIDS`` (top-p: the paper's 26 values). For
            ``threshold`` the values are target sparsities; tau is calibrated per layer on every
            ``CALIBRATION_EVERY``-th window, and only the other windows are evaluated for it (the
            other rules evaluate every window: with threshold among several rules, the result joins
            two analyses, each with its own ``analysis_id``).
        power: top-p power q >= 1 (authors' ``topp_power``).
        include_special: count BOS/special tokens (excluded by default: attention-sink tokens skew
            statistics, pitfall P4).
        with_error: compute the FFN-output error columns (False: sparsity only, about the cost of
            reading the arrays; error columns are NaN). all-inputs always computes them.
        block_tokens: tokens per streamed block (memory bound).
        layers: restrict to these layers (default all); not cached when given.
        use_cache: reuse/write ``runs/<id>/analysis/curves-<analysis_id>.parquet``.

    Returns:
        One row per (target, rule, value, layer) plus model-level rows with ``layer = -1``
        (dimension-weighted across hooks as the paper counts: sum sparse / sum total, §1.4; their
        sparsity_p10/p50/p90 are quantiles of the layer means, i.e. the spread across layers). Columns:
        run_id, target, rule, value, layer, width, n_tokens, sparsity_mean, sparsity_p10, sparsity_p50,
        sparsity_p90, kept_l1_mean, rel_err_mean, rel_err_p90, cos_mean, err_vs_input_mean,
        analysis_id, label ("open-loop"). ``value`` is the grid value (threshold: target sparsity).

    Raises:
        ActsparseError: unknown run/target/rule, grid out of range, missing sites, NaN/Inf in the data,
            the threshold rule on a run with no window left to evaluate after calibration.
    """
    import polars as pl

    from pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    cfg = CurveConfig(tuple(targets), tuple(rules), dict(grids or {}), float(power), include_special,
                      with_error or "all-inputs" in targets, block_tokens)
    cfg.validate()
    glu = run.manifest["model"]["ffn"].get("pattern", "glu") != "mlp"
    for t in cfg.targets:
        required_sites(t, run.sites, glu)
    if "threshold" in cfg.rules and len(cfg.rules) > 1:
        # the threshold rule evaluates only the windows that do not calibrate it; every other rule
        # keeps every window, so the two are separate analyses (each cached on its own)
        parts = [compute_curves(st, run.run_id, targets=cfg.targets, rules=rs, grids=cfg.grids, power=cfg.power,
                                include_special=include_special, with_error=with_error, block_tokens=block_tokens,
                                layers=layers, use_cache=use_cache, progress=progress)
                 for rs in ([r for r in cfg.rules if r != "threshold"], ["threshold"])]
        return pl.concat(parts, how="diagonal_relaxed").sort(
            ["target", "rule", "layer", "value"], descending=[False, False, False, True])
    analysis_id = fmt.content_hash(cfg.ident())
    cache_path = f"runs/{run.run_id}/analysis/curves-{analysis_id}.parquet"
    if use_cache and layers is None and st.fs.exists(st.path(cache_path)):
        with st.fs.open(st.path(cache_path), "rb") as f:
            df = pl.read_parquet(f)
        if st.is_local and not st.fs.exists(st.path(_critical_path(cache_path))):  # cached before critical rows were stored
            _save_critical(st, run, cache_path, df)
        return df

    tokens = run.tokens()
    special = tokens["special"].to_numpy()
    seq = tokens["sequence"].to_numpy()
    calib = (seq % CALIBRATION_EVERY == 0) if "threshold" in cfg.rules else np.zeros(len(seq), bool)
    include = np.ones(len(seq), bool) if include_special else ~special
    if "threshold" in cfg.rules and not (include & ~calib).any():
        raise ActsparseError(f"threshold rule: run {run.run_id} has {len(np.unique(seq))} window(s), all of them "
                             f"calibrating tau (every {CALIBRATION_EVERY}th); it needs windows left to evaluate")
    from transformers.activations import ACT2FN

    act_fn = ACT2FN[run.activation]
    layer_ids = list(range(run.n_layers)) if layers is None else list(layers)
    d_model, d_ff = run.manifest["model"]["ffn"]["d_model"], run.manifest["model"]["ffn"]["d_ff"]
    width_of = {"input": d_model, "all-inputs": d_model, "all-inputs/h": d_ff, "gate": d_ff, "up": d_ff,
                "intermediate": d_ff}
    keys = [(layer, t, r) for layer in layer_ids for t in cfg.targets for r in cfg.rules]
    keys += [(layer, "all-inputs/h", r) for layer in layer_ids for r in cfg.rules if "all-inputs" in cfg.targets]
    accs = {k: _Acc(len(cfg.grid(k[2])), width_of[k[1]]) for k in keys}

    blocks = [(layer, s, min(s + block_tokens, run.n_tokens)) for layer in layer_ids
              for s in range(0, run.n_tokens, block_tokens)]

    def load(item):
        layer, s, e = item
        sel = include[s:e] & ~calib[s:e]
        keep = torch.from_numpy(np.nonzero(sel)[0])
        sites = _Sites(run, layer, s, e, keep, weights_of(layer))
        for name in _needed(cfg, run):
            sites.native(name)  # read and checked for NaN/inf before any work
        return sites

    wcache: dict[int, dict] = {}
    wlock = threading.Lock()

    def weights_of(layer: int) -> dict:
        with wlock:
            if layer not in wcache:
                if len(wcache) >= 4:  # blocks arrive in layer order: keep the few layers in flight
                    wcache.pop(min(wcache))
                wcache[layer] = run.weights(layer)
            return wcache[layer]

    taus: dict = {}
    calib_rows = np.nonzero(calib & include)[0][:2048]  # bounded memory: enough entries for a quantile
    if "threshold" in cfg.rules:
        for layer in layer_ids:
            taus |= _calibrate(run, cfg, layer, calib_rows, weights_of(layer), act_fn)

    def work(item):
        layer, s, e = item
        sites = load(item)
        out: list = []
        if sites.keep is None or len(sites.keep):
            with torch.inference_mode():
                for target in cfg.targets:
                    _target_block(target, sites, cfg, sites.w, taus, layer, lambda *a: out.append(a), act_fn)
        return e - s, out

    workers = min(MAX_WORKERS, (os.cpu_count() or 1) + 1)
    with _one_torch_thread():
        for n, out in _ordered_map(work, blocks, workers):
            for key, *args in out:
                accs[key].add(*args)
            if progress is not None:
                progress(n)

    rows = []
    for (layer, target, rule), acc in accs.items():
        for value, r in zip(cfg.grid(rule), acc.rows()):
            rows.append(dict(run_id=run.run_id, target=target, rule=rule, value=float(value), layer=layer,
                             width=acc.width, **r))
    df = pl.DataFrame(rows)
    df = pl.concat([df.filter(pl.col("target") != "all-inputs/h"), _model_level(df)], how="diagonal_relaxed")
    df = df.with_columns(analysis_id=pl.lit(analysis_id), label=pl.lit("open-loop")).sort(
        ["target", "rule", "layer", "value"], descending=[False, False, False, True])
    if use_cache and layers is None:
        _save(st, run, cache_path, df)
        _save_critical(st, run, cache_path, df)
    return df


def _critical_path(cache_path: str) -> str:
    return cache_path.replace("/curves-", "/critical-")


def _save_critical(st, run, cache_path: str, df) -> None:
    """Store the open-loop critical sparsity of a cached analysis at the default tolerance beside it
    (``critical-<analysis_id>.parquet``: the store's ``critical_sparsity`` table)."""
    import polars as pl

    crit = critical_sparsity(df).with_columns(analysis_id=pl.lit(df["analysis_id"][0]))
    _save(st, run, _critical_path(cache_path), crit)


def _needed(cfg: CurveConfig, run) -> list[str]:
    need = []
    for t in cfg.targets:
        for s in required_sites(t, run.sites):
            if s not in need and s in run.sites:
                need.append(s)
    return need


def _model_level(df):
    """Model-level rows (layer -1): sparsity dimension-weighted over hooks (paper §1.4), errors averaged
    over layers. For all-inputs both hooks of a layer (x: d_model, h': d_ff) count with their widths."""
    import polars as pl

    hooks = df.with_columns(
        pl.when(pl.col("target") == "all-inputs/h").then(pl.lit("all-inputs")).otherwise(pl.col("target")).alias("t"))
    w = pl.col("width") * pl.col("n_tokens")
    sparsity = hooks.group_by(["run_id", "t", "rule", "value"]).agg(
        sparsity_mean=(pl.col("sparsity_mean") * w).sum() / w.sum(),
        kept_l1_mean=(pl.col("kept_l1_mean") * w).sum() / w.sum(),
        # at model level the quantiles describe the spread of layer means (per-token model-level
        # sparsity would need per-token state across all layers, which grows with the token count)
        sparsity_p10=pl.col("sparsity_mean").quantile(0.1, "linear"),
        sparsity_p50=pl.col("sparsity_mean").quantile(0.5, "linear"),
        sparsity_p90=pl.col("sparsity_mean").quantile(0.9, "linear"),
        width=pl.col("width").sum(), n_tokens=pl.col("n_tokens").max())
    errors = df.filter(pl.col("target") != "all-inputs/h").group_by(["run_id", "target", "rule", "value"]).agg(
        rel_err_mean=pl.col("rel_err_mean").mean(), rel_err_p90=pl.col("rel_err_p90").mean(),
        cos_mean=pl.col("cos_mean").mean(), err_vs_input_mean=pl.col("err_vs_input_mean").mean())
    return (sparsity.rename({"t": "target"}).join(errors, on=["run_id", "target", "rule", "value"])
            .with_columns(layer=pl.lit(-1, pl.Int64)))


def _save(st, run, rel_path: str, df) -> None:
    """Write a result into the run if the store is local and writable (remote stores: compute only)."""
    from pathlib import Path

    if not st.is_local:
        return
    path = Path(st.root) / rel_path
    try:
        fmt.atomic_write_parquet(path, df.to_arrow())
    except OSError:
        return  # read-only store: results are still returned
    from actsparse.share import update_checksums

    update_checksums(Path(st.root) / "runs" / run.run_id, [path])


def check_tolerance(tolerance: float) -> None:
    """Raise ActsparseError unless ``tolerance`` (a relative error bound) is a finite number >= 0."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ActsparseError(f"--tolerance must be a finite number >= 0 (a relative error bound), got {tolerance}")


def critical_sparsity(curves, tolerance: float = DEFAULT_TOLERANCE, metric: str = "rel_err_mean"):
    """Offline critical sparsity per run x target x rule from model-level curve rows (layer -1).

    The largest model-level sparsity whose error ``metric`` stays <= ``tolerance``, (a) at the best grid
    point and (b) linearly interpolated between the last grid point meeting the tolerance and the
    first failing it, points ordered by sparsity (paper.md §1.5, recommended implementation).

    Returns:
        polars DataFrame: run_id, target, rule, tolerance, metric, critical_sparsity_grid,
        critical_value_grid, critical_sparsity_interp, label ("open-loop").

    Raises:
        ActsparseError: a tolerance that is negative or not a finite number.
    """
    import polars as pl

    check_tolerance(tolerance)
    rows = []
    model = curves.filter(pl.col("layer") == -1)
    for (run_id, target, rule), g in model.group_by(["run_id", "target", "rule"], maintain_order=True):
        g = g.sort("sparsity_mean")
        s, e, v = g["sparsity_mean"].to_list(), g[metric].to_list(), g["value"].to_list()
        grid_s, grid_v, interp = critical_point(s, e, v, tolerance)
        rows.append(dict(run_id=run_id, target=target, rule=rule, tolerance=tolerance, metric=metric,
                         critical_sparsity_grid=grid_s, critical_value_grid=grid_v, critical_sparsity_interp=interp,
                         label="open-loop"))
    return pl.DataFrame(rows)


def critical_point(sparsity: Sequence[float], error: Sequence[float], values: Sequence[float], tolerance: float):
    """``(best grid sparsity, its grid value, interpolated sparsity)`` where ``error`` crosses ``tolerance``.

    Points are taken in increasing sparsity; the crossing is where the error first exceeds the
    tolerance (later points that dip back under it are ignored: the curve is meant to be monotone).
    Returns NaNs when even the densest point fails.
    """
    best = (math.nan, math.nan, math.nan)
    for i, (s, e) in enumerate(zip(sparsity, error)):
        if not e <= tolerance:
            if i > 0 and not math.isnan(best[0]):
                s0, e0 = sparsity[i - 1], error[i - 1]
                frac = (tolerance - e0) / (e - e0) if e != e0 else 0.0
                return best[0], best[1], s0 + frac * (s - s0)
            return best
        best = (s, values[i], s)
    return best
