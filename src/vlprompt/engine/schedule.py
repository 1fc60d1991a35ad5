"""Learning-rate schedules, as pure functions of the epoch (so a resumed run needs no scheduler object)."""
from __future__ import annotations

import math

def lr_at_epoch(epoch: int, *, base_lr: float, epochs: int, scheduler: str = "cosine", warmup_epochs: int = 1,
                warmup_lr: float = 1e-5) -> float:
    """The learning rate of ``epoch`` (0-based), as Dassl's ConstantWarmupScheduler + CosineAnnealingLR give it.

    Warm-up epochs run at ``warmup_lr`` and count inside ``epochs``; afterwards the cosine restarts from the base
    rate: epoch e >= w has lr = base * (1 + cos(pi * (e - w) / epochs)) / 2, stepped once per epoch.
    """
    if epoch < warmup_epochs:
        return warmup_lr
    if scheduler == "constant":
        return base_lr
    if scheduler != "cosine":
        raise ValueError(f"unknown scheduler {scheduler!r} (cosine | constant)")
    t = epoch - warmup_epochs
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t / epochs))
