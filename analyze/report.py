"""The HTML report of a store: open-loop curves, closed-loop evaluations, activation statistics, provenance.

``build_report(store, out_dir)`` writes ``out_dir/index.html`` and its figures, each as PNG and SVG under
fixed file names, for every complete run of a store (or the runs asked for). The page is static: no
script and nothing fetched from the network, so it works opened from disk (``file://``) or copied anywhere.

What it shows (the paper's kinds of figures, paper.md §5):

* open-loop (``analyze.curves``: one layer at a time, on the stored dense activations of the collection
  split): sparsity against top-p per layer, a layer x p heatmap, the simulated relative FFN-output
  error against model-level sparsity, and critical sparsity at ``analyze.curves.DEFAULT_TOLERANCE``;
* closed-loop (``analyze.evaluate``: every layer sparsified at once in a real forward pass on the
  held-out split), where evaluations are stored with a run: the top-1 accuracy ratio against realized
  sparsity, and critical sparsity with its bootstrap interval beside the open-loop one;
* activations: the distribution of |a| per layer and site, and sparsity against the position in the
  window (from the per-token statistics of ``analyze.token_stats``, or a bounded sample);
* the provenance of every run, from its manifest.

The curves have one fixed configuration (``REPORT_TARGETS``, ``INPUT_TOPP_GRID``); ``analyze.curves``
caches them in the store, so a second report of the same store reads them back instead of computing.
Memory and time are bounded independently of the run length: activations are sampled
(``SAMPLE_TOKENS`` tokens per layer and site) and at most ``MAX_STATS_PARTS`` statistics parts are read.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from actsparse.errors import ActsparseError

REPORT_TARGETS = ("input", "gate", "up", "intermediate")
# The linear targets get the paper's 26 top-p values for the price of one sweep; input is nonlinear
# (one FFN pass per grid value, analyze.curves), so it gets this coarser grid.
INPUT_TOPP_GRID = (1.0, 0.99, 0.97, 0.95, 0.9, 0.8, 0.6)
HEATMAP_TARGET = "intermediate"
SAMPLE_TOKENS = 1024  # tokens per layer and site read for the magnitude distributions ...
SAMPLE_SLICES = 4  # ... as this many contiguous slices spread over the run (zarr reads whole chunks)
MAX_STATS_PARTS = 16  # token_stats parts read per run for the position profile
POSITION_P = 0.9
POSITION_SITES = ("intermediate", "act", "up", "gate", "input", "output")  # first stored one is profiled
POSITION_BINS = 32  # at most this many points along the window
# log10|a| histogram: 10 bins per decade over 1e-8 .. 1e3; values beyond fall into the end bins.
MAGNITUDE_EDGES = np.linspace(-8.0, 3.0, 111)
MIN_ERROR_PCT = 0.01  # lower end of the error axis (%)
DPI = 110

# A progress reporter: ``progress(description, total)`` returns ``advance(n)``.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


# ---------------------------------------------------------------- data


@dataclass
class _RunData:
    """What the report needs of one run."""

    run: object  # pipeline.reader.Run
    label: str
    color: str
    curves: object  # polars DataFrame (analyze.curves rows), possibly empty
    closed: object  # closed-loop summary rows of the chosen evaluations, possibly empty
    closed_critical: object  # closed-loop critical rows of those evaluations, possibly empty
    notes: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        have = set(self.curves["target"].unique().to_list()) if self.curves.height else set()
        return [t for t in REPORT_TARGETS if t in have]


def _reader(store):
    from pipeline.reader import StoreReader

    return store if isinstance(store, StoreReader) else StoreReader(str(store))


def curve_groups(run) -> list[tuple[tuple[str, ...], dict]]:
    """The report's curve computations for one run: ``[(targets, grids)]``, for the targets its sites allow.

    Linear targets (gate, up, intermediate) share one sweep over the default top-p grid; input has
    its own, coarser grid. Targets whose tensors the run neither stored nor can recompute are left out.
    """
    from analyze.curves import required_sites

    glu = run.manifest["model"]["ffn"].get("pattern", "glu") != "mlp"
    usable = []
    for target in REPORT_TARGETS:
        try:
            required_sites(target, run.sites, glu)
        except ActsparseError:
            continue
        usable.append(target)
    groups = []
    linear = tuple(t for t in usable if t != "input")
    if linear:
        groups.append((linear, {}))
    if "input" in usable:
        groups.append((("input",), {"top-p": INPUT_TOPP_GRID}))
    return groups


def report_curves(store, run_id: str, *, progress: ProgressFactory | None = None):
    """Open-loop curves of the report's targets for one run, as one polars DataFrame.

    Computed by ``analyze.curves.compute_curves`` and cached in the store by it, so a second call (or
    a second report) reads them back. ``progress`` is only called when something is computed.
    """
    import polars as pl

    from analyze.curves import compute_curves

    st = _reader(store)
    run = st.run(run_id)
    frames = []
    for targets, grids in curve_groups(run):
        step = None
        if progress is not None:
            label = run.manifest["model"].get("name", run.run_id)
            step = _lazy_progress(progress, f"open-loop curves {label}: {', '.join(targets)}",
                                  run.n_layers * run.n_tokens)
        frames.append(compute_curves(st, run.run_id, targets=targets, rules=("top-p",), grids=grids or None,
                                     progress=step))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def _lazy_progress(progress: ProgressFactory, description: str, total: int) -> Callable[[int], None]:
    """An ``advance(n)`` that starts its progress bar on the first call (cached results never show one)."""
    advance: Callable[[int], None] | None = None

    def step(n: int) -> None:
        nonlocal advance
        if advance is None:
            advance = progress(description, total)
        advance(n)

    return step


def closed_loop(store, run_id: str):
    """The closed-loop evaluations stored with a run that the report compares with its curves.

    Reads ``runs/<id>/analysis/evaluate-<eval_id>.parquet`` (summary) and
    ``evaluate_critical-<eval_id>.parquet`` (critical sparsity, ``analyze.evaluate``). Only top-p
    evaluations with power 1 are comparable with the report's curves; per target the one with the
    most tokens (then the most grid values) is kept.

    Returns:
        ``(summary, critical)`` polars DataFrames; both empty when the run has no usable evaluation
        (or none can be listed, e.g. on a web server without listings).
    """
    import polars as pl

    st = _reader(store)
    empty = (pl.DataFrame(), pl.DataFrame())
    base = st.path("runs", run_id, "analysis")
    try:
        paths = sorted(st.fs.glob(f"{base}/evaluate-*.parquet"))
    except Exception:  # noqa: BLE001 - listings are optional on remote stores: show open-loop only
        return empty
    need = {"target", "rule", "value", "sparsity", "acc_ratio", "n_tokens"}
    chosen: dict[str, tuple] = {}
    for path in paths:
        eval_id = path.rsplit("/", 1)[-1].removeprefix("evaluate-").removesuffix(".parquet")
        try:
            with st.fs.open(path, "rb") as f:
                summary = pl.read_parquet(f)
            with st.fs.open(f"{base}/evaluate_critical-{eval_id}.parquet", "rb") as f:
                critical = pl.read_parquet(f)
        except (OSError, pl.exceptions.PolarsError):
            continue  # an evaluation being written, or of another layout: leave it out
        if not need <= set(summary.columns) or not summary.height or "criterion" not in critical.columns:
            continue
        power = float(summary["power"][0]) if "power" in summary.columns else 1.0
        if summary["rule"][0] != "top-p" or power != 1.0:
            continue
        target = summary["target"][0]
        key = (int(summary["n_tokens"][0]), summary.height, eval_id)
        if target not in chosen or key > chosen[target][0]:
            chosen[target] = (key, summary.with_columns(eval_id=pl.lit(eval_id)),
                              critical.with_columns(eval_id=pl.lit(eval_id)))
    if not chosen:
        return empty
    order = [t for t in REPORT_TARGETS if t in chosen] + sorted(set(chosen) - set(REPORT_TARGETS))
    return (pl.concat([chosen[t][1] for t in order], how="diagonal_relaxed"),
            pl.concat([chosen[t][2] for t in order], how="diagonal_relaxed"))


def _labels(runs: list) -> list[str]:
    """Model names, made unique with the corpus, then the run id, where runs share them."""
    names = [r.manifest["model"].get("name") or r.run_id for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n} / {r.manifest['corpus'].get('name', '?')}" for n, r in zip(names, runs)]
    if len(set(names)) < len(names):
        names = [f"{n} ({r.run_id[:8]})" for n, r in zip(names, runs)]
    return names


# ---------------------------------------------------------------- figures


@dataclass
class _Figure:
    stem: str
    title: str
    caption: str


class _Figures:
    """Saves matplotlib figures as ``<stem>.png`` and ``<stem>.svg`` with byte-stable content."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.saved: list[_Figure] = []

    def new(self, n_panels: int = 1, *, width: float = 12.0):
        """A constrained-layout figure with ``n_panels`` axes (1, 1x2 or 2x2 grid)."""
        # No pyplot: Figure.savefig renders PNG with Agg and SVG with the SVG backend whatever backend
        # is configured, needs no display, and leaves an interactive session's backend alone.
        from matplotlib.figure import Figure

        rows, cols = (1, 1) if n_panels == 1 else (1, 2) if n_panels == 2 else (math.ceil(n_panels / 2), 2)
        fig = Figure(figsize=(width if n_panels > 1 else 8.5, (4.6 if rows == 1 else 4.0 * rows) + 0.6),
                     layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax in axes[n_panels:]:
            ax.set_visible(False)
        return fig, list(axes[:n_panels])

    def save(self, fig, stem: str, title: str, caption: str) -> None:
        import matplotlib

        fig.suptitle(title, fontsize=13)
        # Fixed hash salt and no dates: the same data give the same bytes (diff-able reports).
        with matplotlib.rc_context({"svg.hashsalt": "actsparse-report", "svg.fonttype": "path"}):
            fig.savefig(self.out_dir / f"{stem}.png", dpi=DPI, metadata={"Software": None})
            fig.savefig(self.out_dir / f"{stem}.svg", metadata={"Date": None, "Creator": None})
        self.saved.append(_Figure(stem, title, caption))


def _depth(n_layers: int):
    """Colormap and norm mapping a layer index to its colour (depth)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    return colormaps["viridis"], Normalize(0, max(n_layers - 1, 1))


def _depth_colorbar(fig, axes, n_layers: int) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.ticker import MaxNLocator

    cmap, norm = _depth(n_layers)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.9, pad=0.01)
    bar.set_label("layer index (colour = depth)")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()


def _layer_handle(n_layers: int, text: str = "one line per layer (colour = depth)"):
    from matplotlib.lines import Line2D

    cmap, _ = _depth(n_layers)
    return Line2D([], [], color=cmap(0.5), lw=1.2, label=text)


def _fig_sparsity_topp(figs: _Figures, rd: _RunData) -> None:
    import polars as pl
    from matplotlib.lines import Line2D

    targets = rd.targets
    n_layers = rd.run.n_layers
    cmap, norm = _depth(n_layers)
    fig, axes = figs.new(len(targets))
    for ax, target in zip(axes, targets):
        d = rd.curves.filter(pl.col("target") == target)
        for layer in range(n_layers):
            g = d.filter(pl.col("layer") == layer).sort("value")
            ax.plot(g["value"], g["sparsity_mean"] * 100, color=cmap(norm(layer)), lw=1.0, alpha=0.9)
        m = d.filter(pl.col("layer") == -1).sort("value")
        ax.plot(m["value"], m["sparsity_mean"] * 100, color="black", ls="--", lw=2.0)
        ax.set(title=f"target: {target}", xlabel="top-p value p (fraction of L1 mass kept)",
               ylabel="sparsity (% of entries dropped)", xlim=(0, 1), ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(handles=[_layer_handle(n_layers), Line2D([], [], color="black", ls="--", lw=2,
                                                           label="model level (dimension-weighted)")],
                  loc="upper right", fontsize=8)
    _depth_colorbar(fig, axes, n_layers)
    figs.save(fig, f"fig-sparsity-vs-topp-{rd.run.run_id}",
              f"Open-loop sparsity vs top-p per layer — {rd.label}",
              f"Mean per-token sparsity the top-p rule induces on each target, per layer (colour: depth) and at "
              f"model level, on the {rd.run.n_tokens:,} stored tokens (special tokens excluded). Open-loop: "
              f"computed from the stored dense activations.")


def _fig_heatmap(figs: _Figures, rd: _RunData) -> None:
    import polars as pl
    from matplotlib.ticker import MaxNLocator

    target = HEATMAP_TARGET if HEATMAP_TARGET in rd.targets else rd.targets[-1]
    d = rd.curves.filter((pl.col("target") == target) & (pl.col("layer") >= 0))
    values = sorted(set(d["value"].to_list()), reverse=True)
    n_layers = rd.run.n_layers
    grid = np.full((n_layers, len(values)), np.nan)
    col = {v: j for j, v in enumerate(values)}
    for row in d.iter_rows(named=True):
        grid[row["layer"], col[row["value"]]] = row["sparsity_mean"] * 100
    fig, (ax,) = figs.new(1)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(len(values)), [f"{v:g}" for v in values], rotation=90, fontsize=8)
    ax.set(xlabel="top-p value p", ylabel="layer index", title=f"target: {target}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar = fig.colorbar(im, ax=ax, pad=0.01)
    bar.set_label("mean sparsity (% of entries dropped)")
    figs.save(fig, f"fig-heatmap-{rd.run.run_id}",
              f"Open-loop sparsity per layer and top-p ({target}) — {rd.label}",
              f"Mean per-token sparsity of the {target} activation for every layer (rows) and top-p value "
              f"(columns); the colour bar is the legend. Open-loop.")


def _fig_error(figs: _Figures, data: list[_RunData], tolerance: float) -> None:
    import polars as pl
    from matplotlib.ticker import FuncFormatter

    targets = [t for t in REPORT_TARGETS if any(t in rd.targets for rd in data)]
    fig, axes = figs.new(len(targets))
    for ax, target in zip(axes, targets):
        for rd in data:
            m = rd.curves.filter((pl.col("target") == target) & (pl.col("layer") == -1)).sort("sparsity_mean")
            if m.height:
                err = (m["rel_err_mean"] * 100).to_numpy()
                err = np.where(err >= MIN_ERROR_PCT, err, np.nan)  # not drawn: see the caption
                ax.plot(m["sparsity_mean"] * 100, err, marker="o", ms=3, lw=1.5, color=rd.color, label=rd.label)
        ax.axhline(tolerance * 100, color="gray", ls=":", lw=1.5, label=f"tolerance {tolerance:.0%}")
        ax.set_yscale("log", nonpositive="mask")
        # p = 1 drops only entries too small to matter; errors of 1e-8 % would squash the useful range
        ax.set_ylim(bottom=max(ax.get_ylim()[0], MIN_ERROR_PCT))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
        ax.set(title=f"target: {target}", xlabel="model-level sparsity (% of entries dropped)",
               ylabel="mean relative FFN-output error (%)", xlim=(0, 100))
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    figs.save(fig, "fig-error-vs-sparsity",
              "Open-loop simulated error vs sparsity (top-p), per target",
              "Mean over tokens and layers of ||y - y_sparse|| / ||y||, the relative error of each layer's FFN "
              "output when only that layer's target is sparsified (open-loop, stored dense inputs), against "
              f"model-level sparsity; one line per model, one point per top-p value. Errors below "
              f"{MIN_ERROR_PCT:g} % (at p = 1 the error is zero or nearly) are not drawn.")


def _minor_log_label(v: float, _pos) -> str:
    """Label the 2x and 5x minor ticks of a log axis (spans under a decade would have no label)."""
    if v <= 0:
        return ""
    mantissa = round(v / 10 ** math.floor(math.log10(v)), 6)
    return f"{v:g}" if mantissa in (2.0, 5.0) else ""


def _fig_critical(figs: _Figures, data: list[_RunData], open_crit, tolerance: float) -> None:
    import polars as pl
    from matplotlib.patches import Patch

    targets = [t for t in REPORT_TARGETS if any(t in rd.targets for rd in data)]
    any_closed = any(rd.closed_critical.height for rd in data)
    per_run = 2 if any_closed else 1
    width = 0.8 / (len(data) * per_run)
    fig, (ax,) = figs.new(1)
    for i, rd in enumerate(data):
        for j, target in enumerate(targets):
            x = j - 0.4 + width * (i * per_run + 0.5)
            o = open_crit.filter((pl.col("run_id") == rd.run.run_id) & (pl.col("target") == target))
            if o.height:
                _bar(ax, x, width, o["critical_sparsity_interp"][0], None, rd.color, hatch=None)
            c = _closed_row(rd, target, "top1_acc")
            if c is not None:
                interval = (c.get("critical_lo"), c.get("critical_hi"))
                _bar(ax, x + width, width, c.get("critical_sparsity_interp"), interval, rd.color, hatch="//")
    ax.set_xticks(range(len(targets)), targets)
    ax.set(xlabel="sparsification target", ylabel="critical sparsity (% of entries dropped)", ylim=(0, 105),
           xlim=(-0.5, len(targets) - 0.5))
    ax.grid(alpha=0.3, axis="y")
    handles = [Patch(facecolor=rd.color, label=rd.label) for rd in data]
    handles.append(Patch(facecolor="white", edgecolor="black", label=f"open-loop (rel. error <= {tolerance:.0%})"))
    if any_closed:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="closed-loop (top-1 ratio >= 0.99), 95% CI"))
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=2)
    figs.save(fig, "fig-critical-sparsity",
              "Critical sparsity per target: open-loop" + (" vs closed-loop" if any_closed else ""),
              f"Open-loop: the largest model-level sparsity whose simulated relative FFN-output error stays <= "
              f"{tolerance:g} (interpolated between top-p grid points). Closed-loop (hatched, where evaluated): the "
              f"largest realized sparsity keeping >= 99% of dense top-1 accuracy on the held-out split, with its "
              f"95% bootstrap interval over windows. 'n/a': even the densest grid point misses the criterion.")


def _bar(ax, x: float, width: float, value, interval, color: str, hatch: str | None) -> None:
    """One critical-sparsity bar (fraction ``value`` drawn in %), 'n/a' where it is undefined."""
    if value is None or not math.isfinite(value):
        ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        return
    yerr, top = None, value
    if interval is not None and all(v is not None and math.isfinite(v) for v in interval):
        yerr = [[max(value - interval[0], 0) * 100], [max(interval[1] - value, 0) * 100]]
        top = max(value, interval[1])
    ax.bar(x, value * 100, width=width * 0.9, color=color, edgecolor="black",
           hatch=hatch, alpha=0.55 if hatch else 0.95, yerr=yerr, capsize=3, ecolor="black")
    ax.text(x, top * 100 + 1, f"{value * 100:.0f}", ha="center", va="bottom", fontsize=7)  # above the error bar


def _closed_row(rd: _RunData, target: str, criterion: str) -> dict | None:
    import polars as pl

    if not rd.closed_critical.height:
        return None
    c = rd.closed_critical.filter((pl.col("target") == target) & (pl.col("criterion") == criterion))
    return c.row(0, named=True) if c.height else None


def _fig_closed(figs: _Figures, data: list[_RunData]) -> None:
    import polars as pl

    targets = [t for t in REPORT_TARGETS if any(rd.closed.height and t in rd.closed["target"].to_list()
                                                for rd in data)]
    fig, axes = figs.new(len(targets))
    for ax, target in zip(axes, targets):
        for rd in data:
            if not rd.closed.height:
                continue
            s = rd.closed.filter(pl.col("target") == target).sort("sparsity")
            if not s.height:
                continue
            y = s["acc_ratio"].to_numpy()
            yerr = None
            if {"acc_ratio_lo", "acc_ratio_hi"} <= set(s.columns):
                lo, hi = s["acc_ratio_lo"].to_numpy(), s["acc_ratio_hi"].to_numpy()
                yerr = np.nan_to_num(np.vstack([y - lo, hi - y]).clip(min=0))
            ax.errorbar(s["sparsity"] * 100, y, yerr=yerr, marker="o", ms=4, lw=1.5, capsize=3, color=rd.color,
                        label=f"{rd.label} ({int(s['n_tokens'][0]):,} tokens)")
            for v, xs, ys in zip(s["value"], s["sparsity"] * 100, y):
                ax.annotate(f"p={v:g}", (xs, ys), textcoords="offset points", xytext=(3, 4), fontsize=6,
                            color=rd.color)
        ax.axhline(0.99, color="gray", ls=":", lw=1.5, label="99% of dense")
        ax.set(title=f"target: {target}", xlabel="realized model-level sparsity (% of entries dropped)",
               ylabel="top-1 accuracy, sparse / dense")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    figs.save(fig, "fig-closed-loop-accuracy",
              "Closed-loop: normalised top-1 accuracy vs realized sparsity (top-p), per target",
              "Next-token top-1 accuracy of the model with every FFN layer sparsified at once, relative to the "
              "dense model, on the held-out split; error bars: 95% bootstrap interval over windows. One point per "
              "top-p value (labelled).")


def _sample_slices(run) -> list[tuple[int, int]]:
    """Token ranges of the bounded sample: ``SAMPLE_TOKENS`` in all, from up to ``SAMPLE_SLICES`` stored
    chunks spread over the run (each range starts a chunk, so every chunk is decompressed once)."""
    n = run.n_tokens
    if n <= SAMPLE_TOKENS:
        return [(0, n)]
    k = min(SAMPLE_SLICES, run.n_parts)
    per = SAMPLE_TOKENS // k
    chunks = np.linspace(0, run.n_parts - 1, k).round().astype(np.int64)  # distinct: spacing >= 1
    return [(int(c) * run.chunk_tokens, min(int(c) * run.chunk_tokens + per, n)) for c in chunks]


def _slices_text(slices, n_tokens: int) -> str:
    if len(slices) == 1 and slices[0] == (0, n_tokens):
        return "every stored token"
    return f"{len(slices)} contiguous slice{'s' if len(slices) > 1 else ''} spread over the run"


def _read_sample(run, site: str, layer: int, slices, keep: np.ndarray):
    """float32 torch tensor [sampled non-special tokens, width] of one layer."""
    import torch

    return torch.cat([run.read(site, layer, s, e)[torch.from_numpy(keep[s:e])] for s, e in slices])


def _fig_magnitudes(figs: _Figures, rd: _RunData, special: np.ndarray) -> None:
    run = rd.run
    slices = _sample_slices(run)
    keep = ~special
    n_sample = int(sum(keep[s:e].sum() for s, e in slices))
    from pipeline.sites import SITES

    sites = [s for s in SITES if s in run.sites]
    cmap, norm = _depth(run.n_layers)
    centers = 10 ** ((MAGNITUDE_EDGES[:-1] + MAGNITUDE_EDGES[1:]) / 2)
    fig, axes = figs.new(len(sites), width=13.0 if len(sites) > 2 else 12.0)
    zero_notes = []
    for ax, site in zip(axes, sites):
        used = np.zeros(len(centers), bool)
        zeros = []
        for layer in range(run.n_layers):
            a = _read_sample(run, site, layer, slices, keep).abs().numpy().ravel()
            nonzero = a[a > 0]
            zeros.append(1.0 - len(nonzero) / max(len(a), 1))
            logs = np.clip(np.log10(nonzero), MAGNITUDE_EDGES[0], MAGNITUDE_EDGES[-1] - 1e-9)
            # equal-width bins given as a count and range: numpy's fast path, no sort of the data
            hist = np.histogram(logs, bins=len(MAGNITUDE_EDGES) - 1,
                                range=(MAGNITUDE_EDGES[0], MAGNITUDE_EDGES[-1]))[0] / max(len(a), 1) * 100
            used |= hist > 0.01
            ax.plot(centers, hist, color=cmap(norm(layer)), lw=1.0, alpha=0.9)
        ax.set_xscale("log")
        if used.any():
            idx = np.nonzero(used)[0]
            ax.set_xlim(10 ** MAGNITUDE_EDGES[idx[0]], 10 ** MAGNITUDE_EDGES[idx[-1] + 1])
        ax.set(title=f"site: {site}", xlabel="|activation| (log scale)",
               ylabel="share of entries (% per 0.1 decade)")
        ax.grid(alpha=0.3)
        ax.legend(handles=[_layer_handle(run.n_layers)], loc="upper left", fontsize=8)
        zero_notes.append(f"{site} {min(zeros) * 100:.1f}–{max(zeros) * 100:.1f} %")
    _depth_colorbar(fig, axes, run.n_layers)
    figs.save(fig, f"fig-magnitudes-{run.run_id}",
              f"Distribution of activation magnitudes per layer — {rd.label}",
              f"Histogram of log10|a| per layer (colour: depth) and stored site, from a sample of {n_sample:,} "
              f"non-special tokens per layer ({_slices_text(slices, run.n_tokens)}); entries beyond 1e-8 .. 1e3 "
              f"are counted in the end bins. Exact zeros, not drawn (range over layers): {'; '.join(zero_notes)}.")


def _position_site(run) -> str:
    return next(s for s in POSITION_SITES if s in run.sites)


def _position_from_stats(st, rd: _RunData, site: str, bin_width: int):
    """``({layer: (position bins, mean sparsity)}, source text)`` from token_stats; None where they are absent."""
    import polars as pl

    from pipeline import store as fmt

    run = rd.run
    column = f"sparsity_p{round(POSITION_P * 100)}"
    parts = sorted(set(np.linspace(0, run.n_parts - 1, min(run.n_parts, MAX_STATS_PARTS)).astype(int).tolist()))
    sums = []
    for k in parts:
        path = st.path("runs", run.run_id, "token_stats", f"site={site}", fmt.part_name(k))
        try:
            with st.fs.open(path, "rb") as f:
                df = pl.read_parquet(f, columns=["layer", "position", "special", column])
        except (OSError, pl.exceptions.PolarsError):
            return None  # statistics not written (older run) or another layout: compute from the arrays
        sums.append(df.filter(~pl.col("special") & pl.col(column).is_not_null())
                    .group_by("layer", (pl.col("position") // bin_width).alias("bin"))
                    .agg(s=pl.col(column).cast(pl.Float64).sum(), n=pl.len()))
    total = pl.concat(sums).group_by("layer", "bin").agg(pl.col("s").sum(), pl.col("n").sum()).sort("layer", "bin")
    rd.notes.append(f"position profile: token_stats of {len(parts)} of {run.n_parts} shard(s)")
    n_tokens = int(total.filter(pl.col("layer") == 0)["n"].sum())
    profile = {int(layer): (g["bin"].to_numpy(), (g["s"] / g["n"]).to_numpy())
               for (layer,), g in total.group_by(["layer"], maintain_order=True)}
    return profile, f"per-token statistics of {n_tokens:,} tokens"


def _position_from_arrays(rd: _RunData, site: str, bin_width: int, tokens):
    """The same profile computed with ``analyze.rules.topp_mask`` on the bounded sample of tokens."""
    from analyze.rules import topp_mask

    run = rd.run
    slices = _sample_slices(run)
    keep = ~tokens["special"].to_numpy()
    bins = tokens["position"].to_numpy() // bin_width
    idx = np.concatenate([np.arange(s, e)[keep[s:e]] for s, e in slices])
    out = {}
    for layer in range(run.n_layers):
        a = _read_sample(run, site, layer, slices, keep)
        sparsity = 1.0 - topp_mask(a, POSITION_P).float().mean(dim=1).numpy()
        b = bins[idx]
        uniq = np.unique(b)
        out[layer] = (uniq, np.array([sparsity[b == u].mean() for u in uniq]))
    return out, f"a sample of {len(idx):,} tokens (top-p computed from the stored arrays)"


def _fig_position(figs: _Figures, st, rd: _RunData, tokens) -> None:
    from matplotlib.lines import Line2D

    run = rd.run
    site = _position_site(run)
    seq_len = int(run.manifest["config"].get("seq_len") or (int(tokens["position"].max()) + 1))
    bin_width = max(1, math.ceil(seq_len / POSITION_BINS))
    found = _position_from_stats(st, rd, site, bin_width)
    profile, source = found if found is not None else _position_from_arrays(rd, site, bin_width, tokens)
    cmap, norm = _depth(run.n_layers)
    fig, (ax,) = figs.new(1)
    stacked = {}
    for layer, (b, s) in sorted(profile.items()):
        ax.plot((b + 0.5) * bin_width, s * 100, color=cmap(norm(layer)), lw=1.0, alpha=0.85)
        for bi, si in zip(b.tolist(), s.tolist()):
            stacked.setdefault(bi, []).append(si)
    xs = np.array(sorted(stacked))
    ax.plot((xs + 0.5) * bin_width, [np.mean(stacked[x]) * 100 for x in xs], color="black", lw=2.2)
    ax.legend(handles=[_layer_handle(run.n_layers), Line2D([], [], color="black", lw=2.2, label="mean over layers")],
              loc="best", fontsize=8)
    ax.set(xlabel=f"position in the window (tokens, bins of {bin_width})",
           ylabel=f"sparsity at top-p {POSITION_P:g} (% of entries dropped)", xlim=(0, seq_len),
           title=f"site: {site}")
    ax.grid(alpha=0.3)
    _depth_colorbar(fig, [ax], run.n_layers)
    figs.save(fig, f"fig-position-{run.run_id}",
              f"Open-loop sparsity vs position in the window ({site}, top-p {POSITION_P:g}) — {rd.label}",
              f"Mean per-token sparsity of the {site} activation under top-p {POSITION_P:g}, per layer (colour: "
              f"depth) and averaged over layers, against the token's position in its {seq_len}-token window; "
              f"special tokens (BOS) excluded. From {source}.")


# ---------------------------------------------------------------- HTML


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 3rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9rem; color: #444; max-width: 1100px; }
.tag { display: inline-block; font-size: 0.75rem; padding: 0 0.4rem; border-radius: 0.3rem; margin-right: 0.3rem; }
.open { background: #e3effa; } .closed { background: #fbe8d9; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.85rem;
              word-break: break-all; }
.note { background: #fffbe6; border: 1px solid #eedc82; padding: 0.5rem 0.8rem; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _pct(v, digits: int = 1) -> str:
    return "–" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v * 100:.{digits}f} %"


def _figure_html(f: _Figure) -> str:
    return (f'<figure id="{f.stem}"><img src="{f.stem}.png" alt="{_e(f.title)}">'
            f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)} "
            f'Files: <a href="{f.stem}.svg">SVG</a> · <a href="{f.stem}.png">PNG</a></figcaption></figure>')


def _critical_table(data: list[_RunData], open_crit, tolerance: float) -> str:
    import polars as pl

    head = ("<tr><th>model</th><th>target</th>"
            f'<th><span class="tag open">open-loop</span>critical sparsity (rel. error &le; {tolerance:g})</th>'
            '<th><span class="tag open">open-loop</span>at top-p (grid point)</th>'
            '<th><span class="tag closed">closed-loop</span>critical sparsity, top-1 ratio &ge; 0.99 [95% CI]</th>'
            '<th><span class="tag closed">closed-loop</span>critical sparsity, exp(&minus;&Delta;NLL) &ge; 0.99 '
            "[95% CI]</th><th>closed-loop tokens (held-out)</th></tr>")
    rows = []
    for rd in data:
        for target in rd.targets:
            o = open_crit.filter((pl.col("run_id") == rd.run.run_id) & (pl.col("target") == target))
            o = o.row(0, named=True) if o.height else {}
            cells = [_e(rd.label), _e(target), _pct(o.get("critical_sparsity_interp")),
                     _e(f"{o['critical_value_grid']:g}") if _finite(o.get("critical_value_grid")) else "–"]
            for criterion in ("top1_acc", "exp_neg_dnll"):
                c = _closed_row(rd, target, criterion)
                cells.append("not evaluated" if c is None else
                             f"{_pct(c.get('critical_sparsity_interp'))} [{_pct(c.get('critical_lo'))}, "
                             f"{_pct(c.get('critical_hi'))}]")
            c = _closed_row(rd, target, "top1_acc")
            cells.append("–" if c is None or c.get("n_tokens") is None else f"{int(c['n_tokens']):,}")
            rows.append("<tr>" + "".join(f'<td class="num">{x}</td>' if i >= 2 else f"<td>{x}</td>"
                                         for i, x in enumerate(cells)) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _provenance(rd: _RunData) -> str:
    from pipeline.sites import SITES

    m = rd.run.manifest
    model, corpus, cfg = m.get("model", {}), m.get("corpus", {}), m.get("config", {})
    ffn = model.get("ffn", {})
    stats = m.get("stats", {})
    rows = [
        ("run id", f'<span class="mono">{_e(m.get("run_id"))}</span> ({_e(m.get("status"))}, '
                   f"completed {_e(m.get('completed'))})"),
        ("model", f"{_e(model.get('name'))} — {_e(model.get('architecture'))}, {_e(model.get('model_type'))}; "
                  f"source: {_e(model.get('source'))}; licence: {_e(model.get('license'))}"),
        ("weights sha256", f'<span class="mono">{_e(model.get("weights_sha256"))}</span> '
                           f'(weights id <span class="mono">{_e(model.get("weights_id"))}</span>)'),
        ("FFN", f"{_e(ffn.get('pattern'))}, activation {_e(ffn.get('activation'))}, d_model {_e(ffn.get('d_model'))}, "
                f"d_ff {_e(ffn.get('d_ff'))}, {_e(ffn.get('n_layers'))} layers"),
        ("corpus", f"{_e(corpus.get('name'))} ({_e(corpus.get('spec'))}), split {_e(cfg.get('split'))}, "
                   f"{_e(corpus.get('n_documents'))} documents; licence: {_e(corpus.get('license'))}"),
        ("corpus sha256", f'<span class="mono">{_e(corpus.get("sha256"))}</span>'),
        ("tokens", f"{int(m.get('n_tokens', 0)):,} in {_e(m.get('n_sequences'))} windows of at most "
                   f"{_e(cfg.get('seq_len'))} (BOS first: {_e(cfg.get('add_bos'))}), batch size "
                   f"{_e(cfg.get('batch_size'))}"),
        ("sites", _e(", ".join(s for s in SITES if s in m.get("arrays", {})))),
        ("dtype", f"stored {_e(cfg.get('dtype'))}, computed {_e(cfg.get('compute_dtype'))}"),
        ("versions", _e(", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items())))),
        ("collection", f"{_e(stats.get('elapsed_s'))} s, {_e(stats.get('tokens_per_s'))} tokens/s, "
                       f"{int(stats.get('bytes_on_disk', 0)):,} bytes on disk"),
    ]
    if rd.closed.height:
        ids = ", ".join(sorted(set(rd.closed["eval_id"].to_list())))
        rows.append(("closed-loop evaluations", f'<span class="mono">{_e(ids)}</span> (held-out split)'))
    if rd.notes:
        rows.append(("report notes", _e("; ".join(rd.notes))))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<h3 id="run-{rd.run.run_id}">{_e(rd.label)}</h3><table>{body}</table>'


def _page(store_url: str, data: list[_RunData], figs: list[_Figure], open_crit, tolerance: float) -> str:
    from actsparse import __version__

    by_stem = {f.stem: f for f in figs}

    def fig(stem: str) -> str:
        return _figure_html(by_stem[stem]) if stem in by_stem else ""

    runs_list = "".join(f'<li><a href="#run-{rd.run.run_id}">{_e(rd.label)}</a>: {rd.run.n_tokens:,} tokens, '
                        f"{rd.run.n_layers} layers, run <span class=\"mono\">{rd.run.run_id}</span></li>"
                        for rd in data)
    any_closed = any(rd.closed.height for rd in data)
    closed = fig("fig-closed-loop-accuracy") if any_closed else (
        '<p class="note">No closed-loop evaluation is stored with these runs, so this report shows open-loop '
        "results only. Add one with <code>actsparse evaluate --store STORE --run RUN_ID --target intermediate"
        "</code> and rebuild the report.</p>")

    def per_run(prefix: str) -> str:
        return "".join(fig(f"{prefix}-{rd.run.run_id}") for rd in data)

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>actsparse report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>actsparse report: FFN activation sparsity</h1>",
        f"<p>Store <code>{_e(store_url)}</code>, actsparse {_e(__version__)}. Runs:</p><ul>{runs_list}</ul>",
        '<p><span class="tag open">open-loop</span> results are computed offline from the stored dense '
        "activations of the collection split, one layer at a time (each layer sees dense inputs). "
        '<span class="tag closed">closed-loop</span> results re-run the model with every FFN layer sparsified '
        "at once, on the corpus's held-out split. All rules are top-p (the fewest largest-|a| entries "
        "holding a fraction p of a token's L1 mass); sparsity is the fraction of entries dropped, with "
        "special tokens excluded.</p>",
        "<h2>Critical sparsity</h2>", _critical_table(data, open_crit, tolerance), fig("fig-critical-sparsity"),
        '<h2><span class="tag open">open-loop</span>Sparsity and simulated error</h2>', fig("fig-error-vs-sparsity"),
        per_run("fig-sparsity-vs-topp"), per_run("fig-heatmap"),
        '<h2><span class="tag closed">closed-loop</span>Evaluation</h2>', closed,
        "<h2>Activations</h2>", per_run("fig-magnitudes"), per_run("fig-position"),
        "<h2>Provenance</h2>", "".join(_provenance(rd) for rd in data),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------- entry point


def build_report(store, out_dir: str | Path, runs: Sequence[str] | None = None, *,
                 progress: ProgressFactory | None = None, log: Callable[[str], None] = print) -> Path:
    """Write a static HTML report of a store's runs with its figures (PNG and SVG) into ``out_dir``.

    Args:
        store: store path or URL (or an open ``pipeline.reader.StoreReader``).
        out_dir: output directory (created if missing); files there with the report's fixed names
            (``index.html``, ``fig-*.png``, ``fig-*.svg``, ``critical-sparsity.csv``) are overwritten.
        runs: run ids or unique prefixes (default: every complete run of the store).
        progress: progress reporter for open-loop curves that are not cached yet.
        log: where one-line messages go.

    Returns:
        The absolute path of ``index.html``.

    Raises:
        ActsparseError: no complete run, an unknown or incomplete run, a target's missing sites, or
            an output directory inside the store or that cannot be written.
    """
    import matplotlib
    import polars as pl

    from analyze.curves import DEFAULT_TOLERANCE, critical_sparsity

    st = _reader(store)
    ids = list(dict.fromkeys(st.run(r).run_id for r in runs)) if runs else st.run_ids()
    if not ids:
        raise ActsparseError(f"store {st.url} holds no complete run to report on")
    out = Path(out_dir).resolve()
    if st.is_local and (out == Path(st.root).resolve() or Path(st.root).resolve() in out.parents):
        # a store holds only what its format lists: `actsparse verify` and copies would carry the report
        raise ActsparseError(f"--out {out_dir} is inside the store {st.url}; write the report elsewhere")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ActsparseError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    run_objs = [st.run(i) for i in ids]
    colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(run_objs))]
    data = []
    for run, label, color in zip(run_objs, _labels(run_objs), colors):
        log(f"report: run {run.run_id} ({label})")
        curves = report_curves(st, run.run_id, progress=progress)
        summary, critical = closed_loop(st, run.run_id)
        data.append(_RunData(run, label, matplotlib.colors.to_hex(color), curves, summary, critical))

    with_curves = [rd for rd in data if rd.targets]
    open_crit = (critical_sparsity(pl.concat([rd.curves for rd in with_curves], how="diagonal_relaxed"),
                                   DEFAULT_TOLERANCE) if with_curves else pl.DataFrame())
    figs = _Figures(out)
    try:
        if with_curves:
            _fig_critical(figs, with_curves, open_crit, DEFAULT_TOLERANCE)
            _fig_error(figs, with_curves, DEFAULT_TOLERANCE)
        for rd in with_curves:
            _fig_sparsity_topp(figs, rd)
            _fig_heatmap(figs, rd)
        if any(rd.closed.height for rd in data):
            _fig_closed(figs, data)
        for rd in data:
            tokens = rd.run.tokens()
            special = tokens["special"].to_numpy()
            _fig_magnitudes(figs, rd, special)
            _fig_position(figs, st, rd, tokens)
        if open_crit.height:
            open_crit.write_csv(out / "critical-sparsity.csv")
        page = _page(st.url, data, figs.saved, open_crit, DEFAULT_TOLERANCE)
        tmp = out / ".index.html.tmp"
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out / "index.html")
    except OSError as e:
        raise ActsparseError(f"cannot write the report into {out}: {e.strerror or e}") from None
    log(f"report: {len(figs.saved)} figures (PNG and SVG) in {out}")
    return out / "index.html"
