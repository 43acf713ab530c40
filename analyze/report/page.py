"""The report's HTML page: static (no script, nothing fetched), opened from disk or copied anywhere."""

from __future__ import annotations

import html
import math

from actsparse.analyze.report.data import RunData, closed_row
from actsparse.analyze.report.figures import Figure
from actsparse.core.vocab import SITES

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


def _figure_html(f: Figure) -> str:
    return (f'<figure id="{f.stem}"><img src="{f.stem}.png" alt="{_e(f.title)}">'
            f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)} "
            f'Files: <a href="{f.stem}.svg">SVG</a> · <a href="{f.stem}.png">PNG</a></figcaption></figure>')


def _critical_table(data: list[RunData], open_crit, tolerance: float) -> str:
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
                c = closed_row(rd, target, criterion)
                cells.append("not evaluated" if c is None else
                             f"{_pct(c.get('critical_sparsity_interp'))} [{_pct(c.get('critical_lo'))}, "
                             f"{_pct(c.get('critical_hi'))}]")
            c = closed_row(rd, target, "top1_acc")
            cells.append("–" if c is None or c.get("n_tokens") is None else f"{int(c['n_tokens']):,}")
            rows.append("<tr>" + "".join(f'<td class="num">{x}</td>' if i >= 2 else f"<td>{x}</td>"
                                         for i, x in enumerate(cells)) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _provenance(rd: RunData) -> str:
    m = rd.run.manifest
    model, corpus, cfg, ffn, stats = m.model, m.corpus, m.config, m.ffn, m.stats
    rows = [
        ("run id", f'<span class="mono">{_e(m.run_id)}</span> ({_e(m.status)}, completed {_e(m.completed)})'),
        ("model", f"{_e(model.name)} — {_e(model.architecture)}, {_e(model.model_type)}; "
                  f"source: {_e(model.source)}; licence: {_e(model.license)}"),
        ("weights sha256", f'<span class="mono">{_e(model.weights_sha256)}</span> '
                           f'(weights id <span class="mono">{_e(model.weights_id)}</span>)'),
        ("FFN", f"{_e(ffn.pattern)}, activation {_e(ffn.activation)}, d_model {_e(ffn.d_model)}, "
                f"d_ff {_e(ffn.d_ff)}, {_e(ffn.n_layers)} layers"),
        ("corpus", f"{_e(corpus.name)} ({_e(corpus.spec)}), split {_e(m.split)}, "
                   f"{_e(corpus.n_documents)} documents; licence: {_e(corpus.license)}"),
        ("corpus sha256", f'<span class="mono">{_e(corpus.sha256)}</span>'),
        ("tokens", f"{m.n_tokens:,} in {_e(m.n_sequences)} windows of at most "
                   f"{_e(m.seq_len)} (BOS first: {_e(cfg.get('add_bos'))}), batch size "
                   f"{_e(cfg.get('batch_size'))}"),
        ("sites", _e(", ".join(s for s in SITES if s in m.arrays))),
        ("dtype", f"stored {_e(m.stored_dtype)}, computed {_e(m.compute_dtype)}"),
        ("versions", _e(", ".join(f"{k} {v}" for k, v in sorted(m.versions.items())))),
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


def page(store_url: str, data: list[RunData], figs: list[Figure], open_crit, tolerance: float, *,
         tasks_html: str = "") -> str:
    """The page; ``tasks_html``: the downstream-task table (``report.tasks.task_table``), its section left out
    when empty."""
    from actsparse.core import __version__

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
        *(['<h2><span class="tag open">open-loop</span>Mixture of experts</h2>', per_run("fig-expert-sparsity"),
            per_run("fig-expert-load")] if any(rd.experts is not None for rd in data) else []),
        '<h2><span class="tag closed">closed-loop</span>Evaluation</h2>', closed,
        *(['<h2><span class="tag closed">closed-loop</span>Downstream tasks (lm-eval)</h2>', tasks_html,
           per_run("fig-task-accuracy"), per_run("fig-task-critical")] if tasks_html else []),
        "<h2>Across runs</h2>" if ("fig-effective-rank" in by_stem or "fig-size-scaling" in by_stem) else "",
        fig("fig-effective-rank"), fig("fig-size-scaling"),
        "<h2>Activations</h2>", per_run("fig-magnitudes"), per_run("fig-position"),
        ('<h2><span class="tag open">open-loop</span>Generation and diffusion</h2>' if any(
            f.stem.startswith(("fig-phases-", "fig-steps-")) for f in figs) else ""),
        per_run("fig-phases"), per_run("fig-steps"),
        "<h2>Provenance</h2>", "".join(_provenance(rd) for rd in data),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
