"""Learning-rate schedules, as pure functions of the epoch (so a resumed run needs no scheduler object)."""
from __future__ import annotations

import math
from typing import Optional


SCHEDULERS = ("cosine", "constant", "cosine_step", "cosine_squared")


def lr_at_step(epoch: int, step: int, steps_per_epoch: int, *, base_lr: float, epochs: int, scheduler: str = "cosine",
               warmup_epochs: int = 1, warmup_lr: float = 1e-5, min_lr: float = 0.0,
               total_steps: Optional[int] = None) -> float:
    """The learning rate of step ``step`` (0-based) of ``epoch`` (0-based).

    ``cosine`` / ``constant``: per epoch (:func:`lr_at_epoch`). ``cosine_step``: torch's ``CosineAnnealingLR``
    stepped after every optimisation step over all the steps after the warm-up epochs (Tip-Adapter-F's schedule):
    step t of T = (epochs - warmup_epochs) x steps_per_epoch has lr = min + (base - min) (1 + cos(pi t / T)) / 2.
    ``total_steps``: a run of that many steps (``iterations``, the last epoch cut) makes T = total_steps -
    warmup_epochs x steps_per_epoch (CLIP-LoRA's ``CosineAnnealingLR(T_max = 500 x shots)``)."""
    if scheduler != "cosine_step" or epoch < warmup_epochs:
        return lr_at_epoch(epoch, base_lr=base_lr, epochs=epochs,
                           scheduler="constant" if scheduler == "cosine_step" else scheduler,
                           warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr)
    whole = total_steps if total_steps is not None else epochs * steps_per_epoch
    total = max(whole - warmup_epochs * steps_per_epoch, 1)
    t = (epoch - warmup_epochs) * steps_per_epoch + step
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / total))


def lr_at_epoch(epoch: int, *, base_lr: float, epochs: int, scheduler: str = "cosine", warmup_epochs: int = 1,
                warmup_lr: float = 1e-5, min_lr: float = 0.0) -> float:
    """The learning rate of ``epoch`` (0-based), as Dassl's ConstantWarmupScheduler + CosineAnnealingLR give it.

    Warm-up epochs run at ``warmup_lr`` and count inside ``epochs``; afterwards the cosine restarts from the base
    rate: epoch e >= w has lr = min + (base - min) (1 + cos(pi * (e - w) / epochs)) / 2, stepped once per epoch
    (``min_lr``: torch's ``eta_min``, 0 in Dassl).

    ``cosine_squared``: min + (base - min) * ((1 + cos(pi * (e - w) / epochs)) / 2) ** 2 -- two such cosine
    schedulers stepping one optimizer under torch 1.x (each multiplies the rate by its own ratio), what KgCoOp's
    maintainer ran in the log posted in htyao89/KgCoOp issue #2 (its printed rates are these to 7 digits; the
    released code has one).
    """
    if epoch < warmup_epochs:
        return warmup_lr
    if scheduler == "constant":
        return base_lr
    if scheduler not in ("cosine", "cosine_squared"):
        raise ValueError(f"unknown scheduler {scheduler!r} (cosine | constant | cosine_squared)")
    t = epoch - warmup_epochs
    factor = 0.5 * (1.0 + math.cos(math.pi * t / epochs))
    return min_lr + (base_lr - min_lr) * (factor * factor if scheduler == "cosine_squared" else factor)
