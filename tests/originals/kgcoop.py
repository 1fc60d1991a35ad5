"""KgCoOp, written out from htyao89/KgCoOp @ c43ccc32c8739f64b165cfa205fcc6c0f5bb5b17 (MIT).

``kgcoop.py:N`` is ``KgCoOp/trainers/kgcoop.py`` line N; ``train.py`` is ``KgCoOp/train.py``; the trainer runs on
the ProGrad Dassl fork shipped in the repository (see coop_base). CoOp's context (4 vectors from "a photo of a")
at the end of every prompt; the loss adds ``W * (1 - mean_c cos(t_c, t_c^clip))`` between the learned class text
features and those of the dataset's hand-crafted prompt.

Quirks (each also in the docstring of the function concerned):

- any truthy ``CTX_INIT`` (the configs set ``True``; a string works the same) means "a photo of a" and 4 context
  vectors, whatever the string and ``N_CTX`` say (kgcoop.py:94-104);
- ``CLASS_TOKEN_POSITION`` is stored and never used: the class name is always at the end (kgcoop.py:173, 175-193);
- the hand-crafted DTD prompt is "a photo of a {}, a type of texture." (CoOp's is "{} texture.", kgcoop.py:41);
- dead parameters that are saved in every checkpoint: ``bias_vectors`` (1, 512) and ``meta_net.linear1`` (512 ->
  512), 512 hard-coded whatever the text width; an ``Adapter(512, 4)`` in CustomCLIP (not saved); none is used in
  the forward, all are frozen by the name filter ``"ctx" in name`` (kgcoop.py:123-125, 148-156, 221, 268-273);
- the hand-crafted features come from a second CLIP built fp16 on CUDA whatever ``PREC`` is (kgcoop.py:132-146);
- the amp branch calls ``cross_entropy`` on the (logits, score) tuple and fails (kgcoop.py:300-307);
- the learning rates printed in the maintainer's log of issue #2 are those of TWO cosine schedules stepping the
  same optimizer (the commented-out ``sched_`` of kgcoop.py:284-286, 321), not of the released code
  (:func:`issue2_printed_lr`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .coop_base import (coop_prompt_buffers, dassl_epoch_lr, encode_text, load_dropping,
                        registered_optimizer_and_scheduler, text_encoder, tokenize, write_dassl_checkpoint)

#: kgcoop.py:37-54 (DescribableTextures differs from CoOp's "{} texture."; a commented-out EuroSAT
#: "a photo of a {}." sits at line 43).
CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "a photo of a {}, a type of texture.",
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

#: The text every truthy CTX_INIT becomes (kgcoop.py:96).
INIT_TEXT = "a photo of a"

#: The base-to-new recipe: configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml + scripts/base2new_train.sh
#: (+ train.py:92-99 defaults). RN50 variant: rn50_ep100.yaml (same values, backbone "RN50").
RECIPE = {
    "backbone": "ViT-B/16", "ctx_init": True, "n_ctx": 4, "csc": False, "class_token_position": "end", "w": 8.0,
    "prec": "fp16", "optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "max_epoch": 100,
    "warmup_epoch": 1, "warmup_lr": 1e-5, "batch_size": 128, "test_batch_size": 100, "shots": 16,
    "seeds": (1, 2, 3), "load_epoch": 100,
}


def init_context(model, n_cls: int, *, ctx_init=True, n_ctx: int = 16, csc: bool = False,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, str]:
    """PromptLearner's context (kgcoop.py:94-121). Returns ``ctx`` and the prompt prefix text.

    Quirk: ANY truthy ``ctx_init`` (``True`` in the configs, or any string) is replaced by "a photo of a": ``ctx``
    = its 4 token embeddings (rows 1..4 of ``token_embedding(tokenize("a photo of a"))``), ``n_ctx`` becomes 4
    whatever was asked, and ``csc`` is ignored (one shared context). Falsy: CoOp's random init N(0, 0.02),
    (n_ctx, D) or (n_cls, n_ctx, D) with ``csc``, prefix "X X ... X". The original draws from the global RNG, then
    draws ``bias_vectors`` and ``meta_net`` (see :func:`dead_parameters`); ``generator`` stands for that RNG."""
    width = model.ln_final.weight.shape[0]
    if ctx_init:
        n_ctx = len(INIT_TEXT.split(" "))
        with torch.no_grad():
            embedding = model.token_embedding(tokenize([INIT_TEXT]))
        return embedding[0, 1:1 + n_ctx, :].clone(), INIT_TEXT
    shape = (n_cls, n_ctx, width) if csc else (n_ctx, width)
    ctx = torch.empty(shape, dtype=model.ln_final.weight.dtype).normal_(0, 0.02, generator=generator)
    return ctx, " ".join(["X"] * n_ctx)


def prompt_buffers(model, classnames: Sequence[str], prompt_prefix: str, n_ctx: int):
    """``token_prefix`` (K, 1, D), ``token_suffix`` (K, 76 - n_ctx, D), ``tokenized`` (K, 77) (kgcoop.py:127-171;
    names with "_" replaced, ``prompt_prefix + " " + name + "."`` tokenized whole)."""
    prefix, suffix, tokenized, _ = coop_prompt_buffers(model, classnames, prompt_prefix, n_ctx)
    return prefix, suffix, tokenized


def build_prompts(token_prefix: torch.Tensor, ctx: torch.Tensor, token_suffix: torch.Tensor,
                  class_token_position: str = "end") -> torch.Tensor:
    """PromptLearner.forward (kgcoop.py:175-193): ``cat([prefix, ctx, suffix], dim=1)`` -> (K, 77, D).

    Quirk: ``class_token_position`` is accepted and ignored, as the original stores it (kgcoop.py:173) and never
    reads it: "middle" and "front" silently give the end layout."""
    del class_token_position
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(token_prefix.shape[0], -1, -1)
    return torch.cat([token_prefix, ctx, token_suffix], dim=1)


def anchor_text_features(model, classnames: Sequence[str], dataset: str) -> torch.Tensor:
    """The hand-crafted text features ``PromptLearner.text_features`` (kgcoop.py:132-146): ``encode_text`` of
    ``CUSTOM_TEMPLATES[dataset].format(name.replace("_", " "))``, L2-normalised -> (K, E), no gradient.

    The original encodes them with a second CLIP loaded fp16 and moved to CUDA regardless of PREC, keeps them as a
    plain attribute (not a buffer: never saved) and normalises them again in every forward (a no-op up to
    rounding). Here: the same weights in the model's dtype."""
    tokens = tokenize([CUSTOM_TEMPLATES[dataset].format(name.replace("_", " ")) for name in classnames])
    with torch.no_grad():
        features = encode_text(model, tokens)
    return features / features.norm(dim=-1, keepdim=True)


def forward(model, image_features: torch.Tensor, prompts: torch.Tensor, tokenized: torch.Tensor,
            anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CustomCLIP.forward (kgcoop.py:223-243) from the image encoder's output on.

    ``image_features`` (B, E) = ``visual(image)``, ``prompts`` (K, 77, D), ``anchor`` (K, E). Returns the logits
    (B, K) = ``exp(logit_scale) * norm(f) @ norm(t).t()`` and ``score = 1 - mean_c cos(norm(t_c), norm(anchor_c))``
    with ``CosineSimilarity(dim=1, eps=1e-7)``. Evaluation uses the logits only (``model_inference``,
    kgcoop.py:331-332)."""
    text = text_encoder(model, prompts, tokenized)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = model.logit_scale.exp() * image_features @ text.t()
    anchor = anchor / anchor.norm(dim=-1, keepdim=True)
    score = 1.0 - torch.mean(F.cosine_similarity(text, anchor, dim=1, eps=1e-07))
    return logits, score


def loss(logits: torch.Tensor, score: torch.Tensor, labels: torch.Tensor, w: float = 8.0) -> torch.Tensor:
    """``F.cross_entropy(logits, labels) + W * score`` (kgcoop.py:309-310). ``W`` = ``TRAINER.COOP.W``: 1.0 by
    default (train.py:97), 8.0 in every script (scripts/run.sh, xd_train.sh:8). For unit vectors ``1 - cos`` is
    half the squared distance, so W = 8 here is W = 4 on ``||t - t^clip||^2``."""
    return F.cross_entropy(logits, labels) + w * score


def reference_step(model, ctx: torch.nn.Parameter, token_prefix, token_suffix, tokenized, anchor, image_features,
                   labels, optimizer: torch.optim.Optimizer, w: float = 8.0) -> dict:
    """One training step (kgcoop.py:297-322 with Dassl's ``model_backward_and_update``, fork:dassl/engine/
    trainer.py:306-309): zero_grad, backward of the total loss, ``optimizer.step()`` (Dassl's SGD over the
    registered prompt learner; only ``ctx`` has a gradient). The scheduler steps after the epoch's last batch
    (kgcoop.py:318-320 calls ``self.sched.step()`` itself, the same as ``update_lr``). Returns the loss parts."""
    logits, score = forward(model, image_features, build_prompts(token_prefix, ctx, token_suffix), tokenized, anchor)
    total = loss(logits, score, labels, w)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return {"loss": total.detach(), "score": score.detach(), "logits": logits.detach()}


def dead_parameters(dtype=torch.float16, generator: Optional[torch.Generator] = None) -> OrderedDict:
    """The unused parameters the prompt learner registers and saves (kgcoop.py:123-125, 148-156):
    ``bias_vectors`` (1, 512) N(0, 0.02) in the model dtype, ``meta_net.linear1.weight`` (512, 512) and ``.bias``
    (512,) with nn.Linear's default init, converted to fp16 because ``TRAINER.COCOOP.PREC`` defaults to "fp16"
    (train.py:104) even when ``TRAINER.COOP.PREC`` is fp32. 512 is hard-coded (ViT-L/14's 768-wide text tower
    would still get 512). They only consume RNG and appear in checkpoints."""
    bias_vectors = torch.empty(1, 512, dtype=dtype).normal_(0, 0.02, generator=generator)
    bound = 1 / math.sqrt(512)  # nn.Linear's default init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    weight = torch.empty(512, 512).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(512).uniform_(-bound, bound, generator=generator)
    return OrderedDict([("bias_vectors", bias_vectors), ("meta_net.linear1.weight", weight.half()),
                        ("meta_net.linear1.bias", bias.half())])


def released_epoch_lr(epoch: int, base_lr: float = 0.002, max_epoch: int = 100) -> float:
    """The learning rate of 0-based ``epoch`` with the released code: one Dassl cosine + constant warm-up
    (configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml:15-22, kgcoop.py:280-281, 318-320)."""
    return dassl_epoch_lr(epoch, base_lr, max_epoch)


def issue2_printed_lr(display_epoch: int, base_lr: float = 0.002, max_epoch: int = 100) -> float:
    """The ``lr`` the maintainer's log in htyao89/KgCoOp issue #2 prints at ``epoch [d/100]`` (EuroSAT seed 1).

    The log prints after the epoch's scheduler step, i.e. the rate of the next epoch. Its values (1.197732e-06 at
    91 ... 1.217413e-10 at 100) are ``base_lr * f(d - 1) ** 2`` with ``f(t) = (1 + cos(pi t / max_epoch)) / 2``:
    two cosine + warm-up schedulers stepping the same optimizer, as the commented-out ``self.sched_ =
    build_lr_scheduler(self.optim, ...)`` / ``self.sched_.step()`` (kgcoop.py:285, 321) would, under torch 1.x
    (whose CosineAnnealingLR returns ``base_lrs`` at its initial step; torch 2.x returns the group's current rate
    there and the product would start from 1e-5). The released code prints ``base_lr * f(d - 1)``
    (:func:`released_epoch_lr` of epoch d): 4.89e-5 at 91. The published KgCoOp numbers may come from the squared
    schedule; the log is the only evidence read here."""
    f = (1 + math.cos(math.pi * (display_epoch - 1) / max_epoch)) / 2
    return base_lr * f * f


def write_original_checkpoint(directory, tensors: dict, epoch: int = 100, *, dtype=torch.float16,
                              max_epoch: Optional[int] = None, lr: float = 0.002,
                              generator: Optional[torch.Generator] = None):
    """What a KgCoOp run saves: ``<directory>/prompt_learner/model.pth.tar-<epoch>`` (+ ``checkpoint``), the ProGrad
    fork's four keys (no ``val_result``). Returns the file's path.

    ``tensors``: ``ctx`` ((4, D) after word init), ``token_prefix``, ``token_suffix``; optionally the dead
    ``bias_vectors``, ``meta_net.linear1.weight``, ``meta_net.linear1.bias`` (drawn by :func:`dead_parameters`
    otherwise). ``state_dict`` order is the module's: parameters, buffers, then the ``meta_net`` child: ctx,
    bias_vectors, token_prefix, token_suffix, meta_net.linear1.weight, meta_net.linear1.bias. ``dtype``: the
    model dtype (fp16 for PREC "fp16", the recipe); ``meta_net`` is fp16 in both cases. The optimizer is SGD over
    the four parameters in that order (only ctx has momentum state). The loader (kgcoop.py:335-371) deletes
    token_prefix, token_suffix (and a token_midfix no KgCoOp file has) and loads the rest with strict=False."""
    dead = dead_parameters(dtype, generator)
    dead.update({k: v for k, v in tensors.items() if k in dead})
    cast = {k: v.detach().to(torch.float16 if k.startswith("meta_net.") else dtype) for k, v in dead.items()}
    state = OrderedDict([("ctx", tensors["ctx"].detach().to(dtype)), ("bias_vectors", cast["bias_vectors"]),
                         ("token_prefix", tensors["token_prefix"].detach().to(dtype)),
                         ("token_suffix", tensors["token_suffix"].detach().to(dtype)),
                         ("meta_net.linear1.weight", cast["meta_net.linear1.weight"]),
                         ("meta_net.linear1.bias", cast["meta_net.linear1.bias"])])
    params = [torch.nn.Parameter(state[k].clone(), requires_grad=(k == "ctx"))
              for k in ("ctx", "bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias")]
    optimizer, scheduler = registered_optimizer_and_scheduler(params, "sgd", lr, epoch, max_epoch or epoch)
    return write_dassl_checkpoint(directory, "prompt_learner", state, epoch, optimizer, scheduler,
                                  with_val_result=False)


def loaded_state(checkpoint: dict) -> OrderedDict:
    """What ``KgCoOp.load_model`` (kgcoop.py:335-371) loads into the prompt learner (strict=False)."""
    return load_dropping(checkpoint["state_dict"], ("token_prefix", "token_suffix", "token_midfix"))
