"""TaskRes (task residual), written out from geekyutao/TaskRes @ 5195359661d6bef661090c33b81aacfc7d7cc181 (MIT).

``taskres.py:N`` is ``trainers/taskres.py`` line N, ``imagenet_templates.py:N`` is
``trainers/imagenet_templates.py``, ``train.py`` the repository's; the trainer runs on upstream Dassl. The text
classifier is the frozen zero-shot classifier ``t`` plus a learned residual: ``t' = t + alpha * x``, ``x`` zeros at
the start; logits are CLIP's cosine logits against ``t'``.

Quirks (each also in the docstring of the function concerned):

- the base classifier averages the UNNORMALISED text features of its templates (taskres.py:140), and formats the
  RAW class names: no ``replace("_", " ")`` (taskres.py:134), so Pets / Caltech / UCF prompts keep underscores;
- templates: ImageNet = CoOp's 7 ``IMAGENET_TEMPLATES_SELECT`` + "a photo of a {}.", every other dataset its
  CoOp template alone (taskres.py:125-129), the opposite of CoOp's own ensemble (7 + custom except ImageNet);
- ``TEMPLATES = IMAGENET_TEMPLATES_SELECT; TEMPLATES += [...]`` appends to the imported module-level list: every
  further ImageNet build in the same process sees the custom template once more (taskres.py:125-129, 161-165);
- the "enhanced base" replaces ``text_projection`` only when CLIP is fp16 (the replacement sits inside ``if
  clip_model.dtype == torch.float16``, taskres.py:146-158): with PREC fp32 / amp it is silently the regular base;
- ``self.model.float()`` after building (taskres.py:255) while ``self.dtype`` stays fp16: the image cast to fp16
  fails in the fp32 tower and a bare ``except`` retries in fp32 (taskres.py:199-202): training runs in fp32, with
  TF32 matmuls and cuDNN benchmark switched on at import (taskres.py:25-28); the base features were computed in
  fp16 before the cast;
- the saved ``base_text_features`` buffer is not deleted by the loader: evaluation uses the saved classifier, not
  the one recomputed for the evaluation dataset (ImageNet-A / -R: rows re-indexed, taskres.py:326-333).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch

from .coop_base import (cosine_logits, load_dropping, registered_optimizer_and_scheduler, text_encoder, tokenize,
                        write_dassl_checkpoint)

#: taskres.py:32-48 (the same as KaiyangZhou/CoOp's trainers/zsclip.py:13-29).
CUSTOM_TEMPLATES = {
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

#: imagenet_templates.py:86-94 (CoOp's 7).
IMAGENET_TEMPLATES_SELECT = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

#: ``TRAINER.TaskRes.RESIDUAL_SCALE`` (alpha) in train_regular.sh: 0.5, OxfordFlowers 1.0 (all shots).
RESIDUAL_SCALE_10 = {"OxfordFlowers"}

RECIPE = {
    "backbone": "RN50", "optimizer": "adam", "betas": (0.9, 0.999), "weight_decay": 5e-4, "batch_size": 256,
    "test_batch_size": 500, "warmup_epoch": 1, "warmup_lr": 1e-5, "prec": "fp16", "seeds": (1,),
}


def recipe(dataset: str, shots: int) -> dict:
    """train_regular.sh + configs/trainers/TaskRes/adam_lr*_B256_ep*.yaml: lr 2e-3 (ImageNet 2e-4), 100 epochs for
    1 / 2 / 4 shots and 200 for 8 / 16, alpha 0.5 (OxfordFlowers 1.0), seed 1 only (scripts/taskres/main.sh:14)."""
    lr = 2e-4 if dataset == "ImageNet" else 2e-3
    epochs = 100 if shots in (1, 2, 4) else 200
    alpha = 1.0 if dataset in RESIDUAL_SCALE_10 else 0.5
    config = f"adam_lr{'2e-4' if lr == 2e-4 else '2e-3'}_B256_ep{epochs}"
    return {**RECIPE, "lr": lr, "max_epoch": epochs, "alpha": alpha, "config": config, "shots": shots}


def base_templates(dataset: str, imagenet_builds_before: int = 0) -> list[str]:
    """The templates of ``_get_base_text_features`` (taskres.py:125-129). ImageNet: the 7 SELECT templates + its
    custom one; every other dataset: its custom template alone.

    Quirk: for ImageNet the code appends to the imported list object itself, so the n-th ImageNet build in one
    process (``imagenet_builds_before`` = n - 1 earlier ImageNet builds, regular or enhanced) sees the custom
    template n times, and the average weights it more. One training run builds once."""
    custom = CUSTOM_TEMPLATES[dataset]
    if dataset == "ImageNet":
        return list(IMAGENET_TEMPLATES_SELECT) + [custom] * (1 + imagenet_builds_before)
    return [custom]


def base_text_features(model, classnames: Sequence[str], dataset: str, *, imagenet_builds_before: int = 0,
                       text_projection: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The frozen classifier ``t`` (K, E) (``_get_base_text_features``, taskres.py:118-142).

    Per class: ``tokenize([tpl.format(name) for tpl in templates])`` with the RAW name (underscores kept), the
    token embeddings through CoOp's TextEncoder, then ``torch.stack(...).mean(1)``: the plain average of the
    UNNORMALISED template features (no per-template normalisation, no renormalisation). The original runs this in
    fp16 on CUDA and the buffer becomes fp32 at ``self.model.float()``.

    ``text_projection`` (W, E): the "enhanced base" (``_get_enhanced_base_text_features``, taskres.py:144-178) uses
    ``weight.t()`` of a separately trained Linear (Google-Drive ``strong_base/<Dataset>/rn50_<K>shots/
    model.pth.tar``, ``['state_dict']['weight']`` (E, W)) in place of CLIP's. Quirk: only when CLIP is fp16."""
    templates = base_templates(dataset, imagenet_builds_before)
    rows = []
    with torch.no_grad():
        for name in classnames:
            tokens = tokenize([template.format(name) for template in templates])
            rows.append(text_encoder(model, model.token_embedding(tokens), tokens, text_projection))
    return torch.stack(rows).mean(1)


def init_residual(base: torch.Tensor) -> torch.Tensor:
    """``text_feature_residuals = nn.Parameter(torch.zeros_like(base_text_features))`` (taskres.py:98): (K, E)."""
    return torch.zeros_like(base)


def classifier(base: torch.Tensor, residual: torch.Tensor, alpha: float) -> torch.Tensor:
    """TaskResLearner.forward (taskres.py:100-101): ``t + alpha * x`` (K, E)."""
    return base + alpha * residual


def logits(model, image_features: torch.Tensor, base: torch.Tensor, residual: torch.Tensor,
           alpha: float) -> torch.Tensor:
    """CustomCLIP.forward (taskres.py:198-217): ``exp(logit_scale) * norm(f) @ norm(t + alpha x).t()`` (B, K);
    ``image_features`` (B, E) = ``visual(image)`` (the image tower is frozen: the features of an augmented view do
    not depend on the step)."""
    return cosine_logits(model, image_features, classifier(base, residual, alpha))


def imagenet_subset_indexes(subset_names: Sequence[str], imagenet_names: Sequence[str]) -> list[int]:
    """``find_imagenet_a_indexes`` / ``find_imagenet_r_indexes`` (trainers/imagenet_a_r_indexes_v2.py): for each
    ImageNet-A / -R class, ``imagenet_names.index(name)``, i.e. the FIRST ImageNet class of that name (the
    1000-name list used there has duplicates, e.g. 'missile' and 'sunglasses' twice)."""
    return [list(imagenet_names).index(name) for name in subset_names]


def loaded_state(checkpoint: dict, indexes: Optional[Sequence[int]] = None) -> OrderedDict:
    """What ``TaskRes.load_model`` (taskres.py:304-346) loads (strict=False): the saved ``base_text_features`` AND
    ``text_feature_residuals``, rows re-indexed by ``indexes`` for ImageNet-A / -R (taskres.py:326-333);
    ``token_prefix`` / ``token_suffix`` are deleted, but a TaskRes file has none."""
    state = OrderedDict(checkpoint["state_dict"])
    if indexes is not None:
        for key in ("base_text_features", "text_feature_residuals"):
            state[key] = state[key][list(indexes)]
    return load_dropping(state, ("token_prefix", "token_suffix"))


def write_original_checkpoint(directory, tensors: dict, epoch: int, *, max_epoch: Optional[int] = None,
                              lr: float = 2e-3, with_val_result: bool = True):
    """What a TaskRes run saves: ``<directory>/prompt_learner/model.pth.tar-<epoch>`` (+ ``checkpoint``); the model
    registered as "prompt_learner" is the TaskResLearner. ``tensors``: ``text_feature_residuals`` and
    ``base_text_features`` (K, E), saved fp32 (``self.model.float()`` runs before the optimizer is built), in the
    module's order: the parameter, then the buffer. Adam over ``[text_feature_residuals]``. ``with_val_result``:
    upstream Dassl since August 2022 adds ``"val_result": None`` (TaskRes was released on it in October 2022;
    the repository does not pin a Dassl version)."""
    state = OrderedDict((k, tensors[k].detach().float()) for k in ("text_feature_residuals", "base_text_features"))
    params = [torch.nn.Parameter(state["text_feature_residuals"].clone())]
    optimizer, scheduler = registered_optimizer_and_scheduler(params, "adam", lr, epoch, max_epoch or epoch)
    return write_dassl_checkpoint(directory, "prompt_learner", state, epoch, optimizer, scheduler,
                                  with_val_result=with_val_result)
