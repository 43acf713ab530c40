"""Queries over whole stores: DuckDB SQL views and Polars scans (``engine``), and the named queries of this
folder (``named``: one ``<name>.sql`` each, with typed parameters)."""

from actsparse.queries.engine import Store
from actsparse.queries.named import NamedQuery, get, load

__all__ = ["NamedQuery", "Store", "get", "load"]
