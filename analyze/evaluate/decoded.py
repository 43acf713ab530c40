"""Closed loop on generation and on diffusion LMs: the rule in every FFN layer at every forward pass of a
generation (``evaluate --generate N``) or of every denoising step (``evaluate --diffusion``), against the dense
model's own output.

Protocol. The prompts are the corpus's held-out windows (``pipeline.windows``, BOS first, at most ``seq_len``
tokens), run in batches through the decoder that collection uses (``pipeline.decoding``: the same left padding,
stop tokens and seeds), once dense and once per grid value with ``analyze.sparsifier.Sparsifier`` active
(``begin_batch`` / ``end_batch`` around every forward pass). Counted positions are the ones collection stores:
real prompt tokens and generated tokens up to and including each prompt's first stop token (generation,
docs/paper-notes.md §1.4), every real position of every row at every denoising step, both guidance halves
included (diffusion, §1.7, as the authors count).

Reported per grid value (``core.format.GENERATION_EVALUATION`` / ``DIFFUSION_EVALUATION``):

* realized sparsity, zeroed entries over counted entries of every hook (weighted by width, §1.4): for
  generation per phase, the authors' prefill / generation / total split; for diffusion per denoising step
  (``step``, ``block``) and over all steps (``step`` -1);
* agreement of the sparse generation with the dense one, per prompt: ``token_agreement`` the fraction of the
  dense continuation's tokens that the sparse one has at the same place (a token it never reached disagrees; an
  empty dense continuation agrees with an empty one only), and ``exact_match`` (same length, same tokens);
* 95% percentile-bootstrap intervals over prompts (whole prompts resampled; ``analyze.evaluate.bootstrap``).

Stored under ``eval_id`` (a hash of the model, corpus, settings, decoding and grid): in the run's ``analysis/``
with ``--run``, else in the store's ``evaluations/``; a stored result is reused.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from actsparse.analyze.evaluate.bootstrap import _interval, _resample_counts
from actsparse.analyze.evaluate.config import N_BOOT, SPLIT, grid_values
from actsparse.analyze.evaluate.storage import base_dir, check_against_run, checksum, with_run
from actsparse.analyze.sparsifier import DIFFUSION_RULES, UNCALIBRATED_RULES, Sparsifier, check_closed_loop
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.files import atomic_write_parquet

DECODED_VERSION = 1
DEFAULT_DECODED_GRID = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)


@dataclass(frozen=True)
class DecodedEvalConfig:
    """A closed-loop evaluation of generation or diffusion (module docstring).

    Attributes:
        decoding: ``pipeline.decoding.GenerationSpec`` or ``DiffusionSpec``.
        model, corpus: as ``analyze.evaluate.EvalConfig`` (None: the run's).
        target, rule, grid, power: the rule (diffusion also takes ``top-p-flat``).
        max_tokens: held-out prompt tokens (BOS included); seq_len: tokens per prompt at most.
        batch_size, compute_dtype, text_field, trust_remote_code: as in collection.
    """

    decoding: object
    model: str | None = None
    corpus: str | None = None
    target: str = "intermediate"
    rule: str = "top-p"
    grid: tuple[float, ...] = DEFAULT_DECODED_GRID
    power: float = 1.0
    max_tokens: int | None = 512
    seq_len: int = 64
    batch_size: int = 8
    compute_dtype: str = "float32"
    text_field: str | None = None
    trust_remote_code: bool = False

    @property
    def kind(self) -> str:
        return self.decoding.kind

    def values(self) -> tuple[float, ...]:
        """The grid as floats, duplicates dropped, in the given order (``evaluate.config.grid_values``)."""
        return grid_values(self.grid)

    def validate(self) -> None:
        """Raise ActsparseError for values that cannot work, before anything is loaded."""
        if not self.values():
            raise ActsparseError("the grid is empty; give at least one rule value")
        rules = DIFFUSION_RULES if self.kind == "diffusion" else UNCALIBRATED_RULES
        check_closed_loop(self.target, self.rule, self.values(), self.power, rules)
        self.decoding.validate()
        if self.seq_len < 2 or self.batch_size < 1 or (self.max_tokens is not None and self.max_tokens < 1):
            raise ActsparseError(f"--seq-len must be at least 2, --batch-size and --max-tokens positive (got "
                                 f"{self.seq_len}, {self.batch_size}, {self.max_tokens})")
        if self.compute_dtype not in fmt.STORED_DTYPES:
            raise ActsparseError(f"unknown compute dtype '{self.compute_dtype}' "
                                 f"(choose {', '.join(fmt.STORED_DTYPES)})")


@dataclass
class DecodedEvaluation:
    """The result of :func:`evaluate_decoded`: ``table`` (a polars DataFrame of the result kind's columns), where
    it is stored (None: not stored) and whether it was reused from the store."""

    eval_id: str
    kind: fmt.ResultKind
    table: object
    path: Path | None
    reused: bool


class _Counts:
    """A :class:`pipeline.decoding.RowSink` that counts, per prompt and group (phase, or step and block), the
    counted positions and the entries a :class:`Sparsifier` zeroed there (no Sparsifier: positions only)."""

    def __init__(self, sp: Sparsifier | None, kind: str):
        self.sp, self.kind = sp, kind
        self.positions: dict = defaultdict(int)  # (sequence, group) -> counted positions
        self.zeroed: dict = defaultdict(int)  # (sequence, group) -> zeroed entries, all hooks
        self._rows: list[tuple[int, tuple, int]] = []

    def begin(self, keep: torch.Tensor, rows: dict, shape: tuple[int, int]) -> None:
        valid = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
        valid[keep] = True
        valid = valid.reshape(shape)
        row_of = (keep // shape[1]).numpy()
        first = np.flatnonzero(np.r_[True, row_of[1:] != row_of[:-1]]) if len(row_of) else np.zeros(0, int)
        group = (lambda i: (rows["phase"][i],)) if self.kind == "generation" else (
            lambda i: (int(rows["step"][i]), int(rows["block"][i])))
        per_row = valid.sum(dim=1)
        self._rows = [(int(row_of[i]), (int(rows["sequence"][i]), *group(i)), int(per_row[row_of[i]])) for i in first]
        if self.sp is not None:
            self.sp.begin_batch(valid)

    def end(self) -> None:
        counts = self.sp.end_batch().sum(dim=0) if self.sp is not None else None  # [rows], all hooks
        for r, key, n in self._rows:
            self.positions[key] += n
            if counts is not None:
                self.zeroed[key] += int(counts[r])


def evaluate_decoded(cfg: DecodedEvalConfig, store: str | Path | None = None, run: str | None = None, *,
                     n_boot: int = N_BOOT, seed: int = 0, log: Callable[[str], None] = print) -> DecodedEvaluation:
    """Run the closed loop of ``cfg`` on generation or diffusion (module docstring).

    Args:
        cfg: what to evaluate; model and corpus default to the run's.
        store: local store to keep the result in (None: computed only).
        run: run id or prefix the result belongs to (its model and corpus must be the ones evaluated).
        n_boot, seed: bootstrap resamples over prompts and their seed.
        log: one-line progress messages.

    Raises:
        ActsparseError: bad settings, a model the decoding cannot run (``pipeline.decoding.plan_decoder``), a
            held-out split without prompts, a model or corpus that is not the run's.
    """
    import polars as pl

    from actsparse.pipeline.corpora import open_corpus
    from actsparse.pipeline.decoding import plan_decoder
    from actsparse.pipeline.models import load_tokenizer, resolve_model
    from actsparse.pipeline.windows import batches, iter_windows

    cfg.validate()
    cfg, manifest = with_run(cfg, store, run)
    resolved = resolve_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tok, mcfg = load_tokenizer(resolved, seq_len=cfg.seq_len)
    corpus = open_corpus(cfg.corpus, text_field=cfg.text_field)
    if manifest is not None:
        check_against_run(manifest, cfg.model, resolved.weights_sha256, cfg.corpus, corpus.sha256)
    decoder = plan_decoder(cfg.decoding, tok, mcfg, resolved.spec, cfg.seq_len)
    windows = list(iter_windows(corpus.split(SPLIT), tok, cfg.seq_len, max_tokens=cfg.max_tokens, add_bos=True))
    if not windows:
        raise ActsparseError(f"the held-out split of corpus {cfg.corpus} yields no prompts")
    kind = fmt.GENERATION_EVALUATION if cfg.kind == "generation" else fmt.DIFFUSION_EVALUATION
    identity = _identity(cfg, resolved.weights_sha256, corpus.sha256, n_boot, seed)
    eval_id = fmt.content_hash(identity)
    path = None if store is None else base_dir(store, manifest.run_id if manifest else None) / fmt.result_file(
        kind, eval_id)
    if path is not None and path.is_file():
        log(f"evaluation {eval_id} is stored; reusing it")
        return DecodedEvaluation(eval_id, kind, pl.read_parquet(path), path, True)

    model, arch = decoder.load(resolved, cfg.compute_dtype)
    groups = list(batches(windows, cfg.batch_size))
    rules = DIFFUSION_RULES if cfg.kind == "diffusion" else UNCALIBRATED_RULES
    with torch.inference_mode():
        dense_counts = _Counts(None, cfg.kind)
        dense = [c for b, ws in enumerate(groups) for c in decoder.run_batch(model, ws, b, dense_counts)]
        log(f"dense reference: {len(windows)} prompts")
        results = []
        for v in cfg.values():
            with Sparsifier(arch, cfg.target, cfg.rule, v, power=cfg.power, rules=rules) as sp:
                counts = _Counts(sp, cfg.kind)
                sparse = [c for b, ws in enumerate(groups) for c in decoder.run_batch(model, ws, b, counts)]
                width = sum(p.width for p in sp.points)
            results.append((v, counts, sparse))
            log(f"{cfg.target} {cfg.rule} {v:g}: sparsity {_pooled(counts, width):.4f}")
    meta = dict(run_id=manifest.run_id if manifest else None, eval_id=eval_id, model=cfg.model, corpus=corpus.spec,
                split=SPLIT, target=cfg.target, rule=cfg.rule, power=cfg.power)
    seqs = [w.sequence for w in windows]
    boot = _resample_counts(len(seqs), n_boot, seed)
    rows = []
    for v, counts, sparse in results:
        agreement, exact = continuation_agreement(dense, sparse)
        table = _generation_rows if cfg.kind == "generation" else _diffusion_rows
        rows += table(meta | dict(value=v, n_boot=n_boot), counts, seqs, width, boot, agreement, exact, cfg, dense)
    types = {"VARCHAR": pl.String, "BIGINT": pl.Int64, "DOUBLE": pl.Float64}
    df = pl.DataFrame(rows, schema={c: types[t] for c, t in kind.columns}).with_columns(label=pl.lit("closed-loop"))
    if path is not None:
        atomic_write_parquet(path, df.to_arrow())
        checksum(path.parent, meta["run_id"], [path])
    return DecodedEvaluation(eval_id, kind, df, path, False)


def _identity(cfg: DecodedEvalConfig, weights_sha256: str, corpus_sha256: str, n_boot: int, seed: int) -> dict:
    import transformers

    d = dataclasses.asdict(cfg) | dict(model=None, corpus=None, grid=sorted(cfg.values()))
    return dict(kind=f"evaluate-{cfg.kind}", version=DECODED_VERSION, weights_sha256=weights_sha256,
                corpus_sha256=corpus_sha256, split=SPLIT, config=d, n_boot=n_boot, seed=seed, torch=torch.__version__,
                transformers=transformers.__version__)


def _pooled(counts: _Counts, width: int) -> float:
    positions = sum(counts.positions.values())
    return sum(counts.zeroed.values()) / (positions * width) if positions else float("nan")


def continuation_agreement(dense: list[list[int]], sparse: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the agreement of a sparse continuation with the dense model's.

    Returns:
        ``token_agreement`` float64 [prompts]: the fraction of the dense continuation's positions where the
        sparse one has the same token (a position the sparse one did not reach disagrees; an empty dense
        continuation scores 1 if the sparse one is empty too, else 0); ``exact_match`` bool [prompts]: same
        length and same tokens.

    Raises:
        ActsparseError: lists of different lengths.
    """
    if len(dense) != len(sparse):
        raise ActsparseError(f"{len(dense)} dense and {len(sparse)} sparse continuations")
    agree = np.empty(len(dense))
    exact = np.empty(len(dense), dtype=bool)
    for i, (d, s) in enumerate(zip(dense, sparse)):
        same = sum(a == b for a, b in zip(d, s))
        agree[i] = same / len(d) if d else float(not s)
        exact[i] = d == s
    return agree, exact


def _ratio_interval(boot: np.ndarray, num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """2.5 / 97.5 percentiles of ``Σ num / Σ den`` over bootstrap resamples ``boot`` [n_boot, prompts]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        lo, hi = _interval((boot @ num) / (boot @ den))
    return float(lo[0]), float(hi[0])


def _mean_interval(boot: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    lo, hi = _interval((boot @ x) / boot.sum(axis=1))
    return float(lo[0]), float(hi[0])


def _per_prompt(counts: _Counts, seqs: list[int], groups) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed entries and counted positions [prompts] summed over the given groups."""
    z = np.array([sum(counts.zeroed.get((s, *g), 0) for g in groups) for s in seqs], dtype=np.float64)
    n = np.array([sum(counts.positions.get((s, *g), 0) for g in groups) for s in seqs], dtype=np.float64)
    return z, n


def _agreement_columns(boot, agreement, exact) -> dict:
    a_lo, a_hi = _mean_interval(boot, agreement)
    e_lo, e_hi = _mean_interval(boot, exact.astype(np.float64))
    return dict(token_agreement=float(agreement.mean()), token_agreement_lo=a_lo, token_agreement_hi=a_hi,
                exact_match=float(exact.mean()), exact_match_lo=e_lo, exact_match_hi=e_hi)


def _generation_rows(meta, counts, seqs, width, boot, agreement, exact, cfg, dense) -> list[dict]:
    row = dict(meta, max_new_tokens=cfg.decoding.max_new_tokens, n_prompts=len(seqs),
               dense_generated_mean=float(np.mean([len(c) for c in dense])),
               **_agreement_columns(boot, agreement, exact))
    for phase, groups in (("prefill", [("prefill",)]), ("generation", [("generation",)]),
                          ("total", [("prefill",), ("generation",)])):
        z, n = _per_prompt(counts, seqs, groups)
        row[f"sparsity_{phase}"] = float(z.sum() / (n.sum() * width)) if n.sum() else None
        row[f"sparsity_{phase}_lo"], row[f"sparsity_{phase}_hi"] = (
            _ratio_interval(boot, z, n * width) if n.sum() else (None, None))
        if phase != "total":
            row[f"n_{phase}"] = int(n.sum())
    return [row]


def _diffusion_rows(meta, counts, seqs, width, boot, agreement, exact, cfg, dense) -> list[dict]:
    steps = sorted({k[1:] for k in counts.positions})
    rows = []
    for step, block in [*steps, (-1, None)]:
        groups = steps if step == -1 else [(step, block)]
        z, n = _per_prompt(counts, seqs, groups)
        lo, hi = _ratio_interval(boot, z, n * width)
        row = dict(meta, step=step, block=block, n_prompts=len(seqs), n_positions=int(n.sum()),
                   sparsity=float(z.sum() / (n.sum() * width)), sparsity_lo=lo, sparsity_hi=hi)
        if step == -1:
            row |= _agreement_columns(boot, agreement, exact)
        rows.append(row)
    return rows
