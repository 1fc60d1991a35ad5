"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022), as gaopengcuhk/Tip-Adapter@d0e2d6f computes them
(``main.py``, ``utils.py``, ``configs/<dataset>.yaml``).

A cache of the few-shot training images sits beside zero-shot CLIP. For a normalised image feature f (B, E):

    logits = 100 f W^T + alpha * A L,   A = exp(-(beta - beta f K^T))   (main.py:32-42)

W (K, E): the zero-shot classifier (each template's text feature normalised, averaged, renormalised:
``utils.py:18-35``); K (N, E): the cache keys, one per training image, the L2-normalised MEAN of the UNnormalised
features of its ``cache_views`` augmented views (``utils.py:44-61``: the 10 passes are averaged before the
normalisation); L (N, K): the one-hot labels of the cached images (``utils.py:62``). Tip-Adapter learns nothing;
Tip-Adapter-F learns the keys (``main.py:69-70``: the adapter's weight is the cache keys, the values stay fixed).

What the original does that produced its numbers, and what vlprompt does (file:line at d0e2d6f):

* the zero-shot term is scaled by a literal 100 (``main.py:32``), not the model's logit scale: kept
  (:data:`ZERO_SHOT_SCALE`; OpenAI's CLIP has exactly 100), so alpha means what the recipe's values mean;
* the cache's augmentation is RandomResizedCrop(scale 0.5-1) + flip (``main.py:173-178``): ``data.crop_scale``
  (the method's data default), so the cached views are the recipe's and are keyed by it;
* the search of (alpha, beta) (``utils.py:99-129``): beta_i = 0.1 + i (scale_beta - 0.1) / steps_beta for i in
  range(steps_beta) (the scale itself is never tried), alpha likewise; beta in the outer loop; the first pair
  STRICTLY better than the best so far is kept, starting from (0, 0) at 0 % -- so a split where nothing scores
  gives alpha = beta = 0, the zero-shot classifier: all reproduced;
* the split searched: the original's ``main.py`` searches the FULL val split (``datasets/*.py``), its
  ``main_imagenet.py:43,110`` the TEST set. vlprompt never selects on the test set: the search runs on the run's
  val split -- CoOp's min(shots, 4) per class by default, the whole val split with ``--val-shots 0`` (the
  original's protocol) -- and ImageNet, which has no val split, keeps the recipe's initial alpha and beta;
* Tip-Adapter-F (``main.py:66-141``): AdamW(lr 0.001, eps 1e-4, weight decay 0.01), cosine annealing stepped
  after every iteration over epochs x batches, batch 256 with the last smaller batch kept, CE of the logits with
  the INITIAL alpha / beta; the epoch kept is the one with the best accuracy (initial alpha / beta) on the split
  evaluated after each epoch -- the TEST set in the original (``main.py:112-124``, issue #11): vlprompt evaluates
  the val split (``eval_every 1``, the first best epoch, as ``acc > best_acc``); then (alpha, beta) are searched
  again with the kept keys (``main.py:126-136``). The original prints ``max(best test accuracy, final test
  accuracy)`` (``main.py:141``): vlprompt reports the test accuracy of the model it kept;
* the original re-augments the training images every epoch (``main.py:85-89``); vlprompt draws one of the
  cached views per image and step (``--online`` augments and encodes at every step, as the original);
* precision: the original runs CLIP, the cache and AdamW's state in fp16 on CUDA (``clip/clip.py``,
  ``utils.py:62``, ``main.py:69``), an artefact of its CLIP loader: vlprompt keeps the cache and its logits in
  fp32 (also under ``--precision amp``: exp(beta ...) with beta up to 50 would magnify half-precision error).
  The cache term is a sum per class (``index_add``) instead of the product with the one-hot matrix: the same sum.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.templates import DEFAULT_TEMPLATE, resolve_templates
from ...errors import CheckpointError, ConfigError
from ..base import Features, Method, opt
from ..parts.handcrafted import class_text_features
from ..parts.options import HandCraftedOptions
from ..parts.originals import ImportedRun, shape
from ..parts.recipes import tip_adapter_templates

log = logging.getLogger("vlprompt")

#: main.py:32 (and l.53, 93, 116): the zero-shot logits are ``100. * f @ W``, a literal 100
ZERO_SHOT_SCALE = 100.0

#: configs/<dataset>.yaml: init_alpha (l.21) and search_scale [beta, alpha] (l.17), by vlprompt's dataset name;
#: init_beta 1 (l.20), search_step [200, 20] (l.18) and augment_epoch 10 (l.30) are the same in every config.
#: Tip-Adapter-F's train_epoch (l.31) is 20, EuroSAT's 100 (configs/eurosat.yaml:31).
RECIPES: dict[str, dict] = {
    "imagenet": {"alpha": 1.17, "search_scale": [7.0, 3.0]},        # configs/imagenet.yaml
    "caltech101": {"alpha": 3.0, "search_scale": [12.0, 5.0]},      # configs/caltech101.yaml
    "dtd": {"alpha": 2.0, "search_scale": [13.0, 13.0]},            # configs/dtd.yaml
    "eurosat": {"alpha": 2.0, "search_scale": [12.0, 10.0]},        # configs/eurosat.yaml
    "fgvc_aircraft": {"alpha": 5.0, "search_scale": [30.0, 30.0]},  # configs/fgvc.yaml
    "food101": {"alpha": 1.17, "search_scale": [10.0, 10.0]},       # configs/food101.yaml
    "oxford_flowers": {"alpha": 10.0, "search_scale": [50.0, 50.0]},  # configs/oxford_flowers.yaml
    "oxford_pets": {"alpha": 1.17, "search_scale": [7.0, 3.0]},     # configs/oxford_pets.yaml
    "stanford_cars": {"alpha": 3.0, "search_scale": [20.0, 10.0]},  # configs/stanford_cars.yaml
    "sun397": {"alpha": 1.17, "search_scale": [12.0, 10.0]},        # configs/sun397.yaml
    "ucf101": {"alpha": 3.0, "search_scale": [7.0, 3.0]},           # configs/ucf101.yaml
}
#: a dataset the original has no config for: ImageNet's (configs/imagenet.yaml), its general-purpose one
OTHER_DATA = "imagenet"


@dataclass
class TipAdapterConfig(HandCraftedOptions):
    alpha: float = opt(1.17, "residual ratio of the cache logits (the original's init_alpha; the search on the val "
                       "split replaces it)", min=0)
    beta: float = opt(1.0, "sharpness of the cache's affinities (the original's init_beta; the search replaces "
                      "it)", min=0)
    cache_views: int = opt(10, "augmented views of each training image averaged into its cache key (the original's "
                           "augment_epoch)", min=1)
    search: bool = opt(True, "search alpha and beta on the val split after the cache is built (or trained); "
                       "--no-search keeps --alpha and --beta")
    search_scale: list[float] = opt(default_factory=lambda: [7.0, 3.0],
                                    help="upper ends [beta, alpha] of the search grids (the original's "
                                         "search_scale; never reached: the grid stops one step below)")
    search_steps: list[int] = opt(default_factory=lambda: [200, 20],
                                  help="grid sizes [beta, alpha] of the search (the original's search_step)")

    def check(self) -> None:
        super().check()
        if len(self.search_scale) != 2 or not all(s > 0.1 for s in self.search_scale):
            raise ConfigError(f"search_scale (--search-scale) must be [beta, alpha], each above the grid's start "
                              f"0.1, got {self.search_scale!r}")
        if len(self.search_steps) != 2 or not all(s >= 1 for s in self.search_steps):
            raise ConfigError(f"search_steps (--search-steps) must be [beta, alpha] grid sizes >= 1, got "
                              f"{self.search_steps!r}")


def search_grid(scale: float, steps: int) -> list[float]:
    """utils.py:103-104: ``i * (scale - 0.1) / steps + 0.1`` for i in range(steps) (the scale is never reached)."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def class_sums(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, N) values of the N cached images -> (B, K) their sums per class (``values @ one_hot(labels)``)."""
    return values.new_zeros(values.shape[0], num_classes).index_add_(1, labels, values)


class TipAdapter(Method):
    """Tip-Adapter: the cache is built in :meth:`setup` from the cached augmented views of the training images,
    (alpha, beta) searched on the val split in :meth:`after_training`. Learned state: ``cache_keys`` (N, E),
    ``cache_labels`` (N,), ``alpha``, ``beta`` (searched); the zero-shot classifier is rebuilt from the templates."""

    name = "tip-adapter"
    family = "adapters"
    config_class = TipAdapterConfig
    summary = ("Tip-Adapter: a training-free cache of the few-shot features beside zero-shot CLIP; alpha / beta "
               "searched on the val split (the original searches ImageNet's on the test set; vlprompt never does)")
    setup_reads = frozenset({"train_views", "val"})
    uses_template = True
    template_field = "templates"
    head_kind = "prompt"
    original_format = "tensor-files"
    #: Tip-Adapter-F learns the keys; Tip-Adapter keeps them as built
    learns_keys = False

    @classmethod
    def trains(cls, config) -> bool:
        return cls.learns_keys

    @classmethod
    def data_defaults(cls) -> dict:
        return {"crop_scale": [0.5, 1.0]}  # main.py:173-178: RandomResizedCrop(224, scale=(0.5, 1))

    @classmethod
    def setup_views(cls, config, train) -> int:
        return config.cache_views

    @classmethod
    def method_recipe(cls, data) -> dict:
        """The method options of configs/<dataset>.yaml (:data:`RECIPES`); templates of datasets/<name>.py."""
        recipe = RECIPES.get(data.dataset.lower(), RECIPES[OTHER_DATA])
        return {"templates": tip_adapter_templates(data.dataset), "alpha": recipe["alpha"], "beta": 1.0,
                "cache_views": 10, "search_scale": list(recipe["search_scale"]), "search_steps": [200, 20]}

    @classmethod
    def preset(cls, data) -> dict:
        """configs/<dataset>.yaml at d0e2d6f: init_alpha, init_beta 1, search_scale, search_step [200, 20],
        augment_epoch 10 (:data:`RECIPES`; data without a config of its own: ImageNet's); the dataset's prompt,
        ImageNet CoOp's 7 (``datasets/*.py``). The same values for every number of shots (README.md:40: the
        configs hold the hyper-parameters "achieving the overall best performance on 1~16 shots")."""
        return {"method_options": cls.method_recipe(data)}

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return resolve_templates(request, dataset_template or DEFAULT_TEMPLATE)

    def __init__(self, config: TipAdapterConfig, backbone, classnames: Sequence[str], template: Optional[str] = None):
        super().__init__(config, backbone, classnames)
        self.template_request = list(config.templates)
        self.templates = self.expand_templates(config.templates, template)
        self.config = dataclasses.replace(config, templates=list(self.templates))
        dev, e = backbone.device, backbone.embed_dim
        self.register_buffer("zeroshot", class_text_features(backbone, self.classnames, self.templates).float(),
                             persistent=False)  # (K, E): the original's clip_weights, transposed
        keys = torch.zeros(0, e, device=dev)  # sized by setup (or a loaded state) to the training images
        if self.learns_keys:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.register_buffer("cache_labels", torch.zeros(0, dtype=torch.long, device=dev))
        self.register_buffer("alpha", torch.tensor(float(config.alpha), device=dev))
        self.register_buffer("beta", torch.tensor(float(config.beta), device=dev))

    # -- the cache ---------------------------------------------------------------------------------------------
    def resize_cache(self, n: int) -> None:
        """An empty cache of ``n`` images (its keys and labels then set in place: setup, a loaded state)."""
        dev, e = self.zeroshot.device, self.zeroshot.shape[1]
        keys = torch.zeros(n, e, device=dev)
        if self.learns_keys:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.cache_keys = keys
        self.cache_labels = torch.zeros(n, dtype=torch.long, device=dev)

    @torch.no_grad()
    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Keys (N, E) (normalised here) and their labels (N,)."""
        self.resize_cache(keys.shape[0])
        self.cache_keys.copy_(F.normalize(keys.float(), dim=-1))
        self.cache_labels.copy_(labels)

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        keys = state.get("cache_keys")
        if keys is not None and keys.dim() == 2 and keys.shape[0] != self.cache_keys.shape[0]:
            self.resize_cache(keys.shape[0])  # the saved cache's size (the run's training images)
        super().load_learned_state(state)

    def setup(self, train, val) -> dict:
        """utils.py:38-62: keys = normalise(mean over the cached views of the raw features), one per training
        image, in the split's order; their labels."""
        views = train.views().global_  # (V, N, E), not normalised
        self.set_cache(views.float().mean(dim=0), train.labels.to(self.zeroshot.device))
        return {"cache_images": int(views.shape[1]), "cache_views": int(views.shape[0])}

    # -- logits ------------------------------------------------------------------------------------------------
    def cache_logits(self, affinity: torch.Tensor, beta) -> torch.Tensor:
        """(B, N) affinities ``f K^T`` of normalised features to the keys -> (B, K): main.py:39-41,
        ``exp((-1) * (beta - beta * A)) L``, computed as ``exp(beta * A - beta)`` in place: the same floats (``x - b``
        is exactly ``-(b - x)`` in IEEE arithmetic) with one (B, N) temporary instead of four (2.9x faster on a
        (4000, 16000) search block)."""
        return class_sums((affinity * beta).sub_(beta).exp_(), self.cache_labels, self.num_classes)

    def forward(self, feats: Features) -> torch.Tensor:
        with torch.autocast(feats.global_.device.type, enabled=False):  # fp32: exp(beta ...) magnifies rounding
            f = F.normalize(feats.global_.float(), dim=-1)
            cache = self.cache_logits(f @ self.cache_keys.t(), self.beta)
            return ZERO_SHOT_SCALE * f @ self.zeroshot.t() + cache * self.alpha

    # -- the search --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        """utils.py:99-129 on features (M, E) (normalised here) and labels (M,): the first (beta, alpha) of the
        beta-major grid with strictly more correct predictions than every pair before it, from (0, 0) at none."""
        cfg = self.config
        betas = search_grid(cfg.search_scale[0], cfg.search_steps[0])
        alphas = search_grid(cfg.search_scale[1], cfg.search_steps[1])
        # a float tensor times a Python float multiplies in the tensor's dtype: the same products as the original's
        alpha_t = torch.tensor(alphas, dtype=torch.float32, device=features.device)
        f = F.normalize(features.float(), dim=-1)
        labels = labels.to(f.device)
        zero_shot = ZERO_SHOT_SCALE * f @ self.zeroshot.t()
        affinity = f @ self.cache_keys.t()  # once: only beta changes below
        logits = torch.empty_like(zero_shot)  # one (M, K) buffer for every pair: zero_shot + cache * alpha
        best, best_beta, best_alpha = 0, 0.0, 0.0
        for beta in betas:
            cache = self.cache_logits(affinity, beta)
            correct = []
            for a in alpha_t:  # the original's products and sums (cache * alpha, then + zero_shot), in one buffer
                torch.mul(cache, a, out=logits).add_(zero_shot)
                correct.append(int((logits.argmax(-1) == labels).sum()))
            for alpha, c in zip(alphas, correct):
                if c > best:
                    best, best_beta, best_alpha = c, beta, alpha
        zero_shot_correct = int((zero_shot.argmax(-1) == labels).sum())
        return {"alpha": best_alpha, "beta": best_beta, "val_accuracy": 100.0 * best / max(len(labels), 1),
                "zero_shot_val_accuracy": 100.0 * zero_shot_correct / max(len(labels), 1)}

    def after_training(self, val) -> dict:
        cfg = self.config
        if not cfg.search:
            return {"alpha": float(self.alpha), "beta": float(self.beta), "searched": False}
        if val is None or not len(val):
            log.warning("%s: no val split to search alpha and beta on (never the test split): keeping alpha %g, "
                        "beta %g", self.name, float(self.alpha), float(self.beta))
            return {"alpha": float(self.alpha), "beta": float(self.beta), "searched": False,
                    "why": "no val split"}
        init = 100.0 * int((self(val.features().to(self.zeroshot.device)).argmax(-1).cpu() == val.labels).sum()) \
            / len(val)
        found = self.search(val.features().global_.to(self.zeroshot.device), val.labels)
        self.alpha.fill_(found["alpha"])
        self.beta.fill_(found["beta"])
        log.info("%s: alpha %g, beta %g searched on %d val images (val accuracy %.2f%%, %.2f%% with the initial "
                 "pair)", self.name, found["alpha"], found["beta"], len(val), found["val_accuracy"], init)
        return {**found, "searched": True, "val_images": len(val), "initial_val_accuracy": init}

    # -- classes, files ----------------------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Its own classes, or a subset of them (ImageNet-A / -R): the cached images of those classes, relabelled,
        and their zero-shot rows -- the same logits for them as the whole cache gives."""
        rows = self.trained_class_rows(classnames, f"{self.name}'s cache (one-hot values of its training images)",
                                       hint="it evaluates on its classes or a subset of them")
        if rows is not None:
            with torch.no_grad():
                index = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.cache_labels.device)
                index[rows] = torch.arange(len(rows), device=index.device)
                keep = index[self.cache_labels] >= 0
                keys, labels = self.cache_keys.detach()[keep].clone(), index[self.cache_labels[keep]]
                self.resize_cache(int(keep.sum()))
                self.cache_keys.copy_(keys)
                self.cache_labels.copy_(labels)
                self.zeroshot = self.zeroshot[rows].clone()
        super().set_classnames(classnames)

    def describe(self) -> dict:
        return {"templates": list(self.templates)}

    @classmethod
    def import_original(cls, run) -> ImportedRun:
        """A run's ``caches/<dataset>/`` folder (``main.py:152-154``), or one of its files to pick the shots when
        it holds several: ``keys_<K>shots.pt`` (E, N) and ``values_<K>shots.pt`` (N, C) fp16 (``utils.py:64-65``),
        for Tip-Adapter-F also ``best_F_<K>shots.pt``, the kept keys (N, E) (``main.py:124``). The original saves
        neither alpha nor beta (it prints them): ``--alpha`` and ``--beta`` are required."""
        files = list(run.state)
        found = sorted({int(m.group(1)) for f in files if (m := re.fullmatch(r"values_(\d+)shots", f))})
        if run.path.is_file():
            m = re.fullmatch(r"(?:keys|values|best_F)_(\d+)shots", run.path.stem)
            if m is None:
                raise CheckpointError(f"{run.path}: not one of Tip-Adapter's cache files (keys_<K>shots.pt, "
                                      f"values_<K>shots.pt, best_F_<K>shots.pt)")
            found = [int(m.group(1))]
        if len(found) != 1:
            raise CheckpointError(f"{run.path}: " + (f"runs of {', '.join(map(str, found))} shots: give one of "
                                                     f"the run's files (e.g. values_{found[-1]}shots.pt) to pick one"
                                                     if found else "no values_<K>shots.pt (Tip-Adapter's cache)"))
        shots = found[0]
        keys_name = f"best_F_{shots}shots" if cls.learns_keys else f"keys_{shots}shots"
        names = [f"values_{shots}shots", keys_name]
        missing = [n for n in names if n not in run.state]
        if missing:
            raise CheckpointError(f"{run.path}: no {missing[0]}.pt"
                                  + (" (Tip-Adapter-F's kept keys: import this run with --from tip-adapter)"
                                     if missing[0].startswith("best_F") else ""))
        values, keys = run.state[names[0]], run.state[keys_name]
        if values.dim() != 2 or not bool(((values == 0) | (values == 1)).all()) or \
                not bool((values.sum(1) == 1).all()):
            raise CheckpointError(f"{run.path}: {names[0]}.pt {shape(values)} is not the one-hot labels of the "
                                  f"cached images")
        n, c = values.shape
        keys = keys if cls.learns_keys else keys.t()  # keys_*.pt (E, N); best_F_*.pt (N, E), the adapter weight
        if keys.dim() != 2 or keys.shape[0] != n:
            raise CheckpointError(f"{run.path}: {keys_name}.pt has shape {shape(keys)}, not {n} cached images (as "
                                  f"{names[0]}.pt holds)")
        labels = values.float().argmax(dim=1)

        def classes_match(method) -> None:
            if c != method.num_classes:
                raise CheckpointError(f"{run.path}: a cache of {c} classes, but the data has {method.num_classes}: "
                                      f"import it onto the classes it was built on (--dataset, --root, --classes)")

        state = {"cache_keys": (f"{keys_name}.pt", keys, keys), "cache_labels": (f"{names[0]}.pt", values, labels)}
        imported = ImportedRun(cls.name, run.path, state, {"data": {"shots": shots}, "seed": 1}, run.info,
                               optional=("alpha", "beta"), required=("alpha", "beta"),
                               prepare=lambda m: m.resize_cache(n))
        imported.checks.insert(0, classes_match)
        return imported


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys fine-tuned by gradient (``main.py:66-124``), the epoch kept on the val split,
    (alpha, beta) searched again with the kept keys."""

    name = "tip-adapter-f"
    summary = ("Tip-Adapter-F: the cache keys fine-tuned (AdamW, cosine per step), the best epoch and alpha / beta "
               "chosen on the val split (the original chooses its epoch on the test set; vlprompt never does)")
    learns_keys = True

    @classmethod
    def preset(cls, data) -> dict:
        """Tip-Adapter's options (:meth:`TipAdapter.preset`) and Tip-Adapter-F's training: AdamW(lr = configs'
        lr 0.001 (l.29), eps 1e-4, torch's betas and weight decay 0.01) (main.py:72), CosineAnnealingLR over
        epochs x batches stepped per iteration without warm-up (main.py:73,106), train_epoch 20, EuroSAT 100
        (configs/*.yaml:31), batch 256 with the last smaller batch kept (main.py:181, DataLoader drop_last False),
        the epoch evaluated after each epoch (main.py:112-124; on the val split here), 10 cached views."""
        epochs = 100 if data.dataset.lower() == "eurosat" else 20
        return {"method_options": cls.method_recipe(data),
                "train": {"epochs": epochs, "batch_size": 256, "last_batch": "keep", "optimizer": "adamw",
                          "lr": 0.001, "adam_eps": 1e-4, "weight_decay": 0.01, "scheduler": "cosine_step",
                          "warmup_epochs": 0, "eval_every": 1, "views": 10}}

    def selection(self):
        return ("accuracy", "max")  # main.py:118: kept when strictly better, so the first of equal epochs


__all__ = ["TipAdapterConfig", "TipAdapter", "TipAdapterF", "ZERO_SHOT_SCALE", "RECIPES", "search_grid",
           "class_sums"]
