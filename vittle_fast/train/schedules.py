"""Step-indexed schedules: the Vittle interpolation weight alpha and the learning rate.

Both are pure functions of the optimizer step, so a resumed run reproduces them exactly.
"""

from __future__ import annotations

import math


def vittle_alpha(
    step: int,
    total_steps: int,
    kind: str = "cosine",
    end: float = 0.5,
    k: float = 10.0,
    t0: float = 0.5,
) -> float:
    """Alpha at `step` of `total_steps`, ramping from ~0 to `end`.

    cosine (the paper):          end * (1 - cos(pi * t)) / 2,       t = step / total_steps
    sigmoid (the released code): end / (1 + exp(-k * (t - t0)))
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= end <= 1.0:
        raise ValueError(f"end must be in [0, 1], got {end}")
    t = min(step / total_steps, 1.0)
    if kind == "cosine":
        return end * 0.5 * (1.0 - math.cos(math.pi * t))
    if kind == "sigmoid":
        return end / (1.0 + math.exp(-k * (t - t0)))
    raise ValueError(f"kind must be 'cosine' or 'sigmoid', got {kind!r}")


def warmup_cosine_lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR: linear warmup to 1 over `warmup_steps`, then cosine to `min_ratio`.

    Step 0 of a warmup already gets 1 / warmup_steps (not 0), so no optimizer step is wasted.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
