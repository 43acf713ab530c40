"""actsparse: an activation dataset pipeline and offline analyzer for FFN activation sparsity."""

__version__ = "0.1.0"
__all__ = ["Store", "__version__"]


def __getattr__(name: str):
    # Store pulls in DuckDB, Polars and pyarrow; the CLI and the pipeline import this package without it.
    if name == "Store":
        from actsparse.store import Store

        return Store
    raise AttributeError(f"module 'actsparse' has no attribute {name!r}")
