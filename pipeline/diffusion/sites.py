"""FFN sites of diffusion LMs, found by structure, as ``pipeline.sites.FFNArchitecture`` (so that the recorder
and the sparsifier work unchanged).

* LLaDA's block has no MLP module (docs/paper-notes.md §2; the authors' configs hook ``ff_out``): ``ff_norm``
  -> ``ff_proj`` (W_g) and ``up_proj`` (W_u) -> ``act`` -> product -> ``ff_out`` (W_d). So input = input of
  ``ff_proj`` (the ``ff_norm`` output), gate = ``ff_proj`` output, act = ``act`` output, up = ``up_proj``
  output, intermediate = input of ``ff_out``, output = its output.
* diffusion_gemma's decoder layers run a dense GLU ``mlp`` and, in parallel, a router with fused 3-D experts.
  Only the dense ``mlp`` of each decoder layer is resolved: fused experts have no per-expert module to hook
  (docs/pitfalls.md P2, which is why ``pipeline.sites.resolve_ffn`` refuses the layers), and the encoder (the
  same weights, separate modules) encodes the context, it does not denoise.
* Dream's layers are Qwen2's ``mlp`` (``gate_proj``/``up_proj``/``down_proj``), which
  ``pipeline.sites.resolve_ffn`` resolves.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.diffusion.kinds import diffusion_kind
from actsparse.pipeline.sites import FFNArchitecture, FFNLayer, resolve_ffn

# ACT2FN keys tried, in order, to name an activation module numerically (remote-code activations have their own
# classes, which pipeline.sites cannot match by class).
_ACTIVATION_CANDIDATES = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "quick_gelu", "gelu_fast")
_LLADA_NAMES = {"gate": "ff_proj", "up": "up_proj", "down": "ff_out", "act": "act"}
_GEMMA_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "act": "act_fn"}


def activation_name(act: nn.Module, where: str) -> str:
    """The ``ACT2FN`` key whose function equals ``act`` on [-8, 8] (rtol 1e-5).

    Raises:
        ActsparseError: no candidate reproduces it.
    """
    probe = torch.linspace(-8.0, 8.0, 1601)
    with torch.no_grad():
        ref = act(probe)
        for name in _ACTIVATION_CANDIDATES:
            if torch.allclose(ACT2FN[name](probe), ref, rtol=1e-5, atol=1e-6):
                return name
    raise ActsparseError(f"cannot name the activation {type(act).__name__} at {where}: none of "
                         f"{', '.join(_ACTIVATION_CANDIDATES)} reproduces it")


def _architecture(per_layer: list[tuple[str, dict[str, nn.Module]]], layers_path: str, names: dict[str, str],
                  model_name: str) -> FFNArchitecture:
    """An FFNArchitecture from ``(FFN root path, {gate, up, down, act} modules)`` per layer.

    Raises:
        ActsparseError: widths that differ between layers or between the gate, up and down projections.
    """
    layers = tuple(FFNLayer(index=i, path=path, gate=m["gate"], up=m["up"], down=m["down"], act=m["act"])
                   for i, (path, m) in enumerate(per_layer))
    widths = {(f.gate.out_features, f.gate.in_features, f.up.out_features, f.down.in_features) for f in layers}
    if len(widths) != 1:
        raise ActsparseError(f"non-uniform FFN widths in {model_name}: {sorted(widths)}")
    d_ff, d_model, d_up, d_down = widths.pop()
    if not d_ff == d_up == d_down:
        raise ActsparseError(f"unsupported FFN in {model_name}: gate {d_ff}, up {d_up} and down-projection input "
                             f"{d_down} widths differ")
    first = layers[0]
    return FFNArchitecture(pattern="glu", activation=activation_name(first.act, f"{first.path}.{names['act']}"),
                           d_model=d_model, d_ff=d_ff, layers=layers, layers_path=layers_path, module_names=names)


def _llada_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList whose every child has LLaDA's ff_proj/up_proj/ff_out Linears and act."""
    found = []
    for path, mods in model.named_modules():
        if not isinstance(mods, nn.ModuleList) or len(mods) == 0:
            continue
        if all(all(isinstance(getattr(b, _LLADA_NAMES[r], None), nn.Linear) for r in ("gate", "up", "down"))
               and isinstance(getattr(b, "act", None), nn.Module) for b in mods):
            found.append((path, mods))
    return max(found, key=lambda item: len(item[1]), default=None)


def resolve_llada_ffn(model: nn.Module) -> FFNArchitecture:
    """FFN sites of a LLaDA-layout model (``blocks.i.{ff_proj, up_proj, act, ff_out}``, no MLP module).

    Raises:
        ActsparseError: no list of blocks with that layout, or inconsistent widths.
    """
    found = _llada_blocks(model)
    if found is None:
        raise ActsparseError(f"{type(model).__name__} has no LLaDA-layout blocks (ff_proj, up_proj, act, ff_out)")
    path, blocks = found
    per_layer = [(f"{path}.{i}", {r: getattr(b, n) for r, n in _LLADA_NAMES.items()}) for i, b in enumerate(blocks)]
    return _architecture(per_layer, path, dict(_LLADA_NAMES), type(model).__name__)


def resolve_diffusion_gemma_ffn(model: nn.Module) -> FFNArchitecture:
    """The dense ``mlp`` of every decoder layer of a ``DiffusionGemmaForBlockDiffusion`` (module docstring).

    Raises:
        ActsparseError: the model has no ``model.decoder.layers`` with GLU ``mlp`` modules.
    """
    try:
        layers = model.get_submodule("model.decoder.layers")
        per_layer = [(f"model.decoder.layers.{i}.mlp", {r: layer.get_submodule(f"mlp.{n}") for r, n in
                                                        _GEMMA_NAMES.items()}) for i, layer in enumerate(layers)]
    except AttributeError as e:
        raise ActsparseError(f"{type(model).__name__} has no diffusion_gemma decoder layers with a dense mlp: "
                             f"{e}") from e
    return _architecture(per_layer, "model.decoder.layers", dict(_GEMMA_NAMES), type(model).__name__)


def resolve_diffusion_ffn(model: nn.Module) -> FFNArchitecture:
    """FFN sites of a diffusion LM by structure: diffusion_gemma's decoder ``mlp``, LLaDA's block layout, else
    ``pipeline.sites.resolve_ffn`` (Dream's Qwen2 ``mlp``).

    Raises:
        ActsparseError: not a diffusion LM (:func:`~actsparse.pipeline.diffusion.kinds.diffusion_kind`), or no
            FFN found.
    """
    if diffusion_kind(model) == "block":
        return resolve_diffusion_gemma_ffn(model)
    if _llada_blocks(model) is not None:
        return resolve_llada_ffn(model)
    return resolve_ffn(model)
