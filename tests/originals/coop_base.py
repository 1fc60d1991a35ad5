"""The substrate KgCoOp, ProGrad, TaskRes and CLIP-Adapter share, written out on open_clip modules: CoOp's text
path and prompt buffers, Dassl's optimizers, learning-rate schedule, checkpoint files and printed config.

Read at (line numbers below are those of these commits):

- KaiyangZhou/CoOp @ ff61507c790454bce7c5052c3ac39e60772f1f89 (``clip/model.py``, ``trainers/coop.py``)
- KaiyangZhou/Dassl.pytorch @ c61a1b570ac6333bd50fb5ae06aea59002fb20bb ("upstream Dassl": TaskRes, CLIP-Adapter)
- Dassl.ProGrad.pytorch, the Dassl fork shipped in BeierZhu/Prompt-align @ 1b762036 and, blob for blob the same,
  in htyao89/KgCoOp @ c43ccc32 ("the ProGrad fork": ProGrad, KgCoOp). Cited as ``fork:<path>:<line>``.

open_clip's ``CLIP`` has the parameter names and shapes of OpenAI's ``CLIP`` class the originals use; its
transformer is batch-first (the originals' ``permute(1, 0, 2)`` pairs disappear) and takes the causal mask as
``attn_mask``. Everything here runs in the model's dtype (fp32 in the tests). The originals' default ``PREC
"fp16"`` (OpenAI weights through ``clip.build_model`` -> ``convert_weights``; learnable tensors created from
``token_embedding(...).type(dtype)`` are fp16 parameters stepped by plain SGD) is an artefact we do not keep; each
method module says where it changes a number.
"""
from __future__ import annotations

import contextlib
import math
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import open_clip
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

TOKENIZER = open_clip.get_tokenizer("RN50")  # CLIP's BPE: the originals' clip.tokenize and _tokenizer.encode

#: Dassl's ``DATASET.NAME`` (the key of every original's template table) -> vlprompt's reader name.
DASSL_DATASET_NAMES = {
    "OxfordPets": "oxford_pets", "OxfordFlowers": "oxford_flowers", "FGVCAircraft": "fgvc_aircraft",
    "DescribableTextures": "dtd", "EuroSAT": "eurosat", "StanfordCars": "stanford_cars", "Food101": "food101",
    "SUN397": "sun397", "Caltech101": "caltech101", "UCF101": "ucf101", "ImageNet": "imagenet",
    "ImageNetSketch": "imagenet_sketch", "ImageNetV2": "imagenetv2", "ImageNetA": "imagenet_a",
    "ImageNetR": "imagenet_r",
}


# -- CLIP's text and image paths ----------------------------------------------------------------------------
def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """``torch.cat([clip.tokenize(p) for p in texts])`` (kgcoop.py:139, 159; prograd.py:116): (N, 77) int64,
    SOT 49406 ... EOT 49407, zero padding."""
    return torch.cat([TOKENIZER([t]) for t in texts])


def bpe_length(text: str) -> int:
    """``len(_tokenizer.encode(text))``: the BPE token count the originals use for ``name_lens`` (kgcoop.py:128,
    prograd.py:113)."""
    return len(TOKENIZER.encode(text))


def text_encoder(model, prompts: torch.Tensor, tokenized: torch.Tensor,
                 text_projection: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CoOp's ``TextEncoder.forward`` (kgcoop.py:68-79, prograd.py:51-63, taskres.py:77-88, identical).

    ``prompts`` (K, 77, D) token embeddings, ``tokenized`` (K, 77) ids (only their argmax, the EOT position, is
    used). Returns (K, E): ``ln_final`` of the EOT position times ``text_projection`` (the model's unless one is
    given: TaskRes' enhanced base), not normalised."""
    x = prompts + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    projection = model.text_projection if text_projection is None else text_projection
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ projection


def encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """OpenAI ``CLIP.encode_text`` (KgCoOp/clip/model.py:394-409): token ids (K, 77) -> (K, E), not normalised."""
    return text_encoder(model, model.token_embedding(tokens), tokens)


def encode_image(model, images: torch.Tensor) -> torch.Tensor:
    """OpenAI ``CLIP.encode_image`` (KgCoOp/clip/model.py:391-392): ``visual(image)``: (B, 3, H, W) -> (B, E)."""
    return model.visual(images)


def cosine_logits(model, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``logit_scale.exp() * norm(f) @ norm(t).t()`` as every CustomCLIP.forward writes it: (B, E), (K, E) ->
    (B, K). The norms are plain ``x / x.norm(dim=-1, keepdim=True)`` (no epsilon)."""
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text_features.t()


def coop_prompt_buffers(model, classnames: Sequence[str], prompt_prefix: str, n_ctx: int):
    """CoOp's ``PromptLearner.__init__`` buffers (trainers/coop.py; kgcoop.py:127-171, prograd.py:112-132).

    Names get ``replace("_", " ")``; each prompt is ``prompt_prefix + " " + name + "."`` tokenized whole. Returns
    ``token_prefix`` (K, 1, D) (the SOT embedding), ``token_suffix`` (K, 76 - n_ctx, D) (everything after the
    first ``n_ctx`` tokens of the prefix: class name, ".", EOT, padding), ``tokenized`` (K, 77) and ``name_lens``
    (the BPE length of each cleaned name counted alone, used by the middle / front layouts)."""
    names = [name.replace("_", " ") for name in classnames]
    name_lens = [bpe_length(name) for name in names]
    tokenized = tokenize([prompt_prefix + " " + name + "." for name in names])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    return embedding[:, :1, :].clone(), embedding[:, 1 + n_ctx:, :].clone(), tokenized, name_lens


# -- Dassl's optimizers and schedule ------------------------------------------------------------------------
def dassl_optimizer(params: Iterable, name: str, lr: float, *, weight_decay: float = 5e-4, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Dassl's ``build_optimizer`` (fork:dassl/optim/optimizer.py:13-136, upstream 13-140) with its defaults
    (fork:dassl/config/defaults.py:149-157): ``sgd`` = SGD(momentum 0.9, dampening 0, nesterov False, weight decay
    5e-4); ``adam`` = Adam(betas (0.9, 0.999), eps 1e-8, weight decay 5e-4 as **L2 added to the gradient**, not
    decoupled); ``adamw`` = AdamW. ``params`` is ``module.parameters()`` of the registered module: frozen
    parameters are in the group too, and SGD / Adam skip them because their ``.grad`` stays None."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=0,
                               nesterov=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    raise ValueError(f"optimizer {name!r} is not one the recipes of this group use")


class ConstantWarmupScheduler(LRScheduler):
    """Dassl's ``ConstantWarmupScheduler`` (fork:dassl/optim/lr_scheduler.py:10-54; upstream identical).

    Epochs ``< warmup_epoch`` run at ``cons_lr``; afterwards ``step()`` steps the successor (a cosine schedule
    whose own epoch count starts when the warm-up ends: WARMUP_RECOUNT is True by default, defaults.py:181). The
    originals pass ``verbose=False`` to ``_LRScheduler.__init__``; torch 2.14 has no such argument any more."""

    def __init__(self, optimizer, successor, warmup_epoch: int, cons_lr: float, last_epoch: int = -1):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        self.cons_lr = cons_lr
        super().__init__(optimizer, last_epoch)

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


def dassl_scheduler(optimizer, max_epoch: int, *, warmup_epoch: int = 1, warmup_lr: float = 1e-5):
    """Dassl's ``build_lr_scheduler`` for ``LR_SCHEDULER "cosine"`` + ``WARMUP_TYPE "constant"`` (every recipe of
    this group; fork:dassl/optim/lr_scheduler.py:83-154): ``CosineAnnealingLR(optimizer, float(max_epoch))`` wrapped
    in the constant warm-up. Stepped once per epoch, after the epoch's last batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no optimizer.step() came before the initial step
        cosine = CosineAnnealingLR(optimizer, float(max_epoch))
        if warmup_epoch <= 0:
            return cosine
        return ConstantWarmupScheduler(optimizer, cosine, warmup_epoch, warmup_lr)


def dassl_epoch_lr(epoch: int, base_lr: float, max_epoch: int, *, warmup_epoch: int = 1,
                   warmup_lr: float = 1e-5) -> float:
    """The learning rate used during 0-based ``epoch`` under :func:`dassl_scheduler`: ``warmup_lr`` for the
    warm-up epochs (counted inside ``max_epoch``), then ``base_lr * (1 + cos(pi * (epoch - warmup_epoch) /
    max_epoch)) / 2``. The cosine's period is ``max_epoch``, not ``max_epoch - warmup_epoch``, so the last epoch
    runs at a small positive rate (0.002 -> 4.9e-7 for 100 epochs). torch computes the same values recursively
    (equal to ~1e-15 relative). Sources: fork:dassl/optim/lr_scheduler.py:35-54, 130-143."""
    if epoch < warmup_epoch:
        return warmup_lr
    t = epoch - warmup_epoch
    return base_lr * (1 + math.cos(math.pi * t / max_epoch)) / 2


def sgd_step(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: Optional[torch.Tensor], lr: float, *,
             momentum: float = 0.9, weight_decay: float = 5e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the SGD Dassl builds (torch.optim.SGD, dampening 0, no Nesterov), written out: the weight decay
    is added to the gradient the optimizer is handed (after any projection, ProGrad's included); the first step
    sets the buffer to that gradient. Returns (new parameter, new momentum buffer)."""
    d_p = grad + weight_decay * param
    buf = d_p.clone() if momentum_buffer is None else momentum * momentum_buffer + d_p
    return param - lr * buf, buf


def adam_l2_step(param: torch.Tensor, grad: torch.Tensor, state: Optional[dict], lr: float, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 5e-4) -> tuple[torch.Tensor, dict]:
    """One step of Dassl's ``adam`` (torch.optim.Adam with ``weight_decay``: L2 added to the gradient, then the
    moments; not AdamW), written out. ``state`` holds ``step``, ``exp_avg``, ``exp_avg_sq`` (None before the first
    step). Returns (new parameter, new state)."""
    g = grad + weight_decay * param
    b1, b2 = betas
    if state is None:
        state = {"step": 0, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
    step = state["step"] + 1
    exp_avg = b1 * state["exp_avg"] + (1 - b1) * g
    exp_avg_sq = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
    bias1, bias2 = 1 - b1 ** step, 1 - b2 ** step
    denom = exp_avg_sq.sqrt() / math.sqrt(bias2) + eps
    return param - (lr / bias1) * exp_avg / denom, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


# -- Dassl's files ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dassl_importable():
    """Make :class:`ConstantWarmupScheduler` pickle as ``dassl.optim.lr_scheduler.ConstantWarmupScheduler`` (the
    global a real checkpoint names) while a checkpoint is written, and remove the stand-in modules afterwards."""
    names = ("dassl", "dassl.optim", "dassl.optim.lr_scheduler")
    if any(n in sys.modules for n in names):
        raise RuntimeError("a module named dassl is already imported: the stand-in would shadow it")
    modules = {n: types.ModuleType(n) for n in names}
    modules["dassl.optim.lr_scheduler"].ConstantWarmupScheduler = ConstantWarmupScheduler
    saved = ConstantWarmupScheduler.__module__
    ConstantWarmupScheduler.__module__ = "dassl.optim.lr_scheduler"
    sys.modules.update(modules)
    try:
        yield
    finally:
        ConstantWarmupScheduler.__module__ = saved
        for n in names:
            sys.modules.pop(n, None)


def write_dassl_checkpoint(directory, model_name: str, state_dict: Mapping[str, torch.Tensor], epoch: int,
                           optimizer: torch.optim.Optimizer, scheduler, *, with_val_result: bool) -> Path:
    """Dassl's ``TrainerBase.save_model`` + ``utils.save_checkpoint`` (fork:dassl/engine/trainer.py:119-143,
    fork:dassl/utils/torchtools.py:27-82; upstream trainer.py:118-145).

    Writes ``<directory>/<model_name>/model.pth.tar-<epoch>`` = ``torch.save({"state_dict": OrderedDict,
    "epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})``, plus
    ``"val_result": None`` with ``with_val_result`` (upstream Dassl since 2022-08-06, commit d634125 renamed
    "result"; the ProGrad fork and older upstream have no such key), and the text file
    ``<directory>/<model_name>/checkpoint`` holding the file's name. ``epoch`` is the 1-based count (the trainer
    passes ``self.epoch + 1``); the recipes save only after the last epoch (``TRAIN.CHECKPOINT_FREQ`` 0). The
    scheduler's state holds the cosine successor object, which holds the optimizer object with its parameters:
    that is what a real file holds, and why loading one needs the classes (vlprompt.safe_pickle placeholders)."""
    folder = Path(directory) / model_name
    folder.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": OrderedDict((k, v) for k, v in state_dict.items()), "epoch": epoch,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if with_val_result:
        state["val_result"] = None
    path = folder / f"model.pth.tar-{epoch}"
    with _dassl_importable():
        torch.save(state, path)
    (folder / "checkpoint").write_text(f"{path.name}\n")
    return path


def registered_optimizer_and_scheduler(params: Sequence[torch.nn.Parameter], name: str, lr: float, epoch: int,
                                       max_epoch: int, **optim_kw):
    """The optimizer and scheduler of a registered module as they stand after ``epoch`` epochs: built like
    Dassl builds them for ``register_model`` (fork:dassl/engine/trainer.py:87-107; e.g. kgcoop.py:280-282), the
    scheduler stepped once per epoch, and optimizer state for every parameter that trains (``requires_grad``)
    in the form torch writes it (SGD: a momentum buffer; Adam: step, exp_avg, exp_avg_sq). The state's values
    are zeros: the tests need the file's layout, not a trajectory."""
    optimizer = dassl_optimizer(params, name, lr, **optim_kw)
    scheduler = dassl_scheduler(optimizer, max_epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epoch):
            scheduler.step()
    for p in params:
        if not p.requires_grad:
            continue
        if name == "sgd":
            optimizer.state[p] = {"momentum_buffer": torch.zeros_like(p)}
        else:
            optimizer.state[p] = {"step": torch.tensor(float(epoch)), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    return optimizer, scheduler


def load_dropping(state_dict: Mapping[str, torch.Tensor], dropped: Sequence[str]) -> OrderedDict:
    """What the originals' ``load_model`` hands to ``load_state_dict(strict=False)``: the saved state minus the
    names it deletes (kgcoop.py:359-367, prograd.py:429-434, taskres.py:337-342, clip_adapter.py:205-210)."""
    return OrderedDict((k, v) for k, v in state_dict.items() if k not in dropped)


def yacs_text(cfg: Mapping, indent: int = 0) -> str:
    """A nested config printed as yacs' ``CfgNode.__str__`` prints it (keys sorted, two-space indent, leaves
    through ``str``): the ``** Config **`` block of Dassl's log.txt."""
    lines = []
    for key in sorted(cfg):
        value = cfg[key]
        if isinstance(value, Mapping):
            lines.append(" " * indent + f"{key}:")
            lines.append(yacs_text(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


def write_dassl_log(directory, args: Mapping, cfg: Mapping) -> Path:
    """The head of ``<output>/log.txt`` that Dassl's logger records from ``train.py``'s ``print_args``
    (KgCoOp/train.py:33-44, ProGrad.public/train.py, TaskRes/train.py): the arguments sorted, then the config."""
    text = "***************\n** Arguments **\n***************\n"
    text += "".join(f"{k}: {args[k]}\n" for k in sorted(args))
    text += "************\n** Config **\n************\n" + yacs_text(cfg) + "\n"
    text += "Collecting env info ...\n** System info **\n"
    path = Path(directory) / "log.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path

