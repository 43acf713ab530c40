"""Report figures across runs: effective rank against relative depth beside critical sparsity, and critical
sparsity against parameter count (one line per model family: the paper's size-scaling figure, docs/paper-notes.md
§5). Both read stored results only: the effective rank from ``actsparse rank``, the parameter count from the
manifest (runs collected before it was recorded have none and are left out, as the caption says)."""

from __future__ import annotations

import math

from actsparse.analyze.report.data import RunData
from actsparse.analyze.report.figures import Figures, closed_row

SCALING_TARGET = "intermediate"


def stored_rank(st, run_id: str):
    """Every stored effective-rank row of a run (all analyses concatenated), or None."""
    import polars as pl

    from actsparse.core import format as fmt

    base = st.path(fmt.result_base(run_id))
    try:
        paths = sorted(st.fs.glob(f"{base}/{fmt.EFFECTIVE_RANK.glob}"))
    except (FileNotFoundError, OSError):
        return None
    frames = []
    for p in paths:
        with st.fs.open(p, "rb") as f:
            frames.append(pl.read_parquet(f))
    return pl.concat(frames, how="diagonal_relaxed").unique(["site", "layer", "n_tokens"]) if frames else None


def _open_critical(open_crit, run_id: str) -> float | None:
    import polars as pl

    if not open_crit.height:
        return None
    o = open_crit.filter((pl.col("run_id") == run_id) & (pl.col("target") == SCALING_TARGET)
                         & (pl.col("rule") == "top-p"))
    return float(o["critical_sparsity_interp"][0]) if o.height else None


def fig_effective_rank(figs: Figures, st, data: list[RunData], open_crit) -> None:
    """Effective rank / width of the intermediate (else the first site with a rank) against relative depth, one
    line per run at the largest token count every run has; beside it, each run's mean against its open-loop
    critical sparsity. Drawn only when at least one run has a stored effective rank."""
    import polars as pl

    ranks = {rd.run.run_id: stored_rank(st, rd.run.run_id) for rd in data}
    ranks = {k: v for k, v in ranks.items() if v is not None and v.height}
    if not ranks:
        return
    sites = set.intersection(*(set(v["site"].to_list()) for v in ranks.values()))
    site = SCALING_TARGET if SCALING_TARGET in sites else (sorted(sites)[0] if sites else None)
    if site is None:
        return
    counts = set.intersection(*(set(v.filter(pl.col("site") == site)["n_tokens"].to_list()) for v in ranks.values()))
    if not counts:
        return
    n = max(counts)
    fig, (ax, ax2) = figs.new(2)
    for rd in data:
        if rd.run.run_id not in ranks:
            continue
        r = ranks[rd.run.run_id].filter((pl.col("site") == site) & (pl.col("n_tokens") == n)).sort("layer")
        ax.plot(r["depth"].to_list(), r["erank_norm"].to_list(), marker="o", ms=3, color=rd.color, label=rd.label)
        crit = _open_critical(open_crit, rd.run.run_id)
        closed = closed_row(rd, SCALING_TARGET, "top1_acc")
        mean = float(r["erank_norm"].mean())
        if crit is not None and math.isfinite(crit):
            ax2.scatter([mean], [100 * crit], color=rd.color, marker="o", label=f"{rd.label} (open-loop)")
        cc = None if closed is None else closed.get("critical_sparsity_interp")
        if cc is not None and math.isfinite(cc):
            ax2.scatter([mean], [100 * cc], color=rd.color, marker="s", facecolors="none",
                        label=f"{rd.label} (closed-loop)")
    ax.set(xlabel="relative depth (layer / (layers - 1))", ylabel="effective rank / width", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax2.set(xlabel="mean effective rank / width over layers", ylabel=f"critical sparsity, {SCALING_TARGET} (%)",
            ylim=(0, 105))
    ax2.grid(alpha=0.3)
    if ax2.has_data():
        ax2.legend(fontsize=8)
    figs.save(fig, "fig-effective-rank", f"Effective rank of the {site} activations against depth, and critical "
                                        "sparsity",
              f"Entropy effective rank (docs/paper-notes.md §1.6) of the dense {site} activations, token x feature "
              f"matrix of the first {n:,} counted tokens, not centred, divided by the width; it is bounded by "
              f"min(tokens, width), so only runs at the same token count are drawn together. Right: each run's mean "
              f"over layers against its critical sparsity (top-p, {SCALING_TARGET}; open-loop circles, closed-loop "
              "squares where evaluated). From `actsparse rank`.")


def fig_size_scaling(figs: Figures, data: list[RunData], open_crit) -> None:
    """Critical sparsity (intermediate, top-p) against parameter count, one line per model family (model_type),
    open-loop and, where evaluated, closed-loop. Drawn when at least one run records its parameter count."""
    fams: dict[str, list[tuple[int, float | None, float | None, str]]] = {}
    skipped = 0
    for rd in data:
        m = rd.run.manifest.model
        if m.n_params is None:
            skipped += 1
            continue
        closed = closed_row(rd, SCALING_TARGET, "top1_acc")
        fams.setdefault(m.model_type or m.architecture or "unknown", []).append(
            (m.n_params, _open_critical(open_crit, rd.run.run_id),
             None if closed is None else closed.get("critical_sparsity_interp"), rd.color))
    if not fams:
        return
    from matplotlib import colormaps

    fig, (ax,) = figs.new(1)
    for i, (fam, pts) in enumerate(sorted(fams.items())):
        pts.sort()
        color = colormaps["tab10"](i % 10)
        for k, (marker, style, what) in enumerate((("o", "-", "open-loop"), ("s", "--", "closed-loop"))):
            xy = [(p[0], 100 * p[1 + k]) for p in pts if p[1 + k] is not None and math.isfinite(p[1 + k])]
            if xy:
                ax.plot(*zip(*xy), marker=marker, ls=style, color=color, label=f"{fam} ({what})")
    ax.set_xscale("log")
    ax.set(xlabel="parameters (log scale)", ylabel=f"critical sparsity, {SCALING_TARGET}, top-p (%)", ylim=(0, 105))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    note = f" {skipped} run(s) without a recorded parameter count are left out." if skipped else ""
    figs.save(fig, "fig-size-scaling", "Critical sparsity against model size, per model family",
              "One line per model family (the manifest's model_type), one point per run: open-loop critical sparsity "
              "(solid) and closed-loop where evaluated (dashed). Parameters as counted at collection (tied "
              f"embeddings once).{note} The named query size_scaling gives the same numbers.")
