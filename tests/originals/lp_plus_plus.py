"""LP++, written out from FereshteShakeri/FewShot-CLIP-Strong-Baseline@f81054f995b060f8348d20e7306e15889b70c786
(2024-04-08; no licence file: read, never copied). Files cited: ``methods/linear_probe_p2.py`` (the method),
``methods/utils.py``, ``main.py``, ``main_imagenet.py``, ``utils.py``, ``datasets/*.py``, ``configs/base.yaml``.
The repository is built on Tip-Adapter's code: its zero-shot classifier (``utils.py:35-52``) and val / test
feature extraction (``utils.py:55-77``) are Tip-Adapter's, so :mod:`originals.tip_adapter`'s restatements are used.

Everything in torch (fp32) on open_clip modules. The original's CLIP is fp16 on CUDA, so its features, the
linear head (``.to(model.dtype)``), alpha and both step sizes are fp16 (``F^T F`` is even formed in fp16 before
``scipy.linalg.eigh``); precision artefacts, documented, not reproduced.

Shapes: N = C x shots support images, D the embedding width, C classes; ``clip_weights`` (D, C) as in
Tip-Adapter; the linear head's weight (C, D), bias (C,); alpha (1, C).
"""
from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from originals.tip_adapter import TEMPLATES as TIP_TEMPLATES
from originals.tip_adapter import clip_classifier, pre_load_features  # noqa: F401 (re-exported, see above)

REPO = "FereshteShakeri/FewShot-CLIP-Strong-Baseline"
COMMIT = "f81054f995b060f8348d20e7306e15889b70c786"

#: datasets/<name>.py: the same single templates as Tip-Adapter's (caltech101.py:7, dtd.py:8, eurosat.py:7,
#: fgvc.py:6, food101.py:7, oxford_flowers.py:10, oxford_pets.py:11, stanford_cars.py:8, sun397.py:8,
#: ucf101.py:8) and ImageNet's 7-template ensemble (imagenet.py:178-184).
TEMPLATES: dict[str, list[str]] = dict(TIP_TEMPLATES)

#: configs/base.yaml (per-dataset configs only set ``dataset``): method l.8, shots l.9 (4; the README runs pass
#: ``shots 16`` etc. on the command line), tasks l.10, backbone l.11, train_epoch l.17 (the number of full-batch
#: steps), batch_size l.18 (feature-extraction loaders only). lr l.16 is not used by LP++.
CONFIG = {"method": "LinearProbe_P2", "shots": 4, "tasks": 10, "backbone": "RN50", "train_epoch": 300,
          "batch_size": 256}
#: main.py:69-74: the support set is extracted ONCE through this augmentation (one random view per image).
TRAIN_CROP_SCALE = (0.5, 1.0)
ALPHA_EVERY = 10        # linear_probe_p2.py:138: alpha moves every 10 steps
ALPHA_INIT_SCALE = 250  # linear_probe_p2.py:28


# -- the few-shot tasks -----------------------------------------------------------------------------------
def generate_fewshot(items: list, labels: list[int], num_shots: int, rng: random.Random) -> list:
    """DatasetBase.generate_fewshot_dataset (datasets/utils.py:210-252, = Tip-Adapter's): items grouped by label
    in order of first appearance; per label ``rng.sample(items, K)`` if it has at least K, else
    ``rng.choices(items, k=K)`` (with replacement). ``rng`` plays Python's global ``random`` (main.py:90 seeds it
    with ``random.seed(i + 1)`` for task i = 0..tasks-1; train is drawn, then val: main.py:93-94).

    Quirk (datasets/{eurosat,fgvc,food101,stanford_cars,sun397,ucf101}.py ``__init__``): those six datasets
    already reduce train AND val to K shots at construction, under main.py:60's seed 1; each task then draws
    K of those K, a mere reordering, so their 10 "tasks" share the same support and val images and differ only
    by the augmentation draw and the head's random bias. Caltech101, DTD, OxfordPets and OxfordFlowers sample
    from the full splits (their __init__ line is commented out). The val set is K-shot from CoOp's val split
    (not min(K, 4)). ImageNet (datasets/imagenet.py:226-254) samples 2K train images per class, the first K
    for training and the next K as "val", and that val copy keeps the TRAIN augmentation."""
    by_label = defaultdict(list)
    for item, label in zip(items, labels):
        by_label[label].append(item)
    out = []
    for group in by_label.values():
        out.extend(rng.sample(group, num_shots) if len(group) >= num_shots else rng.choices(group, k=num_shots))
    return out


def confidence_interval(accs) -> tuple[float, float]:
    """utils.py:23-33: (mean, 1.96 * std / sqrt(n)) over the tasks' test accuracies, numpy's population std."""
    a = 1.0 * np.array(accs)
    return float(np.mean(a)), float(1.96 * (np.std(a) / np.sqrt(a.shape[0])))


# -- initialisation and step sizes ------------------------------------------------------------------------
def compute_centroids(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """methods/utils.py:111-124: one-hot(labels)^T @ features = the class SUMS of the support features (the
    division by the counts is commented out, l.122). (N, D) -> (C, D), C = number of distinct labels."""
    one_hot = F.one_hot(labels, labels.unique().numel()).to(features.dtype)
    return one_hot.t() @ features


def compute_centroids_alpha(zs_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """methods/utils.py:96-108 on ``zs_logits = features @ clip_weights`` (N, C): the elementwise product with the
    one-hot labels keeps each image's cosine to its OWN class text; summed per class over count -> (C,) the mean
    own-class zero-shot cosine of each class's support images."""
    one_hot = F.one_hot(labels, labels.unique().numel()).to(zs_logits.dtype)
    return (one_hot * zs_logits / one_hot.sum(0, keepdim=True)).sum(0)


def calculate_init_alpha(features: torch.Tensor, labels: torch.Tensor, shots: int,
                         clip_weights: torch.Tensor) -> torch.Tensor:
    """linear_probe_p2.py:24-30: ``250 / shots * (shots * alpha_tilde)`` averaged over classes, i.e.
    250 x mean_c mean_{i in c} f_i . t_c, one scalar for every class (float64 0-dim tensor)."""
    alpha_tilde = compute_centroids_alpha(features @ clip_weights, labels).double() * shots
    alpha_init = ALPHA_INIT_SCALE / shots * alpha_tilde
    return torch.mean(alpha_init)


def calculate_lr_alpha(features: torch.Tensor, clip_weights: torch.Tensor) -> torch.Tensor:
    """linear_probe_p2.py:16-22: N / (4 max_c ||F t_c||^2) with F t_c the column c of ``features @ clip_weights``."""
    ftT = features @ clip_weights
    max_sum = torch.sum(torch.pow(ftT, 2), dim=0).max()
    return features.shape[0] / (max_sum * 4)


def calculate_lr_w(features: torch.Tensor) -> float:
    """linear_probe_p2.py:32-39: 4N / lambda_max(F^T F), the largest eigenvalue from ``scipy.linalg.eigh`` of the
    (D, D) matrix (computed, as there, with its eigenvectors, on the CPU)."""
    ff_t = (features.T @ features).detach().cpu().numpy()
    w, _ = scipy.linalg.eigh(ff_t)
    return (4 * features.shape[0]) / max(w)


def init_classifier(features: torch.Tensor, labels: torch.Tensor, shots: int) -> torch.nn.Linear:
    """linear_probe_p2.py:94-97: ``nn.Linear(D, int(N / shots), bias=True)`` -- built like that, so it draws from
    torch's global RNG exactly as the original (kaiming-uniform weight, then the bias) -- whose weight is then
    replaced by the class sums (:func:`compute_centroids`). The BIAS KEEPS nn.Linear's random default init,
    U(-1/sqrt(D), 1/sqrt(D)). C comes from N / shots: it assumes exactly ``shots`` images per class."""
    layer = torch.nn.Linear(features.shape[1], int(features.shape[0] / shots), bias=True).to(features.dtype)
    layer.weight.data = compute_centroids(features, labels)
    return layer


def lpp_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor,
               clip_weights: torch.Tensor) -> torch.Tensor:
    """linear_probe_p2.py:127-129: ``Linear(f) + (1_N alpha) * (f W_text)``: (N, D) -> (N, C). The text term is the
    raw cosine (no logit scale); alpha (1, C) is broadcast to every row by a (N, 1) x (1, C) product."""
    vision = F.linear(features, weight, bias)
    text = features @ clip_weights
    return vision + torch.ones(features.shape[0], 1, dtype=features.dtype) @ alpha * text


def lpp_loss(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             alpha: torch.Tensor, clip_weights: torch.Tensor) -> torch.Tensor:
    """linear_probe_p2.py:127-130: CE (mean over all N support images) of :func:`lpp_logits`; its gradients
    reach weight, bias (through SGD) and alpha (accumulated, see :func:`lpp_train`)."""
    return F.cross_entropy(lpp_logits(features, weight, bias, alpha, clip_weights), labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # linear_probe_p2.py:145: np.mean(argmax == labels) * 100.0 (a float64)
    return float(np.mean(logits.argmax(dim=1).cpu().numpy() == labels.cpu().numpy()) * 100.0)


# -- the loop ---------------------------------------------------------------------------------------------
def lpp_train(features: torch.Tensor, labels: torch.Tensor, val_features: torch.Tensor, val_labels: torch.Tensor,
              clip_weights: torch.Tensor, shots: int, epochs: int = 300, test_features: torch.Tensor | None = None,
              test_labels: torch.Tensor | None = None, classifier: torch.nn.Linear | None = None) -> dict:
    """linear_probe_p2.py:94-167, LP++'s full-batch loop on L2-normalised features.

    - ``features`` (N, D): the support set, ONE augmented view per image, extracted once (linear_probe_p2.py:
      70-79): the train loader applies main.py:69-74's RandomResizedCrop(224, scale (0.5, 1)) + flip, and is
      shuffled because base.yaml:36 sets ``finetune: True`` (main.py:96-101); the loop below is invariant to
      that order up to summation order. ``val_features``: the K-shot val set through CLIP's test preprocess
      (main.py:102-103).
    - Head: :func:`init_classifier` (pass ``classifier`` to reuse one); lr_w = :func:`calculate_lr_w`,
      alpha_0 = :func:`calculate_init_alpha` for every class, lr_alpha = :func:`calculate_lr_alpha`.
    - Each of the ``epochs`` (300) steps: logits on ALL support features, CE (mean), ``SGD(head, lr_w,
      momentum 0.9)`` zero_grad / backward / step (no weight decay, no dampening, constant lr). alpha is not in
      the optimizer: it is a leaf tensor whose ``.grad`` is NEVER ZEROED, so after step t it holds the sum of
      the alpha-gradients of steps 0..t; every 10th step (``(epoch + 1) % 10 == 0``) ``alpha -= lr_alpha *
      alpha.grad`` uses that running sum (l.107, 137-139).
    - After each step, val accuracy; ``>=`` the best so far (ties: the LATER step wins) records the step and,
      if test features are given, the test accuracy at that step (l.148-155). The reported task accuracy is
      that test accuracy (l.167). The weights are not saved (the torch.save is commented out, l.156).

    Returns {"weight", "bias", "alpha" (final), "best_epoch", "best_val_acc", "best_state" (weight, bias, alpha
    at the best step), "test_acc" (at the best step, or None), "losses", "lr_w", "lr_alpha", "alpha_init"}."""
    if classifier is None:
        classifier = init_classifier(features, labels, shots)
    lr_w = calculate_lr_w(features)
    alpha_init = calculate_init_alpha(features, labels, shots, clip_weights)
    alpha = (alpha_init * torch.ones(1, classifier.out_features, dtype=features.dtype)).requires_grad_(True)
    lr_alpha = calculate_lr_alpha(features, clip_weights)
    optimizer = torch.optim.SGD(classifier.parameters(), lr_w, momentum=0.9)
    best_acc, best_epoch, best_state, test_acc = 0.0, 0, None, None
    losses = []
    for epoch in range(epochs):
        loss = lpp_loss(features, labels, classifier.weight, classifier.bias, alpha, clip_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (epoch + 1) % ALPHA_EVERY == 0:
            alpha.data -= lr_alpha * alpha.grad.data
        with torch.no_grad():
            acc_val = _accuracy(lpp_logits(val_features, classifier.weight, classifier.bias, alpha, clip_weights),
                                val_labels)
            if acc_val >= best_acc:
                best_acc, best_epoch = acc_val, epoch
                best_state = (classifier.weight.detach().clone(), classifier.bias.detach().clone(),
                              alpha.detach().clone())
                if test_features is not None:
                    test_acc = _accuracy(lpp_logits(test_features, classifier.weight, classifier.bias, alpha,
                                                    clip_weights), test_labels)
    return {"weight": classifier.weight.detach().clone(), "bias": classifier.bias.detach().clone(),
            "alpha": alpha.detach().clone(), "best_epoch": best_epoch, "best_val_acc": best_acc,
            "best_state": best_state, "test_acc": test_acc, "losses": losses, "lr_w": lr_w,
            "lr_alpha": lr_alpha, "alpha_init": alpha_init}


# -- the files the original writes ------------------------------------------------------------------------
def write_original_outputs(directory: str | os.PathLike, dataset: str, shots: int, task_accs: list[float],
                           test_features: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
                           dtype: torch.dtype = torch.float16) -> dict:
    """LP++ SAVES NO WEIGHTS (the ``torch.save(classifier, ...)`` of linear_probe_p2.py:156 is commented out):
    a run leaves only

    - ``<output_dir>/<dataset>.csv`` (main.py:121-145; output_dir ``./results``, configs/base.yaml:3): one row per
      run appended to the existing rows (read back with pandas), columns ``acc,std,method,num_shots,tasks``:
      the mean test accuracy over the tasks and the 95 % half-width (:func:`confidence_interval`), both rounded
      to 4 decimals, ``LinearProbe_P2``, the shots and the number of tasks (written here with the csv module in
      pandas' default layout: header, no index column);
    - ``caches/<dataset>/test_f.pt`` (L2-normalised fp16 test features) and ``test_l.pt`` (int64 labels)
      (utils.py:70-71), as Tip-Adapter writes them.

    So a trained LP++ head cannot be imported from the original's files. Returns {name: path}."""
    directory = Path(directory)
    results = directory / "results"
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / f"{dataset}.csv"
    rows = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    acc, half_width = confidence_interval(task_accs)
    rows.append({"acc": round(acc, 4), "std": round(half_width, 4), "method": CONFIG["method"],
                 "num_shots": shots, "tasks": len(task_accs)})
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["acc", "std", "method", "num_shots", "tasks"])
        writer.writeheader()
        writer.writerows(rows)
    paths = {"csv": csv_path}
    if test_features is not None:
        folder = directory / "caches" / dataset
        folder.mkdir(parents=True, exist_ok=True)
        paths["test_f"], paths["test_l"] = folder / "test_f.pt", folder / "test_l.pt"
        torch.save(test_features.detach().to(dtype), paths["test_f"])
        torch.save(test_labels.detach().long(), paths["test_l"])
    return paths

