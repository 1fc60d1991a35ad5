"""Dassl's checkpoint files as the MaPLe / IVLP / VPT / PromptSRC trainers write them, and its epoch schedule.

Source: KaiyangZhou/Dassl.pytorch@c61a1b570ac6333bd50fb5ae06aea59002fb20bb (the upstream Dassl both
muzairkhattak repos install, docs/INSTALL.md l.18-32 of multimodal-prompt-learning):
``dassl/engine/trainer.py`` ``save_model`` l.118-145 (one file per registered model name), ``after_epoch``
l.422-443 (TRAIN.CHECKPOINT_FREQ 0: only the last epoch is saved), ``load_model`` l.172-201;
``dassl/utils/torchtools.py`` ``save_checkpoint`` l.27-74 (strips "module.", writes ``model.pth.tar-<epoch>`` and a
``checkpoint`` text file naming it); ``dassl/optim/optimizer.py`` l.13-142; ``dassl/optim/lr_scheduler.py`` l.10-152.

What a file holds: ``torch.save({"state_dict": the registered model's state_dict(), "epoch": epoch + 1,
"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "val_result": None})``. These trainers register
the WHOLE CustomCLIP and build the optimizer over ``self.model`` (every CLIP parameter, frozen ones included; SGD
skips those without a gradient), so the state dict holds all of CLIP's weights, and the scheduler's state holds the
cosine successor object, which holds the SGD optimizer object and through it every parameter again (the same
storages). The trainers' own ``load_model`` deletes ``prompt_learner.token_prefix`` / ``token_suffix`` and loads
the rest with ``strict=False`` (so the saved frozen weights overwrite the freshly loaded CLIP).
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

DASSL = "KaiyangZhou/Dassl.pytorch@c61a1b570ac6333bd50fb5ae06aea59002fb20bb"

# dassl/config/defaults.py l.150-185 with the recipes' OPTIM overrides (configs/trainers/*/*.yaml)
SGD_MOMENTUM, SGD_WEIGHT_DECAY, SGD_DAMPENING, SGD_NESTEROV = 0.9, 5e-4, 0, False
WARMUP_EPOCH, WARMUP_CONS_LR = 1, 1e-5


class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ``ConstantWarmupScheduler`` (``dassl/optim/lr_scheduler.py`` l.10-54): lr ``cons_lr`` while
    ``last_epoch < warmup_epoch``, then the successor's lr, the successor being stepped from then on."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


def epoch_lr(epoch: int, base_lr: float, max_epoch: int, warmup_epoch: int = WARMUP_EPOCH,
             cons_lr: float = WARMUP_CONS_LR) -> float:
    """The lr used during 0-based ``epoch`` (Dassl steps the scheduler once, after the last batch of each epoch:
    ``update_lr`` in the trainers' ``forward_backward``, e.g. ``trainers/maple.py`` l.289-290): ``cons_lr`` for the
    warm-up epochs, then cosine over MAX_EPOCH (``CosineAnnealingLR(T_max=max_epoch)``) restarted at the end of
    the warm-up: epoch e >= warmup uses base_lr * (1 + cos(pi * (e - warmup) / max_epoch)) / 2. The warm-up epoch
    counts inside MAX_EPOCH, so the cosine never reaches its end (closed form; torch's recursive form agrees to
    rounding)."""
    if epoch < warmup_epoch:
        return cons_lr
    return base_lr * (1 + math.cos(math.pi * (epoch - warmup_epoch) / max_epoch)) / 2


def _optimizer_and_scheduler(params, lr, max_epoch, epochs_done, momentum_buffers):
    optim = torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY,
                            dampening=SGD_DAMPENING, nesterov=SGD_NESTEROV)
    for p, buf in momentum_buffers.items():
        optim.state[p]["momentum_buffer"] = buf
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optim, float(max_epoch))
    sched = ConstantWarmupScheduler(optim, cosine, WARMUP_EPOCH, WARMUP_CONS_LR)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": the file is what matters
        warnings.simplefilter("ignore")
        for _ in range(epochs_done):
            sched.step()
    return optim, sched


def write_dassl_checkpoint(output_dir, model_name: str, state_dict: "OrderedDict[str, torch.Tensor]", *,
                           epoch: int, trainable: set, buffers: set = frozenset(), lr: float, max_epoch: int,
                           momentum_buffers: dict | None = None) -> Path:
    """Write ``<output_dir>/<model_name>/model.pth.tar-<epoch>`` (and the ``checkpoint`` file next to it) as
    Dassl's ``save_model`` does after the last batch of epoch ``epoch`` (1-based, the number in the file name).

    ``state_dict``: the registered model's state dict in the original's names, order and dtypes;
    ``trainable``: the names whose parameters had gradients (they get SGD momentum buffers: ``momentum_buffers``
    by name, zeros when not given); ``buffers``: names that are buffers, not parameters (not in the optimizer).
    The scheduler has been stepped ``epoch`` times (once per epoch), so its lr is the next epoch's."""
    folder = Path(output_dir) / model_name
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = OrderedDict((k[7:] if k.startswith("module.") else k, v) for k, v in state_dict.items())
    params = OrderedDict((k, torch.nn.Parameter(v, requires_grad=k in trainable))
                         for k, v in state_dict.items() if k not in buffers)
    given = momentum_buffers or {}
    bufs = {p: given.get(k, torch.zeros_like(p)).to(p.dtype).clone() for k, p in params.items() if k in trainable}
    optim, sched = _optimizer_and_scheduler(list(params.values()), lr, max_epoch, epoch, bufs)
    state = {"state_dict": state_dict, "epoch": epoch, "optimizer": optim.state_dict(),
             "scheduler": sched.state_dict(), "val_result": None}
    path = folder / f"model.pth.tar-{epoch}"
    torch.save(state, path)
    (folder / "checkpoint").write_text(f"{path.name}\n")
    return path


def dassl_config(trainer: str, section: str, values: dict, keys: dict, *, dataset: str = "Caltech101",
                 shots: int = 16, subsample: str = "base", seed: int = 1) -> dict:
    """The run's yacs configuration as these repos print it into ``log.txt`` (``train.py`` ``print_args``: the
    merged ``get_cfg_default()`` + ``extend_cfg`` + dataset and trainer yaml + command line), reduced to the entries
    that decide the numbers: ``values`` (a recipe of the method module) renamed by ``keys`` into
    ``TRAINER.<section>``; ``lr`` / ``max_epoch`` / ``batch_size`` into OPTIM / DATALOADER. The dataset ``NAME`` is
    the Dassl class name (e.g. "Caltech101", "OxfordFlowers")."""
    trainer_cfg = {keys[k]: v for k, v in values.items() if k in keys}
    trainer_cfg.setdefault("PREC", "fp16")
    return {
        "DATALOADER": {"TRAIN_X": {"BATCH_SIZE": values.get("batch_size", 4)}, "TEST": {"BATCH_SIZE": 100}},
        "DATASET": {"NAME": dataset, "NUM_SHOTS": shots, "SUBSAMPLE_CLASSES": subsample},
        "INPUT": {"SIZE": (224, 224), "INTERPOLATION": "bicubic", "RRCROP_SCALE": (0.08, 1.0),
                  "TRANSFORMS": ["random_resized_crop", "random_flip", "normalize"],
                  "PIXEL_MEAN": [0.48145466, 0.4578275, 0.40821073],
                  "PIXEL_STD": [0.26862954, 0.26130258, 0.27577711]},
        "MODEL": {"BACKBONE": {"NAME": "ViT-B/16"}},
        "OPTIM": {"NAME": "sgd", "LR": values["lr"], "MAX_EPOCH": values["max_epoch"], "LR_SCHEDULER": "cosine",
                  "WARMUP_EPOCH": WARMUP_EPOCH, "WARMUP_TYPE": "constant", "WARMUP_CONS_LR": WARMUP_CONS_LR,
                  "MOMENTUM": SGD_MOMENTUM, "WEIGHT_DECAY": SGD_WEIGHT_DECAY},
        "SEED": seed,
        "TRAINER": {"NAME": trainer, section: trainer_cfg},
    }


def loaded_by_original(state_dict: dict) -> dict:
    """What the trainers' ``load_model`` keeps (``trainers/maple.py`` l.320-333, ``independentVL.py`` l.291-304,
    ``vpt.py`` l.226-239, PromptSRC ``promptsrc.py`` l.388-401): the state dict minus
    ``prompt_learner.token_prefix`` and ``prompt_learner.token_suffix``, loaded with ``strict=False``."""
    return {k: v for k, v in state_dict.items()
            if k not in ("prompt_learner.token_prefix", "prompt_learner.token_suffix")}
