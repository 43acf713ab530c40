"""Per-step analysis of a stored generation or diffusion run: sparsity per step and mask stability across steps.

For one target and one rule value (any rule of ``core.vocab.STEP_RULES``, the authors' flattened diffusion top-p
among them), every layer's kept masks are computed from the stored activations of every step (open loop: each
layer on its dense stored input), and

* **sparsity per step** (docs/paper-notes.md §1.4, §1.7): dropped entries over entries of the rows stored at the
  step, per hook site and layer and at model level (every hook, weighted by width); also over the positions still
  masked or noised at the step (diffusion runs);
* **mask stability** (diffusion runs; docs/paper-notes.md §1.7, ``analyze.stability``): the Jaccard index of the
  kept masks between consecutive steps, from the first step (drift) and at intervals (4, 8, 16, 32 steps),
  global (Σ intersections / Σ unions) and token-aware (mean per-token Jaccard), per hook site and layer and at
  model level.

Masks compare the same rows at two steps, so steps are grouped into *frames*: a masked-diffusion batch (every step
runs over the same prompt and answer positions), a block-diffusion batch's canvas, a generation batch (whose steps
never share rows: no stability). Frames are pooled: counts of the same step (pair) add up over batches. The
``top-p-flat`` budget is per sample: the rows of one sequence and guidance half at one step. Every stored row is
counted, as the authors count (prompt, masked positions, both guidance halves, rows of diffusion_gemma that
stopped early). Results are cached in the run (``core.format.STEP_SPARSITY``, ``STEP_STABILITY``) under an
``analysis_id`` hashed from the settings.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from actsparse.analyze.curves.blocks import SiteBlock
from actsparse.analyze.flat_topp import check_flat_value, flat_topp_segments
from actsparse.analyze.rules import check_rule_value
from actsparse.analyze.sparsifier import keep_and_count
from actsparse.analyze.stability import DELTAS, STABILITY_COLUMNS, mask_stability
from actsparse.core import format as fmt
from actsparse.core.checksums import update_checksums
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_parquet
from actsparse.core.vocab import FLAT_TOPP, STEP_RULES, TARGETS

STEPS_VERSION = 1
# The hook sites of each target (as analyze.sparsifier.hook_points): the stored site holding its tensor.
HOOK_SITES = {"input": ("input",), "gate": ("act",), "up": ("up",), "intermediate": ("intermediate",),
              "all-inputs": ("input", "intermediate")}


@dataclass(frozen=True)
class StepConfig:
    """What a per-step analysis computes (hashed into its ``analysis_id``).

    Attributes:
        target: input | gate | up | intermediate | all-inputs.
        rule: a rule of ``STEP_RULES``; ``threshold`` is an absolute |a| here (no calibration).
        value: the rule value (``top-p-flat``: the kept mass fraction, the authors' percent / 100).
        power: top-p power q >= 1.
        deltas: step intervals of the interval Jaccard.
        empty: token-aware Jaccard of a token whose kept sets are both empty (``analyze.stability``).
    """

    target: str = "intermediate"
    rule: str = FLAT_TOPP
    value: float = 0.9
    power: float = 1.0
    deltas: tuple[int, ...] = DELTAS
    empty: float = 0.0

    def validate(self) -> None:
        """Raise ActsparseError for settings that cannot work."""
        if self.target not in TARGETS:
            raise ActsparseError(f"unknown target '{self.target}' (choose {', '.join(TARGETS)})")
        if self.rule not in STEP_RULES:
            raise ActsparseError(f"unknown rule '{self.rule}' (choose {', '.join(STEP_RULES)})")
        if self.rule == FLAT_TOPP:
            check_flat_value(self.value)
            if self.power != 1.0:
                raise ActsparseError(f"power applies only to the top-p rule, not {FLAT_TOPP}")
        else:
            check_rule_value(self.rule, self.value, self.power)
        if not self.deltas or any(int(d) < 1 for d in self.deltas):
            raise ActsparseError(f"--deltas must be step intervals >= 1, got {list(self.deltas)}")
        if not 0.0 <= self.empty <= 1.0:
            raise ActsparseError(f"the Jaccard of two empty kept sets must be in [0, 1], got {self.empty}")

    def ident(self, run_id: str) -> dict:
        return asdict(self) | dict(kind="steps", version=STEPS_VERSION, run_id=run_id,
                                   deltas=sorted({int(d) for d in self.deltas}))


@dataclass
class StepAnalysis:
    """The result of :func:`analyze_steps`: ``sparsity`` and ``stability`` polars DataFrames with the columns of
    ``core.format.STEP_SPARSITY`` and ``STEP_STABILITY`` (no stability rows for a generation run)."""

    analysis_id: str
    sparsity: object
    stability: object


@dataclass
class _Frame:
    """Token rows ``[lo, hi)`` of a run whose steps may be compared: ``steps`` and ``blocks`` per step, each step's
    rows ``[bounds[i], bounds[i + 1])`` (relative to ``lo``), the sample segments of every step (``seg_lo``,
    ``seg_hi``, relative), ``noised`` per row (or None) and whether every step holds the same rows."""

    lo: int
    hi: int
    steps: np.ndarray
    blocks: np.ndarray
    bounds: np.ndarray
    seg_lo: np.ndarray
    seg_hi: np.ndarray
    noised: np.ndarray | None
    comparable: bool


def _changes(*cols: np.ndarray) -> np.ndarray:
    """Indices where any of ``cols`` changes value (0 included), int64."""
    n = len(cols[0])
    change = np.zeros(n, dtype=bool)
    change[:1] = True
    for c in cols:
        change[1:] |= c[1:] != c[:-1]
    return np.flatnonzero(change)


def frames(manifest: fmt.Manifest, tokens) -> list[_Frame]:
    """The frames of a generation or diffusion run (module docstring) from its token table (polars).

    Raises:
        ActsparseError: a run of teacher-forced text.
    """
    if manifest.kind == "text":
        raise ActsparseError(f"run {manifest.run_id} holds teacher-forced text, not generation or diffusion steps; "
                             "collect one with --generate or --diffusion")
    col = {c: tokens[c].to_numpy() for c in ("sequence", "position", "step")}
    diffusion = manifest.kind == "diffusion"
    for c in ("cfg_half", "block", "noised"):
        col[c] = tokens[c].to_numpy() if diffusion else np.zeros(len(col["step"]), dtype=np.int64)
    batch = col["sequence"] // int(manifest.config["batch_size"])
    block_frames = (manifest.tokenization.get("decoding") or {}).get("sampler") == "block"
    edges = [*_changes(batch, col["block"] if block_frames else batch), len(batch)]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        s = {c: v[lo:hi] for c, v in col.items()}
        bounds = np.append(_changes(s["step"]), hi - lo)
        seg = np.append(_changes(s["step"], s["sequence"], s["cfg_half"]), hi - lo)
        first = slice(bounds[0], bounds[1])
        comparable = diffusion and len(bounds) > 2 and all(
            b - a == first.stop - first.start and all(np.array_equal(s[c][a:b], s[c][first])
                                                      for c in ("sequence", "position", "cfg_half"))
            for a, b in zip(bounds[:-1], bounds[1:]))
        out.append(_Frame(int(lo), int(hi), s["step"][bounds[:-1]].astype(np.int64),
                          s["block"][bounds[:-1]].astype(np.int64), bounds, seg[:-1], seg[1:],
                          s["noised"].astype(bool) if diffusion else None, comparable))
    return out


def analyze_steps(store, run_ref: str | None = None, cfg: StepConfig = StepConfig(), *, use_cache: bool = True,
                  progress: Callable[[int], None] | None = None) -> StepAnalysis:
    """Sparsity per step and mask stability of one generation or diffusion run (module docstring).

    Args:
        store: store path/URL or an open ``pipeline.reader.StoreReader``.
        run_ref: run id or unique prefix (None: the store's only run).
        cfg: target, rule, value and Jaccard options.
        use_cache: reuse/write the run's cached result.
        progress: called with 1 after each layer.

    Raises:
        ActsparseError: bad settings, a run of teacher-forced text, a target whose sites the run lacks, NaN/inf
            in the data.
    """
    from actsparse.analyze.curves.config import required_sites
    from actsparse.pipeline.reader import StoreReader

    cfg.validate()
    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_ref)
    required_sites(cfg.target, run.sites, run.manifest.ffn.glu)
    analysis_id = fmt.content_hash(cfg.ident(run.run_id))
    if use_cache:
        cached = _cached(st, run.run_id, analysis_id)
        if cached is not None:
            return cached
    frame_list = frames(run.manifest, run.tokens())
    sparse: dict = defaultdict(lambda: np.zeros(4, dtype=np.int64))  # n, dropped, n_noised, dropped_noised
    pairs: dict = defaultdict(lambda: np.zeros(4))  # intersection, union, token-Jaccard sum, tokens
    widths = {"input": run.manifest.ffn.d_model}
    with torch.inference_mode():
        for layer in range(run.n_layers):
            w = run.weights(layer)
            for fr in frame_list:
                block = SiteBlock(run, layer, fr.lo, fr.hi, None, w)
                for site in HOOK_SITES[cfg.target]:
                    x = block.native(site) if block.stored(site) else block[site]
                    widths.setdefault(site, x.shape[1])
                    _add_frame(fr, _masks(x, fr, cfg), site, layer, cfg, sparse, pairs)
            if progress is not None:
                progress(1)
    meta = dict(run_id=run.run_id, analysis_id=analysis_id, target=cfg.target, rule=cfg.rule, value=float(cfg.value))
    result = StepAnalysis(analysis_id, _sparsity_table(sparse, widths, meta, run.manifest.kind),
                          _stability_table(pairs, meta))
    if use_cache:
        _save(st, run.run_id, analysis_id, result)
    return result


def _masks(x: torch.Tensor, fr: _Frame, cfg: StepConfig) -> torch.Tensor:
    """Kept mask of a frame's rows of one hook site, bool [rows, width]."""
    if cfg.rule == FLAT_TOPP:
        return flat_topp_segments(x, fr.seg_lo, fr.seg_hi, cfg.value)
    return keep_and_count(cfg.rule, x, cfg.value, cfg.power)[0]


def _add_frame(fr: _Frame, keep: torch.Tensor, site: str, layer: int, cfg: StepConfig, sparse: dict,
               pairs: dict) -> None:
    """Add one frame's dropped counts per step and, for a comparable frame, its Jaccard counts."""
    width = keep.shape[1]
    dropped = width - keep.sum(dim=1).numpy()
    for i, (a, b) in enumerate(zip(fr.bounds[:-1], fr.bounds[1:])):
        acc = sparse[(site, layer, int(fr.steps[i]), int(fr.blocks[i]))]
        acc[0] += b - a
        acc[1] += dropped[a:b].sum()
        if fr.noised is not None:
            sel = fr.noised[a:b]
            acc[2] += sel.sum()
            acc[3] += dropped[a:b][sel].sum()
    if not fr.comparable:
        return
    n = int(fr.bounds[1] - fr.bounds[0])
    table = mask_stability(keep.reshape(len(fr.steps), n, width), deltas=cfg.deltas, step_ids=fr.steps,
                           empty=cfg.empty)
    for j in range(len(table["step"])):
        key = (site, layer, table["kind"][j], int(table["delta"][j]), int(table["step"][j]), int(table["ref_step"][j]))
        pairs[key] += (table["n_intersection"][j], table["n_union"][j], table["token_jaccard_sum"][j],
                       table["n_tokens"][j])


def _sparsity_table(sparse: dict, widths: dict, meta: dict, kind: str):
    """The ``step_sparsity`` rows: per (site, layer, step, block), then model level (layer -1, site ``model``:
    every hook's dropped entries over every hook's entries, the hooks' widths summed)."""
    import polars as pl

    rows = []
    model: dict = defaultdict(lambda: np.zeros(6))  # rows, noised rows, entries, dropped, noised entries, dropped
    for (site, layer, step, block), (n, dropped, n_noised, dropped_noised) in sorted(sparse.items()):
        width = widths[site]
        rows.append(_sparsity_row(meta, layer, site, step, block, int(n), width, dropped / (n * width),
                                  int(n_noised), dropped_noised / (n_noised * width) if n_noised else None, kind))
        m = model[(step, block)]
        m[:2] = n, n_noised  # the same rows at every hook
        m[2:] += (n * width, dropped, n_noised * width, dropped_noised)
    total_width = sum(widths[s] for s in {k[0] for k in sparse})
    for (step, block), (n, n_noised, entries, dropped, noised_entries, dropped_noised) in sorted(model.items()):
        rows.append(_sparsity_row(meta, -1, "model", step, block, int(n), total_width, dropped / entries,
                                  int(n_noised), dropped_noised / noised_entries if noised_entries else None, kind))
    return pl.DataFrame(rows, schema=_schema(fmt.STEP_SPARSITY))


def _sparsity_row(meta, layer, site, step, block, n, width, sparsity, n_noised, sparsity_noised, kind) -> dict:
    diffusion = kind == "diffusion"
    return dict(meta, layer=layer, site=site, step=step, block=block if diffusion else None, n_tokens=n, width=width,
                sparsity=float(sparsity), n_noised=n_noised if diffusion else None,
                sparsity_noised=None if sparsity_noised is None else float(sparsity_noised), label="open-loop")


def _stability_table(pairs: dict, meta: dict):
    """The ``step_stability`` rows: per (site, layer, kind, delta, step, ref step), then model level."""
    import polars as pl

    model: dict = defaultdict(lambda: np.zeros(4))
    rows = []
    for key, counts in sorted(pairs.items()):
        site, layer, *pair = key
        rows.append(_stability_row(meta, layer, site, *pair, counts))
        model[tuple(pair)] += counts
    rows += [_stability_row(meta, -1, "model", *pair, counts) for pair, counts in sorted(model.items())]
    return pl.DataFrame(rows, schema=_schema(fmt.STEP_STABILITY))


def _stability_row(meta, layer, site, kind, delta, step, ref_step, counts) -> dict:
    inter, union, tj_sum, n_tok = counts
    return dict(meta, layer=layer, site=site, kind=kind, delta=delta, step=step, ref_step=ref_step,
                n_intersection=int(inter), n_union=int(union), token_jaccard_sum=float(tj_sum), n_tokens=int(n_tok),
                global_jaccard=float(inter / union) if union else math.nan, token_jaccard=float(tj_sum / n_tok),
                label="open-loop")


def _schema(kind: fmt.ResultKind) -> dict:
    import polars as pl

    types = {"VARCHAR": pl.String, "BIGINT": pl.Int64, "DOUBLE": pl.Float64}
    return {c: types[t] for c, t in kind.columns}


def _cached(st, run_id: str, analysis_id: str) -> StepAnalysis | None:
    import polars as pl

    frames_ = []
    for kind in (fmt.STEP_SPARSITY, fmt.STEP_STABILITY):
        path = st.path(fmt.result_base(run_id), fmt.result_file(kind, analysis_id))
        if not st.fs.exists(path):
            return None
        with st.fs.open(path, "rb") as f:
            frames_.append(pl.read_parquet(f))
    return StepAnalysis(analysis_id, *frames_)


def _save(st, run_id: str, analysis_id: str, result: StepAnalysis) -> None:
    """Write both tables into the run's ``analysis/`` where the store is local and writable (else: computed only)."""
    if not st.is_local:
        return
    run_dir = Path(st.root).resolve() / fmt.run_path(run_id)
    written = []
    try:
        for kind, df in ((fmt.STEP_SPARSITY, result.sparsity), (fmt.STEP_STABILITY, result.stability)):
            path = run_dir / fmt.ANALYSIS / fmt.result_file(kind, analysis_id)
            atomic_write_parquet(path, df.to_arrow())
            written.append(path)
    except OSError:
        return
    update_checksums(run_dir, written)


def stability_summary(stability, *, layer: int = -1) -> dict[tuple[str, int], tuple[float, float]]:
    """``{(kind, delta): (global, token-aware Jaccard)}`` of a ``step_stability`` table at one layer (-1: model
    level), pooled over steps (drift under delta 0), as ``analyze.stability.summarize``."""
    from actsparse.analyze.stability import summarize

    rows = stability.filter(stability["layer"] == layer)
    return summarize({c: rows[c].to_numpy() for c in STABILITY_COLUMNS})

