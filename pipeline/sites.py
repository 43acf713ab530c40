"""Resolve the FFN modules of a Hugging Face model by structure and hook its activation sites.

The decoder layers are found by walking the model, not through a fixed path such as
``model.model.layers`` (docs/pitfalls.md P1: Gemma-3 moved its layers between transformers releases).
Every hook captures the tensor of a raw HF module, never a TransformerLens-style alias (P13).

Site mapping. ``W_g``/``W_u``/``W_d`` are the gate, up and down projections, ``σ`` the activation.

============  ==================================  =====================================  ==========
site          GLU (``glu``, ``glu-fused``)         non-GLU (``mlp``)                      width
============  ==================================  =====================================  ==========
input         x: input of W_g (pre-hook)           x: input of fc1 (pre-hook)             d_model
gate          W_g x, PRE-activation                fc1(x), PRE-activation                 d_ff
act           σ(W_g x): act module output          σ(fc1(x)): act module output           d_ff
up            W_u x                                (absent)                               d_ff
intermediate  σ(W_g x) * W_u x: input of W_d       σ(fc1(x)) = input of fc2 (same as act) d_ff
output        W_d h: output of W_d                 fc2(h): output of fc2                  d_model
============  ==================================  =====================================  ==========

Module patterns, relative to the FFN root (``gate`` / ``up`` / ``down`` / ``act``):

* ``glu``: ``gate_proj`` / ``up_proj`` / ``down_proj`` / ``act_fn`` (Llama, Mistral, Qwen2/3,
  Gemma 1/2/3).
* ``glu-fused``: ``gate_up_proj`` / - / ``down_proj`` / ``activation_fn`` (Phi-3). The fused
  output is chunked as (gate, up) along the last dimension (``Phi3MLP.forward``), so the gate
  site is the first ``d_ff`` columns and the up site the last ``d_ff`` (P12).
* ``mlp``: ``c_fc`` / - / ``c_proj`` / ``act`` (GPT-2, ``Conv1D`` with weight ``[in, out]``);
  ``dense_h_to_4h`` / - / ``dense_4h_to_h`` / ``act`` (GPT-NeoX); ``fc1`` / - / ``fc2`` /
  ``activation_fn`` (OPT, where the root is the decoder layer itself);
  ``intermediate.dense`` / - / ``output.dense`` / ``intermediate.intermediate_act_fn`` (BERT; the
  output site is before BERT's residual add and LayerNorm).

Mixture-of-experts FFNs are refused here: transformers v5 stores experts as stacked 3-D parameters
that no module hook can split per expert (P2); ``pipeline.moe`` resolves them and ``pipeline.moe_recorder``
captures them through an experts implementation of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN
from transformers.pytorch_utils import Conv1D

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES

# Config attributes that name the FFN activation, most specific first: Gemma 2/3 configs carry
# ``hidden_activation``, GPT-2 and OPT ``activation_function``, the others ``hidden_act``.
_ACTIVATION_ATTRS = ("hidden_activation", "hidden_act", "activation_function")


@dataclass(frozen=True)
class _Pattern:
    kind: str
    gate: str
    up: str | None
    down: str
    acts: tuple[str, ...]


_PATTERNS = (
    _Pattern("glu", "gate_proj", "up_proj", "down_proj", ("act_fn", "activation_fn", "act")),
    _Pattern("glu-fused", "gate_up_proj", None, "down_proj", ("activation_fn", "act_fn", "act")),
    _Pattern("mlp", "c_fc", None, "c_proj", ("act",)),
    _Pattern("mlp", "dense_h_to_4h", None, "dense_4h_to_h", ("act",)),
    _Pattern("mlp", "fc1", None, "fc2", ("activation_fn", "act_fn", "act")),
    _Pattern("mlp", "intermediate.dense", None, "output.dense", ("intermediate.intermediate_act_fn",)),
)
_KNOWN = ", ".join("/".join(n for n in (p.gate, p.up, p.down) if n) for p in _PATTERNS)


@dataclass(frozen=True)
class FFNLayer:
    """The FFN modules of one decoder layer."""

    index: int
    path: str
    gate: nn.Module
    up: nn.Module | None
    down: nn.Module
    act: nn.Module


@dataclass(frozen=True)
class FFNArchitecture:
    """The FFN of every decoder layer of a model, as found by :func:`resolve_ffn`.

    ``module_names`` maps ``gate``/``up``/``down``/``act`` to the module name relative to each
    layer's FFN root (``up`` is None for non-GLU and fused FFNs).
    """

    pattern: str
    activation: str
    d_model: int
    d_ff: int
    layers: tuple[FFNLayer, ...]
    layers_path: str
    module_names: Mapping[str, str | None] = field(default_factory=dict, hash=False)

    @property
    def glu(self) -> bool:
        """True for gated FFNs (``glu`` and ``glu-fused``)."""
        return self.pattern != "mlp"

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this FFN has: :data:`SITES`, without ``up`` for non-GLU FFNs."""
        return SITES if self.glu else tuple(s for s in SITES if s != "up")

    def describe(self) -> dict:
        """A JSON-able summary for the run manifest, with the full module paths of layer 0."""
        first = self.layers[0]
        modules = {
            role: f"{first.path}.{name}" if (name := self.module_names.get(role)) else None
            for role in ("gate", "up", "down", "act")
        }
        return {
            "pattern": self.pattern,
            "activation": self.activation,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "n_layers": len(self.layers),
            "layers_path": self.layers_path,
            "layer0_modules": modules,
        }


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _match(root: nn.Module, pattern: _Pattern) -> dict[str, str | None] | None:
    """Relative names of the pattern's modules under ``root``, or None if it does not match."""
    for name in (pattern.gate, pattern.up, pattern.down):
        if name is not None and not _is_projection(_submodule(root, name)):
            return None
    act = next((a for a in pattern.acts if _submodule(root, a) is not None), None)
    if act is None:
        return None
    return {"gate": pattern.gate, "up": pattern.up, "down": pattern.down, "act": act}


def _ffn_roots(layer: nn.Module) -> list[tuple[str, _Pattern, dict[str, str | None]]]:
    """Every (root name relative to the layer, pattern, module names) found inside ``layer``."""
    found = []
    for root_name, root in layer.named_modules():
        for pattern in _PATTERNS:
            names = _match(root, pattern)
            if names is not None:
                found.append((root_name, pattern, names))
                break
    return found


def _homogeneous_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]


def _decoder_prefix(model: nn.Module) -> str | None:
    """Dotted path of ``model.get_decoder()`` (the text decoder of multimodal models), if any."""
    get_decoder = getattr(model, "get_decoder", None)
    if not callable(get_decoder):
        return None
    try:
        decoder = get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return next((n for n, m in model.named_modules() if m is decoder), None)


def _rank(prefix: str | None) -> Callable[[tuple[str, nn.ModuleList]], tuple]:
    # Prefer lists inside the text decoder (a vision tower also has fc1/fc2 MLPs), then the
    # longest list, then the shallowest path.
    def key(item: tuple[str, nn.ModuleList]) -> tuple:
        path, layers = item
        inside = prefix is not None and (prefix == "" or path == prefix or path.startswith(prefix + "."))
        return (not inside, -len(layers), path.count("."), path)

    return key


def _describe_layer(layer: nn.Module) -> str:
    names = [n for n, m in layer.named_modules() if _is_projection(m)]
    return f"layer class {type(layer).__name__} has linear modules [{', '.join(names)}]"


def _refuse_moe(model_name: str, layers_path: str, layers: nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        experts = next((n for n, _ in layer.named_modules() if n.rsplit(".", 1)[-1] == "experts"), None)
        if experts is not None:
            raise ActsparseError(
                f"unsupported architecture {model_name}: {layers_path}.{i}.{experts} is a mixture-of-experts "
                "FFN, not a dense one (fused expert weights, docs/pitfalls.md P2): resolve it with pipeline.moe"
            )


def layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's ``nn.ModuleList`` s of same-class layers, best first: inside ``model.get_decoder()``, then
    the longest, then the shallowest path."""
    return sorted(_homogeneous_lists(model), key=_rank(_decoder_prefix(model)))


def activation_name(model: nn.Module, act: nn.Module, where: str) -> str:
    """The ACT2FN key that reproduces ``act``: the config's name if it matches, else a class match.

    Raises ActsparseError when no ACT2FN entry reproduces the module numerically.
    """
    probe = torch.linspace(-8.0, 8.0, 1601)
    param = next(act.parameters(), None)
    if param is not None:
        probe = probe.to(param)
    with torch.no_grad():
        reference = act(probe).float()

        def reproduces(name: str) -> bool:
            candidate = ACT2FN[name]
            if param is not None:
                candidate = candidate.to(param)
            return torch.allclose(candidate(probe).float(), reference, rtol=1e-5, atol=1e-6)

        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        declared = [getattr(config, a, None) for a in _ACTIVATION_ATTRS]
        for name in declared:
            if isinstance(name, str) and name in ACT2CLS and reproduces(name):
                return name
        # No (matching) config attribute, e.g. a bare nn.Module: find the entry of the same class.
        for name, spec in ACT2CLS.items():
            cls = spec[0] if isinstance(spec, tuple) else spec
            if type(act) is cls and reproduces(name):
                return name
    raise ActsparseError(
        f"cannot name the activation {type(act).__name__} at {where}: no ACT2FN entry reproduces it "
        f"(config declares {[n for n in declared if n is not None]})"
    )


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] (``Conv1D`` stores [in, out])."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def resolve_ffn(model: nn.Module) -> FFNArchitecture:
    """Find the FFN modules of every decoder layer of ``model`` by structure.

    The layer list is the ``nn.ModuleList`` of same-class children that each contain exactly one
    known FFN pattern (see the module docstring); among several, lists inside
    ``model.get_decoder()`` win, then the longest, then the shallowest.

    Raises:
        ActsparseError: one line naming the model class, the layer class and its linear modules
            when no pattern matches; also for mixture-of-experts layers, for ambiguous or
            inconsistent layers, for an activation module shared between layers and for an
            activation that no ``transformers.activations.ACT2FN`` entry reproduces.
    """
    model_name = type(model).__name__
    ranked = layer_lists(model)
    if not ranked:
        raise ActsparseError(
            f"unsupported architecture {model_name}: no nn.ModuleList of same-class layers; "
            f"known FFN patterns: {_KNOWN}"
        )
    # Lazily, so that a large model's other lists are only scanned if the best one fails.
    scanned = ((path, layers, [_ffn_roots(layer) for layer in layers]) for path, layers in ranked)
    supported = next((item for item in scanned if all(item[2])), None)
    layers_path, layers = supported[:2] if supported else ranked[0]
    _refuse_moe(model_name, layers_path, layers)
    if supported is None:
        raise ActsparseError(
            f"unsupported architecture {model_name}: {_describe_layer(layers[0])}; known FFN patterns: {_KNOWN}"
        )

    matches = supported[2]
    first_root, first_pattern, names = matches[0][0]
    for i, found in enumerate(matches):
        if len(found) > 1:
            roots = ", ".join(f"{r or '<layer>'} ({p.gate}/{p.down})" for r, p, _ in found)
            raise ActsparseError(f"ambiguous FFN in {model_name} {layers_path}.{i}: several FFN patterns at {roots}")
        if (found[0][0], found[0][2]) != (first_root, names):
            raise ActsparseError(
                f"inconsistent FFN layout in {model_name}: {layers_path}.{i} has {found[0][0]}/{found[0][2]}, "
                f"layer 0 has {first_root}/{names}"
            )

    ffn_layers = []
    for i, layer in enumerate(layers):
        root = layer.get_submodule(first_root)
        ffn_layers.append(
            FFNLayer(
                index=i,
                path=".".join(p for p in (layers_path, str(i), first_root) if p),
                gate=root.get_submodule(names["gate"]),
                up=root.get_submodule(names["up"]) if names["up"] else None,
                down=root.get_submodule(names["down"]),
                act=root.get_submodule(names["act"]),
            )
        )

    # A module shared between layers would fire its hook once per layer and mislabel the layer.
    for role in ("gate", "up", "down", "act"):
        modules = [getattr(layer, role) for layer in ffn_layers if getattr(layer, role) is not None]
        if len({id(m) for m in modules}) != len(modules):
            raise ActsparseError(
                f"unsupported architecture {model_name}: the {role} module {names[role]} is shared between layers"
            )

    d_ff_of = {}
    for layer in ffn_layers:
        out_features, d_model = oriented_weight(layer.gate).shape
        d_ff_of[layer.index] = (out_features // 2 if first_pattern.kind == "glu-fused" else out_features, d_model)
    if len(set(d_ff_of.values())) != 1:
        raise ActsparseError(f"non-uniform FFN widths in {model_name}: (d_ff, d_model) per layer {d_ff_of}")
    d_ff, d_model = d_ff_of[0]

    return FFNArchitecture(
        pattern=first_pattern.kind,
        activation=activation_name(model, ffn_layers[0].act, f"{ffn_layers[0].path}.{names['act']}"),
        d_model=d_model,
        d_ff=d_ff,
        layers=tuple(ffn_layers),
        layers_path=layers_path,
        module_names=names,
    )
