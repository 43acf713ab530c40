"""Closed-loop evaluation: re-run a model with sparsified FFNs and measure critical sparsity.

Where ``analyze.curves`` simulates a rule one layer at a time on stored dense activations
(open-loop), this module applies the rule in every FFN layer at once inside a real forward pass
(``analyze.hooks.Sparsifier``), so each layer sees the already-sparsified output of the layers
before it, as in the paper (paper.md §1.1, §8 "closed-loop").

Protocol. The corpus's held-out split (``open_corpus(C).split("heldout")``) is cut into windows
exactly as collection cuts its split (``pipeline.corpora.iter_windows``: BOS first, no padding
stored; batches are right-padded and attention-masked). Every batch runs once dense and once per
grid value sparsified; the dense run is the reference. Metrics, per predicted position (position t
predicts token t + 1 of its window; targets that are special tokens and padding are skipped):

* next-token NLL, perplexity exp(mean NLL), top-1 accuracy (argmax of the logits), all for the
  sparse and the dense model;
* KL(dense || sparse) of the next-token distributions, per token, then averaged;
* realized sparsity: zeroed entries / width per token and hook, summed over the input positions
  that are neither padding nor special tokens (as ``analyze.curves`` with its default
  ``include_special=False``), aggregated per hook as sum sparse / sum total and at model level
  dimension-weighted over all hooks (paper.md §1.4).

Critical sparsity (paper.md §1.5): the largest realized model-level sparsity at which the
sparse/dense ratio of top-1 accuracy stays >= 0.99, at the best grid point and interpolated
linearly between the last grid point meeting it and the first failing it (points ordered by
realized sparsity). The same from ``exp(-dNLL)``, dNLL = mean NLL sparse - mean NLL dense, as a
smoother criterion on few tokens. Confidence intervals: percentile bootstrap over windows (whole
windows are resampled: tokens of one window are correlated), ``N_BOOT`` resamples, fixed seed,
for the accuracy ratio, dNLL, the sparsity and both critical sparsities.

Storage. An evaluation is identified by ``eval_id``, a content hash of the model weights' sha256,
the corpus sha256, the split, target, rule, power, seq_len, max_tokens, batch_size, compute dtype
and versions; the grid is not part of it, so a later call with more grid values reuses the
finished ones. Its files live in one base directory B of a store:

* with a run (``run=ID``): ``B = STORE/runs/<ID>/analysis`` (the model and corpus must be the
  run's; results are listed in the run's checksums, packed and merged with it, and the
  ``evaluations`` SQL view reads them);
* without a run: ``B = STORE/evaluations`` (a store-level directory for models or corpora that
  were never collected; same file names, not part of any run, so not packed);
* without a store nothing is written and nothing resumes.

Files (the summary name matches the view's ``evaluate-*.parquet`` glob; the others do not)::

    B/evaluate-<eval_id>.parquet           one row per grid value: run_id, target, rule, value,
                                           sparsity, nll, ppl, top1_acc, kl, n_tokens, eval_id,
                                           dense_*, acc_ratio(_lo/_hi), dnll(_lo/_hi), ...
    B/evaluate_layers-<eval_id>.parquet    sparsity per (value, layer, hook); layer -1 = model level;
                                           n_positions = input positions counted
    B/evaluate_critical-<eval_id>.parquet  critical sparsity per criterion with bootstrap interval
    B/evaluate-<eval_id>/config.json       identity, readable config and hook list
    B/evaluate-<eval_id>/value-<v>.parquet per-window sums of grid value v, written atomically when
                                           v finishes; a killed evaluation resumes after the last one

The three summary files are rebuilt from every ``value-*.parquet`` present after each call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from actsparse.errors import ActsparseError
from analyze.hooks import Sparsifier, check_closed_loop, hook_points
from pipeline import store as fmt

EVAL_VERSION = 1
SPLIT = "heldout"
ACC_RATIO = 0.99  # paper.md §1.5: keep >= 99% of dense performance
N_BOOT = 200
MIN_TOKENS = 64  # predicted positions below which bootstrap intervals are meaningless
DEFAULT_GRID = (1.0, 0.99, 0.98, 0.97, 0.95, 0.92, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
# Dense log-probabilities are kept between grid values when they fit (float32 [tokens, vocab]);
# otherwise the LM head is re-applied to the cached dense hidden states for every value.
DENSE_CACHE_BYTES = 2 << 30
# Tokens per LM-head call: bounds the [tokens, vocab] float32 logits (262k vocab: 256 tokens).
_LOGITS_BYTES = 256 << 20


@dataclass(frozen=True)
class EvalConfig:
    """What a closed-loop evaluation computes.

    Attributes:
        model: alias, HF id or checkpoint path (None: the run's model, when a run is given).
        corpus: built-in name or path (None: the run's corpus); its held-out split is used.
        target: input | gate | up | intermediate | all-inputs.
        rule: top-p | top-k | max-p (``analyze.hooks.CLOSED_LOOP_RULES``).
        grid: rule values; order does not matter, duplicates are dropped.
        power: top-p power q >= 1.
        max_tokens: tokens of the held-out split to use, BOS included (None: all).
        seq_len, batch_size: windows as in collection; the batch composition changes float results,
            so both are part of the identity.
        compute_dtype: float32 | bfloat16 | float16 model dtype.
    """

    model: str | None = None
    corpus: str | None = None
    target: str = "intermediate"
    rule: str = "top-p"
    grid: tuple[float, ...] = DEFAULT_GRID
    power: float = 1.0
    max_tokens: int | None = 4096
    seq_len: int = 256
    batch_size: int = 8
    compute_dtype: str = "float32"
    text_field: str | None = None
    trust_remote_code: bool = False

    def values(self) -> tuple[float, ...]:
        """The grid as floats, duplicates dropped, in the given order."""
        try:
            return tuple(dict.fromkeys(float(v) for v in self.grid))
        except (TypeError, ValueError):
            raise ActsparseError(f"grid values must be numbers, got {self.grid!r}") from None

    def validate(self) -> None:
        """Raise ActsparseError for values that cannot work, before anything is loaded."""
        if not self.values():
            raise ActsparseError("the grid is empty; give at least one rule value")
        check_closed_loop(self.target, self.rule, self.values(), self.power)
        if self.seq_len < 2:
            raise ActsparseError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.batch_size < 1:
            raise ActsparseError(f"--batch-size must be positive (got {self.batch_size})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ActsparseError(f"--max-tokens must be positive (got {self.max_tokens})")
        if self.compute_dtype not in fmt.STORED_DTYPES:
            raise ActsparseError(f"unknown compute dtype '{self.compute_dtype}' (choose {', '.join(fmt.STORED_DTYPES)})")


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    ``summary``, ``layers`` and ``critical`` are polars DataFrames as stored (module docstring);
    they cover every grid value evaluated under ``eval_id`` so far, not only this call's.
    ``computed`` and ``reused`` list this call's grid values by what happened to them.
    """

    eval_id: str
    base: Path | None
    config: dict
    summary: object
    layers: object
    critical: object
    computed: list[float] = field(default_factory=list)
    reused: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- critical sparsity and bootstrap


def critical_crossing(sparsity: Sequence[float], ratio: Sequence[float], values: Sequence[float],
                      threshold: float = ACC_RATIO) -> tuple[float, float, float]:
    """``(grid sparsity, its grid value, interpolated sparsity)`` where ``ratio`` falls below ``threshold``.

    Points are taken in increasing ``sparsity`` (paper.md §1.5, recommended implementation): the
    best grid point is the last one with ratio >= threshold before the first failing one; the
    interpolated value is the linear crossing of the threshold between those two points. When
    every point passes, both equal the sparsest point (no extrapolation); when the densest point
    fails (or its ratio is NaN), all three are NaN. Later points that pass again are ignored.
    """
    order = sorted(range(len(sparsity)), key=lambda i: sparsity[i])
    best = (math.nan, math.nan, math.nan)
    previous = None
    for i in order:
        s, r = float(sparsity[i]), float(ratio[i])
        if not r >= threshold:
            if previous is None:
                return best
            s0, r0 = previous
            return best[0], best[1], s0 + (threshold - r0) / (r - r0) * (s - s0)
        best, previous = (s, float(values[i]), s), (s, r)
    return best


def _resample_counts(n_windows: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_windows] float64: how often each window is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_windows, size=(n_boot, n_windows))
    counts = np.zeros((n_boot, n_windows))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_windows), draws.ravel()), 1.0)
    return counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles over axis 0, ignoring NaN (all-NaN columns give NaN)."""
    with np.errstate(all="ignore"):
        if samples.ndim == 1:
            samples = samples[:, None]
        ok = ~np.all(np.isnan(samples), axis=0)
        lo = np.full(samples.shape[1], np.nan)
        hi = np.full(samples.shape[1], np.nan)
        if ok.any():
            lo[ok], hi[ok] = np.nanpercentile(samples[:, ok], [2.5, 97.5], axis=0)
    return lo, hi


def summarize(windows, hooks: Sequence[dict], meta: dict, *, n_boot: int = N_BOOT, seed: int = 0,
              threshold: float = ACC_RATIO):
    """Summary, per-layer and critical-sparsity tables from per-window sums.

    Args:
        windows: polars DataFrame, one row per (value, window) with columns value, window, n_pred,
            n_valid, nll_sparse, nll_dense, correct_sparse, correct_dense, kl, hook_sparse (list of
            zeroed-entry counts per hook, in ``hooks`` order). Every value must cover the same windows.
        hooks: ``[{"layer", "site", "width"}]`` per hook.
        meta: columns repeated on every row (run_id, eval_id, target, rule, power, ...).
        n_boot, seed: bootstrap resamples of whole windows and the generator seed.
        threshold: the performance ratio defining critical sparsity.

    Returns:
        ``(summary, layers, critical)`` polars DataFrames (columns in the module docstring). Ratios
        whose dense denominator is 0 (e.g. a dense accuracy of 0) are NaN.
    """
    import polars as pl

    windows = windows.sort(["value", "window"], descending=[True, False])
    values = windows["value"].unique(maintain_order=True).to_list()
    ids = windows.filter(pl.col("value") == values[0])["window"].to_numpy()
    n_val, n_win = len(values), len(ids)
    if windows.height != n_val * n_win or not all(
            np.array_equal(g["window"].to_numpy(), ids) for _, g in windows.group_by("value", maintain_order=True)):
        raise ActsparseError(f"evaluation {meta.get('eval_id')}: grid values cover different windows; "
                             "delete its value files and rerun")

    def mat(col: str) -> np.ndarray:  # [values, windows]
        return windows[col].to_numpy().astype(np.float64).reshape(n_val, n_win)

    n_pred, n_valid = mat("n_pred")[0], mat("n_valid")[0]
    nll_s, nll_d, cs, cd, kl = (mat(c) for c in ("nll_sparse", "nll_dense", "correct_sparse", "correct_dense", "kl"))
    hook_sparse = np.asarray(windows["hook_sparse"].to_list(), dtype=np.float64).reshape(n_val, n_win, len(hooks))
    widths = np.array([h["width"] for h in hooks], dtype=np.float64)
    sparse = hook_sparse.sum(axis=2)
    n_tok = n_pred.sum()
    entries = n_valid.sum() * widths.sum()

    point = dict(
        sparsity=sparse.sum(1) / entries, nll=nll_s.sum(1) / n_tok, top1_acc=cs.sum(1) / n_tok, kl=kl.sum(1) / n_tok,
        dense_nll=nll_d.sum(1) / n_tok, dense_acc=cd.sum(1) / n_tok, acc_ratio=_ratio(cs.sum(1), cd.sum(1)),
    )
    point["dnll"] = point["nll"] - point["dense_nll"]

    counts = _resample_counts(n_win, n_boot, seed)  # [boot, windows]
    boot_tok = counts @ n_pred
    boot = dict(
        sparsity=(counts @ sparse.T) / ((counts @ n_valid) * widths.sum())[:, None],
        acc_ratio=_ratio(counts @ cs.T, counts @ cd.T),
        dnll=(counts @ (nll_s - nll_d).T) / boot_tok[:, None],
    )
    nll_ratio = np.exp(-boot["dnll"])

    rows = []
    for j, v in enumerate(values):
        row = dict(meta, value=float(v), n_tokens=int(n_tok), n_windows=n_win, n_boot=n_boot,
                   **{k: float(a[j]) for k, a in point.items()})
        row["ppl"] = math.exp(row["nll"])
        row["dense_ppl"] = math.exp(row["dense_nll"])
        row["nll_ratio"] = math.exp(-row["dnll"])
        for k, samples in boot.items():
            lo, hi = _interval(samples[:, j])
            row[f"{k}_lo"], row[f"{k}_hi"] = float(lo[0]), float(hi[0])
        rows.append(row)
    # run_id is null for store-level evaluations: keep it a string column so tables concatenate.
    strings = dict(run_id=pl.String)
    summary = pl.DataFrame(rows, schema_overrides=strings).with_columns(label=pl.lit("closed-loop"))

    criteria = {"top1_acc": (point["acc_ratio"], boot["acc_ratio"]),
                "exp_neg_dnll": (np.exp(-point["dnll"]), nll_ratio)}
    critical = []
    for name, (ratio, boot_ratio) in criteria.items():
        grid_s, grid_v, interp = critical_crossing(point["sparsity"], ratio, values, threshold)
        boot_interp = np.array([critical_crossing(boot["sparsity"][b], boot_ratio[b], values, threshold)[2]
                                for b in range(n_boot)])
        lo, hi = _interval(boot_interp)
        critical.append(dict(meta, criterion=name, threshold=threshold, critical_sparsity_grid=grid_s,
                             critical_value_grid=grid_v, critical_sparsity_interp=interp,
                             critical_lo=float(lo[0]), critical_hi=float(hi[0]),
                             boot_undefined=float(np.isnan(boot_interp).mean()), n_values=n_val, n_tokens=int(n_tok),
                             n_boot=n_boot, label="closed-loop"))

    layer_rows = []
    valid_total = n_valid.sum()
    for j, v in enumerate(values):
        per_hook = hook_sparse[j].sum(axis=0)
        for h, hook in enumerate(hooks):
            layer_rows.append(dict(meta, value=float(v), layer=int(hook["layer"]), hook=hook["site"],
                                   width=int(hook["width"]), n_positions=int(valid_total),
                                   sparsity=float(per_hook[h] / (valid_total * hook["width"]))))
        layer_rows.append(dict(meta, value=float(v), layer=-1, hook="model", width=int(widths.sum()),
                               n_positions=int(valid_total), sparsity=float(point["sparsity"][j])))
    return (summary, pl.DataFrame(layer_rows, schema_overrides=strings),
            pl.DataFrame(critical, schema_overrides=strings))


# ---------------------------------------------------------------- model plumbing


class _LMHead:
    """The causal LM's output layer applied to final hidden states [n, d_model] -> float32 logits [n, vocab].

    ``model.base_model`` gives the final hidden states (final norm included); the output
    embedding plus Gemma's optional final logit soft-capping gives the logits. :meth:`check`
    compares the result with the model's own forward once, so a head with extra scaling is
    refused instead of silently mis-measured.
    """

    def __init__(self, model, spec: str):
        self.model, self.spec = model, spec
        self.linear = model.get_output_embeddings()
        if self.linear is None or getattr(model, "base_model", model) is model:
            raise ActsparseError(f"model {spec} has no language-model head; closed-loop evaluation needs a causal LM")
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.body = model.base_model

    def hidden(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Final hidden states [batch, seq, d_model] in the model dtype."""
        return self.body(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        z = self.linear(h)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z.float()

    def check(self, ids: torch.Tensor, attn: torch.Tensor) -> None:
        """Raise ActsparseError unless our logits match ``model(...).logits`` on one window."""
        ref = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
        ours = self.logits(self.hidden(ids, attn))
        scale = float(ref.abs().max())
        if not torch.allclose(ours, ref, rtol=1e-3, atol=1e-3 * max(scale, 1.0)):
            raise ActsparseError(f"model {self.spec}: logits from the output embedding differ from the model's "
                                 f"forward (max |diff| {float((ours - ref).abs().max()):.3g}); its LM head is not supported")


@dataclass
class _Batch:
    """One padded batch: ids/attn [B, S]; valid [B, S] counted input positions; pred rows/cols and targets."""

    windows: list
    ids: torch.Tensor
    attn: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor


def _make_batch(windows: list, pad_id: int, special_ids: set[int]) -> _Batch:
    width = max(len(w.token_ids) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(windows), width), dtype=torch.long)
    special = torch.ones((len(windows), width), dtype=torch.bool)
    for i, w in enumerate(windows):
        n = len(w.token_ids)
        ids[i, :n] = torch.from_numpy(w.token_ids)
        attn[i, :n] = 1
        special[i, :n] = torch.from_numpy(w.special | np.isin(w.token_ids, list(special_ids)))
    valid = attn.bool() & ~special
    # Position t predicts token t + 1: both must be in the window, and the target must not be special.
    pred = torch.zeros_like(valid)
    pred[:, :-1] = attn[:, 1:].bool() & ~special[:, 1:]
    rows, cols = pred.nonzero(as_tuple=True)
    return _Batch(windows, ids, attn, valid, rows, cols, ids[rows, cols + 1])


def _token_metrics(logits_s: torch.Tensor, logp_d: torch.Tensor, targets: torch.Tensor):
    """Per token: NLL, top-1 hit and KL(dense || sparse) from sparse logits and dense log-probs [n, vocab]."""
    logp_s = torch.log_softmax(logits_s, dim=-1)
    nll = -logp_s.gather(1, targets[:, None])[:, 0]
    hit = logits_s.argmax(dim=-1) == targets
    kl = (logp_d.exp() * (logp_d - logp_s)).sum(dim=-1)
    return nll, hit, kl


# ---------------------------------------------------------------- storage


def _value_name(v: float) -> str:
    return f"value-{float(v)!r}.parquet"


def eval_identity(cfg: EvalConfig, weights_sha256: str, corpus_sha256: str) -> dict:
    """What identifies an evaluation (its ``eval_id`` is the content hash of this dict): the model
    weights' and corpus' sha256, every setting that changes a number, and the torch/transformers
    versions. The grid is not part of it: values are added to an evaluation as they are computed."""
    import transformers

    return dict(kind="evaluate", version=EVAL_VERSION, weights_sha256=weights_sha256, corpus_sha256=corpus_sha256,
                split=SPLIT, target=cfg.target, rule=cfg.rule, power=cfg.power, seq_len=cfg.seq_len,
                max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, compute_dtype=cfg.compute_dtype, add_bos=True,
                torch=torch.__version__, transformers=transformers.__version__)


def _base_dir(store, run_id: str | None) -> Path:
    paths = fmt.create_store(store)
    if run_id is None:
        return paths.root / "evaluations"
    return paths.run_dir(run_id) / "analysis"


def _checksum(base: Path, run_id: str | None, files: list[Path]) -> None:
    """List files written into a run directory in its checksums.json (store-level results have none)."""
    if run_id is not None:
        from actsparse.share import update_checksums

        update_checksums(base.parent, files)


def _done_values(parts: Path) -> dict[float, Path]:
    import pyarrow.parquet as pq

    done = {}
    for p in sorted(parts.glob("value-*.parquet")):
        v = pq.read_table(p, columns=["value"]).column("value")
        if len(v):
            done[float(v[0].as_py())] = p
    return done


def _run_manifest(store, run_ref: str) -> dict:
    from pipeline.reader import StoreReader

    return StoreReader(str(store)).run(run_ref).manifest


def _check_against_run(m: dict, model: str, weights_sha256: str, corpus: str, corpus_sha256: str) -> None:
    """Refuse a model or corpus whose content is not the run's (specs may differ: a path vs an alias)."""
    run_model, run_corpus = m["config"]["model"], m["corpus"]["spec"]
    if weights_sha256 != m["model"]["weights_sha256"]:
        raise ActsparseError(f"model {model} (weights sha256 {weights_sha256[:12]}) does not match run {m['run_id']} "
                             f"(model {run_model}, weights sha256 {m['model']['weights_sha256'][:12]})")
    if corpus_sha256 != m["corpus"]["sha256"]:
        raise ActsparseError(f"corpus {corpus} does not match run {m['run_id']} (corpus {run_corpus}); "
                             "an evaluation stored with a run uses the run's corpus")


# ---------------------------------------------------------------- evaluation


def evaluate(cfg: EvalConfig, store: str | Path | None = None, run: str | None = None, *, n_boot: int = N_BOOT,
             seed: int = 0, dense_cache_bytes: int = DENSE_CACHE_BYTES,
             log: Callable[[str], None] = print) -> Evaluation:
    """Run the closed-loop evaluation of ``cfg`` (resuming it in ``store`` when possible).

    Args:
        cfg: what to evaluate; ``cfg.model``/``cfg.corpus`` default to the run's.
        store: local store directory (created if missing) or None (compute only, nothing written).
        run: run id or unique prefix to attach the results to; its model weights and corpus must
            be the ones evaluated.
        n_boot, seed: bootstrap resamples over windows and their seed.
        dense_cache_bytes: memory allowed for the dense log-probabilities kept across grid values.
        log: where one-line progress messages go.

    Returns:
        :class:`Evaluation` with the summary, per-layer and critical-sparsity tables.

    Raises:
        ActsparseError: unknown target/rule, a value out of range, a held-out split with fewer than
            ``MIN_TOKENS`` predicted tokens, a model or corpus that is not the run's, an unsupported
            model, non-finite logits, or another process evaluating the same config.
    """
    from pipeline.corpora import iter_windows, open_corpus
    from pipeline.models import load_tokenizer, resolve_model

    cfg.validate()
    manifest = None
    if run is not None:
        if store is None:
            raise ActsparseError("--run needs --store (the store holding the run)")
        manifest = _run_manifest(store, run)
        cfg = dataclasses.replace(cfg, model=cfg.model or manifest["config"]["model"],
                                  corpus=cfg.corpus or manifest["corpus"]["spec"])
    if cfg.model is None or cfg.corpus is None:
        raise ActsparseError("evaluate needs --model and --corpus (or --run with --store to use the run's)")

    resolved = resolve_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tok, _ = load_tokenizer(resolved, seq_len=cfg.seq_len)
    corpus = open_corpus(cfg.corpus, text_field=cfg.text_field)
    run_id = None
    if manifest is not None:
        _check_against_run(manifest, cfg.model, resolved.weights_sha256, cfg.corpus, corpus.sha256)
        run_id = manifest["run_id"]
    windows = list(iter_windows(corpus.split(SPLIT), tok, cfg.seq_len, max_tokens=cfg.max_tokens, add_bos=True))
    special_ids = set(tok.all_special_ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [_make_batch(windows[b:b + cfg.batch_size], pad_id, special_ids)
               for b in range(0, len(windows), cfg.batch_size)]
    n_pred = sum(len(b.targets) for b in batches)
    if n_pred < MIN_TOKENS:
        raise ActsparseError(f"the held-out split of corpus {cfg.corpus} gives {n_pred} predicted tokens "
                             f"({len(windows)} windows); closed-loop evaluation needs at least {MIN_TOKENS}")

    identity = eval_identity(cfg, resolved.weights_sha256, corpus.sha256)
    eval_id = fmt.content_hash(identity)
    meta = dict(run_id=run_id, eval_id=eval_id, model=cfg.model, corpus=corpus.spec, split=SPLIT,
                target=cfg.target, rule=cfg.rule, power=cfg.power)
    base = None if store is None else _base_dir(store, run_id)
    values = cfg.values()

    if base is None:
        frames, hooks, computed = _run_values(cfg, resolved, batches, values, {}, None, run_id, dense_cache_bytes, log)
        return _finish(frames, hooks, meta, eval_id, None, identity, run_id, n_boot, seed, computed, [])

    parts = base / f"evaluate-{eval_id}"
    try:
        parts.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fmt.disk_error(e, f"creating {parts}") from e
    with fmt.exclusive_lock(parts / ".lock", f"evaluation {eval_id}"):
        done = _done_values(parts)
        reused = [v for v in values if v in done]
        if reused:
            log(f"evaluation {eval_id}: {len(reused)} of {len(values)} grid values already done, skipping them")
        config_path = parts / "config.json"
        hooks = json.loads(config_path.read_text())["hooks"] if config_path.is_file() else None
        _, hooks, computed = _run_values(cfg, resolved, batches, [v for v in values if v not in done], identity,
                                         parts, run_id, dense_cache_bytes, log, hooks=hooks, meta=meta)
        import polars as pl

        frames = [pl.read_parquet(p) for p in sorted(parts.glob("value-*.parquet"))]
        return _finish(frames, hooks, meta, eval_id, base, identity, run_id, n_boot, seed, computed, reused)


def _run_values(cfg: EvalConfig, resolved, batches: list[_Batch], values: Sequence[float], identity: dict,
                parts: Path | None, run_id: str | None, dense_cache_bytes: int, log: Callable[[str], None], *,
                hooks: list[dict] | None = None, meta: dict | None = None):
    """Dense pass, then one sparse pass per value; returns (per-window frames, hooks, computed values).

    With ``parts`` set, each value's frame is written there as soon as it is complete and only
    the frames of this call are returned (the caller reads the directory).
    """
    import polars as pl

    from pipeline.models import load_model
    from pipeline.sites import resolve_ffn

    if not values:
        return [], hooks, []
    model = load_model(resolved, cfg.compute_dtype)
    arch = resolve_ffn(model)
    points = hook_points(arch, cfg.target)
    hooks = [dict(layer=p.layer, site=p.site, width=p.width) for p in points]
    head = _LMHead(model, cfg.model)
    if parts is not None:
        fmt.atomic_write_json(parts / "config.json", dict(identity=identity, meta=meta, hooks=hooks,
                                                          ffn=arch.describe()))
        _checksum(parts.parent, run_id, [parts / "config.json"])

    t0 = time.perf_counter()
    with torch.inference_mode():
        first = batches[0]
        head.check(first.ids[:1], first.attn[:1])
        vocab = head.linear.weight.shape[0]
        n_total = sum(len(b.targets) for b in batches)
        cache_logp = n_total * vocab * 4 <= dense_cache_bytes
        chunk = max(1, _LOGITS_BYTES // (vocab * 4))
        dense = []  # per batch: (hidden at predicted positions, [logp chunks] or None, window sums)
        for b in batches:
            h = head.hidden(b.ids, b.attn)[b.rows, b.cols]
            nll = torch.zeros(len(b.windows), dtype=torch.float64)
            hit = torch.zeros(len(b.windows), dtype=torch.int64)
            chunks = []
            for s in range(0, len(h), chunk):
                logits = head.logits(h[s:s + chunk])
                logp = torch.log_softmax(logits, dim=-1)
                y, r = b.targets[s:s + chunk], b.rows[s:s + chunk]
                nll.index_add_(0, r, -logp.gather(1, y[:, None])[:, 0].double())
                hit.index_add_(0, r, (logits.argmax(dim=-1) == y).long())
                if cache_logp:
                    chunks.append(logp)
            _check_finite(nll, cfg, "dense")
            dense.append((h, chunks if cache_logp else None, nll, hit))
        log(f"dense reference: {n_total} predicted tokens in {len(batches)} batches ({time.perf_counter() - t0:.1f} s)")

        frames, computed = [], []
        for v in values:
            t1 = time.perf_counter()
            cols: dict[str, list] = {c: [] for c in ("window", "n_pred", "n_valid", "nll_sparse", "nll_dense",
                                                     "correct_sparse", "correct_dense", "kl", "hook_sparse")}
            with Sparsifier(arch, cfg.target, cfg.rule, v, power=cfg.power) as sp:
                for b, (h_d, logp_chunks, nll_d, hit_d) in zip(batches, dense):
                    sp.begin_batch(b.valid)
                    h_s = head.hidden(b.ids, b.attn)[b.rows, b.cols]
                    counts = sp.end_batch()
                    n_win = len(b.windows)
                    nll = torch.zeros(n_win, dtype=torch.float64)
                    hit = torch.zeros(n_win, dtype=torch.int64)
                    kl = torch.zeros(n_win, dtype=torch.float64)
                    for k, s in enumerate(range(0, len(h_s), chunk)):
                        logp_d = (logp_chunks[k] if logp_chunks is not None
                                  else torch.log_softmax(head.logits(h_d[s:s + chunk]), dim=-1))
                        tok_nll, tok_hit, tok_kl = _token_metrics(head.logits(h_s[s:s + chunk]), logp_d,
                                                                  b.targets[s:s + chunk])
                        r = b.rows[s:s + chunk]
                        nll.index_add_(0, r, tok_nll.double())
                        hit.index_add_(0, r, tok_hit.long())
                        kl.index_add_(0, r, tok_kl.double())
                    _check_finite(nll, cfg, f"{cfg.rule} {v}")
                    cols["window"] += [w.sequence for w in b.windows]
                    cols["n_pred"] += torch.bincount(b.rows, minlength=n_win).tolist()
                    cols["n_valid"] += b.valid.sum(dim=1).tolist()
                    cols["nll_sparse"] += nll.tolist()
                    cols["nll_dense"] += nll_d.tolist()
                    cols["correct_sparse"] += hit.tolist()
                    cols["correct_dense"] += hit_d.tolist()
                    cols["kl"] += kl.tolist()
                    cols["hook_sparse"] += counts.T.tolist()
            frame = pl.DataFrame(dict(value=[float(v)] * len(cols["window"]), **cols), schema_overrides=dict(
                window=pl.Int64, n_pred=pl.Int64, n_valid=pl.Int64, correct_sparse=pl.Int64, correct_dense=pl.Int64,
                hook_sparse=pl.List(pl.Int64)))
            if parts is not None:
                path = parts / _value_name(v)
                fmt.atomic_write_parquet(path, frame.to_arrow())
                _checksum(parts.parent, run_id, [path])
            frames.append(frame)
            computed.append(float(v))
            tokens = frame["n_pred"].sum()
            log(f"{cfg.target} {cfg.rule} {v:g}: sparsity {_sparsity(frame, hooks):.4f}, "
                f"nll {frame['nll_sparse'].sum() / tokens:.4f} (dense {frame['nll_dense'].sum() / tokens:.4f}), "
                f"top-1 {frame['correct_sparse'].sum() / tokens:.4f} (dense {frame['correct_dense'].sum() / tokens:.4f}) "
                f"[{time.perf_counter() - t1:.1f} s]")
    return frames, hooks, computed


def _sparsity(frame, hooks: list[dict]) -> float:
    counts = np.asarray(frame["hook_sparse"].to_list(), dtype=np.float64)
    return float(counts.sum() / (frame["n_valid"].sum() * sum(h["width"] for h in hooks)))


def _check_finite(nll: torch.Tensor, cfg: EvalConfig, what: str) -> None:
    if not bool(torch.isfinite(nll).all()):
        raise ActsparseError(f"non-finite NLL in the {what} run of {cfg.model} ({cfg.compute_dtype}); "
                             "try --compute-dtype float32")


def _finish(frames: list, hooks: list[dict], meta: dict, eval_id: str, base: Path | None, identity: dict,
            run_id: str | None, n_boot: int, seed: int, computed: list[float], reused: list[float]) -> Evaluation:
    import polars as pl

    summary, layers, critical = summarize(pl.concat(frames), hooks, meta, n_boot=n_boot, seed=seed)
    if base is not None:
        files = [base / f"evaluate-{eval_id}.parquet", base / f"evaluate_layers-{eval_id}.parquet",
                 base / f"evaluate_critical-{eval_id}.parquet"]
        for path, df in zip(files, (summary, layers, critical)):
            fmt.atomic_write_parquet(path, df.to_arrow())
        _checksum(base, run_id, files)
    return Evaluation(eval_id, base, identity, summary, layers, critical, computed, reused)


# ---------------------------------------------------------------- proxy check


def stored_evaluations(store, run_id: str | None = None):
    """Every evaluation summary stored with one run (or all runs) of ``store``, as one polars DataFrame.

    Reads ``runs/<id>/analysis/evaluate-*.parquet``; an empty DataFrame when there are none.
    """
    import polars as pl

    from pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    ids = [st.run(run_id).run_id] if run_id is not None else st.run_ids()
    frames = []
    for rid in ids:
        for path in sorted(st.fs.glob(st.path("runs", rid, "analysis", "evaluate-*.parquet"))):
            with st.fs.open(path, "rb") as f:
                frames.append(pl.read_parquet(f))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def proxy_check(store, run_id: str | None = None, target: str | None = None, rule: str | None = None, *,
                eval_id: str | None = None, tolerance: float | None = None):
    """Open-loop (offline) against closed-loop critical sparsity for the evaluations stored with a run.

    For every stored evaluation of the run (filtered by ``target``, ``rule``, ``eval_id``), the
    offline curves of the same run, target, rule, power and grid values come from
    ``analyze.curves.compute_curves`` (on the run's stored activations, i.e. its collection split;
    the closed loop runs on the held-out split) and their critical sparsity from
    ``analyze.curves.critical_sparsity`` at ``tolerance`` (its default when None).

    Returns:
        polars DataFrame, one row per evaluation: run_id, eval_id, target, rule, power, n_values,
        closed_critical (interpolated, top-1 criterion) with closed_lo/closed_hi, closed_critical_nll
        (exp(-dNLL) criterion), open_critical (interpolated), open_critical_grid, tolerance,
        spearman_err_dnll and spearman_err_kl (rank correlation across the grid between the offline
        model-level mean relative FFN-output error and the closed-loop dNLL / KL), and
        sparsity_gap (mean over the grid of closed-loop minus open-loop model-level sparsity).

    Raises:
        ActsparseError: no stored evaluation matches; errors of ``compute_curves`` (e.g. a target
            whose sites the run did not collect).
    """
    import polars as pl

    from analyze import curves
    from pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    evals = stored_evaluations(st, run.run_id)
    for col, want in (("target", target), ("rule", rule), ("eval_id", eval_id)):
        if want is not None and evals.height:
            evals = evals.filter(pl.col(col) == want)
    if not evals.height:
        wanted = ", ".join(f"{k} {v}" for k, v in (("target", target), ("rule", rule), ("eval_id", eval_id)) if v)
        raise ActsparseError(f"run {run.run_id} has no stored closed-loop evaluation{' with ' + wanted if wanted else ''}; "
                             f"run `actsparse evaluate --store {st.url} --run {run.run_id} ...` first")
    tol = curves.DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    rows = []
    for (eid,), closed in evals.group_by(["eval_id"], maintain_order=True):
        closed = closed.sort("value", descending=True)
        t, r, q = closed["target"][0], closed["rule"][0], float(closed["power"][0])
        grid = closed["value"].to_list()
        open_df = curves.compute_curves(st, run.run_id, targets=(t,), rules=(r,), grids={r: grid}, power=q)
        model_level = open_df.filter((pl.col("layer") == -1) & (pl.col("target") == t) & (pl.col("rule") == r))
        open_crit = curves.critical_sparsity(model_level, tolerance=tol).row(0, named=True)
        crit = _read_critical(st, run.run_id, eid)
        joined = closed.join(model_level.select("value", open_sparsity="sparsity_mean", rel_err="rel_err_mean"),
                             on="value", how="inner")
        rows.append(dict(
            run_id=run.run_id, eval_id=eid, target=t, rule=r, power=q, n_values=joined.height,
            closed_critical=crit.get("top1_acc", {}).get("critical_sparsity_interp", math.nan),
            closed_lo=crit.get("top1_acc", {}).get("critical_lo", math.nan),
            closed_hi=crit.get("top1_acc", {}).get("critical_hi", math.nan),
            closed_critical_nll=crit.get("exp_neg_dnll", {}).get("critical_sparsity_interp", math.nan),
            open_critical=open_crit["critical_sparsity_interp"], open_critical_grid=open_crit["critical_sparsity_grid"],
            tolerance=tol, spearman_err_dnll=spearman(joined["rel_err"].to_numpy(), joined["dnll"].to_numpy()),
            spearman_err_kl=spearman(joined["rel_err"].to_numpy(), joined["kl"].to_numpy()),
            sparsity_gap=float((joined["sparsity"] - joined["open_sparsity"]).mean()) if joined.height else math.nan,
        ))
    return pl.DataFrame(rows)


def _read_critical(st, run_id: str, eval_id: str) -> dict[str, dict]:
    import polars as pl

    path = st.path("runs", run_id, "analysis", f"evaluate_critical-{eval_id}.parquet")
    if not st.fs.exists(path):
        return {}
    with st.fs.open(path, "rb") as f:
        return {row["criterion"]: row for row in pl.read_parquet(f).iter_rows(named=True)}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = ~(np.isnan(x) | np.isnan(y))
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return math.nan

    def ranks(a: np.ndarray) -> np.ndarray:
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=np.float64)
        # average the ranks of tied values
        for val in np.unique(a):
            tied = a == val
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])
