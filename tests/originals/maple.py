"""MaPLe (multi-modal prompt learning), written out on open_clip.

Source: muzairkhattak/multimodal-prompt-learning@69bce21ae8eda80ad6187534b2dce09cf6c59e17 ``trainers/maple.py``
(``load_clip_to_cpu`` l.21-40, ``TextEncoder`` l.43-66, ``MultiModalPromptLearner`` l.69-176, ``CustomCLIP``
l.179-204, ``_get_clones`` l.207-208, ``MaPLe`` trainer l.211-333) on the MaPLe blocks and
``VisionTransformer_MaPLe`` of ``clip/model.py`` (l.259-331, l.425-476; see :mod:`originals.mpl_clip`).

Learned tensors (original names; J = PROMPT_DEPTH, n = N_CTX, D = text width, W = vision width):
  ``prompt_learner.ctx`` (n, D)                                   text input context (word-init rule)
  ``prompt_learner.proj.weight`` (W, D), ``.bias`` (W,)            shallow coupling: vision input prompts = proj(ctx)
  ``prompt_learner.compound_prompts_text.<j>`` (n, D), j < J-1     deep text prompts, block j + 1
  ``prompt_learner.compound_prompt_projections.<j>.weight`` (W, D), ``.bias`` (W,)
                                                                  deep vision prompts = Linear_j(text prompt j)
Forward (l.189-204): text = prompted TextEncoder with the deep text prompts replacing positions 1..n at blocks
1..J-1; image = ViT with proj(ctx) appended after the positional embedding and Linear_j(text_j) replacing the last
n tokens at blocks 1..J-1; logits = exp(logit_scale) * cosine; train mode returns CE, eval the logits (the same
forward, nothing stochastic). Gradients reach ctx through both towers (via proj).

Quirks (read from code):
- Word init, n <= 4 (l.84-92): ctx = the first n token embeddings of CTX_INIT; the prompt text stays the whole
  CTX_INIT (l.121): recipe n=2, "a photo of a" learns "a photo", "of a" is a frozen part of every prompt.
- The J-1 coupling Linears are deep copies of ONE initialised ``nn.Linear`` (l.116-117, ``_get_clones`` l.207-208):
  they all start identical. The deep text prompts are random N(0, 0.02) (l.111-114), never word-initialised.
- Hard-coded widths: ``proj = nn.Linear(ctx_dim, 768)`` (l.103), ``compound_prompts_text`` ``(n_ctx, 512)``
  (l.111), ``nn.Linear(ctx_dim, 768)`` (l.116): ViT-B only (ViT-L/14 needs edits: issues #46, #73). Written out
  here with the model's widths (512 -> D, 768 -> W).
- ``self.proj.half()`` is unconditional (l.104): with PREC fp32, ``proj(ctx)`` mixes an fp32 ctx with an fp16
  Linear and fails; with amp the autocast forward runs but ``GradScaler`` refuses to unscale the fp16 gradients of
  proj (both read from code, not run). Only fp16 works: ctx and proj fp16, the deep prompts and deep projections
  fp32 with outputs cast ``.half()`` in the blocks.
- PROMPT_DEPTH must be >= 1 (assert l.80); J = 1 is shallow MaPLe (empty deep lists). J larger than the layer count
  creates prompts the blocks never use.
- The optimizer and the checkpoint cover the whole model (l.253-255): every CLIP weight is saved.
- ResNet image towers: ``VisionTransformer_MaPLe`` is not built (``ModifiedResNet``) and ``self.image_encoder(image,
  shared_ctx, deep_vision)`` raises TypeError (issue #49): :func:`maple_image_features` raises likewise.
- Draw order in ``__init__`` (after CLIP's construction): ctx (only when random), proj, the J-1 deep text prompts,
  then the single Linear that is cloned. :func:`init_maple` draws in that order (global RNG when ``generator`` is
  None), so from the same RNG state it gives the original's values (in fp32; the original rounds ctx and proj to
  fp16).
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
MODEL_NAME = "MultiModalPromptLearner"  # register_model name (l.255): the checkpoint's sub-folder

RECIPES = {
    "base2new": dict(n_ctx=2, depth=9, ctx_init="a photo of a", lr=0.0035, max_epoch=5, batch_size=4),
    # configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml l.1-36
    "cross_datasets": dict(n_ctx=2, depth=3, ctx_init="a photo of a", lr=0.0026, max_epoch=2, batch_size=4),
    # configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml l.15-36
    "train_py_defaults": dict(n_ctx=2, depth=9, ctx_init="a photo of a"),  # train.py l.105-109
}


# the cfg.TRAINER.MAPLE keys (train.py l.105-109)
CONFIG_KEYS = {"n_ctx": "N_CTX", "depth": "PROMPT_DEPTH", "ctx_init": "CTX_INIT"}


def dassl_config(recipe: str = "base2new", **run) -> dict:
    """The configuration a MaPLe run of ``recipe`` prints into log.txt (:func:`originals.mpl_dassl.dassl_config`)."""
    return mpl_dassl.dassl_config("MaPLe", "MAPLE", RECIPES[recipe], CONFIG_KEYS, **run)


def init_maple(model, classnames: Sequence[str], *, n_ctx: int = 2, depth: int = 9,
               ctx_init: Optional[str] = "a photo of a",
               generator: Optional[torch.Generator] = None) -> tuple["OrderedDict[str, torch.Tensor]", dict]:
    """``MultiModalPromptLearner.__init__`` (l.69-136). Returns (learned, fixed) like :func:`originals.ivlp.init_ivlp`
    (learned in the original's state-dict order)."""
    if depth < 1:
        raise AssertionError("For MaPLe, PROMPT_DEPTH should be >= 1")  # l.80
    d, w = C.text_width(model), C.vision_width(model)
    ctx, prompt_prefix = C.context_init(model, n_ctx, ctx_init, generator)
    proj_w, proj_b = C.linear_init(d, w, generator)
    deep_text = [torch.empty(n_ctx, d) for _ in range(depth - 1)]
    for t in deep_text:
        torch.nn.init.normal_(t, std=0.02, generator=generator)
    single_w, single_b = C.linear_init(d, w, generator)
    learned = OrderedDict()
    learned["prompt_learner.ctx"] = ctx
    learned["prompt_learner.proj.weight"], learned["prompt_learner.proj.bias"] = proj_w, proj_b
    for j, t in enumerate(deep_text):
        learned[f"prompt_learner.compound_prompts_text.{j}"] = t
    for j in range(depth - 1):  # _get_clones: deep copies of the one layer
        learned[f"prompt_learner.compound_prompt_projections.{j}.weight"] = single_w.clone()
        learned[f"prompt_learner.compound_prompt_projections.{j}.bias"] = single_b.clone()
    parts = C.class_prompts(model, classnames, prompt_prefix, n_ctx)
    fixed = {"prompt_learner.token_prefix": parts["token_prefix"], "prompt_learner.token_suffix": parts["token_suffix"],
             "tokenized_prompts": parts["tokenized_prompts"], "prompt_prefix": prompt_prefix}
    return learned, fixed


def maple_prompts(learned: dict) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``MultiModalPromptLearner.forward`` (l.159-176) minus the text prompts: (shared_ctx = proj(ctx) (n, W),
    deep text prompts [(n, D)] * (J-1), deep vision prompts [Linear_j(text_j) (n, W)] * (J-1))."""
    shared = F.linear(learned["prompt_learner.ctx"], learned["prompt_learner.proj.weight"],
                      learned["prompt_learner.proj.bias"])
    deep_text, deep_vision, j = [], [], 0
    while f"prompt_learner.compound_prompts_text.{j}" in learned:
        text = learned[f"prompt_learner.compound_prompts_text.{j}"]
        deep_text.append(text)
        deep_vision.append(F.linear(text, learned[f"prompt_learner.compound_prompt_projections.{j}.weight"],
                                    learned[f"prompt_learner.compound_prompt_projections.{j}.bias"]))
        j += 1
    return shared, deep_text, deep_vision


def maple_text_features(model, learned: dict, fixed: dict) -> torch.Tensor:
    """``TextEncoder.forward(prompts, tokenized, deep_text)`` (l.52-66): (K, E), unnormalised."""
    prompts = C.construct_prompts(learned["prompt_learner.ctx"], fixed["prompt_learner.token_prefix"],
                                  fixed["prompt_learner.token_suffix"])
    return C.text_features(model, prompts, fixed["tokenized_prompts"], maple_prompts(learned)[1])


def maple_image_features(model, learned: dict, images: torch.Tensor) -> torch.Tensor:
    """``VisionTransformer_MaPLe.forward(image, shared_ctx, deep_vision)``: (B, E), unnormalised."""
    if not C.is_vit(model):
        raise TypeError("forward() takes 2 positional arguments but 4 were given (the original's ModifiedResNet)")
    shared, _, deep_vision = maple_prompts(learned)
    return C.image_features(model, images, shared, deep_vision)


def maple_logits(model, learned: dict, fixed: dict, images: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward`` in eval mode (l.189-204): (B, K)."""
    return C.cosine_logits(model, maple_image_features(model, learned, images),
                           maple_text_features(model, learned, fixed))


def maple_loss(model, learned: dict, fixed: dict, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward`` in train mode: ``F.cross_entropy(logits, label)`` (l.201-202)."""
    return F.cross_entropy(maple_logits(model, learned, fixed, images), labels)


def parameter_count(text_width: int, vision_width: int, n_ctx: int, depth: int) -> int:
    """Learned parameters: J Linear(D -> W) (proj + J-1 deep projections) and J (n, D) text prompts (ctx + J-1
    deep). ViT-B/16, n 2, J 9: 3,555,072 (the paper's "3.55M")."""
    return depth * (text_width * vision_width + vision_width) + depth * n_ctx * text_width


def original_state_dict(model, learned: dict, fixed: dict, fp16: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """``CustomCLIP.state_dict()``: logit_scale; prompt_learner.{ctx, token_prefix, token_suffix, proj.*,
    compound_prompts_text.*, compound_prompt_projections.*}; image_encoder.*; text_encoder.*. ``fp16``: the recipe's
    dtypes (ctx, token buffers and proj fp16; the deep prompts and deep projections fp32; CLIP per convert_weights)."""
    half = (lambda t: t.half()) if fp16 else (lambda t: t)
    sd = OrderedDict(logit_scale=model.logit_scale.detach().clone())
    sd["prompt_learner.ctx"] = half(learned["prompt_learner.ctx"].detach().clone())
    for key in ("prompt_learner.token_prefix", "prompt_learner.token_suffix"):
        if key in fixed:
            sd[key] = half(fixed[key].detach().clone())
    for key in ("prompt_learner.proj.weight", "prompt_learner.proj.bias"):
        sd[key] = half(learned[key].detach().clone())
    for key, value in learned.items():
        if key.startswith(("prompt_learner.compound_prompts_text.", "prompt_learner.compound_prompt_projections.")):
            sd[key] = value.detach().clone()
    sd.update(C.visual_state(model, {}, "image_encoder", fp16))
    sd.update(C.text_state(model, {}, fp16))
    return sd


def write_original_checkpoint(directory, tensors: dict, model, *, epoch: int = 5, lr: float = 0.0035,
                              max_epoch: Optional[int] = None, fp16: bool = True,
                              momentum_buffers: Optional[dict] = None):
    """The file a MaPLe run leaves: ``<directory>/MultiModalPromptLearner/model.pth.tar-<epoch>`` (the whole
    CustomCLIP; trainable = every prompt_learner parameter). ``tensors``: ``{**learned, **fixed}`` of
    :func:`init_maple` or the same names. The loader drops token_prefix/suffix, loads the rest strict=False."""
    learned = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and "token_" not in k}
    sd = original_state_dict(model, learned, tensors, fp16)
    buffers = {"prompt_learner.token_prefix", "prompt_learner.token_suffix"} | {
        f"image_encoder.{k[len('visual.'):]}" for k in C.buffer_names(model) if k.startswith("visual.")}
    trainable = {k for k in sd if k.startswith("prompt_learner.") and k not in buffers}
    return write_dassl_checkpoint(directory, MODEL_NAME, sd, epoch=epoch, trainable=trainable, buffers=buffers,
                                  lr=lr, max_epoch=max_epoch or epoch, momentum_buffers=momentum_buffers)
