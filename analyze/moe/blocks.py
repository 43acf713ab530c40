"""One block of tokens of one decoder layer of a mixture-of-experts run: routing, stored or recomputed sites.

A MoE layer gives its routing (``expert_ids``, ``routing`` [T, k]), its per-slot sites [T, k, d_moe] and, with a
shared expert, the shared sites [T, d_shared] and gate [T]. A dense layer of a mixed model is read as one expert
that every token is routed to with weight 1 (k = 1, its weights with a leading expert axis of 1), so the same
analysis covers both. Sites not stored are recomputed from ``input`` and the stored weights
(``pipeline.expert_ffn``); ``act`` also from a stored ``gate``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers.activations import ACT2FN

from actsparse.analyze.curves.blocks import first_nonfinite
from actsparse.core import format as fmt
from actsparse.core.errors import ActsparseError
from actsparse.pipeline.expert_ffn import routed_sites, shared_sites


class MoEBlock:
    """Tokens ``[start, stop)`` of decoder layer ``layer`` of a MoE run (those ``keep`` selects, int64 indices
    into the range; None: all), with the layer's stored weights (``Run.expert_weights``).

    ``unit`` is ``expert`` for a MoE layer, ``dense`` for a dense one. :meth:`routed` gives a site per slot
    [T, k, width], :meth:`shared` the shared expert's [T, d_shared] (``weight``: its gate [T]); ``weights`` has
    a leading expert axis for both kinds of layer.
    """

    def __init__(self, run, layer: int, start: int, stop: int, keep: torch.Tensor | None,
                 weights: Mapping[str, torch.Tensor]):
        self.run, self.layer, self.start, self.stop, self.keep = run, layer, start, stop, keep
        group, _ = run.moe.position(layer)
        self.unit = "dense" if group == fmt.DENSE else "expert"
        self._group = fmt.DENSE if self.unit == "dense" else fmt.ROUTED
        self.weights = ({k: weights[k][None] for k in ("gate", "up", "down")} if self.unit == "dense"
                        else weights)
        self.has_shared = self.unit == "expert" and run.moe.d_shared is not None
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        n = len(keep) if keep is not None else stop - start
        if self.unit == "dense":
            self.expert_ids = torch.zeros(n, 1, dtype=torch.int64)
            self.routing = torch.ones(n, 1)
        else:
            self.expert_ids = self._read(fmt.moe_array(fmt.ROUTED, fmt.EXPERT_ID))
            self.routing = self._read(fmt.moe_array(fmt.ROUTED, fmt.ROUTING_WEIGHT))

    @property
    def n_tokens(self) -> int:
        return self.expert_ids.shape[0]

    def stored(self, site: str) -> bool:
        """Whether the run stored ``site`` for this layer's experts (``input``: the FFN input of every layer)."""
        if site == "input":
            return "input" in self.run.sites
        return fmt.moe_array(self._group, site) in self.run.manifest.moe_arrays

    def _select(self, t: torch.Tensor, what: str) -> torch.Tensor:
        t = t[self.keep] if self.keep is not None else t
        if t.is_floating_point():
            bad = first_nonfinite(t.reshape(t.shape[0], -1))
            if bad is not None:
                token = self.start + int(self.keep[bad[0]] if self.keep is not None else bad[0])
                raise ActsparseError(f"run {self.run.run_id}: non-finite value in {what}, layer {self.layer}, "
                                     f"token {token}")
        return t

    def _read(self, name: str, to: str = "float32") -> torch.Tensor:
        return self._select(self.run.read_moe(name, self.layer, self.start, self.stop, to=to), name)

    def input(self) -> torch.Tensor:
        """The FFN input x [T, d_model] (float32).

        Raises:
            ActsparseError: the run did not store ``input``.
        """
        if ("x", "input") not in self._cache:
            if not self.stored("input"):
                raise ActsparseError(f"run {self.run.run_id} did not store site 'input'")
            x = self.run.read("input", self.layer, self.start, self.stop)
            self._cache[("x", "input")] = self._select(x, "input")
        return self._cache[("x", "input")]

    def routed(self, site: str, *, native: bool = False) -> torch.Tensor:
        """``site`` (gate, act, up, intermediate) per routed slot [T, k, width]: as stored (``native``: in the
        stored dtype), else recomputed in float32 from ``input`` (``act`` also from a stored ``gate``).

        Raises:
            ActsparseError: neither the site nor what recomputes it was stored.
        """
        key = ("native" if native else "float", site)
        if key in self._cache:
            return self._cache[key]
        if self.stored(site):
            t = self._read(fmt.moe_array(self._group, site), to="native" if native else "float32")
            t = t.unsqueeze(1) if self.unit == "dense" else t
        elif site == "act" and self.stored("gate"):
            t = ACT2FN[self.run.moe.activation](self.routed("gate"))
        else:
            if not self.stored("input"):
                raise ActsparseError(f"run {self.run.run_id} has neither site '{site}' nor 'input' to recompute it "
                                     "from")
            computed = routed_sites(self.input(), self.expert_ids, self.weights, self.run.moe.activation)
            self._cache |= {("float", s): v for s, v in computed.items() if not self.stored(s)}
            t = computed[site]
        self._cache[key] = t
        return t

    def shared(self, site: str, *, native: bool = False) -> torch.Tensor:
        """The shared expert's ``site`` [T, d_shared] (``weight``: sigmoid(shared_expert_gate x) [T]), stored or
        recomputed from ``input`` as :meth:`routed`."""
        key = ("shared-native" if native else "shared", site)
        if key in self._cache:
            return self._cache[key]
        if site == "weight" or self.stored(site):
            t = self._read(fmt.moe_array(fmt.SHARED, site if site != "weight" else fmt.ROUTING_WEIGHT),
                           to="native" if native and site != "weight" else "float32")
            t = t[:, 0] if site == "weight" else t
        elif site == "act" and self.stored("gate"):
            t = ACT2FN[self.run.moe.activation](self.shared("gate"))
        else:
            computed = shared_sites(self.input(), self.weights, self.run.moe.activation)
            t = computed[f"shared_{site}"]
        self._cache[key] = t
        return t
