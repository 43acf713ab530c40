"""One FFN layer's weights and its forward pass, as plain tensors.

:func:`ffn_weights` copies a resolved layer's weights out of the model (collection stores them for offline
analysis); :func:`ffn_recompute` runs the FFN from its input, site by site (the offline analysis recomputes
sites that were not stored, and checks the stored ones against it in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from transformers.activations import ACT2FN

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES
from actsparse.pipeline.sites import FFNArchitecture, oriented_weight


def ffn_weights(arch: FFNArchitecture, layer: int) -> dict[str, torch.Tensor]:
    """Detached float32 copies of one layer's FFN weights, in ``nn.Linear`` layout [out, in].

    Returns ``gate`` [d_ff, d_model], ``up`` [d_ff, d_model] (GLU only), ``down`` [d_model, d_ff],
    plus ``gate_bias`` [d_ff], ``up_bias`` [d_ff], ``down_bias`` [d_model] when the model has them,
    all on the device of the parameters. GPT-2 ``Conv1D`` weights are transposed; a fused
    ``gate_up_proj`` is split into rows ``[:d_ff]`` (gate) and ``[d_ff:]`` (up).

    Raises:
        ActsparseError: ``layer`` is not a layer index of ``arch``.
    """
    if not 0 <= layer < len(arch.layers):
        raise ActsparseError(f"layer {layer} out of range: the model has {len(arch.layers)} FFN layers")
    ffn = arch.layers[layer]

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype=torch.float32, copy=True)

    weights = {}
    parts = {"gate": ffn.gate, "up": ffn.up, "down": ffn.down}
    for role, module in parts.items():
        if module is None:
            continue
        weights[role] = copy(oriented_weight(module))
        if getattr(module, "bias", None) is not None:
            weights[f"{role}_bias"] = copy(module.bias)
    if arch.pattern == "glu-fused":
        # Phi3MLP.forward: gate, up = gate_up_proj(x).chunk(2, dim=-1).
        fused, fused_bias = weights.pop("gate"), weights.pop("gate_bias", None)
        weights["gate"], weights["up"] = fused[: arch.d_ff], fused[arch.d_ff :]
        if fused_bias is not None:
            weights["gate_bias"], weights["up_bias"] = fused_bias[: arch.d_ff], fused_bias[arch.d_ff :]
    return weights


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ b)``: a projection with an nn.Linear-layout weight ``[out, in]``."""
    y = x @ w.T
    return y + b if b is not None else y


def ffn_recompute(weights: Mapping[str, torch.Tensor], activation: str, x: torch.Tensor | None,
                  sites: Sequence[str] | None = None, *,
                  given: Callable[[str], torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """Recompute sites of one FFN layer from its input, computing only what the requested sites need.

    Args:
        weights: as returned by :func:`ffn_weights` (a GLU when it has ``up``).
        activation: an ``ACT2FN`` key.
        x: the FFN input ``[tokens, d_model]`` (any leading dimensions work), cast to the weights' dtype;
            may be None when ``given`` supplies every tensor the requested sites need from it.
        sites: the sites wanted (default: every site the FFN has; ``up`` only for a GLU).
        given: ``given(site)`` returns a tensor already at hand for a site (e.g. a stored one) or None;
            such a tensor is used instead of recomputing it.

    Returns:
        ``{site: tensor}`` for the requested sites and every site computed on the way: ``input``
        ``[tokens, d_model]``, ``gate`` (pre-activation), ``act``, ``up`` (GLU only), ``intermediate``
        ``[tokens, d_ff]``, ``output`` ``[tokens, d_model]`` (down-projection bias included).

    Raises:
        KeyError: ``activation`` is not an ``ACT2FN`` key.
        ActsparseError: ``up`` of a non-GLU FFN, or a site that needs ``x`` when none is given.
    """
    out: dict[str, torch.Tensor] = {}

    def get(site: str) -> torch.Tensor:
        if site not in out:
            t = given(site) if given is not None else None
            out[site] = t if t is not None else compute(site)
        return out[site]

    def compute(site: str) -> torch.Tensor:
        if site == "act":
            return ACT2FN[activation](get("gate"))
        if site == "intermediate":
            return get("act") * get("up") if "up" in weights else get("act")
        if site == "output":
            return linear(get("intermediate"), weights["down"], weights.get("down_bias"))
        if x is None:
            raise ActsparseError(f"site '{site}' needs the FFN input to be recomputed")
        if site == "input":
            return x.to(weights["gate"].dtype)
        if site == "up" and "up" not in weights:
            raise ActsparseError("site 'up' does not exist for a non-GLU FFN")
        return linear(get("input"), weights[site], weights.get(f"{site}_bias"))

    for site in sites if sites is not None else [s for s in SITES if s != "up" or "up" in weights]:
        get(site)
    return out
