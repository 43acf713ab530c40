"""Resolve the FFN modules of a Hugging Face model by structure and hook its activation sites.

The decoder layers are found by walking the model, not through a fixed path such as
``model.model.layers`` (pitfall P1: Gemma-3 moved its layers between transformers releases).
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

Mixture-of-experts FFNs are refused: transformers v5 stores experts as stacked 3-D parameters
that no module hook can split per expert (P2).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN
from transformers.pytorch_utils import Conv1D

from actsparse.errors import ActsparseError
from actsparse.vocab import SITES

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
                "FFN; only dense FFNs are supported (fused expert weights, pitfall P2)"
            )


def _activation_name(model: nn.Module, act: nn.Module, where: str) -> str:
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


def _oriented(module: nn.Module) -> torch.Tensor:
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
    ranked = sorted(_homogeneous_lists(model), key=_rank(_decoder_prefix(model)))
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
        out_features, d_model = _oriented(layer.gate).shape
        d_ff_of[layer.index] = (out_features // 2 if first_pattern.kind == "glu-fused" else out_features, d_model)
    if len(set(d_ff_of.values())) != 1:
        raise ActsparseError(f"non-uniform FFN widths in {model_name}: (d_ff, d_model) per layer {d_ff_of}")
    d_ff, d_model = d_ff_of[0]

    return FFNArchitecture(
        pattern=first_pattern.kind,
        activation=_activation_name(model, ffn_layers[0].act, f"{ffn_layers[0].path}.{names['act']}"),
        d_model=d_model,
        d_ff=d_ff,
        layers=tuple(ffn_layers),
        layers_path=layers_path,
        module_names=names,
    )


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
        weights[role] = copy(_oriented(module))
        if getattr(module, "bias", None) is not None:
            weights[f"{role}_bias"] = copy(module.bias)
    if arch.pattern == "glu-fused":
        # Phi3MLP.forward: gate, up = gate_up_proj(x).chunk(2, dim=-1).
        fused, fused_bias = weights.pop("gate"), weights.pop("gate_bias", None)
        weights["gate"], weights["up"] = fused[: arch.d_ff], fused[arch.d_ff :]
        if fused_bias is not None:
            weights["gate_bias"], weights["up_bias"] = fused_bias[: arch.d_ff], fused_bias[arch.d_ff :]
    return weights


def ffn_recompute(weights: Mapping[str, torch.Tensor], activation: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Recompute every site of one FFN layer from its input.

    ``weights`` as returned by :func:`ffn_weights` (GLU when it has ``up``); ``activation`` an
    ``ACT2FN`` key; ``x`` [tokens, d_model] (any leading dimensions work), cast to the weights'
    dtype. Returns ``input`` [tokens, d_model], ``gate``, ``act``, ``up`` (GLU only) and
    ``intermediate`` [tokens, d_ff], ``output`` [tokens, d_model], in the weights' dtype.

    Raises:
        KeyError: ``activation`` is not an ``ACT2FN`` key.
    """
    x = x.to(weights["gate"].dtype)
    gate = F.linear(x, weights["gate"], weights.get("gate_bias"))
    act = ACT2FN[activation](gate)
    sites = {"input": x, "gate": gate, "act": act}
    if "up" in weights:
        sites["up"] = F.linear(x, weights["up"], weights.get("up_bias"))
        sites["intermediate"] = act * sites["up"]
    else:
        sites["intermediate"] = act
    sites["output"] = F.linear(sites["intermediate"], weights["down"], weights.get("down_bias"))
    return sites


Sink = Callable[[str, int, torch.Tensor], None]


class SiteRecorder:
    """Context manager that hooks the requested sites on every FFN layer.

    Each hook passes ``sink(site, layer_index, tensor)`` the captured tensor, detached but not
    copied or cast: [batch, seq, width] or [tokens, width] (OPT flattens tokens before fc1), in the
    model's dtype. For a fused ``gate_up_proj`` the gate and up tensors are non-contiguous views
    of its output. Hooks: ``input`` = forward pre-hook on the gate projection (``args[0]``);
    ``gate``/``up`` = outputs of the gate/up projections; ``act`` = output of the activation
    module; ``intermediate`` = forward pre-hook on the down projection; ``output`` = its output.

    Fires are counted per (site, layer); :meth:`check_fired` asserts each hook fired the expected
    number of times since :meth:`reset_counts` (P11: hooks registered after ``torch.compile`` are
    silently skipped). All hooks are removed on exit, also when the block raises.

    Raises:
        ActsparseError: an empty ``sites``, an unknown site, or ``up`` on a non-GLU FFN.
    """

    def __init__(self, arch: FFNArchitecture, sites: Sequence[str], sink: Sink) -> None:
        sites = tuple(dict.fromkeys(sites))
        if not sites:
            raise ActsparseError(f"no sites requested; choose from {', '.join(arch.sites)}")
        for site in sites:
            if site not in SITES:
                raise ActsparseError(f"unknown site {site!r}; choose from {', '.join(arch.sites)}")
            if site not in arch.sites:
                raise ActsparseError(
                    f"site {site!r} does not exist for a non-GLU FFN (pattern {arch.pattern}); "
                    f"choose from {', '.join(arch.sites)}"
                )
        self.arch = arch
        self.sites = sites
        self._sink = sink
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._counts = {(site, layer.index): 0 for site in sites for layer in arch.layers}

    def _emit(self, site: str, index: int, tensor: torch.Tensor) -> None:
        self._counts[(site, index)] += 1
        self._sink(site, index, tensor.detach())

    def _register(self, site: str, layer: FFNLayer) -> torch.utils.hooks.RemovableHandle:
        i, d_ff = layer.index, self.arch.d_ff
        fused = self.arch.pattern == "glu-fused"
        if site == "input":
            return layer.gate.register_forward_pre_hook(lambda m, args: self._emit(site, i, args[0]))
        if site == "gate":
            cut = (lambda out: out[..., :d_ff]) if fused else (lambda out: out)
            return layer.gate.register_forward_hook(lambda m, args, out: self._emit(site, i, cut(out)))
        if site == "up":
            if fused:
                return layer.gate.register_forward_hook(lambda m, args, out: self._emit(site, i, out[..., d_ff:]))
            return layer.up.register_forward_hook(lambda m, args, out: self._emit(site, i, out))
        if site == "act":
            return layer.act.register_forward_hook(lambda m, args, out: self._emit(site, i, out))
        if site == "intermediate":
            return layer.down.register_forward_pre_hook(lambda m, args: self._emit(site, i, args[0]))
        return layer.down.register_forward_hook(lambda m, args, out: self._emit(site, i, out))

    def __enter__(self) -> SiteRecorder:
        if self._handles:
            raise ActsparseError("this SiteRecorder is already active")
        try:
            for layer in self.arch.layers:
                for site in self.sites:
                    self._handles.append(self._register(site, layer))
        except BaseException:
            self._remove()
            raise
        self.reset_counts()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def counts(self) -> dict[tuple[str, int], int]:
        """Fires per (site, layer index) since the last :meth:`reset_counts`."""
        return dict(self._counts)

    def reset_counts(self) -> None:
        """Zero the fire counts, e.g. before each batch."""
        self._counts = dict.fromkeys(self._counts, 0)

    def check_fired(self, expected: int = 1) -> None:
        """Check that every hook fired exactly ``expected`` times since :meth:`reset_counts`.

        Raises:
            ActsparseError: naming up to five (site, layer) hooks with another count (P11).
        """
        wrong = [(key, n) for key, n in self._counts.items() if n != expected]
        if wrong:
            shown = ", ".join(f"{site}@{layer}={n}" for (site, layer), n in wrong[:5])
            raise ActsparseError(
                f"{len(wrong)} of {len(self._counts)} hooks did not fire {expected} time(s) ({shown}); "
                "hooks registered after torch.compile are skipped (P11)"
            )
