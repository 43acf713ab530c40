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
* downstream tasks (``actsparse.analyze.tasks``: lm-eval task evaluations stored with a run): the task accuracy
  ratio against realized sparsity per task and target, and critical sparsity per task and the task average
  beside the open-loop and next-token figures (``report.tasks``);
* activations: the distribution of |a| per layer and site, and sparsity against the position in the
  window (from the per-token statistics of ``actsparse.analyze.token_stats``, or a bounded sample);
* across runs, where stored: effective rank against relative depth beside critical sparsity (``actsparse
  rank``), and critical sparsity against parameter count per model family (``analyze.report.scaling``);
* mixture-of-experts runs (open-loop, ``actsparse.analyze.moe``): sparsity per expert and layer, and each
  expert's load against its sparsity;
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

from actsparse.analyze.report.data import (
    RunData,
    closed_loop,
    curve_groups,
    labels,
    reader,
    report_curves,
    report_experts,
)
from actsparse.analyze.report.experts import fig_expert_load, fig_expert_sparsity
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
from actsparse.analyze.report.scaling import fig_effective_rank, fig_size_scaling
from actsparse.analyze.report.steps import fig_phases, fig_steps, step_analysis
from actsparse.analyze.report.tasks import fig_task_accuracy, fig_task_critical, task_evaluations, task_table
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_text
from actsparse.core.progress import ProgressFactory

__all__ = ["build_report", "check_out_dir", "curve_groups", "report_curves"]


# Written first into a report's directory: a later report may replace the files of that directory, and of no
# other non-empty one (a report's fixed file names would overwrite the user's own files).
MARKER = ".actsparse-report"
MARKER_TEXT = "This directory holds an actsparse report; `actsparse report --out` may rewrite it.\n"


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an output path that is a file, or a non-empty directory that is not a previous report.

    Raises:
        ActsparseError: naming the path.
    """
    out, given = Path(out_dir).resolve(), out_dir
    if out.exists() and not out.is_dir():
        raise ActsparseError(f"--out {given} is a file; give a directory for the report")
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise ActsparseError(f"--out {given} is a non-empty directory that holds no actsparse report; "
                             "give a new or empty directory, or that of a previous report")


def build_report(store, out_dir: str | Path, runs: Sequence[str] | None = None, *,
                 progress: ProgressFactory | None = None, log: Callable[[str], None] = print) -> Path:
    """Write a static HTML report of a store's runs with its figures (PNG and SVG) into ``out_dir``.

    Args:
        store: store path or URL (or an open ``pipeline.reader.StoreReader``).
        out_dir: output directory: new, empty, or a previous report's (marked by ``MARKER``), whose files
            with the report's fixed names (``index.html``, ``fig-*.png``, ``fig-*.svg``,
            ``critical-sparsity.csv``) are overwritten; any other non-empty directory is refused.
        runs: run ids or unique prefixes (default: every complete run of the store).
        progress: progress reporter for open-loop curves that are not cached yet.
        log: where one-line messages go.

    Returns:
        The absolute path of ``index.html``.

    Raises:
        ActsparseError: no complete run, an unknown or incomplete run, a target's missing sites, or
            an output directory inside the store, non-empty and not a report, or that cannot be written.
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
    check_out_dir(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / MARKER, MARKER_TEXT)
    except OSError as e:
        raise ActsparseError(f"cannot create the output directory {out}: {e.strerror or e}") from None
    run_objs = [st.run(i) for i in ids]
    colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(run_objs))]
    data = []
    for run, label, color in zip(run_objs, labels(run_objs), colors):
        log(f"report: run {run.run_id} ({label})")
        curves = report_curves(st, run.run_id, progress=progress)
        summary, critical = closed_loop(st, run.run_id)
        data.append(RunData(run, label, matplotlib.colors.to_hex(color), curves, summary, critical,
                            experts=report_experts(st, run.run_id)))

    task_data = [task_evaluations(st, rd.run.run_id) for rd in data]
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
        for rd in data:
            if rd.experts is not None and rd.experts.height:
                fig_expert_sparsity(figs, rd)
                fig_expert_load(figs, rd)
        if any(rd.closed.height for rd in data):
            fig_closed(figs, data)
        for rd, td in zip(data, task_data):
            if td.summary.height:
                fig_task_accuracy(figs, rd, td)
                fig_task_critical(figs, rd, td, open_crit)
        fig_effective_rank(figs, st, data, open_crit)
        fig_size_scaling(figs, data, open_crit)
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
        tasks_html = task_table(data, task_data, open_crit) if any(td.summary.height for td in task_data) else ""
        atomic_write_text(out / "index.html", page(st.url, data, figs.saved, open_crit, DEFAULT_TOLERANCE,
                                                   tasks_html=tasks_html))
    except OSError as e:
        raise ActsparseError(f"cannot write the report into {out}: {e.strerror or e}") from None
    log(f"report: {len(figs.saved)} figures (PNG and SVG) in {out}")
    return out / "index.html"
