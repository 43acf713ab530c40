"""The FFN weights of a mixture-of-experts model: per-layer copies, and their store layout
(``models/<weights_id>/ffn.zarr``, written once per model and compute dtype, as ``pipeline.weights`` does for
dense models).

Stored arrays (float32, per expert ``nn.Linear`` ``[out, in]``, one chunk per layer; array ``i`` of the MoE
arrays is decoder layer ``moe_layers[i]``, of the ``dense_*`` arrays ``dense_layers[i]``):
``gate``/``up`` ``[moe layers, E, d_moe, d_model]``, ``down`` ``[moe layers, E, d_model, d_moe]``, ``router``
``[moe layers, E, d_model]``; with a shared expert ``shared_gate``/``shared_up`` ``[moe layers, d_shared,
d_model]``, ``shared_down`` ``[moe layers, d_model, d_shared]``, ``shared_expert_gate`` ``[moe layers, 1,
d_model]``; with dense layers ``dense_gate``/``dense_up`` ``[dense layers, d_ff, d_model]``, ``dense_down``
``[dense layers, d_model, d_ff]``.
"""

from __future__ import annotations

import torch

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.arrays import compressor
from actsparse.pipeline.moe import DenseLayer, MoEArchitecture
from actsparse.pipeline.weights import write_weights_group

LAYOUT = ("per expert nn.Linear [out, in]: gate/up [layers, E, d_moe, d_model], down [layers, E, d_model, d_moe]; "
          "router [layers, E, d_model]; shared_*, dense_* as a dense GLU")
DENSE_PREFIX = "dense_"


def moe_weights(arch: MoEArchitecture, layer: int) -> dict[str, torch.Tensor]:
    """Detached float32 copies of one decoder layer's FFN weights, per expert in ``nn.Linear`` layout [out, in].

    MoE layer: ``gate`` [E, d_moe, d_model] (rows ``[:d_moe]`` of ``gate_up_proj``, as ``_default_apply_gate``
    chunks it), ``up`` [E, d_moe, d_model] (rows ``[d_moe:]``), ``down`` [E, d_model, d_moe], ``router``
    [E, d_model]; with a shared expert also ``shared_gate`` / ``shared_up`` [d_shared, d_model],
    ``shared_down`` [d_model, d_shared] and ``shared_expert_gate`` [1, d_model]. Dense layer: ``gate`` /
    ``up`` [d_ff, d_model], ``down`` [d_model, d_ff] (as ``pipeline.ffn.ffn_weights``).

    Raises:
        ActsparseError: ``layer`` is not a decoder layer index of ``arch``.
    """
    if not 0 <= layer < len(arch.layers):
        raise ActsparseError(f"layer {layer} out of range: the model has {len(arch.layers)} decoder layers")
    found = arch.layers[layer]

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype=torch.float32, copy=True)

    if isinstance(found, DenseLayer):
        return {r: copy(getattr(found.mlp, f"{r}_proj").weight) for r in ("gate", "up", "down")}
    gate_up, d = found.experts.gate_up_proj, arch.d_moe
    weights = {"gate": copy(gate_up[:, :d]), "up": copy(gate_up[:, d:]), "down": copy(found.experts.down_proj),
               "router": copy(found.router.weight)}
    if found.shared is not None:
        weights |= {f"shared_{r}": copy(getattr(found.shared, f"{r}_proj").weight) for r in ("gate", "up", "down")}
        weights["shared_expert_gate"] = copy(found.shared_gate.weight)
    return weights


def moe_weights_id(weights_sha256: str, arch: MoEArchitecture, compute_dtype: str) -> str:
    """The id of a MoE model's stored weights: a hash of the weights, the resolved layout and the compute dtype."""
    return fmt.content_hash(dict(weights=weights_sha256, moe=arch.describe(), dtype=compute_dtype))


def write_moe_weights(paths: fmt.StorePaths, wid: str, arch: MoEArchitecture) -> None:
    """Store every layer's expert, router, shared-expert and dense weights once per model (module docstring), as
    ``pipeline.weights.write_weights_group`` writes them."""

    def fill(group) -> None:
        for layers, prefix in ((arch.moe_layers, ""), (arch.dense_layers, DENSE_PREFIX)):
            arrays = {}
            for i, la in enumerate(layers):
                for name, w in moe_weights(arch, la.index).items():
                    if name not in arrays:
                        arrays[name] = group.create_array(prefix + name, shape=(len(layers), *w.shape),
                                                          dtype="float32", chunks=(1, *w.shape),
                                                          compressors=compressor(4))
                    arrays[name][i] = w.float().cpu().numpy()
        group.attrs.update(dict(arch.describe(), layout=LAYOUT))

    write_weights_group(paths, wid, fill)
