"""Comma-separated command-line values (``--sites input,gate``, ``--grid 0.9,0.5``), shared by the CLI and the demo."""

from __future__ import annotations

from actsparse.errors import ActsparseError


def names(value: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: items stripped, empty items dropped; None or "" -> ()."""
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def numbers(value: str | None, option: str) -> tuple[float, ...]:
    """Comma-separated floats, as ``names`` splits them.

    Raises:
        ActsparseError: an item that is not a number, naming ``option`` (e.g. ``--grid``).
    """
    try:
        return tuple(float(v) for v in names(value))
    except ValueError:
        raise ActsparseError(f"{option} must be comma-separated numbers, got '{value}'") from None
