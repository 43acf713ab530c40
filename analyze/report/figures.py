"""The report's figures: matplotlib, saved as PNG and SVG with byte-stable content, each titled, with labelled
axes, units and a legend, and marked open-loop or closed-loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actsparse.analyze.report.data import (
    HEATMAP_TARGET,
    POSITION_BINS,
    POSITION_P,
    REPORT_TARGETS,
    RunData,
    closed_row,
    position_from_arrays,
    position_from_stats,
    position_site,
    read_sample,
    sample_slices,
    slices_text,
)

# log10|a| histogram: 10 bins per decade over 1e-8 .. 1e3; values beyond fall into the end bins.
MAGNITUDE_EDGES = np.linspace(-8.0, 3.0, 111)
MIN_ERROR_PCT = 0.01  # lower end of the error axis (%)
DPI = 110


@dataclass
class Figure:
    stem: str
    title: str
    caption: str


class Figures:
    """Saves matplotlib figures as ``<stem>.png`` and ``<stem>.svg`` with byte-stable content."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.saved: list[Figure] = []

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
        self.saved.append(Figure(stem, title, caption))


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


def fig_sparsity_topp(figs: Figures, rd: RunData) -> None:
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


def fig_heatmap(figs: Figures, rd: RunData) -> None:
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


def fig_error(figs: Figures, data: list[RunData], tolerance: float) -> None:
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


def fig_critical(figs: Figures, data: list[RunData], open_crit, tolerance: float) -> None:
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
            c = closed_row(rd, target, "top1_acc")
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


def fig_closed(figs: Figures, data: list[RunData]) -> None:
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


def fig_magnitudes(figs: Figures, rd: RunData, special: np.ndarray) -> None:
    run = rd.run
    slices = sample_slices(run)
    keep = ~special
    n_sample = int(sum(keep[s:e].sum() for s, e in slices))
    from actsparse.core.vocab import SITES

    sites = [s for s in SITES if s in run.sites]
    cmap, norm = _depth(run.n_layers)
    centers = 10 ** ((MAGNITUDE_EDGES[:-1] + MAGNITUDE_EDGES[1:]) / 2)
    fig, axes = figs.new(len(sites), width=13.0 if len(sites) > 2 else 12.0)
    zero_notes = []
    for ax, site in zip(axes, sites):
        used = np.zeros(len(centers), bool)
        zeros = []
        for layer in range(run.n_layers):
            a = read_sample(run, site, layer, slices, keep).abs().numpy().ravel()
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
              f"non-special tokens per layer ({slices_text(slices, run.n_tokens)}); entries beyond 1e-8 .. 1e3 "
              f"are counted in the end bins. Exact zeros, not drawn (range over layers): {'; '.join(zero_notes)}.")


def fig_position(figs: Figures, st, rd: RunData, tokens) -> None:
    from matplotlib.lines import Line2D

    run = rd.run
    site = position_site(run)
    seq_len = run.manifest.seq_len or (int(tokens["position"].max()) + 1)
    bin_width = max(1, math.ceil(seq_len / POSITION_BINS))
    found = position_from_stats(st, rd, site, bin_width)
    profile, source = found if found is not None else position_from_arrays(rd, site, bin_width, tokens)
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
