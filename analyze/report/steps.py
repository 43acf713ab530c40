"""The report's figures of generation and diffusion runs: prefill against generation, sparsity against the step and
the Jaccard of kept masks against the step (docs/paper-notes.md §5: "sparsity and mask Jaccard against the denoising
step for diffusion LLMs")."""

from __future__ import annotations

from actsparse.analyze.report.data import MAX_STATS_PARTS, POSITION_P, RunData
from actsparse.analyze.report.figures import Figures, _depth, _depth_colorbar, _layer_handle
from actsparse.core import format as fmt

PHASE_SITE = "intermediate"


def phase_profile(st, rd: RunData, site: str):
    """Per layer and phase, the mean per-token top-p sparsity at ``POSITION_P`` over non-special tokens, and per
    generation step (pooled over layers), from the run's ``token_stats`` and token parts (at most
    ``MAX_STATS_PARTS`` shards); None where statistics are missing."""
    import polars as pl

    run = rd.run
    column = f"sparsity_p{round(POSITION_P * 100)}"
    frames = []
    for k in range(min(run.n_parts, MAX_STATS_PARTS)):
        try:
            with st.fs.open(st.path(fmt.run_path(run.run_id, fmt.stats_part(site, k))), "rb") as f:
                stats = pl.read_parquet(f, columns=["layer", "token_index", "special", column])
            with st.fs.open(st.path(fmt.run_path(run.run_id, fmt.token_part(k))), "rb") as f:
                tokens = pl.read_parquet(f, columns=["token_index", "phase", "step"])
        except (OSError, pl.exceptions.PolarsError):
            return None
        frames.append(stats.join(tokens, on="token_index").filter(~pl.col("special") & pl.col(column).is_not_null()))
    if not frames:
        return None
    df = pl.concat(frames)
    by_layer = df.group_by("layer", "phase").agg(s=pl.col(column).cast(pl.Float64).mean()).sort("layer")
    by_step = df.group_by("step").agg(s=pl.col(column).cast(pl.Float64).mean(), n=pl.len()).sort("step")
    return by_layer, by_step


def _integer_ticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def fig_phases(figs: Figures, st, rd: RunData) -> None:
    """Prefill against generation per layer, and sparsity against the generation step (``token_stats``)."""
    run = rd.run
    site = PHASE_SITE if PHASE_SITE in run.sites else run.sites[0]
    found = phase_profile(st, rd, site)
    if found is None:
        rd.notes.append("prefill vs generation: no per-token statistics (run `actsparse index`)")
        return
    by_layer, by_step = found
    fig, (left, right) = figs.new(2)
    for phase, style in (("prefill", "-o"), ("generation", "-s")):
        part = by_layer.filter(by_layer["phase"] == phase)
        if part.height:
            left.plot(part["layer"].to_numpy(), part["s"].to_numpy() * 100, style, ms=3, label=phase)
    left.set(xlabel="layer", ylabel=f"sparsity at top-p {POSITION_P:g} (% of entries dropped)", title=f"site: {site}")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(by_step["step"].to_numpy(), by_step["s"].to_numpy() * 100, "-o", ms=3, color="black")
    right.set(xlabel="generation step (0 = prefill)", ylabel="sparsity, mean over layers (%)",
              title="by step")
    right.grid(alpha=0.3)
    _integer_ticks(left, right)
    figs.save(fig, f"fig-phases-{run.run_id}",
              f"Open-loop sparsity of prefill and generated tokens ({site}, top-p {POSITION_P:g}) — {rd.label}",
              f"Mean per-token sparsity under top-p {POSITION_P:g} of the {site} activation, non-special tokens: per "
              "layer for the prompt's tokens (prefill) and the generated ones (one forward each with the KV cache, "
              "up to each prompt's first stop token), and against the generation step (pooled over layers). From "
              "the per-token statistics of at most "
              f"{MAX_STATS_PARTS} shards.")


def fig_steps(figs: Figures, rd: RunData, analysis) -> None:
    """Sparsity against the step per layer (``step_sparsity``), and the Jaccard of kept masks against the step
    (``step_stability``, diffusion runs) of one per-step analysis (``analyze.steps``)."""
    import polars as pl

    run = rd.run
    sp = analysis.sparsity
    meta = sp.row(0, named=True)
    rule = f"{meta['target']}, {meta['rule']} {meta['value']:g}"
    cmap, norm = _depth(run.n_layers)
    fig, (left, right) = figs.new(2)
    model = sp.filter(pl.col("layer") == -1).sort("step")
    for layer in range(run.n_layers):
        part = (sp.filter(pl.col("layer") == layer).group_by("step")
                .agg(s=(pl.col("sparsity") * pl.col("n_tokens") * pl.col("width")).sum()
                     / (pl.col("n_tokens") * pl.col("width")).sum()).sort("step"))
        left.plot(part["step"].to_numpy(), part["s"].to_numpy() * 100, color=cmap(norm(layer)), lw=0.9, alpha=0.8)
    left.plot(model["step"].to_numpy(), model["sparsity"].to_numpy() * 100, color="black", lw=2.2, label="model")
    if model["sparsity_noised"].is_not_null().any():
        left.plot(model["step"].to_numpy(), model["sparsity_noised"].to_numpy() * 100, color="black", lw=1.4,
                  ls="--", label="model, masked/noised positions")
    left.legend(handles=[_layer_handle(run.n_layers), *left.get_legend_handles_labels()[0]], fontsize=8)
    left.set(xlabel="step", ylabel="sparsity (% of entries dropped)", title="sparsity per step")
    left.grid(alpha=0.3)
    _depth_colorbar(fig, [left], run.n_layers)
    stab = analysis.stability.filter(pl.col("layer") == -1)
    for kind, color in (("consecutive", "tab:blue"), ("drift", "tab:red")):
        part = (stab.filter(pl.col("kind") == kind).group_by("step")
                .agg(g=pl.col("n_intersection").sum() / pl.col("n_union").sum(),
                     t=pl.col("token_jaccard_sum").sum() / pl.col("n_tokens").sum()).sort("step"))
        if part.height:
            right.plot(part["step"].to_numpy(), part["g"].to_numpy(), color=color, lw=1.8, label=f"{kind}, global")
            right.plot(part["step"].to_numpy(), part["t"].to_numpy(), color=color, lw=1.2, ls="--",
                       label=f"{kind}, token-aware")
    if stab.height:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no step shares its rows with another\n(generation: each step feeds new tokens)",
                   ha="center", va="center", transform=right.transAxes, fontsize=9)
    right.set(xlabel="step", ylabel="Jaccard of kept masks", ylim=(0, 1.02), title="mask stability (model level)")
    right.grid(alpha=0.3)
    _integer_ticks(left, right)
    figs.save(fig, f"fig-steps-{run.run_id}",
              f"Open-loop sparsity and mask stability per step ({rule}) — {rd.label}",
              f"Left: dropped entries per step, per layer (colour: depth) and for the model (every hook weighted by "
              f"its width), over every stored row and (dashed) over the positions still masked or noised. Right: "
              f"Jaccard of the kept masks between consecutive steps and against the first step (drift) of the same "
              f"rows, global (Σ intersections / Σ unions) and token-aware (mean per-token Jaccard), pooled over "
              f"layers. Analysis {meta['analysis_id']} (`actsparse steps`).")


def step_analysis(st, rd: RunData):
    """The per-step analysis the report shows (computed and cached where missing): the intermediate target under
    the authors' flattened top-p 0.9 for a diffusion run, under the per-token top-p 0.9 for a generation run;
    None where the run lacks the sites (noted)."""
    from actsparse.analyze.steps import StepConfig, analyze_steps
    from actsparse.core.errors import ActsparseError
    from actsparse.core.vocab import FLAT_TOPP

    rule = FLAT_TOPP if rd.run.manifest.kind == "diffusion" else "top-p"
    try:
        return analyze_steps(st, rd.run.run_id, StepConfig(target="intermediate", rule=rule, value=POSITION_P))
    except ActsparseError as e:
        rd.notes.append(f"per-step figures left out: {e}")
        return None
