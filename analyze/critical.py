"""Critical sparsity: the largest sparsity at which a quality measure still meets its bound.

The paper's critical sparsity is the largest sparsity keeping >= 99% of dense performance
(docs/paper-notes.md §1.5). Its crossing is found here once, for every measure actsparse has: the
closed-loop accuracy ratio (``>= 0.99``), the task accuracy ratio, and the open-loop relative error
(``<= tolerance``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def critical_point(sparsity: Sequence[float], score: Sequence[float], values: Sequence[float], bound: float, *,
                   higher_is_better: bool) -> tuple[float, float, float]:
    """``(best grid sparsity, its grid value, interpolated sparsity)`` where ``score`` stops meeting ``bound``.

    Points are taken in increasing ``sparsity`` (a stable sort: ties keep the given order). A point meets the
    bound when ``score >= bound`` (``higher_is_better``, e.g. an accuracy ratio) or ``score <= bound`` (an
    error); NaN never does. The best grid point is the last one meeting the bound before the first one that
    fails; the interpolated value is the linear crossing of the bound between those two points (docs/
    paper-notes.md §1.5, recommended implementation). When every point meets the bound, both are the
    sparsest point (no extrapolation); when the densest point fails, all three are NaN. Later points that
    meet the bound again are ignored: the curve is meant to be monotone.
    """
    order = sorted(range(len(sparsity)), key=lambda i: sparsity[i])
    best = (math.nan, math.nan, math.nan)
    previous = None
    for i in order:
        s, c = float(sparsity[i]), float(score[i])
        if not (c >= bound if higher_is_better else c <= bound):
            if previous is None:
                return best
            s0, c0 = previous
            return best[0], best[1], s0 + (bound - c0) / (c - c0) * (s - s0)
        best, previous = (s, float(values[i]), s), (s, c)
    return best
