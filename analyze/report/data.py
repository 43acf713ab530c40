"""What the report reads and computes for each run: open-loop curves, stored closed-loop evaluations, bounded
samples of activations and the position profile."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.progress import ProgressFactory, lazy_task

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
EXPERT_TARGET, EXPERT_P = "intermediate", 0.9  # mixture-of-experts runs: per-expert figures at this target and p


@dataclass
class RunData:
    """What the report needs of one run."""

    run: object  # pipeline.reader.Run
    label: str
    color: str
    curves: object  # polars DataFrame (analyze.curves rows), possibly empty
    closed: object  # closed-loop summary rows of the chosen evaluations, possibly empty
    closed_critical: object  # closed-loop critical rows of those evaluations, possibly empty
    notes: list[str] = field(default_factory=list)
    experts: object = None  # mixture-of-experts runs: the expert_curves rows of the report's curves

    @property
    def targets(self) -> list[str]:
        have = set(self.curves["target"].unique().to_list()) if self.curves.height else set()
        return [t for t in REPORT_TARGETS if t in have]


def reader(store):
    from actsparse.pipeline.reader import StoreReader

    return store if isinstance(store, StoreReader) else StoreReader(str(store))


def curve_groups(run) -> list[tuple[tuple[str, ...], dict]]:
    """The report's curve computations for one run: ``[(targets, grids)]``, for the targets its sites allow.

    Linear targets (gate, up, intermediate) share one sweep over the default top-p grid; input has
    its own, coarser grid. Targets whose tensors the run neither stored nor can recompute are left out.
    """
    from actsparse.analyze.curves import required_sites

    glu = run.manifest.ffn.glu
    if run.moe is not None:
        from actsparse.analyze.moe.curves import stored_sites

        sites = stored_sites(run)
    else:
        sites = run.sites
    usable = []
    for target in REPORT_TARGETS:
        try:
            required_sites(target, sites, glu)
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

    Computed by ``actsparse.analyze.curves.compute_curves`` and cached in the store by it, so a second call (or
    a second report) reads them back. ``progress`` is only called when something is computed.
    """
    import polars as pl

    from actsparse.analyze.curves import compute_curves

    st = reader(store)
    run = st.run(run_id)
    frames = []
    for targets, grids in curve_groups(run):
        step = lazy_task(progress, f"open-loop curves {run.manifest.model.name}: {', '.join(targets)}",
                         run.n_layers * run.n_tokens)
        frames.append(compute_curves(st, run.run_id, targets=targets, rules=("top-p",), grids=grids or None,
                                     progress=step))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def report_experts(store, run_id: str):
    """The per-expert rows of a mixture-of-experts run's report curves (``actsparse.analyze.moe.expert_curves``,
    cached with them by :func:`report_curves`), or None for a dense run."""
    import polars as pl

    from actsparse.analyze.moe import expert_curves

    st = reader(store)
    run = st.run(run_id)
    if run.moe is None:
        return None
    frames = [expert_curves(st, run.run_id, targets=targets, rules=("top-p",), grids=grids or None)
              for targets, grids in curve_groups(run)]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def closed_loop(store, run_id: str):
    """The closed-loop evaluations stored with a run that the report compares with its curves.

    Only top-p evaluations with power 1 are comparable with the report's curves; per target the one with the
    most tokens (then the most grid values) is kept (``actsparse.analyze.evaluate.stored_evaluations``
    leaves out evaluations that cannot be read).

    Returns:
        ``(summary, critical)`` polars DataFrames; both empty when the run has no usable evaluation
        (or none can be listed, e.g. on a web server without listings).
    """
    import polars as pl

    from actsparse.analyze.evaluate.storage import stored_evaluations

    need = {"target", "rule", "value", "sparsity", "acc_ratio", "n_tokens"}
    chosen: dict[str, tuple] = {}
    for ev in stored_evaluations(reader(store), run_id):
        summary, critical = ev.summary, ev.critical
        if not need <= set(summary.columns) or critical is None or "criterion" not in critical.columns:
            continue
        power = float(summary["power"][0]) if "power" in summary.columns else 1.0
        if summary["rule"][0] != "top-p" or power != 1.0:
            continue
        target = summary["target"][0]
        key = (int(summary["n_tokens"][0]), summary.height, ev.eval_id)
        if target not in chosen or key > chosen[target][0]:
            chosen[target] = (key, summary.with_columns(eval_id=pl.lit(ev.eval_id)),
                              critical.with_columns(eval_id=pl.lit(ev.eval_id)))
    if not chosen:
        return pl.DataFrame(), pl.DataFrame()
    order = [t for t in REPORT_TARGETS if t in chosen] + sorted(set(chosen) - set(REPORT_TARGETS))
    return (pl.concat([chosen[t][1] for t in order], how="diagonal_relaxed"),
            pl.concat([chosen[t][2] for t in order], how="diagonal_relaxed"))


def labels(runs: list) -> list[str]:
    """Model names, made unique with the corpus, then the run id, where runs share them."""
    names = [r.manifest.model.name or r.run_id for r in runs]
    if len(set(names)) < len(names):
        names = [f"{n} / {r.manifest.corpus.name}" for n, r in zip(names, runs)]
    if len(set(names)) < len(names):
        names = [f"{n} ({r.run_id[:8]})" for n, r in zip(names, runs)]
    return names


def closed_row(rd: RunData, target: str, criterion: str) -> dict | None:
    import polars as pl

    if not rd.closed_critical.height:
        return None
    c = rd.closed_critical.filter((pl.col("target") == target) & (pl.col("criterion") == criterion))
    return c.row(0, named=True) if c.height else None


def sample_slices(run) -> list[tuple[int, int]]:
    """Token ranges of the bounded sample: ``SAMPLE_TOKENS`` in all, from up to ``SAMPLE_SLICES`` stored
    chunks spread over the run (each range starts a chunk, so every chunk is decompressed once)."""
    n = run.n_tokens
    if n <= SAMPLE_TOKENS:
        return [(0, n)]
    k = min(SAMPLE_SLICES, run.n_parts)
    per = SAMPLE_TOKENS // k
    chunks = np.linspace(0, run.n_parts - 1, k).round().astype(np.int64)  # distinct: spacing >= 1
    return [(int(c) * run.chunk_tokens, min(int(c) * run.chunk_tokens + per, n)) for c in chunks]


def slices_text(slices, n_tokens: int) -> str:
    if len(slices) == 1 and slices[0] == (0, n_tokens):
        return "every stored token"
    return f"{len(slices)} contiguous slice{'s' if len(slices) > 1 else ''} spread over the run"


def read_sample(run, site: str, layer: int, slices, keep: np.ndarray):
    """float32 torch tensor [sampled non-special tokens, width] of one layer."""
    import torch

    return torch.cat([run.read(site, layer, s, e)[torch.from_numpy(keep[s:e])] for s, e in slices])


def position_site(run) -> str:
    return next(s for s in POSITION_SITES if s in run.sites)


def position_from_stats(st, rd: RunData, site: str, bin_width: int):
    """``({layer: (position bins, mean sparsity)}, source text)`` from token_stats; None where they are absent."""
    import polars as pl

    run = rd.run
    column = f"sparsity_p{round(POSITION_P * 100)}"
    parts = sorted(set(np.linspace(0, run.n_parts - 1, min(run.n_parts, MAX_STATS_PARTS)).astype(int).tolist()))
    sums = []
    for k in parts:
        path = st.path(fmt.run_path(run.run_id, fmt.stats_part(site, k)))
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


def position_from_arrays(rd: RunData, site: str, bin_width: int, tokens):
    """The same profile computed with ``analyze.rules.topp_mask`` on the bounded sample of tokens."""
    from actsparse.analyze.rules import topp_mask

    run = rd.run
    slices = sample_slices(run)
    keep = ~tokens["special"].to_numpy()
    bins = tokens["position"].to_numpy() // bin_width
    idx = np.concatenate([np.arange(s, e)[keep[s:e]] for s, e in slices])
    out = {}
    for layer in range(run.n_layers):
        a = read_sample(run, site, layer, slices, keep)
        sparsity = 1.0 - topp_mask(a, POSITION_P).float().mean(dim=1).numpy()
        b = bins[idx]
        uniq = np.unique(b)
        out[layer] = (uniq, np.array([sparsity[b == u].mean() for u in uniq]))
    return out, f"a sample of {len(idx):,} tokens (top-p computed from the stored arrays)"
