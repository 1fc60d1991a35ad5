"""IVLP (independent vision-language prompting) and deep language prompting, written out on open_clip.

Source: muzairkhattak/multimodal-prompt-learning@69bce21ae8eda80ad6187534b2dce09cf6c59e17
``trainers/independentVL.py`` (``load_clip_to_cpu`` l.21-39, ``TextEncoder`` l.42-62, ``VLPromptLearner`` l.65-151,
``CustomCLIP`` l.154-179, ``IVLP`` trainer l.182-304) on the prompted CLIP of ``clip/model.py`` (see
:mod:`originals.mpl_clip`). PromptSRC@bb95c77 ships the same trainer (its IVLP baseline recipe differs).

"Deep language prompting" is this trainer with the vision prompts off (N_CTX_VISION 0, PROMPT_DEPTH_VISION 0:
``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml``): :data:`RECIPES` ``"language_only"``.

Learned tensors, by the names the original's state dict gives them (fp32 here):
  ``prompt_learner.ctx`` (n_t, D_text)                          text input context (word-init rule of mpl_clip)
  ``image_encoder.VPT`` (n_v, W)                                 appended vision input prompts, iff depth_vision>0
  ``image_encoder.transformer.resblocks.<i>.VPT_shallow`` (n_v, W) for 1 <= i < min(depth_vision, layers)
  ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` (n_t, D)  for 1 <= i < min(depth_text, layers)
No coupling between the towers. The trainer un-freezes every name containing "VPT" plus the prompt learner
(l.204-210). Training returns CE directly (l.176-177); evaluation returns the logits; no stochastic part.

Quirks (read from code):
- n_t <= 4 with CTX_INIT: word init of the first n_t tokens only, the rest of the init text fixed (recipe 2+2:
  "a photo" learned, "of a" fixed); n_t > 4: CTX_INIT silently ignored, random init (l.82-95).
- PROMPT_DEPTH_TEXT must be >= 1 (assert l.70-72); depths larger than the layer count create prompts only for
  the existing blocks.
- Prompt values are drawn while OpenAI's CLIP is constructed (``build_model`` -> ``VisionTransformer``: the
  ``VPT`` normal_ l.376-378, each block's ``VPT_shallow`` l.215-221, then the text blocks), interleaved with CLIP's
  own init draws, before the state dict overwrites CLIP's weights (the VPT tensors are the "missing keys",
  l.692-696); the context is drawn after. Only the distribution N(0, 0.02) is reproducible: :func:`init_ivlp`
  draws in the same creation order without CLIP's own draws.
- fp16 recipe: ``ctx`` and ``token_prefix/suffix`` are fp16 (SGD on an fp16 parameter, no loss scaling); the
  VPT tensors are fp32 parameters cast ``.half()`` in each block. PREC fp32 / amp make CLIP fp32 but the blocks
  still round the prompts to fp16 at each forward.
- ResNet image towers: ``build_model`` makes a ``ModifiedResNet`` and no vision prompt exists; the text prompts
  still train: IVLP on RN50 is silently text-only (:func:`init_ivlp` returns no vision tensors, and
  :func:`ivlp_image_features` is the plain image encoder then).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import mpl_clip as C
from . import mpl_dassl
from .mpl_dassl import write_dassl_checkpoint

REPO = C.REPO
MODEL_NAME = "VLPromptLearner"  # the trainer's register_model name (l.226): the checkpoint's sub-folder

# configs/trainers/IVLP/*.yaml (MaPLe repo) and PromptSRC's IVLP config; train.py l.112-121 defaults
RECIPES = {
    "ivlp": dict(n_ctx_text=2, n_ctx_vision=2, depth_text=12, depth_vision=12, ctx_init="a photo of a",
                 lr=0.0035, max_epoch=5, batch_size=4),  # vit_b16_c2_ep5_batch4_2+2ctx.yaml l.16-39
    "language_only": dict(n_ctx_text=4, n_ctx_vision=0, depth_text=12, depth_vision=0, ctx_init="a photo of a",
                          lr=0.0025, max_epoch=5, batch_size=4),  # vit_b16_c2_ep5_batch4_4ctx_language_only.yaml
    "promptsrc_baseline": dict(n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9, ctx_init="a photo of a",
                               lr=0.0025, max_epoch=20, batch_size=4),  # PromptSRC IVLP/vit_b16_c2_ep20_batch4_4+4ctx
    "train_py_defaults": dict(n_ctx_text=2, n_ctx_vision=2, depth_text=9, depth_vision=9, ctx_init="a photo of a"),
}


# the cfg.TRAINER.IVLP keys (train.py l.113-120)
CONFIG_KEYS = {"n_ctx_text": "N_CTX_TEXT", "n_ctx_vision": "N_CTX_VISION", "depth_text": "PROMPT_DEPTH_TEXT",
               "depth_vision": "PROMPT_DEPTH_VISION", "ctx_init": "CTX_INIT"}


def dassl_config(recipe: str = "ivlp", **run) -> dict:
    """The configuration an IVLP run of ``recipe`` prints into log.txt (see :func:`originals.mpl_dassl.dassl_config`;
    ``run``: dataset / shots / subsample / seed)."""
    return mpl_dassl.dassl_config("IVLP", "IVLP", RECIPES[recipe], CONFIG_KEYS, **run)


def init_ivlp(model, classnames: Sequence[str], *, n_ctx_text: int = 2, n_ctx_vision: int = 2, depth_text: int = 9,
              depth_vision: int = 9, ctx_init: Optional[str] = "a photo of a",
              generator: Optional[torch.Generator] = None) -> tuple["OrderedDict[str, torch.Tensor]", dict]:
    """The learned tensors at initialisation and the fixed prompt parts (``independentVL.py`` l.65-151 and
    ``clip/model.py`` l.191-223, l.369-378). Defaults are train.py's (l.113-120).

    Returns (learned, fixed): learned by the original's state-dict names (see the module docstring); fixed =
    {"prompt_learner.token_prefix" (K, 1, D), "prompt_learner.token_suffix" (K, 76 - n_t, D),
    "tokenized_prompts" (K, 77), "prompt_prefix" str}."""
    if depth_text < 1:
        raise AssertionError("In Independent VL prompting, Language prompt depth should be >=1")  # l.70-72
    learned: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    if C.is_vit(model) and depth_vision > 0:
        width = C.vision_width(model)
        learned["image_encoder.VPT"] = C.normal_prompts(n_ctx_vision, width, generator)
        for i in range(1, min(depth_vision, len(model.visual.transformer.resblocks))):
            learned[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = C.normal_prompts(
                n_ctx_vision, width, generator)
    for i in range(1, min(depth_text, len(model.transformer.resblocks))):
        learned[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = C.normal_prompts(
            n_ctx_text, C.text_width(model), generator)
    ctx, prompt_prefix = C.context_init(model, n_ctx_text, ctx_init, generator)
    learned["prompt_learner.ctx"] = ctx
    learned.move_to_end("prompt_learner.ctx", last=False)
    parts = C.class_prompts(model, classnames, prompt_prefix, n_ctx_text)
    fixed = {"prompt_learner.token_prefix": parts["token_prefix"], "prompt_learner.token_suffix": parts["token_suffix"],
             "tokenized_prompts": parts["tokenized_prompts"], "prompt_prefix": prompt_prefix}
    return learned, fixed


def ivlp_text_features(model, learned: dict, fixed: dict) -> torch.Tensor:
    """``VLPromptLearner.forward`` + ``TextEncoder.forward`` with the IVLP text blocks: (K, E), unnormalised."""
    prompts = C.construct_prompts(learned["prompt_learner.ctx"], fixed["prompt_learner.token_prefix"],
                                  fixed["prompt_learner.token_suffix"])
    return C.text_features(model, prompts, fixed["tokenized_prompts"], C.deep_prompt_list(learned, "text_encoder"))


def ivlp_image_features(model, learned: dict, images: torch.Tensor) -> torch.Tensor:
    """``clip_model.visual`` with the IVLP vision prompts: (B, E), unnormalised. No vision prompt at all
    (depth_vision 0, or a ResNet tower) is CLIP's plain image encoder."""
    if not C.is_vit(model):
        return model.encode_image(images)
    return C.image_features(model, images, learned.get("image_encoder.VPT"),
                            C.deep_prompt_list(learned, "image_encoder"))


def ivlp_logits(model, learned: dict, fixed: dict, images: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward`` in eval mode (l.164-179): exp(logit_scale) * cosine, (B, K)."""
    return C.cosine_logits(model, ivlp_image_features(model, learned, images),
                           ivlp_text_features(model, learned, fixed))


def ivlp_loss(model, learned: dict, fixed: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward`` in train mode: ``F.cross_entropy(logits, label)`` (l.176-177), mean over the batch."""
    return F.cross_entropy(ivlp_logits(model, learned, fixed, images), labels)


def original_state_dict(model, learned: dict, fixed: dict, fp16: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """``CustomCLIP.state_dict()`` (l.154-162): logit_scale, prompt_learner.{ctx, token_prefix, token_suffix},
    image_encoder.* (CLIP's visual with the VPT tensors), text_encoder.* (transformer with the VPT_shallow
    tensors, positional_embedding, ln_final, text_projection). ``fp16``: the recipes' dtypes (ctx and token
    buffers fp16, CLIP per convert_weights, VPT tensors fp32)."""
    half = (lambda t: t.half()) if fp16 else (lambda t: t)
    sd = OrderedDict(logit_scale=model.logit_scale.detach().clone())
    sd["prompt_learner.ctx"] = half(learned["prompt_learner.ctx"].detach().clone())
    for key in ("prompt_learner.token_prefix", "prompt_learner.token_suffix"):
        if key in fixed:
            sd[key] = half(fixed[key].detach().clone())
    sd.update(C.visual_state(model, learned, "image_encoder", fp16))
    sd.update(C.text_state(model, learned, fp16))
    return sd


def write_original_checkpoint(directory, tensors: dict, model, *, epoch: int = 5, lr: float = 0.0035,
                              max_epoch: Optional[int] = None, fp16: bool = True,
                              momentum_buffers: Optional[dict] = None):
    """The file an IVLP run leaves: ``<directory>/VLPromptLearner/model.pth.tar-<epoch>`` (Dassl's save_model of
    the whole CustomCLIP, see :mod:`originals.mpl_dassl`). ``tensors``: the learned tensors and (optionally) the
    ``prompt_learner.token_prefix/suffix`` buffers by the original's names (``{**learned, **fixed}`` of
    :func:`init_ivlp` works); the frozen CLIP weights come from ``model``. The original's loader drops
    token_prefix/suffix and loads everything else (frozen weights included) with strict=False.
    Returns the file's path."""
    learned = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and "token_" not in k}
    sd = original_state_dict(model, learned, tensors, fp16)
    trainable = {k for k in sd if k == "prompt_learner.ctx" or "VPT" in k}
    buffers = {"prompt_learner.token_prefix", "prompt_learner.token_suffix"} | {
        f"image_encoder.{k[len('visual.'):]}" for k in C.buffer_names(model) if k.startswith("visual.")}
    return write_dassl_checkpoint(directory, MODEL_NAME, sd, epoch=epoch, trainable=trainable, buffers=buffers,
                                  lr=lr, max_epoch=max_epoch or epoch, momentum_buffers=momentum_buffers)
