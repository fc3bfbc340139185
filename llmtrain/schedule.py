"""Learning-rate schedules as multipliers of the peak LR: linear warmup, then cosine or WSD decay.

cosine:   1 -> min_lr_ratio along half a cosine over the steps after warmup
wsd:      warmup, stable at 1, then linear decay to min_lr_ratio over the final
          `decay_fraction` of the steps (warmup-stable-decay, as in MiniCPM / OLMo 2)
constant: warmup, then 1
With `schedule_offset` k, step s is step s + k of the same schedule over max_steps + k steps
(a continued schedule).
"""

from __future__ import annotations

import math

from llmtrain.config import TrainSection


def lr_multiplier(step: int, train: TrainSection) -> float:
    """Multiplier of `train.lr` for optimizer step `step` (0-based: the first update uses step 0)."""
    step += train.schedule_offset
    total, warmup, floor = train.max_steps + train.schedule_offset, train.warmup_steps, train.min_lr_ratio
    if warmup and step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant":
        return 1.0
    if train.schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(total * train.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress
