"""PromptSRC (prompting with self-regulating constraints), written out on open_clip.

Source: muzairkhattak/PromptSRC@bb95c77b634d63488f2cad81ff4a72d53bdd06d5 ``trainers/promptsrc.py``
(``load_clip_to_cpu`` l.19-46, ``VLPromptLearner`` l.72-170, ``CustomCLIP`` l.173-211, ``PromptSRC`` trainer
l.214-401), ``trainers/imagenet_templates.py`` l.3-64, on the IVLP blocks of ``clip/model.py`` (design 'IVLP',
l.31-37; see :mod:`originals.mpl_clip`, :mod:`originals.ivlp`).

Architecture = IVLP (4+4 prompts, depth 9/9 in the recipes). Two frozen teachers are built inside the prompt learner:
- text: a plain fp32 CLIP (``load_clip_to_cpu(cfg, True).float()``, l.114) encodes each of the 60
  ``IMAGENET_TEMPLATES`` with every class name; ``fixed_embeddings`` = the MEAN of the unnormalised text features
  over templates (l.120-128), normalised only afterwards (l.199-200) -- unlike CLIP's prompt ensembling;
- image: ``ZS_image_encoder`` = a second, fp16, frozen copy of CLIP's visual (l.115, l.118, frozen by name l.243-245).
Loss (``forward_backward`` l.297-313, non-amp path):
  CE(logits, y)
  + TEXT_LOSS_WEIGHT (25) * mean |norm(prompted text) - norm(fixed_embeddings)|    (F.l1_loss, over K * E)
  + IMAGE_LOSS_WEIGHT (10) * mean |norm(prompted image) - norm(ZS image)|           (F.l1_loss, over B * E)
  + sum p_zs * (log p_zs - log p) / (B * K)   (kl_div(log_softmax(logits), log_softmax(zs_logits), 'sum',
                                               log_target=True) / logits.numel(), T = 1, weight 1)
with zs_logits = exp(logit_scale) * norm(ZS image) @ norm(fixed_embeddings).T. The KL term is the batch-mean
KL(p_zs || p) divided by the number of classes K.

Gaussian prompt aggregation (GPA, l.262-270, l.320-335, l.338-360): weights w_e = N(e; GPA_MEAN, GPA_STD) for
e = 1..MAX_EPOCH normalised to sum 1; after the last batch of each epoch (after the optimizer step and update_lr)
``copy.deepcopy(model.state_dict())`` times w_e is added to a running sum; when the last epoch's is added the sum is
loaded into the model (l.332-335), which Dassl then saves and tests. The method is the weighted average of the
LEARNED prompts (:func:`gpa_average`); the original averages the WHOLE state dict in each tensor's dtype
(:func:`gpa_average_like_original`): the fp16 frozen CLIP weights (both towers and the ZS image encoder) and the
fp16 ctx are re-summed in fp16 and move by about one ulp (an fp16 artefact), and the perturbed weights are what the
saved checkpoint holds and what the new-class evaluation loads back (strict=False).

Other quirks (read from code):
- PREC amp: ``scaler.scale(loss)`` on the 7-tuple the forward returns fails (l.289-295); PREC fp32 feeds fp32 images
  to the fp16 ``ZS_image_encoder`` (l.202) and fails: fp16 is the only working mode.
- ``fixed_embeddings`` is a plain attribute (not a buffer): not saved, not averaged; ``ZS_image_encoder`` is a
  submodule of the prompt learner: saved in every checkpoint (a second copy of the image tower) and averaged.
- GPA's epoch counter lives in the trainer (``step_counter`` l.264): a resumed run restarts it at 1.
- ``self.model.total_epochs`` (l.332) breaks under DataParallel (multi-GPU).
- The zero-shot logits use the prompted model's ``logit_scale`` (l.205): the same frozen value.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import ivlp
from . import mpl_clip as C
from . import mpl_dassl
from .mpl_dassl import write_dassl_checkpoint

REPO = C.PROMPTSRC_REPO
MODEL_NAME = "VLPromptLearner"  # register_model name (l.261)

# trainers/imagenet_templates.py l.3-64 (transcribed): a 60-template subset of CLIP's 80 ImageNet templates
IMAGENET_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
]

# configs/trainers/PromptSRC/*.yaml; train.py l.113-125 defaults
RECIPES = {
    "base2new": dict(n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9, ctx_init="a photo of a",
                     text_loss_weight=25, image_loss_weight=10, gpa_mean=15, gpa_std=1, lr=0.0025, max_epoch=20,
                     batch_size=4),  # vit_b16_c2_ep20_batch4_4+4ctx.yaml l.16-43
    "cross_datasets": dict(n_ctx_text=4, n_ctx_vision=4, depth_text=3, depth_vision=3, ctx_init="a photo of a",
                           text_loss_weight=25, image_loss_weight=10, gpa_mean=6, gpa_std=10, lr=0.0025,
                           max_epoch=20, batch_size=4),  # vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml l.16-43
    "few_shot": dict(n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9, ctx_init="a photo of a",
                     text_loss_weight=25, image_loss_weight=10, gpa_mean=30, gpa_std=30, lr=0.0025, max_epoch=50,
                     batch_size=4),  # vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml l.16-44
    # ... same file l.45-47 (commented): GPA 45 / 5 for StanfordCars, Flowers102, FGVCAircraft, DTD, EuroSAT
    "few_shot_fine_grained": dict(n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9,
                                  ctx_init="a photo of a", text_loss_weight=25, image_loss_weight=10, gpa_mean=45,
                                  gpa_std=5, lr=0.0025, max_epoch=50, batch_size=4),
}


# the cfg.TRAINER.PROMPTSRC keys (train.py l.114-124)
CONFIG_KEYS = {**ivlp.CONFIG_KEYS, "text_loss_weight": "TEXT_LOSS_WEIGHT", "image_loss_weight": "IMAGE_LOSS_WEIGHT",
               "gpa_mean": "GPA_MEAN", "gpa_std": "GPA_STD"}


def dassl_config(recipe: str = "base2new", **run) -> dict:
    """The configuration a PromptSRC run of ``recipe`` prints into log.txt (:func:`originals.mpl_dassl.dassl_config`;
    few-shot runs: ``subsample="all"``)."""
    return mpl_dassl.dassl_config("PromptSRC", "PROMPTSRC", RECIPES[recipe], CONFIG_KEYS, **run)


def init_promptsrc(model, classnames: Sequence[str], *, n_ctx_text: int = 4, n_ctx_vision: int = 4,
                   depth_text: int = 9, depth_vision: int = 9, ctx_init: Optional[str] = "a photo of a",
                   generator: Optional[torch.Generator] = None):
    """``VLPromptLearner.__init__`` (l.72-138) and the IVLP blocks: the same tensors and rules as
    :func:`originals.ivlp.init_ivlp` (defaults: train.py l.115-120). Returns (learned, fixed)."""
    return ivlp.init_ivlp(model, classnames, n_ctx_text=n_ctx_text, n_ctx_vision=n_ctx_vision, depth_text=depth_text,
                          depth_vision=depth_vision, ctx_init=ctx_init, generator=generator)


def teacher_text_features(model, classnames: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES
                          ) -> torch.Tensor:
    """``fixed_embeddings`` (l.113-128): for each template, ``encode_text`` of the template filled with each class
    name (names with "_" -> " ", l.108) on the unprompted CLIP; the MEAN over templates of the UNNORMALISED text
    features. (K, E), no gradient. (The original loops over templates; texts are encoded independently of each
    other, so they are encoded here in one batch.)"""
    names = [name.replace("_", " ") for name in classnames]
    tokens = C.tokenize([t.replace("{}", n) for t in templates for n in names])  # template-major
    with torch.no_grad():
        features = model.encode_text(tokens)
    return features.view(len(templates), len(names), -1).mean(dim=0)


def promptsrc_forward(model, learned: dict, fixed: dict, images: torch.Tensor, teacher: torch.Tensor) -> dict:
    """``CustomCLIP.forward(image, label)`` in train mode (l.185-209): the prompted logits (B, K) and the
    normalised features the losses compare: ``text`` (K, E) prompted, ``image`` (B, E) prompted, ``zs_text`` (K, E)
    = norm(teacher), ``zs_image`` (B, E) = norm(frozen image encoder), ``zs_logits`` (B, K). The teacher side has
    no gradient. In eval mode the original returns ``logits`` only."""
    text = ivlp.ivlp_text_features(model, learned, fixed)
    image = ivlp.ivlp_image_features(model, learned, images)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp()
    zs_text = teacher / teacher.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        zs_image = model.encode_image(images)
        zs_image = zs_image / zs_image.norm(dim=-1, keepdim=True)
        zs_logits = scale * zs_image @ zs_text.t()
    return {"logits": scale * image @ text.t(), "text": text, "image": image, "zs_text": zs_text,
            "zs_image": zs_image, "zs_logits": zs_logits}


def loss_terms(outputs: dict, labels: torch.Tensor, text_loss_weight: float = 25.0,
               image_loss_weight: float = 10.0) -> dict:
    """``forward_backward`` (l.297-313): each term as the original reduces it, and their sum ``loss``.

    ``scl_logits`` = sum over (b, k) of p_zs * (log p_zs - log p) divided by B * K (``kl_div(..., 'sum',
    log_target=True) / logits.numel()``), written out here from the log-softmaxes."""
    logits, zs_logits = outputs["logits"], outputs["zs_logits"]
    ce = F.cross_entropy(logits, labels)
    scl_text = (outputs["text"] - outputs["zs_text"]).abs().mean() * text_loss_weight
    scl_image = (outputs["image"] - outputs["zs_image"]).abs().mean() * image_loss_weight
    log_p, log_q = F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1)
    scl_logits = (log_q.exp() * (log_q - log_p)).sum() / logits.numel()
    return {"ce": ce, "scl_text": scl_text, "scl_image": scl_image, "scl_logits": scl_logits,
            "loss": ce + (scl_logits + scl_text + scl_image)}


def gpa_weights(max_epoch: int, mean: float, std: float) -> list[float]:
    """``get_gauss`` + normalisation (l.265-270, l.358-360): N(e; mean, std) for e = 1..max_epoch, divided by their
    sum. Entry e - 1 weighs the state after epoch e (``self.gauss[self.step_counter - 2]``, l.323-324)."""
    gauss = [(1 / (std * math.sqrt(2 * math.pi))) * math.exp(-0.5 * ((e - mean) / std) ** 2)
             for e in range(1, max_epoch + 1)]
    total = sum(gauss)
    return [g / total for g in gauss]


def gpa_average(states: Sequence[dict], weights: Sequence[float]) -> dict:
    """The method: sum_e w_e * prompts_e over the LEARNED tensors (``states[e]``: the learned tensors after epoch
    e + 1), accumulated in the original's order (``state_dict_add`` l.348-356: previous + current)."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states for {len(weights)} weights")
    total = None
    for state, w in zip(states, weights):
        weighted = {k: v.detach() * w for k, v in state.items()}
        total = weighted if total is None else {k: total[k] + weighted[k] for k in weighted}
    return total


def gpa_average_like_original(state_dicts: Sequence[dict], weights: Sequence[float]) -> dict:
    """The original's aggregation of WHOLE state dicts (l.325-335, ``state_dict_weighting`` l.338-346,
    ``state_dict_add`` l.348-356): each tensor times w_e IN ITS OWN DTYPE, summed in its own dtype. On fp16 tensors
    (the recipe's CLIP weights, ctx, the ZS image encoder) the result differs from the tensor although the weights
    sum to 1: the fp16 artefact the method does not need."""
    total = None
    for state, w in zip(state_dicts, weights):
        weighted = copy.deepcopy(state)
        for key in state:
            weighted[key] = state[key] * w
        if total is None:
            total = weighted
        else:
            for key in weighted:
                total[key] = total[key] + weighted[key]
    return total


def original_state_dict(model, learned: dict, fixed: dict, fp16: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """``CustomCLIP.state_dict()``: as IVLP's with ``prompt_learner.ZS_image_encoder.*`` (the frozen image tower,
    fp16 per convert_weights in the recipe) after the token buffers (l.106-133 registration order)."""
    sd = ivlp.original_state_dict(model, learned, fixed, fp16)
    anchor = "prompt_learner.token_suffix" if "prompt_learner.token_suffix" in sd else "prompt_learner.ctx"
    out = OrderedDict()
    for key, value in sd.items():
        out[key] = value
        if key == anchor:
            out.update(C.visual_state(model, {}, "prompt_learner.ZS_image_encoder", fp16))
    return out


def write_original_checkpoint(directory, tensors: dict, model, *, epoch: int = 20, lr: float = 0.0025,
                              max_epoch: Optional[int] = None, fp16: bool = True,
                              momentum_buffers: Optional[dict] = None):
    """The file a PromptSRC run leaves: ``<directory>/VLPromptLearner/model.pth.tar-<epoch>`` holding the GPA-averaged
    whole CustomCLIP (pass the averaged tensors). Trainable: ctx and the VPT tensors (not the ZS encoder). The
    loader drops token_prefix/suffix and loads the rest (ZS encoder and frozen weights included) strict=False."""
    learned = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and "token_" not in k}
    sd = original_state_dict(model, learned, tensors, fp16)
    trainable = {k for k in sd if k == "prompt_learner.ctx" or ("VPT" in k and "ZS_image_encoder" not in k)}
    visual_buffers = [k[len("visual."):] for k in C.buffer_names(model) if k.startswith("visual.")]
    buffers = {"prompt_learner.token_prefix", "prompt_learner.token_suffix"}
    buffers |= {f"{p}.{k}" for k in visual_buffers for p in ("image_encoder", "prompt_learner.ZS_image_encoder")}
    return write_dassl_checkpoint(directory, MODEL_NAME, sd, epoch=epoch, trainable=trainable, buffers=buffers,
                                  lr=lr, max_epoch=max_epoch or epoch, momentum_buffers=momentum_buffers)
