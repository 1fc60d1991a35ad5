"""VPT as the MaPLe repo runs it ("deep vision prompting"; shallow with depth 1), written out on open_clip.

Source: muzairkhattak/multimodal-prompt-learning@69bce21ae8eda80ad6187534b2dce09cf6c59e17 ``trainers/vpt.py``
(``load_clip_to_cpu`` l.21-41, ``FixedEmbeddings`` l.67-89, ``CustomCLIP`` l.92-114, ``VPT`` trainer l.117-239) on
the IVLP blocks of ``clip/model.py`` (design ``{"trainer": "VPT", "vision_depth": D, "vision_ctx": n,
"language_depth": 0, "language_ctx": 0}``, l.33-37): vision prompts only, the text side frozen and hand-crafted.

Learned tensors (original names): ``image_encoder.VPT`` (n, W) appended after the positional embedding, and
``image_encoder.transformer.resblocks.<i>.VPT_shallow`` (n, W) replacing the last n tokens at blocks
1 <= i < min(depth, layers). Text: ``encode_text("a photo of a {c}.")`` computed ONCE at construction
(``FixedEmbeddings``, no gradient), normalised in the forward; logits = exp(logit_scale) * cosine; CE when
``training=True`` (l.101-114).

Quirks (read from code):
- ``load_clip_to_cpu`` returns ``model.float()`` (l.41): VPT runs CLIP in fp32 whatever PREC says, but the blocks
  still cast the prompts ``.half()`` before concatenating with the fp32 sequence, so the prompts are rounded to
  fp16 at every forward (not done here: a precision artefact, not the method).
- ``cfg.TRAINER.VPT.CTX_INIT`` (train.py l.126) is never read: the text is always "a photo of a {c}." (l.73).
- PROMPT_DEPTH_VISION must be >= 1 (assert l.38); depth 1 = shallow VPT (train.py default, l.128).
- The recipe file ``vit_b16_c2_ep5_batch4_4.yaml`` sets N_CTX_VISION 8 (despite the "_4" in its name).
- PREC "amp" calls ``model(image, label)`` without ``training=True`` (l.180-182): the forward returns the (B, K)
  logits and ``scaler.scale(logits).backward()`` fails (non-scalar): only fp16/fp32 run.
- The CustomCLIP also holds ``text_encoder`` (l.97), never used in the forward; its weights are saved.
- ResNet image towers: no prompt tensor exists (:func:`init_vpt` returns none); the trainer then has no
  parameter with a gradient and the first ``loss.backward()`` fails (read from code, not run).
- The forward moves the fixed text features ``.cuda()`` on every call (l.104): the original needs a GPU.
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
MODEL_NAME = "prompt_learner"  # register_model name (l.161), although no module of that name exists
TEMPLATE = "a photo of a {}."  # FixedEmbeddings l.73 + l.80 ("a photo of a" + " " + name + ".")

RECIPES = {
    # configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml l.4, l.18-19, l.34-37
    "deep": dict(n_ctx_vision=8, depth_vision=12, lr=0.0025, max_epoch=5, batch_size=4),
    "train_py_defaults": dict(n_ctx_vision=2, depth_vision=1),  # train.py l.124-128 (shallow)
}


# the cfg.TRAINER.VPT keys (train.py l.124-128); CTX_INIT exists but is never read
CONFIG_KEYS = {"n_ctx_vision": "N_CTX_VISION", "depth_vision": "PROMPT_DEPTH_VISION"}


def dassl_config(recipe: str = "deep", **run) -> dict:
    """The configuration a VPT run of ``recipe`` prints into log.txt (:func:`originals.mpl_dassl.dassl_config`)."""
    cfg = mpl_dassl.dassl_config("VPT", "VPT", RECIPES[recipe], CONFIG_KEYS, **run)
    cfg["TRAINER"]["VPT"]["CTX_INIT"] = "a photo of a"
    return cfg


def init_vpt(model, *, n_ctx_vision: int = 2, depth_vision: int = 1,
             generator: Optional[torch.Generator] = None) -> "OrderedDict[str, torch.Tensor]":
    """``clip/model.py`` l.369-378 and l.210-221 with language depth 0: N(0, 0.02) prompts, drawn while CLIP is
    constructed in the original (interleaved with CLIP's own draws; see :mod:`originals.ivlp`). A ResNet tower
    gets none."""
    if depth_vision < 1:
        raise AssertionError("For Vision Prompting, PROMPT_DEPTH_VISION should be >= 1")  # vpt.py l.38
    learned: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    if not C.is_vit(model):
        return learned
    width = C.vision_width(model)
    learned["image_encoder.VPT"] = C.normal_prompts(n_ctx_vision, width, generator)
    for i in range(1, min(depth_vision, len(model.visual.transformer.resblocks))):
        learned[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = C.normal_prompts(n_ctx_vision, width,
                                                                                            generator)
    return learned


def fixed_text_features(model, classnames: Sequence[str]) -> torch.Tensor:
    """``FixedEmbeddings.__init__`` (l.79-86): ``clip_model.encode_text`` of "a photo of a {name}." (names with
    "_" -> " ") on the unprompted text tower, without gradient. (K, E), unnormalised."""
    names = [name.replace("_", " ") for name in classnames]
    with torch.no_grad():
        return model.encode_text(C.tokenize([TEMPLATE.format(name) for name in names]))


def vpt_image_features(model, learned: dict, images: torch.Tensor) -> torch.Tensor:
    """``self.image_encoder(image)`` with the VPT prompts: (B, E), unnormalised."""
    return C.image_features(model, images, learned.get("image_encoder.VPT"),
                            C.deep_prompt_list(learned, "image_encoder"))


def vpt_logits(model, learned: dict, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward(image)`` (l.101-114): exp(logit_scale) * norm(img) @ norm(text).T, (B, K).
    ``text``: :func:`fixed_text_features`."""
    return C.cosine_logits(model, vpt_image_features(model, learned, images), text)


def vpt_loss(model, learned: dict, images: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward(image, label, training=True)``: cross-entropy, mean over the batch (l.111-112)."""
    return F.cross_entropy(vpt_logits(model, learned, images, text), labels)


def original_state_dict(model, learned: dict) -> "OrderedDict[str, torch.Tensor]":
    """``CustomCLIP.state_dict()``: logit_scale, image_encoder.* (with the VPT tensors), text_encoder.* (unused
    by the forward). No ``prompt_learner`` entry exists; everything is fp32 (``model.float()``, l.41)."""
    sd = OrderedDict(logit_scale=model.logit_scale.detach().clone())
    sd.update(C.visual_state(model, learned, "image_encoder", fp16=False))
    sd.update(C.text_state(model, learned, fp16=False))
    return sd


def write_original_checkpoint(directory, tensors: dict, model, *, epoch: int = 5, lr: float = 0.0025,
                              max_epoch: Optional[int] = None, momentum_buffers: Optional[dict] = None):
    """The file a VPT run leaves: ``<directory>/prompt_learner/model.pth.tar-<epoch>`` holding the whole CustomCLIP
    (fp32); the VPT tensors are the trainable ones. The original's loader has nothing to delete (no
    token_prefix/suffix) and loads all with strict=False. Returns the file's path."""
    sd = original_state_dict(model, tensors)
    buffers = {f"image_encoder.{k[len('visual.'):]}" for k in C.buffer_names(model) if k.startswith("visual.")}
    return write_dassl_checkpoint(directory, MODEL_NAME, sd, epoch=epoch, trainable={k for k in sd if "VPT" in k},
                                  buffers=buffers, lr=lr, max_epoch=max_epoch or epoch,
                                  momentum_buffers=momentum_buffers)
