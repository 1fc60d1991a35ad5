"""The training engine shared by every learned method.

The engine knows a method only through :class:`vlprompt.methods.base.Method`. Inputs come in one of two modes:

* **cached views** (default for methods with a frozen image tower): the image features of ``views`` augmented
  views of every training image are computed once through the :class:`~vlprompt.backbone.cache.FeatureCache` (and reused
  across runs, methods and seeds); each step draws one view per image. The frozen image tower -- the largest cost
  of a step -- then runs once per view instead of once per step.
* **online**: every step augments and encodes its images, exactly as the papers do.

Every epoch's data order, view choice and augmentation are seeded from ``(seed, epoch)``, and a checkpoint is
written at the end of every ``checkpoint_every`` epochs, so a run killed at any point resumes from the last
checkpoint and finishes with the same numbers as an uninterrupted run.

Under torchrun (:mod:`vlprompt.engine.distributed`) every rank draws the same global batches and keeps its
slice; the loss is weighted by the slice's share of the batch, the learned tensors' gradients are summed over
the ranks before the optimiser step (so all ranks take the same step), class prompts are encoded sharded over
the ranks, and only rank 0 writes checkpoints and calls ``on_epoch``.

Mixed precision (``--precision amp`` on CUDA, ``bf16``, ``auto``): the forward runs under autocast (bf16 where the
device supports it, else fp16 with a gradient scaler: steps with inf/NaN gradients are skipped by the scaler and
counted); the learned tensors and the optimiser state stay float32; batches are copied from pinned memory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError, VLPromptError
from ..methods.base import Batch, Method, check_fields, opt
from . import distributed
from .checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from .schedule import SCHEDULERS, lr_at_step
from .sources import CachedViews, OnlineImages  # noqa: F401  (the inputs of fit(); re-exported)

log = logging.getLogger("vlprompt")


#: how an epoch draws cached views (:attr:`TrainConfig.sampling`)
SAMPLINGS = ("images", "pool")


@dataclass
class TrainConfig:
    """The training recipe of a gradient-trained method (the method's :meth:`preset` fills it with the paper's
    values; the user's settings override them). Every field is an option of ``vlprompt train``."""

    epochs: Optional[int] = opt(None, "training epochs (default: the method's paper recipe, e.g. CoOp's "
                                "50/100/100/200/200 by shots, ImageNet 50); 0 trains nothing", min=0)
    batch_size: int = opt(32, "images per optimisation step (0: all the training images, full-batch steps)", min=0)
    last_batch: str = opt("drop", "a last batch smaller than --batch-size: dropped when there is a full one (Dassl's "
                          "rule) or kept (torch's DataLoader default, Tip-Adapter-F's)", choices=("drop", "keep"),
                          since="0.2")
    iterations: int = opt(0, "train for exactly this many optimisation steps instead of --epochs: passes over the "
                          "shuffled training images repeat until the count is reached, the last one cut "
                          "(CLIP-LoRA's 500 x shots); the cosine_step schedule spans these steps; 0: --epochs "
                          "decides", min=0, since="0.2")
    optimizer: str = opt("sgd", "optimiser", choices=("sgd", "adamw", "adam", "radam"))
    lr: float = opt(0.002, "base learning rate", gt=0)
    momentum: float = opt(0.9, "SGD momentum", min=0, max=1)
    adam_eps: float = opt(1e-8, "epsilon of adam / adamw / radam (torch's default 1e-8)", gt=0)
    weight_decay: float = opt(5e-4, "weight decay", min=0)
    scheduler: str = opt("cosine", "learning-rate schedule: cosine / constant per epoch (Dassl's), cosine_step "
                         "per optimisation step (torch's CosineAnnealingLR over every step), cosine_squared per epoch "
                         "(two of Dassl's cosines on one optimizer: the KgCoOp maintainer's posted log)",
                         choices=SCHEDULERS)
    warmup_epochs: int = opt(1, "epochs at the constant warm-up rate, counted inside --epochs", min=0)
    warmup_lr: float = opt(1e-5, "learning rate of the warm-up epochs", gt=0)
    min_lr: float = opt(0.0, "the rate the cosine schedules decay to (torch's eta_min; CLIP-LoRA's 1e-6)", min=0,
                         since="0.2")
    views: Optional[int] = opt(10, "cached augmented views per training image (cached-views mode; null where it "
                               "does not apply)", min=1)
    sampling: str = opt("images", "how an epoch draws the cached views: images (every training image once, in "
                        "shuffled batches, one random view each) or pool (CLAP's: as many batches as the images make, "
                        "each a slice of one fresh shuffle of all views of all images, so an epoch sees about one "
                        "view's worth of them and a batch may hold several views of an image)", choices=SAMPLINGS,
                        since="0.2")
    online: bool = opt(False, "augment and encode images at every step, exactly as the papers (no cached views)")
    augment: bool = opt(True, "CoOp's train augmentation; --no-augment trains on the test transform (one view)")
    checkpoint_every: int = opt(1, "epochs between checkpoints (0: none; a killed run then starts over)", min=0)
    eval_every: int = opt(0, "evaluate on the val split every N epochs (0: never); methods that select their "
                          "best epoch on val set it in their preset", min=0)
    batch_workers: int = opt(0, "workers decoding (and augmenting) images: in online mode at every step, with "
                             "cached views when their features are computed", min=0, flag="workers")
    feature_batch_size: int = opt(64, "images per forward pass of the frozen image tower", min=1)
    cache_dtype: str = opt("float32", "storage dtype of the cached training views (float16 halves their disk and "
                           "memory; its effect on logits: docs/benchmarks/scale.md; test features stay float32)",
                           choices=("float32", "float16"))
    nonfinite: str = opt("error", "a non-finite loss stops the run (error) or its step is skipped and counted "
                         "(skip)", choices=("error", "skip"))
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0: no clipping)", min=0)
    max_steps: int = opt(0, "stop after this many optimisation steps (0: no limit; smoke runs)", min=0)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "TrainConfig":
        check_fields(self, "train")
        if self.iterations and self.epochs is not None:
            raise ConfigError(f"train.epochs (--epochs {self.epochs}) and train.iterations (--iterations "
                              f"{self.iterations}) both say how long to train: give one")
        if self.min_lr and self.scheduler not in ("cosine", "cosine_step"):
            raise ConfigError(f"train.min_lr (--min-lr) is where a cosine schedule ends; --scheduler "
                              f"{self.scheduler} has none")
        if self.min_lr >= self.lr:
            raise ConfigError(f"train.min_lr (--min-lr {self.min_lr:g}) must be below train.lr ({self.lr:g})")
        if self.epochs and self.warmup_epochs > self.epochs:  # (0 epochs: nothing runs, no warm-up either)
            raise ConfigError(f"train: warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        if self.sampling == "pool" and self.online:
            raise ConfigError("train.sampling (--sampling) pool draws from the cached views; --online has none")
        if self.optimizer == "sgd" and self.adam_eps != 1e-8:
            raise ConfigError(f"train.adam_eps (--adam-eps) {self.adam_eps:g} applies to adam, adamw and radam, not "
                              f"to --optimizer sgd")
        return self

    #: fields that do not change the numbers (not part of a run's identity)
    NOT_IDENTITY: ClassVar[tuple[str, ...]] = ("checkpoint_every", "batch_workers", "feature_batch_size")

    def steps_per_epoch(self, n: int) -> int:
        """Optimisation steps of one pass over ``n`` training images (the last partial batch dropped when there
        is a full one, unless ``last_batch`` keeps it; batch size 0: one full-batch step)."""
        bs = self.batch_size or max(n, 1)
        return n // bs if (n >= bs and self.last_batch == "drop") else -(-n // bs)

    def epochs_for(self, n: int) -> int:
        """The passes over ``n`` training images a run makes: ``epochs``, or the passes ``iterations`` steps need
        (the last one cut)."""
        if not self.iterations:
            return int(self.epochs)
        return -(-self.iterations // max(self.steps_per_epoch(n), 1))


@dataclass
class TrainState:
    epoch: int = 0  # next epoch to run
    step: int = 0
    skipped_steps: int = 0
    history: list = field(default_factory=list)


def epoch_seed(seed: int, epoch: int, salt: str = "") -> int:
    h = hashlib.sha256(f"{seed}:{epoch}:{salt}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def make_optimizer(params: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if name == "adam":  # weight decay as an L2 term added to the gradient (Dassl's Adam)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if name == "radam":
        return torch.optim.RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    raise VLPromptError(f"unknown optimizer {cfg.optimizer!r} (sgd | adamw | adam | radam)")


# -- the loop ---------------------------------------------------------------------------------------
class Trainer:
    """The training loop over a method's hooks (:class:`~vlprompt.methods.base.Method`): per step
    ``training_step`` -> backward (and the gradients of its ``gradient_only`` losses) -> sum over ranks ->
    unscale -> ``on_before_optimizer_step`` -> clip -> step; per epoch ``on_train_epoch_end``, the validation
    evaluation (``eval_every``), the callbacks (:mod:`.callbacks`: metrics.jsonl, TensorBoard, best epoch,
    training curve) and a checkpoint holding the learned tensors, the optimiser, the hooks' training state and
    every RNG."""

    def __init__(self, method: Method, train_cfg: TrainConfig, run_dir: Path, *, seed: int, config_hash: str = "",
                 device: Optional[torch.device] = None, progress: bool = True, callbacks: Sequence = ()):
        self.method = method
        self.cfg = train_cfg
        self.seed = int(seed)
        self.run_dir = Path(run_dir)
        self.config_hash = config_hash
        self.device = device or method.backbone.device
        self.progress = progress
        self.callbacks = list(callbacks)
        self.optimizer = make_optimizer(method.param_groups(train_cfg.lr), train_cfg)
        for group in self.optimizer.param_groups:
            group.setdefault("lr_scale", group["lr"] / train_cfg.lr if train_cfg.lr else 1.0)
        self.state = TrainState()
        for p in method.trainable_parameters():  # autocast computes in half precision; the masters stay fp32
            if p.dtype != torch.float32:
                raise VLPromptError(f"{type(method).__name__}: a learned tensor of shape {tuple(p.shape)} is "
                                    f"{p.dtype}; learned tensors must be float32 (autocast handles half precision)")
        # fp16 autocast needs a gradient scaler (bf16 has fp32's range: none)
        self.fp16 = getattr(method.backbone, "compute_dtype", None) == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.fp16)

    # -- checkpoints --
    def _state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.state.epoch, "step": self.state.step, "skipped_steps": self.state.skipped_steps,
                "history": json.dumps(self.state.history), "rng": rng_state(),
                "method": {k: v.detach().cpu() for k, v in self.method.training_state().items()}}

    def resume(self) -> bool:
        found = load_latest_checkpoint(self.run_dir, self.config_hash or None)  # the newest intact one
        if found is None:
            return False
        path, epoch, learned, state = found
        self.method.load_learned_state({k: v.to(self.device) for k, v in learned.items()})
        self.method.load_training_state({k: v.to(self.device) for k, v in state.get("method", {}).items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(epoch=int(state["epoch"]), step=int(state["step"]),
                                skipped_steps=int(state["skipped_steps"]), history=json.loads(state["history"]))
        set_rng_state(state["rng"])
        length = (f"{self.cfg.epochs} epochs" if not self.cfg.iterations else f"{self.cfg.iterations} steps")
        log.info("resumed from %s (after epoch %d, step %d, of %s)", path, self.state.epoch, self.state.step, length)
        for cb in self.callbacks:
            cb.on_resume(self)
        return True

    def save(self) -> Optional[Path]:
        if not distributed.is_main():  # rank 0 writes; every rank holds the same state
            return None
        return save_checkpoint(self.run_dir, self.state.epoch, self.method.learned_state(), self._state_dict(),
                               self.config_hash)

    # -- training --
    def _batches(self, n: int, gen: torch.Generator, views: int = 1) -> list[torch.Tensor]:
        """The batches of an epoch over ``n`` images: indices into a shuffle of the images (``views`` 1), or into
        a shuffle of the ``views * n`` (view, image) pairs (index ``v * n + i``, ``sampling`` pool), as many batches
        as ``n`` images make."""
        order = torch.randperm(n * views, generator=gen)
        bs = self.cfg.batch_size or n  # 0: full-batch steps
        # as many as TrainConfig.steps_per_epoch counts (the schedule's), the last partial one dropped as Dassl drops it
        return [order[i * bs:(i + 1) * bs] for i in range(self.cfg.steps_per_epoch(n))]

    def _set_lr(self, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
        cfg = self.cfg
        lr = lr_at_step(epoch, step, steps_per_epoch, base_lr=cfg.lr, epochs=epochs, scheduler=cfg.scheduler,
                        warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                        total_steps=cfg.iterations or None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def fit(self, source, labels: torch.Tensor, targets: Optional[torch.Tensor] = None,
            evaluate: Optional[Callable[[], dict]] = None) -> TrainState:
        """Train from ``self.state.epoch`` to ``cfg.epochs`` (or until ``cfg.iterations`` steps are done).
        ``source.batch(idx, gen)`` gives Features."""
        cfg = self.cfg
        n = len(labels)
        if n == 0:
            raise VLPromptError("no training images")
        method = self.method
        parallel = distributed.active()
        if parallel:
            distributed.check_supported(method, cfg, n)
        text = getattr(method.backbone, "text", None)
        sharded = text.class_sharded if (parallel and hasattr(text, "class_sharded")) else contextlib.nullcontext
        params = method.trainable_parameters()
        pin = self.device.type == "cuda"
        epochs = cfg.epochs_for(n)
        # the step count that ends the run: --iterations (the recipe's length) or --max-steps (a smoke run)
        stop_at = min(s for s in (cfg.iterations, cfg.max_steps) if s) if (cfg.iterations or cfg.max_steps) else 0
        pool = cfg.sampling == "pool"
        views = int(getattr(source, "num_views", 0) or 0) if pool else 1
        if pool and views < 1:
            raise VLPromptError("--sampling pool draws from cached views; this run has none (--online, or a method "
                                "that reads the images)")
        prefetch = getattr(source, "prefetch", None)
        for epoch in range(self.state.epoch, epochs):
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            torch.manual_seed(epoch_seed(self.seed, epoch, "augment"))
            random.seed(epoch_seed(self.seed, epoch, "python"))
            method.train()
            t0 = time.perf_counter()
            losses, correct, seen = [], 0, 0
            part_sums: dict[str, float] = {}
            batches = self._batches(n, gen, views)
            lr = self._set_lr(epoch, 0, len(batches), epochs)
            bar = _progress(batches, f"epoch {epoch + 1}/{epochs}", self.progress)
            for i, idx in enumerate(bar):
                lr = self._set_lr(epoch, i, len(batches), epochs)
                if pool:  # (view, image) pairs of the pool
                    view, idx = idx // n, idx % n
                    feats = source.batch(idx, gen, views=view)
                else:
                    feats = source.batch(idx, gen)  # the global batch: the generator advances as in one process
                    if prefetch is not None and i + 1 < len(batches):
                        prefetch(batches[i + 1])  # decoded in threads while this step runs (--workers)
                if parallel:
                    sl = distributed.share(len(idx))
                    feats, idx_here = feats.rows(sl), idx[sl]
                else:
                    idx_here = idx
                if pin:
                    feats = _pinned(feats)
                feats = feats.to(self.device)
                y = labels[idx_here].to(self.device)
                t = None if targets is None else targets[idx_here].to(self.device)
                with method.backbone.autocast(), sharded():
                    out = method.training_step(Batch(feats, y, t, idx_here))
                loss = out.loss.float()
                aux = {k: v.float() for k, v in out.gradient_only.items()}
                if parallel:  # this slice's share of the global batch's mean loss
                    share = len(idx_here) / len(idx)
                    loss = loss * share
                    aux = {k: v * share for k, v in aux.items()}
                    global_loss = distributed.all_reduce_sum(loss.detach().clone())
                else:
                    global_loss = loss.detach()
                if not torch.isfinite(global_loss):  # the same decision on every rank
                    if self.fp16 or cfg.nonfinite == "skip":
                        self.state.skipped_steps += 1
                        self.optimizer.zero_grad(set_to_none=True)
                        continue
                    raise NonFiniteError(f"non-finite loss ({global_loss.item()}) at epoch {epoch + 1}, step "
                                         f"{self.state.step + 1} (lr {lr:g}); lower --lr, or pass "
                                         f"--nonfinite skip to skip such steps and count them")
                self.optimizer.zero_grad(set_to_none=True)
                aux_grads = {name: list(torch.autograd.grad(self.scaler.scale(value), params, retain_graph=True,
                                                            allow_unused=True))
                             for name, value in aux.items()}
                self.scaler.scale(loss).backward()
                if parallel:
                    distributed.all_reduce_gradients(params)
                    for grads in aux_grads.values():
                        distributed.all_reduce_tensors(grads, params)
                if self.fp16:  # the hook and clipping see true gradients
                    self.scaler.unscale_(self.optimizer)
                    inv = 1.0 / self.scaler.get_scale()
                    aux_grads = {k: [None if g is None else g * inv for g in v] for k, v in aux_grads.items()}
                method.on_before_optimizer_step(params, aux_grads)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scale_before = self.scaler.get_scale() if self.fp16 else None
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.fp16 and self.scaler.get_scale() < scale_before:
                    self.state.skipped_steps += 1  # inf/NaN gradients: the scaler skipped this step
                self.state.step += 1
                losses.append(global_loss.item())
                for name, value in out.parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + float(value)
                correct += int((out.logits.detach().argmax(-1) == y).sum())
                seen += len(y)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if stop_at and self.state.step >= stop_at:
                    break
            if parallel:
                counts = distributed.all_reduce_sum(torch.tensor([correct, seen], device=self.device))
                correct, seen = (int(c) for c in counts)
            record = {"epoch": epoch + 1, "lr": lr, "loss": float(np.mean(losses)) if losses else float("nan"),
                      "train_accuracy": 100.0 * correct / max(seen, 1), "steps": len(losses),
                      "skipped_steps": self.state.skipped_steps, "seconds": time.perf_counter() - t0}
            if len(part_sums) > 1 or (part_sums and "ce" not in part_sums):  # named terms beyond the plain CE
                record.update({f"loss_{k}": v / max(len(losses), 1) for k, v in part_sums.items()})
            method.on_train_epoch_end(epoch + 1, epochs)
            if evaluate is not None and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
                record.update({f"val_{k}": v for k, v in evaluate().items()})
            self.state.history.append(record)
            self.state.epoch = epoch + 1
            log.info("epoch %d/%d  loss %.4f  train acc %.2f%%  lr %.2e  %.1fs", epoch + 1, epochs,
                     record["loss"], record["train_accuracy"], lr, record["seconds"])
            if distributed.is_main():  # the callbacks write the run's files
                for cb in self.callbacks:
                    cb.on_epoch_end(self, record)
            done = self.state.epoch == epochs or bool(stop_at and self.state.step >= stop_at)
            if cfg.checkpoint_every and (self.state.epoch % cfg.checkpoint_every == 0 or done):
                self.save()
            if done:
                break
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.state


@torch.no_grad()
def predict_logits(method: Method, source, n: int, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """Logits (N, K) of every image; class text features are computed once (``begin_eval``)."""
    method.eval()
    method.begin_eval()
    out = []
    try:
        gen = torch.Generator().manual_seed(0)
        idx_all = torch.arange(n)
        prefetch = getattr(source, "prefetch", None)
        for i in _progress(range(0, n, batch_size), "evaluate", progress):
            feats = source.batch(idx_all[i:i + batch_size], gen)
            if prefetch is not None and i + batch_size < n:
                prefetch(idx_all[i + batch_size:i + 2 * batch_size])  # decoded while this batch is evaluated
            feats = feats.to(method.backbone.device)
            with method.backbone.autocast():
                out.append(method(feats).float().cpu())
    finally:
        method.end_eval()
    return torch.cat(out) if out else torch.empty(0, method.num_classes)


def _pinned(feats):
    """The batch in page-locked memory, so that the copy to the GPU is asynchronous."""
    from ..methods.base import Features

    return Features(*(t if t is None or t.is_pinned() else t.pin_memory()
                      for t in (feats.global_, feats.local, feats.images)))


def _progress(it, desc: str, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, desc=desc, leave=False, dynamic_ncols=True)
