"""Float tensors to and from their stored representation (the dtypes of ``actsparse.core.format``).

bfloat16 is stored as its ``uint16`` bit patterns, since neither numpy nor zarr has bfloat16
(docs/pitfalls.md P5); float16 only after an overflow check (P6); float32 as is. The expert ids of
mixture-of-experts runs are ``int16`` (``INDEX_DTYPE``), after a range check.
"""

from __future__ import annotations

import numpy as np

from actsparse.core.errors import ActsparseError
from actsparse.core.format import FLOAT16_MAX, INDEX_DTYPE, STORED_DTYPES, numpy_dtype


def encode(t, dtype: str, *, where: str = "", out: np.ndarray | None = None) -> np.ndarray:
    """Convert a float tensor to the stored numpy representation.

    Args:
        t: torch tensor of any float dtype, any shape (of an integer dtype for ``int16``).
        dtype: ``bfloat16`` (returned as ``uint16`` bit patterns), ``float16``, ``float32`` or ``int16``
            (expert ids).
        where: a label for the overflow error message (site and layer).
        out: optional C-contiguous numpy array of ``numpy_dtype(dtype)`` and t's shape to write into;
            conversion and copy are then one pass (torch rounds to nearest even, as ``Tensor.to``).

    Returns:
        ``out`` when given, else a new array.

    Raises:
        ActsparseError: an unknown dtype, ``float16`` requested and a finite value exceeds its range, or an
            ``int16`` value out of its range.
    """
    import torch

    if dtype not in STORED_DTYPES and dtype != INDEX_DTYPE:
        raise ActsparseError(f"unknown stored dtype '{dtype}' (choose {', '.join(STORED_DTYPES)})")
    if dtype == INDEX_DTYPE and t.numel() and not -(1 << 15) <= int(t.min()) <= int(t.max()) < (1 << 15):
        raise ActsparseError(f"{where} holds ids beyond int16")
    if dtype == "float16":
        peak = float(t.detach().abs().max()) if t.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise ActsparseError(
                f"{where} has |x| up to {peak:.4g}, beyond float16's {FLOAT16_MAX:g}: "
                "store as --dtype bfloat16 (lossless for bf16 models) or float32"
            )
    if out is None:
        out = np.empty(tuple(t.shape), dtype=numpy_dtype(dtype))
    dst = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(out)
    dst.copy_(t)
    return out


def decode(arr: np.ndarray, dtype: str, *, to: str = "float32"):
    """A stored numpy block as a torch tensor: ``float32`` by default, or ``native`` (the logical dtype).

    bfloat16 bit patterns are reinterpreted without copying, then widened exactly.
    """
    import torch

    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr))
    return t if to == "native" else t.to(getattr(torch, to))
