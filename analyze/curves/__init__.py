"""Offline (open-loop) sparsity curves, simulated-sparsification error and critical sparsity.

The package: ``config`` (what a curves result is), ``blocks`` (stored or recomputed sites of one block of
tokens), ``targets`` (one target's rules over one block), ``accumulator`` (streaming sums), ``compute`` (the
sweep: plan, loop, finish), ``critical`` (offline critical sparsity).

Everything the paper sweeps by re-running the model once per threshold, computed from one stored pass:
for each run x layer x target x rule x grid value, the sparsity the rule induces on the stored dense
activations and the error it causes in that layer's FFN output, recomputed from the stored tensors
and the stored FFN weights. "Open-loop": one layer at a time against its dense stored inputs
(docs/paper-notes.md §8); closed-loop numbers come from ``actsparse.analyze.evaluate``.

Targets (docs/paper-notes.md §1.1) and what they need (stored, or recomputed from ``input`` and the weights):

=============  ==========================  ===============================================================
target         ranks by                    output with the target sparsified
=============  ==========================  ===============================================================
input          |x|                         W_d(act(W_g(m*x)) * W_u(m*x))      (per grid value, nonlinear)
gate           |act(gate)|                 W_d((m*g) * u) = y - W_d((1-m)*h)  (linear: one-pass sweep)
up             |up|                        W_d(g * (m*u)) = y - W_d((1-m)*h)  (linear: one-pass sweep)
intermediate   |h|                         W_d(m*h)                           (linear: one-pass sweep)
all-inputs     |x|, then |h'|              W_d(m' * h'), h' from m*x          (per grid value)
=============  ==========================  ===============================================================

Linear targets use ``actsparse.analyze.sweep``: one pass per token (a bit-pattern histogram for top-p on stored
bf16, else a sort) serves every grid value, and every value's error comes from one gather-accumulate of
the dropped part in rank order (the multiply-adds of one matmul).
"""

from actsparse.analyze.curves.compute import compute_curves
from actsparse.analyze.curves.config import (
                                             DEFAULT_GRIDS,
                                             DEFAULT_TOLERANCE,
                                             CurveConfig,
                                             check_tolerance,
                                             required_sites,
)
from actsparse.analyze.curves.critical import critical_sparsity

__all__ = ["CurveConfig", "DEFAULT_GRIDS", "DEFAULT_TOLERANCE", "check_tolerance", "compute_curves",
           "critical_sparsity", "required_sites"]
