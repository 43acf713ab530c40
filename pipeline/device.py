"""Where collection's forward pass runs: the device, the forward dtype, and moving captured activations off the
device into the shard buffers.

On the CPU nothing changes: a hook converts its rows straight into the shard buffers (one pass). On CUDA a hook
casts its rows to the stored dtype on the device and starts an asynchronous copy into pinned host memory; the
conversion into the shard buffers waits until the forward pass is over, so the forward synchronises once per
batch instead of once per hook (a blocking copy in every hook would stall the GPU ``layers x sites`` times per
batch: PyTorch's "pinned memory and non_blocking" notes, https://pytorch.org/tutorials/intermediate/pinmem_nonblock.html).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from actsparse.core.codec import encode
from actsparse.core.errors import ActsparseError

DEVICES = ("auto", "cpu", "cuda")
AUTO = "auto"
HALF = ("bfloat16", "float16")

# (shard buffers {site: [layers, T, width]}, first row in the batch, first row in the shard, rows) per shard
Segments = Sequence[tuple[dict, int, int, int]]


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for ``--device auto|cpu|cuda`` on this machine (``auto``: cuda when torch sees a GPU).

    Raises:
        ActsparseError: an unknown device, or ``cuda`` where torch sees no GPU.
    """
    if device not in DEVICES:
        raise ActsparseError(f"unknown --device '{device}' (choose {', '.join(DEVICES)})")
    if device == "cpu":
        return device
    import torch

    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        import platform

        raise ActsparseError(f"--device cuda, but torch sees no GPU on {platform.node()} (torch {torch.__version__})")
    return device


def forward_dtype(requested: str, device: str, declared: str | None) -> str:
    """The dtype of the forward pass for ``--compute-dtype`` ``requested`` on ``device``.

    ``auto`` is float32 on the CPU (what collection always did) and, on CUDA, the dtype the checkpoint declares
    when it is a half type, else bfloat16 (the dtype modern checkpoints ship in; GGUF conversions declare
    float32). Any other value is kept.
    """
    if requested != AUTO:
        return requested
    if device == "cpu":
        return "float32"
    return declared if declared in HALF else "bfloat16"


def declared_dtype(model_config) -> str | None:
    """The dtype a transformers config declares (``dtype``, formerly ``torch_dtype``) as a name, or None."""
    d = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return str(d).removeprefix("torch.") if d is not None else None


def to_device(model, device: str):
    """The model on ``device`` (a no-op on the CPU)."""
    return model if device == "cpu" else model.to(device)


class ShardCopier:
    """Copies the rows a hook captured into their shard buffers (``encode``: the stored dtype's numpy layout).

    ``copier(key, index, rows, segments)`` is called from the hooks with ``rows`` ``[tokens, row]`` (the
    batch's valid rows, on the model's device) and the batch's segments: the rows go to
    ``bufs[key][index, dst:dst + n]`` (key: a site, or a mixture-of-experts array; index: its layer);
    :meth:`flush` after the forward pass. ``dtypes`` is the stored dtype of every key, or one mapping of key to
    stored dtype. Unstaged (the CPU), each call converts into the buffers at once. Staged (CUDA), a call casts
    on the device (to the stored dtype; float32 for a float16 store, so the overflow check sees the true peak)
    and starts a non-blocking copy to pinned host memory; :meth:`flush` waits for the copies once and converts
    them.

    Raises:
        ActsparseError: from ``encode``: a value beyond float16's range in a float16 store.
    """

    def __init__(self, dtypes: str | Mapping[str, str], *, staged: bool):
        self.dtypes, self.staged = dtypes, staged
        self._pending: list[tuple[str, int, object, Segments, str]] = []

    def _dtype(self, key: str) -> str:
        return self.dtypes if isinstance(self.dtypes, str) else self.dtypes[key]

    def __call__(self, key: str, index: int, rows, segments: Segments, where: str | None = None) -> None:
        where = where or f"site {key} layer {index}"
        if not self.staged:
            _into(rows, key, index, segments, self._dtype(key), where)
            return
        import torch

        dtype = self._dtype(key)
        stage = torch.float32 if dtype == "float16" else getattr(torch, dtype)
        # a copy on the device first: the hook's tensor may be reused by the forward pass
        host = rows.to(stage, copy=True).to("cpu", non_blocking=True)
        self._pending.append((key, index, host, segments, where))

    def flush(self) -> None:
        """Wait for the staged copies and convert them into the shard buffers (a no-op when none is staged)."""
        if not self._pending:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()
        pending, self._pending = self._pending, []
        for key, index, host, segments, where in pending:
            _into(host, key, index, segments, self._dtype(key), where)


def _into(rows, key: str, index: int, segments: Segments, dtype: str, where: str) -> None:
    for bufs, src, dst, n in segments:
        out: np.ndarray = bufs[key][index, dst:dst + n]
        encode(rows[src:src + n], dtype, where=where, out=out)
