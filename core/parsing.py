"""Comma-separated command-line values (``--sites input,gate``, ``--grid 0.9,0.5``), shared by the CLI and the demo."""

from __future__ import annotations

from actsparse.core.errors import ActsparseError


def names(value: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``: items stripped, empty items dropped; None or "" -> ()."""
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def numbers(value: str | None, option: str) -> tuple[float, ...]:
    """Comma-separated floats, as ``names`` splits them; None (option not given) -> ().

    Raises:
        ActsparseError: an item that is not a number, or a value given with no items at all (``""``,
            ``","``: never silently the default), naming ``option`` (e.g. ``--grid``).
    """
    if value is None:
        return ()
    items = names(value)
    if not items:
        raise ActsparseError(f"{option} has no values ('{value}'); leave it out for the default")
    try:
        return tuple(float(v) for v in items)
    except ValueError:
        raise ActsparseError(f"{option} must be comma-separated numbers, got '{value}'") from None
