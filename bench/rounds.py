"""Printing interleaved benchmark rounds."""

from __future__ import annotations


def listed(xs) -> str:
    """``"1.23, 4.56"``: every round's figure, two decimals."""
    return ", ".join(f"{x:.2f}" for x in xs)
