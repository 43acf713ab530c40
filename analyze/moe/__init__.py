"""Mixture-of-experts models, offline: per-expert and per-layer curves from stored expert activations.

The package: ``counting`` (the authors' hook counting), ``targets`` (one rule value, experts recomputed),
``linear`` (a whole grid of a linear target in one pass), ``blocks`` (a block of a run's MoE layer), ``grid``
(one target's rules over a block), ``calibrate`` (threshold rule), ``accumulator`` (per-expert sums),
``curves`` (the sweep, cached in the store). Closed loop: ``actsparse.analyze.moe_sparsifier``.

The stored tensors (``pipeline.moe_recorder``; docs/store-format.md "Mixture-of-experts runs") hold, per decoder
layer, token and routed slot, the expert id, the routing weight and the expert's sites, and the shared expert's
sites; the stored weights (``pipeline.moe_weights``) recompute what was not stored. How sparsity is counted is
in ``analyze.moe.counting``; what each curve row means in ``analyze.moe.curves``.
"""

from collections.abc import Callable, Sequence

from actsparse.analyze.curves.config import DEFAULT_BLOCK_TOKENS, CurveConfig
from actsparse.analyze.moe.curves import moe_curves


def expert_curves(store, run_id: str | None = None, *, targets: Sequence[str] = ("intermediate",),
                  rules: Sequence[str] = ("top-p",), grids: dict | None = None, power: float = 1.0,
                  include_special: bool = False, with_error: bool = True, block_tokens: int = DEFAULT_BLOCK_TOKENS,
                  layers: Sequence[int] | None = None, use_cache: bool = True,
                  progress: Callable[[int], None] | None = None):
    """The per-expert rows (``actsparse.core.format.EXPERT_CURVES``) of a mixture-of-experts run: one per
    (target, rule, value, layer, unit, expert), computed as ``actsparse.analyze.curves.compute_curves``
    computes its curves (the same arguments) and cached with them.

    Raises:
        ActsparseError: the run is not a mixture-of-experts run, or as ``compute_curves``.
    """
    from actsparse.core.errors import ActsparseError
    from actsparse.pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    if run.moe is None:
        raise ActsparseError(f"run {run.run_id} is not a mixture-of-experts run: it has no expert curves")
    cfg = CurveConfig(tuple(targets), tuple(rules), dict(grids or {}), float(power), include_special,
                      with_error or "all-inputs" in targets, block_tokens)
    cfg.validate()
    return moe_curves(st, run, cfg, layers=layers, use_cache=use_cache, progress=progress)[1]


__all__ = ["expert_curves", "moe_curves"]
