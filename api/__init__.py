"""actsparse: an activation dataset pipeline and offline analyzer for FFN activation sparsity.

The Python API, importable at the top (``import actsparse``); each name is loaded on first use, so that the
command line and light scripts do not pay for DuckDB or torch they do not touch:

* :class:`Store` — SQL, named queries and Polars scans over a store (``actsparse.queries.engine``);
* :func:`collect` / :class:`CollectConfig` — collection with the per-token statistics written beside the
  activations (``actsparse.pipeline.collect`` with ``actsparse.analyze.token_stats.TOKEN_STATS``);
* :func:`compute_curves`, :func:`critical_sparsity` — open-loop analysis (``actsparse.analyze.curves``);
* :func:`evaluate` / :class:`EvalConfig` — closed-loop evaluation (``actsparse.analyze.evaluate``);
* :func:`evaluate_tasks` / :class:`TaskEvalConfig` — downstream-task critical sparsity through
  lm-evaluation-harness (``actsparse.analyze.tasks``; the ``tasks`` extra).
"""

from actsparse.core import __version__

__all__ = ["CollectConfig", "EvalConfig", "Store", "TaskEvalConfig", "__version__", "collect", "compute_curves",
           "critical_sparsity", "evaluate", "evaluate_tasks"]


def collect(cfg, store, **kwargs):
    """``actsparse.pipeline.collect.collect`` with the per-token statistics (the ``token_stats`` table) written
    beside the activations; keyword arguments as there (``statistics`` overrides)."""
    from actsparse.analyze.token_stats import TOKEN_STATS
    from actsparse.pipeline.collect import collect as collect_run

    return collect_run(cfg, store, **({"statistics": TOKEN_STATS} | kwargs))


_LAZY = {
    "Store": "actsparse.queries.engine",
    "CollectConfig": "actsparse.pipeline.collect",
    "compute_curves": "actsparse.analyze.curves",
    "critical_sparsity": "actsparse.analyze.curves",
    "evaluate": "actsparse.analyze.evaluate",
    "EvalConfig": "actsparse.analyze.evaluate",
    "evaluate_tasks": "actsparse.analyze.tasks",
    "TaskEvalConfig": "actsparse.analyze.tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'actsparse' has no attribute {name!r}")
