"""Summary, per-layer and critical-sparsity tables of an evaluation, with percentile-bootstrap intervals over
windows (whole windows are resampled: the tokens of one window are correlated). Below ``MIN_WINDOWS`` windows
the intervals are NaN: an interval is reported only where it means something."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from actsparse.analyze.critical import critical_point
from actsparse.analyze.evaluate.config import ACC_RATIO, MIN_WINDOWS, N_BOOT
from actsparse.core.errors import ActsparseError


def _resample_counts(n_windows: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_windows] float64: how often each window is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_windows, size=(n_boot, n_windows))
    counts = np.zeros((n_boot, n_windows))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_windows), draws.ravel()), 1.0)
    return counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles over axis 0, ignoring NaN (all-NaN columns give NaN)."""
    with np.errstate(all="ignore"):
        if samples.ndim == 1:
            samples = samples[:, None]
        ok = ~np.all(np.isnan(samples), axis=0)
        lo = np.full(samples.shape[1], np.nan)
        hi = np.full(samples.shape[1], np.nan)
        if ok.any():
            lo[ok], hi[ok] = np.nanpercentile(samples[:, ok], [2.5, 97.5], axis=0)
    return lo, hi


def summarize(windows, hooks: Sequence[dict], meta: dict, *, n_boot: int = N_BOOT, seed: int = 0,
              threshold: float = ACC_RATIO):
    """Summary, per-layer and critical-sparsity tables from per-window sums.

    Args:
        windows: polars DataFrame, one row per (value, window) with columns value, window, n_pred,
            n_valid, nll_sparse, nll_dense, correct_sparse, correct_dense, kl, hook_sparse (list of
            zeroed-entry counts per hook, in ``hooks`` order) and, for a mixture-of-experts model, hook_rows
            (the rows each hook saw; without it every hook sees every counted position). Every value must
            cover the same windows.
        hooks: ``[{"layer", "site", "width"}]`` per hook (MoE hooks also ``unit`` and ``expert``: the layers
            table then has one row per layer and site, over all its experts).
        meta: columns repeated on every row (run_id, eval_id, target, rule, power, ...).
        n_boot, seed: bootstrap resamples of whole windows and the generator seed.
        threshold: the performance ratio defining critical sparsity.

    Returns:
        ``(summary, layers, critical)`` polars DataFrames (columns in the module docstring). Ratios
        whose dense denominator is 0 (e.g. a dense accuracy of 0) are NaN, and so is every interval
        (``*_lo``, ``*_hi``, ``boot_undefined``) of an evaluation of fewer than ``MIN_WINDOWS`` windows.
    """
    import polars as pl

    windows = windows.sort(["value", "window"], descending=[True, False])
    values = windows["value"].unique(maintain_order=True).to_list()
    ids = windows.filter(pl.col("value") == values[0])["window"].to_numpy()
    n_val, n_win = len(values), len(ids)
    if windows.height != n_val * n_win or not all(
            np.array_equal(g["window"].to_numpy(), ids) for _, g in windows.group_by("value", maintain_order=True)):
        raise ActsparseError(f"evaluation {meta.get('eval_id')}: grid values cover different windows; "
                             "delete its value files and rerun")

    def mat(col: str) -> np.ndarray:  # [values, windows]
        return windows[col].to_numpy().astype(np.float64).reshape(n_val, n_win)

    n_pred, n_valid = mat("n_pred")[0], mat("n_valid")[0]
    nll_s, nll_d, cs, cd, kl = (mat(c) for c in ("nll_sparse", "nll_dense", "correct_sparse", "correct_dense", "kl"))
    hook_sparse = np.asarray(windows["hook_sparse"].to_list(), dtype=np.float64).reshape(n_val, n_win, len(hooks))
    widths = np.array([h["width"] for h in hooks], dtype=np.float64)
    sparse = hook_sparse.sum(axis=2)
    n_tok = n_pred.sum()
    # too few windows: an interval would be (nearly) a point; no resamples, so every interval below is NaN
    resampled = n_win >= MIN_WINDOWS
    counts = _resample_counts(n_win, n_boot, seed) if resampled else np.zeros((0, n_win))  # [boot, windows]
    hook_rows = _hook_rows(windows, n_val, n_win, len(hooks))
    if hook_rows is None:  # every hook sees every counted position
        entries = n_valid.sum() * widths.sum()
        boot_entries = ((counts @ n_valid) * widths.sum())[:, None]
    else:  # the authors' MoE counting: each hook over the rows routed to it (analyze.moe.counting)
        window_entries = hook_rows @ widths  # [values, windows]
        entries = window_entries.sum(axis=1)
        boot_entries = counts @ window_entries.T

    point = dict(
        sparsity=sparse.sum(1) / entries, nll=nll_s.sum(1) / n_tok, top1_acc=cs.sum(1) / n_tok, kl=kl.sum(1) / n_tok,
        dense_nll=nll_d.sum(1) / n_tok, dense_acc=cd.sum(1) / n_tok, acc_ratio=_ratio(cs.sum(1), cd.sum(1)),
    )
    point["dnll"] = point["nll"] - point["dense_nll"]

    boot_tok = counts @ n_pred
    boot = dict(
        sparsity=(counts @ sparse.T) / boot_entries,
        acc_ratio=_ratio(counts @ cs.T, counts @ cd.T),
        dnll=(counts @ (nll_s - nll_d).T) / boot_tok[:, None],
    )
    nll_ratio = np.exp(-boot["dnll"])

    rows = []
    for j, v in enumerate(values):
        row = dict(meta, value=float(v), n_tokens=int(n_tok), n_windows=n_win, n_boot=n_boot if resampled else 0,
                   **{k: float(a[j]) for k, a in point.items()})
        row["ppl"] = math.exp(row["nll"])
        row["dense_ppl"] = math.exp(row["dense_nll"])
        row["nll_ratio"] = math.exp(-row["dnll"])
        for k, samples in boot.items():
            lo, hi = _interval(samples[:, j])
            row[f"{k}_lo"], row[f"{k}_hi"] = float(lo[0]), float(hi[0])
        rows.append(row)
    # run_id is null for store-level evaluations: keep it a string column so tables concatenate.
    strings = dict(run_id=pl.String)
    summary = pl.DataFrame(rows, schema_overrides=strings).with_columns(label=pl.lit("closed-loop"))

    criteria = {"top1_acc": (point["acc_ratio"], boot["acc_ratio"]),
                "exp_neg_dnll": (np.exp(-point["dnll"]), nll_ratio)}
    critical = []
    for name, (ratio, boot_ratio) in criteria.items():
        grid_s, grid_v, interp = _crossing(point["sparsity"], ratio, values, threshold)
        boot_interp = np.array([_crossing(boot["sparsity"][b], boot_ratio[b], values, threshold)[2]
                                for b in range(len(counts))])
        lo, hi = _interval(boot_interp) if resampled else (np.full(1, np.nan), np.full(1, np.nan))
        critical.append(dict(meta, criterion=name, threshold=threshold, critical_sparsity_grid=grid_s,
                             critical_value_grid=grid_v, critical_sparsity_interp=interp,
                             critical_lo=float(lo[0]), critical_hi=float(hi[0]),
                             boot_undefined=float(np.isnan(boot_interp).mean()) if resampled else math.nan,
                             n_values=n_val, n_tokens=int(n_tok), n_boot=n_boot if resampled else 0,
                             label="closed-loop"))

    layer_rows = []
    valid_total = n_valid.sum()
    for j, v in enumerate(values):
        per_hook = hook_sparse[j].sum(axis=0)
        if hook_rows is None:
            for h, hook in enumerate(hooks):
                layer_rows.append(dict(meta, value=float(v), layer=int(hook["layer"]), hook=hook["site"],
                                       width=int(hook["width"]), n_positions=int(valid_total),
                                       sparsity=float(per_hook[h] / (valid_total * hook["width"]))))
        else:
            layer_rows += _grouped_layer_rows(meta, float(v), hooks, per_hook, hook_rows[j].sum(axis=0), valid_total)
        width = widths.sum() if hook_rows is None else entries[j] / max(valid_total, 1)
        layer_rows.append(dict(meta, value=float(v), layer=-1, hook="model", width=int(round(width)),
                               n_positions=int(valid_total), sparsity=float(point["sparsity"][j])))
    return (summary, pl.DataFrame(layer_rows, schema_overrides=strings),
            pl.DataFrame(critical, schema_overrides=strings))


def _hook_rows(windows, n_val: int, n_win: int, n_hooks: int) -> np.ndarray | None:
    """The rows each hook saw, float64 [values, windows, hooks], or None where every hook sees every counted
    position (dense models: no ``hook_rows`` column, or only nulls)."""
    if "hook_rows" not in windows.columns or windows["hook_rows"].null_count() == windows.height:
        return None
    return np.asarray(windows["hook_rows"].to_list(), dtype=np.float64).reshape(n_val, n_win, n_hooks)


def _grouped_layer_rows(meta: dict, value: float, hooks: Sequence[dict], zeroed: np.ndarray, rows: np.ndarray,
                        n_positions: float) -> list[dict]:
    """One layers-table row per (layer, site) of a MoE model, over every expert, shared expert or dense FFN
    hooked there: sparsity Σ zeroed / Σ rows · width, width the entries per counted position."""
    groups: dict[tuple[int, str], list[int]] = {}
    for h, hook in enumerate(hooks):
        groups.setdefault((int(hook["layer"]), hook["site"]), []).append(h)
    out = []
    for (layer, site), idx in groups.items():
        entries = float(sum(rows[h] * hooks[h]["width"] for h in idx))
        out.append(dict(meta, value=value, layer=layer, hook=site, width=int(round(entries / max(n_positions, 1))),
                        n_positions=int(n_positions),
                        sparsity=float(sum(zeroed[h] for h in idx) / entries) if entries else math.nan))
    return out


def _crossing(sparsity, ratio, values, threshold: float) -> tuple[float, float, float]:
    return critical_point(sparsity, ratio, values, threshold, higher_is_better=True)
