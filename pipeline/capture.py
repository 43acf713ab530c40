"""Capture strategies of collection: what a model's FFNs store and how the hooks' tensors reach the shard buffers.

``pipeline.collect`` resolves the model once (:func:`resolve_capture`) and asks the strategy for everything
that depends on the kind of FFN: the sites it can store, its stored weights (and their id), the manifest's
``model.ffn`` and ``moe`` records, the array specs, the recorder, and where each recorded tensor goes
(:meth:`route`: the array and its first-axis index). Two strategies:

* :class:`DenseCapture`: dense FFNs (``pipeline.sites.resolve_ffn``), one array per site
  ``[layers, tokens, width]``, hooked by ``pipeline.recorder.SiteRecorder``;
* :class:`MoECapture`: mixture-of-experts models (``pipeline.moe.resolve_moe``): ``input`` and ``output``
  over every decoder layer as for dense models, and the routed, shared and dense arrays of
  ``actsparse.core.format.MoELayout.array_specs``, recorded by ``pipeline.moe_recorder.MoERecorder``.

Every recorded tensor has its tokens first (``[batch, seq, ...]`` or ``[batch·seq, ...]``); the collection
loop flattens it to ``[batch·seq, row]`` and copies the valid rows into ``bufs[name][index, rows]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES

Sink = Callable[[str, int, object], None]
Specs = dict[str, fmt.ArraySpec]


@dataclass(frozen=True)
class DenseCapture:
    """A dense FFN (``pipeline.sites.FFNArchitecture``): one array per site over every layer."""

    arch: object  # pipeline.sites.FFNArchitecture

    moe = None

    @property
    def n_layers(self) -> int:
        return len(self.arch.layers)

    def check_sites(self, sites: Sequence[str], model_name: str) -> None:
        """Raise ActsparseError for sites this FFN does not have (``up`` of a non-GLU FFN)."""
        unsupported = [s for s in sites if s not in self.arch.sites]
        if unsupported:
            raise ActsparseError(f"site(s) {', '.join(unsupported)} do not exist in {model_name} "
                                 f"({self.arch.pattern} FFN has {', '.join(self.arch.sites)})")

    def weights_id(self, weights_sha256: str, compute_dtype: str) -> str:
        from actsparse.pipeline.weights import weights_id

        return weights_id(weights_sha256, self.arch, compute_dtype)

    def write_weights(self, paths: fmt.StorePaths, wid: str) -> None:
        from actsparse.pipeline.weights import write_weights

        write_weights(paths, wid, self.arch)

    def ffn_info(self) -> fmt.FFNInfo:
        return fmt.FFNInfo(**self.arch.describe())

    def array_specs(self, sites: Sequence[str], n_tokens: int, chunk_tokens: int, dtype: str) -> tuple[Specs, Specs]:
        """``(site arrays, mixture-of-experts arrays)``: ``[layers, tokens, width]`` per site, and none."""
        arch = self.arch
        return {s: fmt.ArraySpec.for_site(self.n_layers, n_tokens, chunk_tokens,
                                          arch.d_model if s in ("input", "output") else arch.d_ff, dtype)
                for s in sites}, {}

    def route(self, name: str, layer: int) -> tuple[str, int]:
        """The array of a recorded tensor and its index along the array's first axis: the site and the layer."""
        return name, layer

    def recorder(self, sites: Sequence[str], sink: Sink):
        from actsparse.pipeline.recorder import SiteRecorder

        return SiteRecorder(self.arch, sites, sink)


@dataclass(frozen=True)
class MoECapture:
    """A mixture-of-experts model (``pipeline.moe.MoEArchitecture``): ``input``/``output`` over every decoder layer,
    the routed, shared and dense arrays over the MoE or dense layers (``MoELayout.array_specs``)."""

    arch: object  # pipeline.moe.MoEArchitecture

    @property
    def moe(self) -> fmt.MoELayout:
        return self.arch.layout

    @property
    def n_layers(self) -> int:
        return len(self.arch.layers)

    def check_sites(self, sites: Sequence[str], model_name: str) -> None:
        """Every site exists in a MoE model (its experts, shared expert and dense layers are GLUs)."""
        unknown = [s for s in sites if s not in SITES]
        if unknown:
            raise ActsparseError(f"unknown site(s) {', '.join(unknown)} for {model_name}; "
                                 f"choose from {', '.join(SITES)}")

    def weights_id(self, weights_sha256: str, compute_dtype: str) -> str:
        from actsparse.pipeline.moe_weights import moe_weights_id

        return moe_weights_id(weights_sha256, self.arch, compute_dtype)

    def write_weights(self, paths: fmt.StorePaths, wid: str) -> None:
        from actsparse.pipeline.moe_weights import write_moe_weights

        write_moe_weights(paths, wid, self.arch)

    def ffn_info(self) -> fmt.FFNInfo:
        return self.arch.ffn_info()

    def array_specs(self, sites: Sequence[str], n_tokens: int, chunk_tokens: int, dtype: str) -> tuple[Specs, Specs]:
        """``(site arrays, mixture-of-experts arrays)``: ``input``/``output`` ``[layers, tokens, d_model]`` where
        asked, and ``MoELayout.array_specs``."""
        plain = {s: fmt.ArraySpec.for_site(self.n_layers, n_tokens, chunk_tokens, self.moe.d_model, dtype)
                 for s in sites if s in ("input", "output")}
        return plain, self.moe.array_specs(sites, n_tokens, chunk_tokens, dtype)

    def route(self, name: str, layer: int) -> tuple[str, int]:
        """``input``/``output`` at the decoder layer; a routed or shared array at the layer's position among the
        MoE layers, a dense array among the dense layers (``MoELayout.position``)."""
        if name in ("input", "output"):
            return name, layer
        return name, self.moe.position(layer)[1]

    def recorder(self, sites: Sequence[str], sink: Sink):
        from actsparse.pipeline.moe_recorder import MoERecorder

        return MoERecorder(self.arch, sites, sink)


def resolve_capture(model) -> DenseCapture | MoECapture:
    """The capture strategy of a loaded model: :class:`MoECapture` when any module has an ``experts`` child
    (``pipeline.moe.has_experts``), else :class:`DenseCapture`.

    Raises:
        ActsparseError: the FFN cannot be resolved (``resolve_ffn``), or a MoE layout that is not supported
            (``resolve_moe`` names it).
    """
    from actsparse.pipeline.moe import has_experts, resolve_moe
    from actsparse.pipeline.sites import resolve_ffn

    return MoECapture(resolve_moe(model)) if has_experts(model) else DenseCapture(resolve_ffn(model))


def check_resumable(existing: fmt.Manifest | None, capture: DenseCapture | MoECapture) -> None:
    """Refuse to resume a run whose stored mixture-of-experts layout differs from the model's now (the run id
    hashes the weights, not the routing settings of ``config.json``).

    Raises:
        ActsparseError: naming the differing fields (``MoELayout.differences``).
    """
    if existing is None or (existing.moe is None and capture.moe is None):
        return
    if existing.moe is None or capture.moe is None:
        raise ActsparseError(f"run {existing.run_id} was collected from a "
                             f"{'dense' if existing.moe is None else 'mixture-of-experts'} model; this one is not")
    diffs = existing.moe.differences(capture.moe)
    if diffs:
        raise ActsparseError(f"run {existing.run_id} was collected with another MoE layout ({'; '.join(diffs)})")
