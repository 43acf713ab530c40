"""The report's figures of mixture-of-experts runs (open-loop, ``actsparse.analyze.moe``): sparsity per expert and
layer, and each expert's load against its sparsity, at one target and top-p value (``EXPERT_TARGET``,
``EXPERT_P``)."""

from __future__ import annotations

import numpy as np

from actsparse.analyze.report.data import EXPERT_P, EXPERT_TARGET, RunData
from actsparse.analyze.report.figures import Figures, _depth, _depth_colorbar


def _rows(rd: RunData):
    """The expert rows at the report's target and p (the nearest grid value to ``EXPERT_P``)."""
    import polars as pl

    d = rd.experts.filter((pl.col("target") == EXPERT_TARGET) & (pl.col("rule") == "top-p"))
    if not d.height:
        d = rd.experts.filter(pl.col("rule") == "top-p")
    values = sorted(set(d["value"].to_list()), key=lambda v: abs(v - EXPERT_P))
    return d.filter(pl.col("value") == values[0]), values[0], d["target"][0]


def fig_expert_sparsity(figs: Figures, rd: RunData) -> None:
    """Heatmap of sparsity per MoE layer (rows) and expert (columns; the shared expert last, ``S``)."""
    import polars as pl
    from matplotlib.ticker import MaxNLocator

    d, p, target = _rows(rd)
    moe = rd.run.moe
    layers = list(moe.moe_layers)
    shared = moe.d_shared is not None
    grid = np.full((len(layers), moe.n_experts + shared), np.nan)
    for row in d.filter(pl.col("unit").is_in(["expert", "shared"])).iter_rows(named=True):
        col = row["expert"] if row["unit"] == "expert" else moe.n_experts
        grid[layers.index(row["layer"]), col] = row["sparsity"] * 100
    fig, (ax,) = figs.new(1)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]), [str(e) for e in range(moe.n_experts)] + (["S"] if shared else []),
                  fontsize=7 if grid.shape[1] > 16 else 9)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=16))
    ax.set(xlabel="expert" + (" (S: shared expert)" if shared else ""), ylabel="decoder layer (MoE layers)",
           title=f"target: {target}, top-p {p:g}")
    fig.colorbar(im, ax=ax, label="sparsity (% of entries dropped)")
    dense = f"; dense layers {list(moe.dense_layers)} are left out" if moe.dense_layers else ""
    figs.save(fig, f"fig-expert-sparsity-{rd.run.run_id}",
              f"Open-loop sparsity per expert and layer — {rd.label}",
              f"Sparsity the top-p rule at p = {p:g} induces on the {target} of each expert, over the rows routed "
              f"to it (the authors' count: zeroed entries over rows × width){dense}. Open-loop: computed from the "
              f"stored activations of {rd.run.n_tokens:,} tokens (special tokens excluded).")


def fig_expert_load(figs: Figures, rd: RunData) -> None:
    """Each routed expert's load (rows per token) against its sparsity, one point per (layer, expert)."""
    import polars as pl

    d, p, target = _rows(rd)
    experts = d.filter(pl.col("unit") == "expert")
    n_layers = rd.run.n_layers
    cmap, norm = _depth(n_layers)
    fig, (ax,) = figs.new(1)
    ax.scatter(experts["load"].to_numpy() * 100, experts["sparsity"].to_numpy() * 100,
               c=[cmap(norm(layer)) for layer in experts["layer"].to_list()], s=18, alpha=0.85, edgecolors="none")
    k = rd.run.moe.top_k
    ax.axvline(k / rd.run.moe.n_experts * 100, color="grey", ls=":", lw=1.2,
               label=f"uniform load (k/E = {k}/{rd.run.moe.n_experts})")
    ax.set(xlabel="load (% of counted tokens routed to the expert)", ylabel="sparsity (% of entries dropped)",
           title=f"target: {target}, top-p {p:g}", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _depth_colorbar(fig, [ax], n_layers)
    figs.save(fig, f"fig-expert-load-{rd.run.run_id}",
              f"Expert load against sparsity — {rd.label}",
              f"One point per routed expert and MoE layer (colour: depth): the share of counted tokens routed to the "
              f"expert (the loads of a layer sum to k = {k}) and the sparsity top-p {p:g} induces on its {target}. "
              "Open-loop.")
