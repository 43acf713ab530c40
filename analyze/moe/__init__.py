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

from actsparse.analyze.moe.curves import moe_curves


def expert_curves(store, run_id: str | None = None, **options):
    """The per-expert rows (``actsparse.core.format.EXPERT_CURVES``) of a mixture-of-experts run, computed as
    ``actsparse.analyze.curves.compute_curves`` computes its curves (same ``options``: targets, rules, grids,
    power, include_special, with_error, block_tokens, layers, use_cache, progress) and cached with them.

    Raises:
        ActsparseError: the run is not a mixture-of-experts run, or as ``compute_curves``.
    """
    from actsparse.analyze.curves.config import CurveConfig
    from actsparse.core.errors import ActsparseError
    from actsparse.pipeline.reader import StoreReader

    st = store if isinstance(store, StoreReader) else StoreReader(str(store))
    run = st.run(run_id)
    if run.moe is None:
        raise ActsparseError(f"run {run.run_id} is not a mixture-of-experts run: it has no expert curves")
    cfg_keys = ("targets", "rules", "grids", "power", "include_special", "with_error", "block_tokens")
    given = {k: options.pop(k) for k in cfg_keys if k in options}
    given = {k: tuple(v) if k in ("targets", "rules") else v for k, v in given.items()}
    cfg = CurveConfig(**given)
    cfg = CurveConfig(cfg.targets, cfg.rules, dict(cfg.grids), float(cfg.power), cfg.include_special,
                      cfg.with_error or "all-inputs" in cfg.targets, cfg.block_tokens)
    cfg.validate()
    return moe_curves(st, run, cfg, **options)[1]


__all__ = ["expert_curves", "moe_curves"]
