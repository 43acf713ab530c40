"""A model's FFN weights in the store: ``models/<weights_id>/ffn.zarr``, written once per model and compute dtype."""

from __future__ import annotations

from collections.abc import Callable

from actsparse.core import format as fmt
from actsparse.core.checksums import write_checksums
from actsparse.core.files import atomic_directory, blocking_lock
from actsparse.pipeline.arrays import compressor
from actsparse.pipeline.ffn import ffn_weights
from actsparse.pipeline.sites import FFNArchitecture

LAYOUT = "nn.Linear [out, in]; gate/up [d_ff, d_model], down [d_model, d_ff]"


def weights_id(weights_sha256: str, arch: FFNArchitecture, compute_dtype: str) -> str:
    """The id of a model's stored FFN weights: a hash of the weights, the resolved FFN and the compute dtype."""
    return fmt.content_hash(dict(weights=weights_sha256, ffn=arch.describe(), dtype=compute_dtype))


def write_weights(paths: fmt.StorePaths, wid: str, arch: FFNArchitecture) -> None:
    """Store the FFN weights of every layer once per model: float32 ``gate``/``up`` ``[layers, d_ff, d_model]``,
    ``down`` ``[layers, d_model, d_ff]`` (and biases), as :func:`write_weights_group` writes them."""

    def fill(group) -> None:
        first = ffn_weights(arch, 0)
        for name, w in first.items():
            arr = group.create_array(name, shape=(len(arch.layers), *w.shape), dtype="float32",
                                     chunks=(1, *w.shape), compressors=compressor(4))
            for layer in range(len(arch.layers)):
                arr[layer] = ffn_weights(arch, layer)[name].float().cpu().numpy()
        group.attrs.update(dict(activation=arch.activation, pattern=arch.pattern, d_model=arch.d_model,
                                d_ff=arch.d_ff, layout=LAYOUT))

    write_weights_group(paths, wid, fill)


def write_weights_group(paths: fmt.StorePaths, wid: str, fill: Callable[[object], None]) -> None:
    """Write a model's weights once: ``fill(group)`` creates the arrays in a zarr v3 group in a temporary
    directory, which is renamed into place (``models/<wid>/ffn.zarr``) under the weights lock, then listed in
    their ``checksums.json``. A no-op when they exist."""
    import zarr

    target = paths.weights_dir(wid)
    with blocking_lock(target.parent / fmt.LOCK):
        if (target / fmt.ZARR_META).is_file():
            return
        with atomic_directory(target) as tmp:
            fill(zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3))
        write_checksums(target.parent)
