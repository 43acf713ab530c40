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


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def byte_size(value: str, option: str, minimum: int = 0) -> int:
    """A size such as ``2GB``, ``512MiB`` or ``1.5GB`` in bytes (units as DuckDB reads them: KB, MB, GB, TB
    are powers of 1000, KiB, MiB, GiB, TiB powers of 1024; a bare number is bytes).

    Raises:
        ActsparseError: not a size, or a size below ``minimum`` bytes, naming ``option``.
    """
    text = str(value).strip().upper().replace(" ", "")
    num = text.rstrip("KMGTIB")
    unit = text[len(num):]
    try:
        n = float(num)
    except ValueError:
        n = float("nan")
    if unit not in _UNITS or not 0 <= n < 2**62:  # NaN fails too
        raise ActsparseError(f"{option} must be a size such as 2GB or 512MiB, got '{value}'")
    size = int(n * _UNITS[unit])
    if size < minimum:
        raise ActsparseError(f"{option} {value} is below the {minimum // 2**20}MiB it needs at least")
    return size
