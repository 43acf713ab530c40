"""Hooks that capture the activation sites of every FFN layer during a forward pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType

import torch

from actsparse.core.errors import ActsparseError
from actsparse.core.vocab import SITES
from actsparse.pipeline.sites import FFNArchitecture, FFNLayer

Sink = Callable[[str, int, torch.Tensor], None]


class FireCounts:
    """Fire counts per (site, layer) of a recorder's hooks, held in ``self._counts`` (docs/pitfalls.md P11: hooks
    registered after ``torch.compile`` are skipped silently, so every hook's fires are checked)."""

    _counts: dict[tuple[str, int], int]
    _what = "hooks"  # what the error message calls them

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
                f"{len(wrong)} of {len(self._counts)} {self._what} did not fire {expected} time(s) ({shown}); "
                "hooks registered after torch.compile are skipped"
            )


class SiteRecorder(FireCounts):
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
