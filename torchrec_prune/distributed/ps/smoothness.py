"""How abruptly regrown weights enter the model (growth paper Fig. 4): the jump statistic.

A shard records, for each growth, the L2 norm of the re-opened weights right after the mask change and
after every push since (``ShardState.traces``). Before growth those weights are closed, so exactly 0
(the closed-weight check holds the shard to it). The jump at growth is the first norm; the statistic
divides it by the largest change over the next ``pushes`` pushes, so it reads "how many ordinary
updates' worth the model moved at growth": 0 for zero-init regrowth, large for a constant init.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def growth_jump(norms: Sequence[float], pushes: int = 50) -> float:
    """Jump at growth over the largest per-push change in the ``pushes`` pushes after it.

    Example::

        growth_jump([0.0, 0.001, 0.003])  # 0.0: no jump
        growth_jump([4.5, 4.499, 4.497])  # 2250: a jump of 2250 ordinary steps

    Raises:
        ValueError: fewer than two points (no push followed the growth).
    """
    values = np.asarray(norms[: pushes + 1], dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"growth_jump needs the norm at growth and after a push, got {len(values)} points")
    step = float(np.abs(np.diff(values)).max())
    jump = abs(float(values[0]))
    if jump == 0.0:
        return 0.0
    return jump / step if step > 0 else float("inf")
