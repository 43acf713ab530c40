"""One block of tokens of one layer: stored sites (in their stored dtype, or as float32) and sites recomputed
from ``input`` and the stored weights (``actsparse.pipeline.ffn.ffn_recompute``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from actsparse.core.errors import ActsparseError
from actsparse.pipeline.ffn import ffn_recompute


class SiteBlock:
    """Tokens ``[start, stop)`` of one layer of a run (those ``keep`` selects): each site as stored (in its
    stored dtype, :meth:`native`, or as float32) or as float32 recomputed from ``input`` and the layer's
    stored ``weights``.
    """

    def __init__(self, run, layer: int, start: int, stop: int, keep: torch.Tensor | None,
                 weights: Mapping[str, torch.Tensor]):
        self.run, self.layer, self.start, self.stop, self.keep, self.w = run, layer, start, stop, keep, weights
        self.cache: dict[str, torch.Tensor] = {}
        self.natives: dict[str, torch.Tensor] = {}

    def stored(self, site: str) -> bool:
        return site in self.run.sites

    def native(self, site: str) -> torch.Tensor:
        """A stored site's selected tokens in the stored dtype (bfloat16 as stored: half the bytes of float32).

        Raises:
            ActsparseError: a non-finite value, naming the site, layer, token and feature.
        """
        if site not in self.natives:
            t = self.run.read(site, self.layer, self.start, self.stop, to="native")
            t = t[self.keep] if self.keep is not None else t
            bad = first_nonfinite(t)
            if bad is not None:
                raise ActsparseError(f"run {self.run.run_id}: non-finite value in site {site}, layer {self.layer}, "
                                     f"token {self.start + int(self.keep[bad[0]] if self.keep is not None else bad[0])}"
                                     ", "
                                     f"feature {bad[1]}")
            self.natives[site] = t
        return self.natives[site]

    def __getitem__(self, site: str) -> torch.Tensor:
        """A site's selected tokens as float32 [tokens, width]."""
        if site not in self.cache:
            self.cache[site] = self._load(site)
        return self.cache[site]

    def _load(self, site: str) -> torch.Tensor:
        if self.stored(site):
            return self.native(site).float()
        if not self.stored("input") and not (site == "act" and self.stored("gate")):
            raise ActsparseError(f"run {self.run.run_id} has neither site '{site}' nor 'input' to recompute it from")
        x = self["input"] if self.stored("input") else None
        computed = ffn_recompute(self.w, self.run.activation, x, (site,),
                                 given=lambda s: self[s] if self.stored(s) or s in self.cache else None)
        self.cache.update(computed)
        return computed[site]


def first_nonfinite(t: torch.Tensor) -> tuple[int, int] | None:
    """(token, feature) of the first NaN or inf in ``t`` [T, W], or None; 16-bit blocks are checked on
    their bit patterns (all exponent bits set), ~10x faster than ``torch.isfinite``."""
    if t.dtype in (torch.bfloat16, torch.float16):
        from actsparse.analyze.bitstats import FORMATS

        inf_bits = FORMATS[str(t.dtype).removeprefix("torch.")][2]
        mag = t.view(torch.int16).numpy().view(np.uint16) & np.uint16(0x7FFF)
        if not mag.size or mag.max() < inf_bits:
            return None
        return tuple(int(i) for i in np.argwhere(mag >= inf_bits)[0])
    bad = ~torch.isfinite(t)
    return tuple(bad.nonzero()[0].tolist()) if bad.any() else None
