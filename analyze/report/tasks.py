"""The report's downstream-task part: the lm-eval task evaluations stored with a run (``actsparse evaluate --tasks``),
their accuracy ratio against sparsity per task and target, and task critical sparsity beside the open-loop and
next-token (closed-loop) figures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from actsparse.analyze.report.data import REPORT_TARGETS, RunData, closed_row
from actsparse.analyze.report.figures import Figures, _bar
from actsparse.analyze.tasks.selection import AVERAGE
from actsparse.core import format as fmt

TARGET_ORDER = (*REPORT_TARGETS, "all-inputs")


@dataclass
class TaskData:
    """The task evaluations chosen for one run: ``summary`` and ``critical`` polars DataFrames (possibly empty)."""

    summary: object
    critical: object

    @property
    def targets(self) -> list[str]:
        have = set(self.summary["target"].to_list()) if self.summary.height else set()
        return [t for t in TARGET_ORDER if t in have]

    def tasks(self) -> list[str]:
        """Task names in the stored order, the average last."""
        names = list(dict.fromkeys(self.summary["task"].to_list())) if self.summary.height else []
        return [n for n in names if n != AVERAGE] + ([AVERAGE] if AVERAGE in names else [])


def _read(st, base: str, kind: fmt.ResultKind, eval_id: str):
    import polars as pl

    try:
        with st.fs.open(st.path(base, fmt.result_file(kind, eval_id)), "rb") as f:
            return pl.read_parquet(f)
    except (OSError, pl.exceptions.PolarsError):
        return None


def task_evaluations(st, run_id: str) -> TaskData:
    """The task evaluations stored with a run that the report shows: top-p with power 1, counted over real
    tokens; per target the one with the most examples (then the most rows, then its id). Evaluations that
    cannot be read, or a store that cannot be listed, give nothing."""
    import polars as pl

    base = fmt.result_base(run_id)
    try:
        paths = sorted(st.fs.glob(f"{st.path(base)}/{fmt.TASK_EVALUATION.glob}"))
    except Exception:  # noqa: BLE001 - listings are optional on remote stores
        paths = []
    chosen: dict[str, tuple] = {}
    for path in paths:
        eval_id = path.rsplit("/", 1)[-1].removeprefix(f"{fmt.TASK_EVALUATION.prefix}-").removesuffix(".parquet")
        if not fmt.ID_RE.match(eval_id):
            continue
        summary, critical = _read(st, base, fmt.TASK_EVALUATION, eval_id), _read(st, base, fmt.TASK_CRITICAL, eval_id)
        if summary is None or critical is None or not summary.height:
            continue
        first = summary.row(0, named=True)
        if first["rule"] != "top-p" or first["power"] != 1.0 or first["count_mode"] != "real":
            continue
        key = (int(summary["n_examples"].max()), summary.height, eval_id)
        if first["target"] not in chosen or key > chosen[first["target"]][0]:
            chosen[first["target"]] = (key, summary, critical)
    if not chosen:
        return TaskData(pl.DataFrame(), pl.DataFrame())
    order = sorted(chosen, key=TARGET_ORDER.index)
    return TaskData(pl.concat([chosen[t][1] for t in order], how="diagonal_relaxed"),
                    pl.concat([chosen[t][2] for t in order], how="diagonal_relaxed"))


def fig_task_accuracy(figs: Figures, rd: RunData, td: TaskData) -> None:
    """Per task (and the average): the task accuracy ratio against realized sparsity, one line per target."""
    import matplotlib
    import polars as pl

    tasks = td.tasks()
    colors = {t: matplotlib.colormaps["tab10"](i % 10) for i, t in enumerate(td.targets)}
    fig, axes = figs.new(len(tasks))
    for ax, task in zip(axes, tasks):
        for target in td.targets:
            s = td.summary.filter((pl.col("task") == task) & (pl.col("target") == target)).sort("sparsity")
            if not s.height:
                continue
            y = s["acc_ratio"].to_numpy()
            yerr = np.nan_to_num(np.vstack([y - s["acc_ratio_lo"].to_numpy(), s["acc_ratio_hi"].to_numpy() - y])
                                 .clip(min=0))
            ax.errorbar(s["sparsity"] * 100, y, yerr=yerr, marker="o", ms=4, lw=1.5, capsize=3,
                        color=colors[target], label=f"{target} ({int(s['n_examples'][0])} examples)")
        ax.axhline(0.99, color="gray", ls=":", lw=1.5, label="99% of dense")
        ax.set(title=f"task: {task}", xlabel="realized model-level sparsity (% of entries dropped)",
               ylabel="task accuracy, sparse / dense")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    figs.save(fig, f"fig-task-accuracy-{rd.run.run_id}",
              f"{rd.label}: downstream-task accuracy vs realized sparsity (top-p), per task and target",
              "lm-eval task accuracy of the model with every FFN layer sparsified at once, relative to lm-eval's "
              "dense run of the same examples ('average': mean accuracy and mean sparsity over tasks per grid value, "
              "the authors' construction); sparsity counted over real tokens, prefill and generation together; "
              "error bars: 95% bootstrap interval over examples.")


def fig_task_critical(figs: Figures, rd: RunData, td: TaskData, open_crit) -> None:
    """Per target: critical sparsity of every task and the average beside the open-loop and next-token figures."""
    import matplotlib
    import polars as pl
    from matplotlib.patches import Patch

    tasks = td.tasks()
    measures = ["open-loop", "next-token", *tasks]
    colors = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(measures)}
    width = 0.8 / len(measures)
    fig, (ax,) = figs.new(1)
    for j, target in enumerate(td.targets):
        o = open_crit.filter((pl.col("run_id") == rd.run.run_id) & (pl.col("target") == target)) \
            if open_crit.height else open_crit
        c = closed_row(rd, target, "top1_acc")
        bars = {"open-loop": (o["critical_sparsity_interp"][0] if o.height else None, None),
                "next-token": (None, None) if c is None else (c.get("critical_sparsity_interp"),
                                                              (c.get("critical_lo"), c.get("critical_hi")))}
        for task in tasks:
            t = td.critical.filter((pl.col("target") == target) & (pl.col("task") == task))
            bars[task] = (None, None) if not t.height else (t["critical_sparsity_interp"][0],
                                                            (t["critical_lo"][0], t["critical_hi"][0]))
        for i, m in enumerate(measures):
            value, interval = bars[m]
            x = j - 0.4 + width * (i + 0.5)
            if m in ("open-loop", "next-token") and value is None:
                continue  # not computed for this run: no bar rather than "n/a"
            _bar(ax, x, width, value if value is not None else math.nan, interval, colors[m],
                 hatch="//" if m == "open-loop" else None)
    ax.set_xticks(range(len(td.targets)), td.targets)
    ax.set(xlabel="sparsification target", ylabel="critical sparsity (% of entries dropped)", ylim=(0, 105),
           xlim=(-0.5, len(td.targets) - 0.5))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(handles=[Patch(facecolor=colors[m], edgecolor="black", hatch="//" if m == "open-loop" else None,
                             label=m) for m in measures], loc="upper left", fontsize=8, ncol=2)
    figs.save(fig, f"fig-task-critical-{rd.run.run_id}",
              f"{rd.label}: critical sparsity per downstream task beside open-loop and next-token",
              "Largest realized sparsity keeping >= 99% of dense accuracy: per lm-eval task and the task average "
              "(95% bootstrap interval over examples), next-token top-1 accuracy on the held-out split (closed-loop, "
              "interval over windows) and the open-loop error criterion (hatched); 'n/a': even the densest grid "
              "point misses the criterion.")


def _pct(v) -> str:
    return "–" if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v * 100:.1f} %"


def task_table(data: list[RunData], task_data: list[TaskData], open_crit) -> str:
    """HTML table: per run, target and task, dense accuracy and task critical sparsity [95% CI], beside the
    next-token closed-loop and the open-loop critical sparsity of the same target."""
    import html

    import polars as pl

    head = ("<tr><th>model</th><th>target</th><th>task</th><th>metric</th><th>examples</th><th>dense accuracy</th>"
            "<th>task critical sparsity [95% CI]</th><th>next-token (closed-loop) [95% CI]</th>"
            "<th>open-loop</th></tr>")
    rows = []
    for rd, td in zip(data, task_data):
        for target in td.targets:
            c = closed_row(rd, target, "top1_acc")
            closed = "–" if c is None else (f"{_pct(c.get('critical_sparsity_interp'))} [{_pct(c.get('critical_lo'))}, "
                                            f"{_pct(c.get('critical_hi'))}]")
            o = open_crit.filter((pl.col("run_id") == rd.run.run_id) & (pl.col("target") == target)) \
                if open_crit.height else open_crit
            opened = _pct(o["critical_sparsity_interp"][0]) if o.height else "–"
            for r in td.critical.filter(pl.col("target") == target).iter_rows(named=True):
                cells = [rd.label, target, r["task"], r["metric"] or "mean over tasks", f"{r['n_examples']:,}",
                         f"{r['dense_acc']:.3f}", f"{_pct(r['critical_sparsity_interp'])} [{_pct(r['critical_lo'])}, "
                         f"{_pct(r['critical_hi'])}]", closed, opened]
                rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"
