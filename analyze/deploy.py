"""Deployment-shaped sparsity from stored activations: what a batched or structured kernel can actually skip.

Per-token sparsity (the paper's measure, docs/paper-notes.md §1.4) is an upper bound on what a kernel skips:

* **Batch union**: a batched kernel can skip a neuron (a column of W_down, for the intermediate) only if no
  token of the batch keeps it, so its sparsity is the fraction of neurons in the complement of the union of
  the batch's kept sets (Deja Vu and TEAL report the same decay with batch size). Batches are formed
  ``contiguous`` (consecutive counted tokens: a prefill chunk) and ``random`` (a seeded permutation: a decode
  batch of independent requests). At batch size 1 it equals the mean per-token sparsity.
* **N:M** structured sparsity (2:4, 8:16; the shape of sparse tensor cores): in every group of M consecutive
  features keep the N largest |a| (exactly N, ties by index), against unstructured top-k at the same
  sparsity (exactly W * N / M per token). Errors: the vector's relative L2 error ``||a * dropped|| / ||a||``,
  and for the intermediate the relative FFN-output error ``||W_down (h * dropped)|| / ||W_down h||``.
* **Per neuron**: how often each neuron is kept by the rule and its mean |a| (always-on and never-on neurons:
  the named query ``neuron_extremes``).

The masks are the rule's on the stored dense activations (``analyze.rules``; WINA with the stored weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from actsparse.analyze import rules as R
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import CALIBRATED_RULES, WEIGHTED_RULES

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_PATTERNS = ((2, 4), (8, 16))
DEFAULT_TOKENS = 4096
SEED = 0
DEPLOY_VERSION = 1


def batch_union_sparsity(mask: torch.Tensor, batch_size: int, order: torch.Tensor | None = None) -> tuple[float, int]:
    """Mean over batches of the fraction of neurons that no token of the batch keeps.

    mask: bool [T, W] keep mask; tokens are grouped in ``order`` (int64 [T], default 0..T-1) into
    floor(T / batch_size) batches (the remainder is left out). Returns (union sparsity, number of batches).

    Raises:
        ActsparseError: a batch size below 1 or above the token count.
    """
    t, w = mask.shape
    if not 1 <= batch_size <= t:
        raise ActsparseError(f"batch size {batch_size} is outside [1, {t}] (tokens available)")
    n_b = t // batch_size
    m = mask if order is None else mask[order]
    union = m[: n_b * batch_size].reshape(n_b, batch_size, w).any(dim=1)
    return 1.0 - float(union.sum()) / (n_b * w), n_b


def nm_mask(a: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep mask: in each group of ``m`` consecutive features, the ``n`` largest |a| (exactly n; ties by the
    lower index). a: [T, W] with W divisible by m; returns bool [T, W].

    Raises:
        ActsparseError: not 0 < n <= m, or W not a multiple of m.
    """
    t, w = a.shape
    if not 0 < n <= m or w % m:
        raise ActsparseError(f"N:M needs 0 < N <= M and a width divisible by M; got {n}:{m} for width {w}")
    g = a.abs().float().reshape(t, w // m, m)
    idx = torch.topk(g, n, dim=-1, sorted=False).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(t, w)


def exact_topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of exactly the ``k`` largest |a| per token (ties broken arbitrarily): bool [T, W]."""
    idx = torch.topk(a.abs().float(), k, dim=-1, sorted=False).indices
    return torch.zeros(a.shape, dtype=torch.bool).scatter_(-1, idx, True)


def _rel_errors(a: torch.Tensor, keep: torch.Tensor, w_down: torch.Tensor | None) -> tuple[float, float]:
    """Mean relative L2 error of the vector and (with ``w_down``) of the down projection's output."""
    x = a.float()
    dropped = x * ~keep
    norm = x.norm(dim=1).double()
    vec = torch.where(norm > 0, dropped.norm(dim=1).double() / norm.clamp_min(1e-300), torch.zeros_like(norm))
    if w_down is None:
        return float(vec.mean()), float("nan")
    y = (x @ w_down.T).norm(dim=1).double()
    dy = (dropped @ w_down.T).norm(dim=1).double()
    out = torch.where(y > 0, dy / y.clamp_min(1e-300), torch.zeros_like(y))
    return float(vec.mean()), float(out.mean())


def deployment_layer(a: torch.Tensor, keep: torch.Tensor, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                     patterns: Sequence[tuple[int, int]] = DEFAULT_PATTERNS, w_down: torch.Tensor | None = None,
                     seed: int = SEED) -> tuple[list[dict], list[dict], dict]:
    """The three tables for one layer: batch-union rows, N:M rows and per-neuron columns.

    a: [T, W] dense activations; keep: bool [T, W] the rule's keep mask; w_down: [d_model, W] for the output
    error (intermediate only). Batch sizes above T are skipped; patterns whose M does not divide W too.
    Returns (batch rows: batching, batch_size, n_batches, token_sparsity, union_sparsity; N:M rows: pattern,
    n, m, sparsity, rel_err_nm, rel_err_unstructured, out_err_nm, out_err_unstructured; neurons: keep_rate and
    mean_abs, float64 arrays [W]).
    """
    t, w = a.shape
    token_sparsity = 1.0 - float(keep.sum()) / keep.numel()
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(t))
    batch_rows = []
    for batching, order in (("contiguous", None), ("random", perm)):
        for b in batch_sizes:
            if b <= t:
                u, n_b = batch_union_sparsity(keep, b, order)
                batch_rows.append(dict(batching=batching, batch_size=b, n_batches=n_b, token_sparsity=token_sparsity,
                                       union_sparsity=u))
    nm_rows = []
    for n, m in patterns:
        if w % m:
            continue
        vec_nm, out_nm = _rel_errors(a, nm_mask(a, n, m), w_down)
        vec_u, out_u = _rel_errors(a, exact_topk_mask(a, w * n // m), w_down)
        nm_rows.append(dict(pattern=f"{n}:{m}", n=n, m=m, sparsity=1.0 - n / m, rel_err_nm=vec_nm,
                            rel_err_unstructured=vec_u, out_err_nm=out_nm, out_err_unstructured=out_u))
    neurons = dict(keep_rate=keep.double().mean(0).numpy(), mean_abs=a.abs().double().mean(0).numpy())
    return batch_rows, nm_rows, neurons


def deployment_run(run, *, site: str = "intermediate", rule: str = "top-p", value: float = 0.9,
                   n_tokens: int = DEFAULT_TOKENS, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                   patterns: Sequence[tuple[int, int]] = DEFAULT_PATTERNS, include_special: bool = False,
                   layers: Sequence[int] | None = None, progress: Callable[[int], None] | None = None):
    """Batch-union, N:M and per-neuron tables of one run's ``site`` over its first ``n_tokens`` counted tokens.

    Returns three polars DataFrames with the columns of ``actsparse.core.format`` BATCH_UNION, NM_SPARSITY and
    NEURONS (without ``analysis_id``). The rule is applied per token to the stored values in their stored dtype.

    Raises:
        ActsparseError: a site the run did not store, a calibrated rule (threshold, cett: no per-token mask
            without calibration), a bad rule value, or no counted tokens.
    """
    import polars as pl

    if site not in run.sites:
        raise ActsparseError(f"run {run.run_id} has no site '{site}' (stored: {', '.join(run.sites)})")
    if rule in CALIBRATED_RULES:
        raise ActsparseError(f"deployment needs a per-token rule; {rule} is calibrated per layer "
                             f"(choose top-p, top-k, max-p, wina-top-k or wina-top-p)")
    R.check_rule_value(rule, value)
    if n_tokens < 1:
        raise ActsparseError(f"--tokens must be positive, got {n_tokens}")
    keep_tok = np.ones(run.n_tokens, bool) if include_special else ~run.special_mask()
    rows = np.nonzero(keep_tok)[0][:n_tokens]
    if not len(rows):
        raise ActsparseError(f"run {run.run_id} has no counted tokens")
    stop = int(rows[-1]) + 1
    sel = torch.from_numpy(rows)
    layer_ids = list(range(run.n_layers)) if layers is None else list(layers)
    b_rows, nm_rows, n_frames = [], [], []
    meta = dict(run_id=run.run_id, site=site)
    for layer in layer_ids:
        a = run.read(site, layer, 0, stop, to="native")[sel]
        w = run.weights(layer) if (site == "intermediate" or rule in WEIGHTED_RULES) else None
        norms = None
        if rule in WEIGHTED_RULES:
            from actsparse.analyze.weighted import consumer_norms

            norms = consumer_norms(w, site)
        keep = R.rule_mask(rule, a, value, norms=norms)
        br, nr, neu = deployment_layer(a.float(), keep, batch_sizes=batch_sizes, patterns=patterns,
                                       w_down=w["down"] if site == "intermediate" else None)
        b_rows += [meta | dict(rule=rule, value=float(value), layer=layer, width=a.shape[1]) | r for r in br]
        nm_rows += [meta | dict(layer=layer, n_tokens=len(rows)) | r for r in nr]
        n_frames.append(pl.DataFrame(dict(run_id=run.run_id, site=site, rule=rule, value=float(value), layer=layer,
                                          neuron=np.arange(a.shape[1]), n_tokens=len(rows), **neu)))
        if progress is not None:
            progress(1)
    batch = pl.DataFrame(b_rows)
    nm = pl.DataFrame(nm_rows) if nm_rows else pl.DataFrame()
    return batch, nm, pl.concat(n_frames)


def deploy_ident(site: str, rule: str, value: float, n_tokens: int, batch_sizes, patterns, include_special) -> dict:
    """What identifies a deployment analysis (its id is the content hash)."""
    return dict(kind="deployment", version=DEPLOY_VERSION, site=site, rule=rule, value=float(value),
                n_tokens=int(n_tokens), batch_sizes=sorted(int(b) for b in batch_sizes),
                patterns=[list(p) for p in patterns], include_special=include_special, seed=SEED)


def compute_deployment(store, run_id: str | None = None, *, site: str = "intermediate", rule: str = "top-p",
                       value: float = 0.9, n_tokens: int = DEFAULT_TOKENS,
                       batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                       patterns: Sequence[tuple[int, int]] = DEFAULT_PATTERNS, include_special: bool = False,
                       use_cache: bool = True, progress: Callable[[int], None] | None = None):
    """:func:`deployment_run` of one run, cached in the store (result kinds batch_union, nm_sparsity, neurons).

    Returns (batch_union, nm_sparsity, neurons) polars DataFrames with their ``analysis_id``.
    """
    import polars as pl

    from actsparse.analyze.results import load_result, save_result
    from actsparse.core import format as fmt
    from actsparse.pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    ident = fmt.content_hash(deploy_ident(site, rule, value, n_tokens, batch_sizes, patterns, include_special))
    kinds = (fmt.BATCH_UNION, fmt.NM_SPARSITY, fmt.NEURONS)
    if use_cache:
        cached = [load_result(st, run.run_id, k, ident) for k in kinds]
        if all(c is not None for c in cached):
            return tuple(cached)
    frames = deployment_run(run, site=site, rule=rule, value=value, n_tokens=n_tokens, batch_sizes=batch_sizes,
                            patterns=patterns, include_special=include_special, progress=progress)
    out = []
    for kind, df in zip(kinds, frames):
        df = df.with_columns(analysis_id=pl.lit(ident)) if df.height else df
        if df.height:
            save_result(st, run.run_id, kind, ident, df)
        out.append(df)
    return tuple(out)
