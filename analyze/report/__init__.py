"""The HTML report of a store: open-loop curves, closed-loop evaluations, activation statistics, provenance.

The package: ``data`` (what the report reads and computes), ``figures`` (matplotlib figures, PNG and SVG),
``page`` (the HTML), and :func:`build_report` here.

``build_report(store, out_dir)`` writes ``out_dir/index.html`` and its figures, each as PNG and SVG under
fixed file names, for every complete run of a store (or the runs asked for). The page is static: no
script and nothing fetched from the network, so it works opened from disk (``file://``) or copied anywhere.

What it shows (the paper's kinds of figures, docs/paper-notes.md §5):

* open-loop (``actsparse.analyze.curves``: one layer at a time, on the stored dense activations of the collection
  split): sparsity against top-p per layer, a layer x p heatmap, the simulated relative FFN-output
  error against model-level sparsity, and critical sparsity at ``actsparse.analyze.curves.DEFAULT_TOLERANCE``;
* closed-loop (``actsparse.analyze.evaluate``: every layer sparsified at once in a real forward pass on the
  held-out split), where evaluations are stored with a run: the top-1 accuracy ratio against realized
  sparsity, and critical sparsity with its bootstrap interval beside the open-loop one;
* activations: the distribution of |a| per layer and site, and sparsity against the position in the
  window (from the per-token statistics of ``actsparse.analyze.token_stats``, or a bounded sample);
* generation and diffusion runs (``report.steps``): prefill against generation sparsity, and sparsity and the
  Jaccard of kept masks against the step (``actsparse.analyze.steps``, computed and cached where missing);
* the provenance of every run, from its manifest.

The curves have one fixed configuration (``REPORT_TARGETS``, ``INPUT_TOPP_GRID``); ``actsparse.analyze.curves``
caches them in the store, so a second report of the same store reads them back instead of computing.
Memory and time are bounded independently of the run length: activations are sampled
(``SAMPLE_TOKENS`` tokens per layer and site) and at most ``MAX_STATS_PARTS`` statistics parts are read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from actsparse.analyze.report.data import RunData, closed_loop, curve_groups, labels, reader, report_curves
from actsparse.analyze.report.figures import (
    Figures,
    fig_closed,
    fig_critical,
    fig_error,
    fig_heatmap,
    fig_magnitudes,
    fig_position,
    fig_sparsity_topp,
)
from actsparse.analyze.report.page import page
from actsparse.analyze.report.steps import fig_phases, fig_steps, step_analysis
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_text
from actsparse.core.progress import ProgressFactory

__all__ = ["build_report", "curve_groups", "report_curves"]


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

    from actsparse.analyze.curves import DEFAULT_TOLERANCE, critical_sparsity

    st = reader(store)
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
    for run, label, color in zip(run_objs, labels(run_objs), colors):
        log(f"report: run {run.run_id} ({label})")
        curves = report_curves(st, run.run_id, progress=progress)
        summary, critical = closed_loop(st, run.run_id)
        data.append(RunData(run, label, matplotlib.colors.to_hex(color), curves, summary, critical))

    with_curves = [rd for rd in data if rd.targets]
    open_crit = (critical_sparsity(pl.concat([rd.curves for rd in with_curves], how="diagonal_relaxed"),
                                   DEFAULT_TOLERANCE) if with_curves else pl.DataFrame())
    figs = Figures(out)
    try:
        if with_curves:
            fig_critical(figs, with_curves, open_crit, DEFAULT_TOLERANCE)
            fig_error(figs, with_curves, DEFAULT_TOLERANCE)
        for rd in with_curves:
            fig_sparsity_topp(figs, rd)
            fig_heatmap(figs, rd)
        if any(rd.closed.height for rd in data):
            fig_closed(figs, data)
        for rd in data:
            tokens = rd.run.tokens()
            special = tokens["special"].to_numpy()
            fig_magnitudes(figs, rd, special)
            fig_position(figs, st, rd, tokens)
            if rd.run.manifest.kind == "generation":
                fig_phases(figs, st, rd)
            if rd.run.manifest.kind != "text" and (analysis := step_analysis(st, rd)) is not None:
                fig_steps(figs, rd, analysis)
        if open_crit.height:
            open_crit.write_csv(out / "critical-sparsity.csv")
        atomic_write_text(out / "index.html", page(st.url, data, figs.saved, open_crit, DEFAULT_TOLERANCE))
    except OSError as e:
        raise ActsparseError(f"cannot write the report into {out}: {e.strerror or e}") from None
    log(f"report: {len(figs.saved)} figures (PNG and SVG) in {out}")
    return out / "index.html"
