"""Learning-rate schedules, as pure functions of the epoch (so a resumed run needs no scheduler object)."""
from __future__ import annotations

import math


SCHEDULERS = ("cosine", "constant", "cosine_step")


def lr_at_step(epoch: int, step: int, steps_per_epoch: int, *, base_lr: float, epochs: int, scheduler: str = "cosine",
               warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """The learning rate of step ``step`` (0-based) of ``epoch`` (0-based).

    ``cosine`` / ``constant``: per epoch (:func:`lr_at_epoch`). ``cosine_step``: torch's ``CosineAnnealingLR``
    stepped after every optimisation step over all the steps after the warm-up epochs (Tip-Adapter-F's schedule):
    step t of T = (epochs - warmup_epochs) x steps_per_epoch has lr = base * (1 + cos(pi * t / T)) / 2."""
    if scheduler != "cosine_step" or epoch < warmup_epochs:
        return lr_at_epoch(epoch, base_lr=base_lr, epochs=epochs,
                           scheduler="constant" if scheduler == "cosine_step" else scheduler,
                           warmup_epochs=warmup_epochs, warmup_lr=warmup_lr)
    total = max((epochs - warmup_epochs) * steps_per_epoch, 1)
    t = (epoch - warmup_epochs) * steps_per_epoch + step
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * t / total))


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
