"""ZS-LP and CLAP (CLass-Adaptive linear Probe), written out from jusiro/CLAP@dbdf4095b3d824546474c725539b9f4efff3ca0e
(2025-06-07, MIT). Files cited: ``trainers/adapters.py`` (everything of the method), ``train.py`` (config
defaults), ``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``, ``scripts/adapt.sh``, ``datasets/imagenet_templates.py``,
and the upstream Dassl it runs on (KaiyangZhou/Dassl.pytorch@c61a1b570ac6333bd50fb5ae06aea59002fb20bb:
``dassl/optim/lr_scheduler.py``, ``dassl/optim/optimizer.py``, ``dassl/data/data_manager.py``,
``dassl/engine/trainer.py``, ``dassl/utils/torchtools.py``, ``dassl/config/defaults.py``).

In torch (fp32) on open_clip modules. Precision of the original: with the default ``PREC fp16`` (train.py:95;
``fp32``/``amp`` would crash in ``_get_base_text_features``, whose text encoder stays on the CPU while the
tokens go to CUDA, adapters.py:93-123; read from the code, not run) the class text features are computed by
the fp16 CLIP, then the whole model is cast to fp32 (adapters.py:520) and the image tower runs in fp32 too (the
fp16 cast of the input raises inside ``try`` and the ``except`` falls back to ``image.float()``,
adapters.py:311-314); matmuls may use TF32 (adapters.py:24-27). Only the fp16 text features are an artefact.

Shapes: C classes, D the embedding width, N support images, R = 20 augmented repetitions; the prototypes
and the text features are (C, D) (row per class, unlike Tip-Adapter's (D, C)).
"""
from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from originals.tip_adapter import encode_image, tokenize

REPO = "jusiro/CLAP"
COMMIT = "dbdf4095b3d824546474c725539b9f4efff3ca0e"
DASSL = "KaiyangZhou/Dassl.pytorch@c61a1b570ac6333bd50fb5ae06aea59002fb20bb"

#: trainers/adapters.py:31-47, keyed by Dassl's ``DATASET.NAME``.
CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
#: datasets/imagenet_templates.py:86-94.
IMAGENET_TEMPLATES_SELECT = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                             "a {} in a video game.", "art of the {}.", "a photo of the small {}."]

#: The recipe of scripts/adapt.sh + SGD_lr1e-1_B256_ep300.yaml + train.py + Dassl defaults (file:line in
#: RECIPES_feature_adapters.md).
CONFIG = {"init": "ZS", "constraint": "l2", "backbone": "RN50", "lr": 0.1, "epochs": 300, "batch_size": 256,
          "momentum": 0.9, "weight_decay": 0.0, "warmup_epochs": 1, "warmup_lr": 1e-5, "repetitions": 20,
          "seeds": (1, 2, 3), "crop_scale": (0.08, 1.0)}


# -- text side --------------------------------------------------------------------------------------------
def templates_for(dataset: str) -> list[str]:
    """adapters.py:112-116: ImageNet: CoOp's 7 templates + the custom one (8); any other dataset: its custom
    template only. Quirk: ``TEMPLATES = IMAGENET_TEMPLATES_SELECT; TEMPLATES += [...]`` extends the MODULE-LEVEL
    list in place, so every further construction for ImageNet in the same process appends the custom template
    once more (the grid search of adapters.py:585-588 does not rebuild the text features, so one run is
    unaffected). Not reproduced: a fresh list each call."""
    if dataset == "ImageNet":
        return IMAGENET_TEMPLATES_SELECT + [CUSTOM_TEMPLATES[dataset]]
    return [CUSTOM_TEMPLATES[dataset]]


def text_encoder(model, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """TextEncoder.forward (adapters.py:77-88) on token embeddings (T, 77, W): + positions, causal transformer,
    ln_final, the EOT position through the projection. (T, D), not normalised."""
    x = embeddings + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


@torch.no_grad()
def base_text_features(model, classnames: list[str], dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """_get_base_text_features (adapters.py:91-128): per class, every template of :func:`templates_for` with the
    class name AS GIVEN (no ``_`` -> space: Dassl's class names keep their underscores, e.g. OxfordPets'
    "american_bulldog"), token_embedding -> :func:`text_encoder`; the class feature is the MEAN of the
    UNnormalised template features (no per-template normalisation). Returns (mean (C, D), all (C, T, D))."""
    templates = templates_for(dataset)
    feats = []
    for name in classnames:
        tokens = tokenize([t.format(name) for t in templates])
        feats.append(text_encoder(model, model.token_embedding(tokens), tokens))
    all_feats = torch.stack(feats)
    return all_feats.mean(1), all_feats


# -- image side -------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(model, views: torch.Tensor) -> torch.Tensor:
    """extract_features (adapters.py:788-827), non-Tip branch: ``views`` (R, N, 3, H, W) are R passes over the
    support set, each in the train loader's order (RandomSampler: a new order per pass) with the TRAIN
    augmentation (Dassl: RandomResizedCrop(224, scale (0.08, 1), bicubic) + flip + CLIP normalisation; the
    attempt to switch to the test transform when ``transforms`` is False edits a copy that is then discarded,
    l.795-805, so passes are always augmented). R = 20 (``epochs_aumentation``, l.143). Features are NOT
    normalised; the R passes are concatenated: (R N, D). The labels follow the same order, ``labels.reshape(-1)``."""
    return torch.cat([encode_image(model, v) for v in views])


def zs_lp_logits(features: torch.Tensor, prototypes: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """forward_lp (adapters.py:343-354): ``exp(logit_scale) * norm(f) @ norm(w)^T``, (B, D) x (C, D) -> (B, C);
    the model's own logit scale (100 for OpenAI CLIP)."""
    f = features / features.norm(dim=-1, keepdim=True)
    w = prototypes / prototypes.norm(dim=-1, keepdim=True)
    return f @ w.t() * logit_scale.exp()


def init_prototypes(base: torch.Tensor, init: str = "ZS") -> torch.nn.Parameter:
    """AdapterMethod.__init__ (adapters.py:145-150): ZS-LP starts from a copy of the zero-shot class features
    (the unnormalised template mean); ``RANDOM`` (the plain LP baseline) from ``kaiming_normal_`` on an empty
    (C, D) tensor (torch's global RNG)."""
    if init == "RANDOM":
        return torch.nn.Parameter(torch.nn.init.kaiming_normal_(torch.empty(base.shape)))
    if "ZS" in init:
        return torch.nn.Parameter(base.clone())
    raise ValueError(f"init {init!r}: only ZS and RANDOM are written out here")


# -- CLAP's penalty ---------------------------------------------------------------------------------------
def init_lagrangian_multipliers(labels: torch.Tensor, zs_logits: torch.Tensor, constraint: str = "l2") -> torch.Tensor:
    """init_lagrangian_multipliers (adapters.py:232-252) on the zero-shot logits of all R N augmented support
    features (computed by ``forward_lp`` while the prototypes still equal the text features):
    lambda_c = diag(softmax(logits)^T onehot) / count_c = the mean zero-shot probability of the TRUE class over
    class c's augmented samples. Substrings of ``constraint`` change it: "balanced" -> all ones; "corrected" ->
    lambda * C / sum(lambda); "constant" -> every lambda_c = mean(lambda) (after "corrected"). (C,)"""
    n_classes = zs_logits.shape[-1]
    if "balanced" in constraint:
        return torch.ones(n_classes, dtype=torch.float)
    with torch.no_grad():
        one_hot = F.one_hot(labels).to(torch.float32)
        performance = torch.diag(torch.softmax(zs_logits, -1).t() @ one_hot) / one_hot.sum(0)
        if "corrected" in constraint:
            performance *= n_classes / torch.sum(performance).item()
        if "constant" in constraint:
            performance = torch.ones(n_classes, dtype=torch.float) * torch.mean(performance).item()
    return performance.clone()


def zero_shot_constraint(prototypes: torch.Tensor, base: torch.Tensor, multipliers: torch.Tensor,
                         constraint: str = "l2") -> torch.Tensor:
    """zero_shot_constraint (adapters.py:219-230): ``mean_c lambda_c d_c`` with d_c = ||w_c - t_c||^2 ("l2", on the
    UNnormalised prototypes and text features) or 1 - cos(w_c, t_c) ("cosine"). A scalar added to the CE."""
    if "l2" in constraint:
        dissimilarity = (prototypes - base.clone()).pow(2).sum(-1)
    elif "cosine" in constraint:
        dissimilarity = 1 - F.cosine_similarity(prototypes, base.clone())
    else:
        raise ValueError(f"constraint {constraint!r}: the original asserts False")
    return torch.mean(multipliers * dissimilarity)


def outer_step(prototypes: torch.Tensor, base: torch.Tensor, multipliers: torch.Tensor,
               penalty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """outer_step (adapters.py:254-284), run after every epoch only when "adaptative" is in the constraint
    string (adapters.py:631-632; the released scripts use plain "l2", so the default run never calls it).
    With h_c = ||w_c - t_c||^2 (always l2) and the PHR function's gradient: lambda <- max(lambda + rho h, 0)
    (``torch.where(lambda + rho h >= 0, ...)``), then rho <- h (the penalty parameter is SET to the current
    dissimilarities, l.281). rho starts at zeros (l.252), so the first call leaves lambda unchanged. The loss
    keeps using ``mean(lambda * d)``, not the PHR value. Returns (new lambda, new rho)."""
    with torch.no_grad():
        h = (prototypes - base.clone()).pow(2).sum(-1)
        x = multipliers + penalty * h
        new_multipliers = torch.where(x >= 0, x, torch.zeros_like(h))
    return new_multipliers.detach().clone(), h.detach().clone()


def clap_loss(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, base: torch.Tensor,
              multipliers: torch.Tensor, logit_scale: torch.Tensor, constraint: str = "l2") -> torch.Tensor:
    """forward_backward (adapters.py:698-707): CE (mean) of :func:`zs_lp_logits` on a batch of unnormalised
    features (B, D), plus :func:`zero_shot_constraint` unless ``constraint == "none"`` (ZS-LP)."""
    loss = F.cross_entropy(zs_lp_logits(features, prototypes, logit_scale), labels)
    if constraint != "none":
        loss = loss + zero_shot_constraint(prototypes, base, multipliers, constraint)
    return loss


# -- Dassl's schedule and batches -------------------------------------------------------------------------
def dassl_lr(epoch: int, base_lr: float = 0.1, max_epoch: int = 300, warmup_epochs: int = 1,
             warmup_lr: float = 1e-5) -> float:
    """The learning rate of ``epoch`` (0-based) under Dassl's ``cosine`` + constant warm-up (lr_scheduler.py:35-54,
    128-141, WARMUP_RECOUNT True; stepped once per epoch at its last batch, adapters.py:720-721): ``warmup_lr``
    for the first ``warmup_epochs`` epochs, counted inside ``max_epoch``; then CosineAnnealingLR(T_max=max_epoch)
    restarted at the warm-up's end: base_lr (1 + cos(pi (epoch - warmup) / max_epoch)) / 2. So the cosine never
    reaches 0 (its last epoch sits at step max_epoch - 1 - warmup of max_epoch)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return base_lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / max_epoch)) / 2


def num_batches(n_images: int, batch_size: int = 256) -> int:
    """``len(train_loader_x)`` (data_manager.py:38-45: ``drop_last = is_train and len(data) >= batch_size``):
    N // B when N >= B, else 1. CLAP runs that many steps per epoch over its R N feature pool (adapters.py:431)."""
    return n_images // batch_size if n_images >= batch_size else math.ceil(n_images / batch_size)


# -- the loop ---------------------------------------------------------------------------------------------
def clap_train(features: torch.Tensor, labels: torch.Tensor, base: torch.Tensor, logit_scale: torch.Tensor,
               n_images: int, constraint: str = "l2", init: str = "ZS", epochs: int = 300, lr: float = 0.1,
               batch_size: int = 256, momentum: float = 0.9, weight_decay: float = 0.0, warmup_epochs: int = 1,
               warmup_lr: float = 1e-5, zs_logits: torch.Tensor | None = None, orders: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> dict:
    """ADAPTER.train / run_epoch / forward_backward (adapters.py:528-634, 421-484, 679-724) for ZS-LP
    (``constraint="none"``) and CLAP (``"l2"``; add "adaptative" for the augmented-Lagrangian variant).

    - ``features`` (R N, D) unnormalised, ``labels`` (R N,): :func:`extract_features`'s pool; ``base`` (C, D) the
      text features; ``n_images`` N, the support size (it sets the steps per epoch, :func:`num_batches`).
    - lambda = :func:`init_lagrangian_multipliers` on ``zs_logits`` (default: :func:`zs_lp_logits` of the pool with
      the text features), once, before training (adapters.py:559-562); fixed unless "adaptative".
    - Each epoch: a fresh permutation of the WHOLE pool (``np.random.rand(RN).argsort()``, l.445; ``orders``
      (epochs, RN) or drawn from ``generator``), then ``num_batches(N)`` steps on its consecutive slices of
      ``batch_size``: so an epoch sees about N of the R N features, and with N < 256 ONE step on 256 of them.
    - Step: ``CE(zs_lp_logits(batch)) + zero_shot_constraint`` (omitted for "none"); Dassl's
      ``model_backward_and_update``: zero_grad, backward, ``SGD(momentum 0.9, weight_decay 0, dampening 0,
      nesterov False)`` step (optimizer.py:105-113; config l.16-23; defaults.py:154-156).
    - lr per epoch: :func:`dassl_lr` (epoch 0 at 1e-5, then cosine from 0.1).
    - After each epoch, with "adaptative": :func:`outer_step`. No validation, no model selection: the last
      epoch is the model (saved as model.pth.tar-300 and loaded with ``--load-epoch 300``).

    Returns {"prototypes" (C, D), "multipliers", "penalty", "losses" (per step), "lrs" (per epoch), "optimizer"
    (the SGD, whose momentum buffer a checkpoint holds)}."""
    prototypes = init_prototypes(base, init)
    optimizer = torch.optim.SGD([prototypes], lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=0,
                                nesterov=False)
    use_penalty = constraint != "none"
    multipliers = torch.zeros(base.shape[0])
    penalty = torch.zeros(base.shape[0])
    if use_penalty:
        if zs_logits is None:
            with torch.no_grad():
                zs_logits = zs_lp_logits(features, base, logit_scale)
        multipliers = init_lagrangian_multipliers(labels, zs_logits, constraint)
        penalty = torch.zeros_like(multipliers)
    steps = num_batches(n_images, batch_size)
    losses, lrs = [], []
    for epoch in range(epochs):
        lrs.append(dassl_lr(epoch, lr, epochs, warmup_epochs, warmup_lr))
        for group in optimizer.param_groups:
            group["lr"] = lrs[-1]
        order = orders[epoch] if orders is not None else torch.randperm(features.shape[0], generator=generator)
        for b in range(steps):
            idx = order[b * batch_size:(b + 1) * batch_size]
            loss = clap_loss(features[idx], labels[idx], prototypes, base, multipliers, logit_scale, constraint)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if "adaptative" in constraint:
            multipliers, penalty = outer_step(prototypes, base, multipliers, penalty)
    return {"prototypes": prototypes.detach().clone(), "multipliers": multipliers, "penalty": penalty,
            "losses": losses, "lrs": lrs, "optimizer": optimizer}


# -- the files the original writes ------------------------------------------------------------------------
def write_original_checkpoint(directory: str | os.PathLike, prototypes: torch.Tensor, base: torch.Tensor,
                              epoch: int = 300, lr: float = 0.1, max_epoch: int = 300, warmup_epochs: int = 1,
                              warmup_lr: float = 1e-5, momentum_buffer: torch.Tensor | None = None,
                              config: dict | None = None) -> Path:
    """Dassl's save_model (trainer.py:118-145) + save_checkpoint (torchtools.py:27-69), called by after_epoch at
    the last epoch only (trainer.py:422-443; CHECKPOINT_FREQ 0): ``<output_dir>/adapter/model.pth.tar-<epoch>``,
    one ``torch.save`` of {"state_dict", "epoch", "optimizer", "scheduler", "val_result": None}, and
    ``<output_dir>/adapter/checkpoint`` naming it. The model is registered as "adapter" (adapters.py:524).

    - ``state_dict`` = AdapterMethod.state_dict(): ``prototypes`` (the learned (C, D)) then the buffer
      ``base_text_features`` (the zero-shot (C, D) text features, fp32 after ``model.float()``). The multipliers
      lambda and rho are plain attributes: NOT saved. The loader (adapters.py:726-786) drops ``token_prefix`` /
      ``token_suffix`` if present and loads with ``strict=False``; for ImageNet-A / -R it re-indexes both
      tensors with the 200-class index lists.
    - ``optimizer``: the SGD state dict (momentum buffer of the prototypes).
    - ``scheduler``: ConstantWarmupScheduler.state_dict() = its ``__dict__`` minus the optimizer: a dict whose
      ``successor`` is the pickled CosineAnnealingLR object (with the SGD optimizer inside it).
    - ``config`` (optional): written into ``<output_dir>/log.txt`` as Dassl's train.py prints it (the yacs dump
      between "** Config **" and "Collecting env info").
    The original's tensors are CUDA tensors; these are on the CPU. Returns the checkpoint path."""
    folder = Path(directory) / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    param = torch.nn.Parameter(prototypes.detach().float().clone())
    optimizer = torch.optim.SGD([param], lr=lr, momentum=0.9, weight_decay=0.0, dampening=0, nesterov=False)
    optimizer.state[param]["momentum_buffer"] = (torch.zeros_like(param) if momentum_buffer is None
                                                 else momentum_buffer.detach().float().clone())
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(max_epoch))
    with warnings.catch_warnings():  # torch warns that this optimizer never stepped: it only carries state here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(warmup_epochs, epoch):  # one successor step at the end of every epoch after the warm-up
            successor.step()
    scheduler = {"cons_lr": warmup_lr, "successor": successor, "warmup_epoch": warmup_epochs,
                 "base_lrs": [lr], "last_epoch": warmup_epochs, "verbose": False, "_step_count": warmup_epochs + 1,
                 "_get_lr_called_within_step": False, "_last_lr": successor.get_last_lr()}
    state_dict = OrderedDict([("prototypes", prototypes.detach().float().clone()),
                              ("base_text_features", base.detach().float().clone())])
    path = folder / f"model.pth.tar-{epoch}"
    torch.save({"state_dict": state_dict, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler, "val_result": None}, path)
    (folder / "checkpoint").write_text(f"model.pth.tar-{epoch}\n")
    if config is not None:
        text = ("***************\n** Arguments **\n***************\n************\n** Config **\n************\n"
                + yaml.safe_dump(config) + "Collecting env info ...\n")
        (Path(directory) / "log.txt").write_text(text)
    return path
