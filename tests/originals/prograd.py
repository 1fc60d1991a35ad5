"""ProGrad (prompt-aligned gradient), written out from BeierZhu/Prompt-align @
1b762036cbe97ecf504e17bb94d89191679e4e6e (MIT).

``prograd.py:N`` is ``ProGrad.public/trainers/prograd.py`` line N (blob-identical to KgCoOp's copy);
``trainer.py:N`` is ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py`` of the fork shipped beside it;
``README.md:N`` is ``ProGrad.public/README.md``. CoOp's context (16 vectors, the dataset phrase's embeddings in the
last slots), a frozen zero-shot CLIP as teacher, and an update that keeps the part of the cross-entropy gradient
that does not conflict with the teacher's KL gradient; the KL itself never enters the update.

Quirks (each also in the docstring of the function concerned):

- any truthy ``CTX_INIT`` means the dataset's template phrase (ProGrad's own wording, e.g. "a type of pet, a photo
  of a {}."), whatever the string; its token embeddings fill the LAST p of 16 slots, zeros before; p counts
  WORDS, so a phrase with a comma ("pet,", "food,") has one more BPE token than p and its last token stays a
  frozen part of the suffix (prograd.py:78-95);
- "middle" raises NameError (``n_ctx`` undefined in forward, prograd.py:153);
- the projection is per parameter tensor, with ``torch.dot`` of flattened tensors; when the KL gradient (or the CE
  gradient) is zero its normalisation gives NaN, ``NaN < 0`` is False and the CE gradient passes unchanged
  (trainer.py:336-345);
- ``prograd_backward_and_update`` zips each registered model's parameters with ONE flat list of KL gradients
  gathered over all models: correct only with one registered model (ProGrad registers one); a parameter
  without a gradient crashes it (``p.grad.clone()`` of None, trainer.py:326);
- the amp branch hands a tuple to the GradScaler and fails (prograd.py:364-373); with the default PREC "fp16"
  ``ctx`` is an fp16 parameter: both gradients, their norms and dot products and the SGD step are fp16 (no loss
  scaling) while the teacher runs fp32 (prograd.py:308-315); here everything is fp32;
- a saved ProGrad context is not a plain CoOp context: evaluating it needs ProGrad's prompt text ("X" * (16 - p)
  + phrase + name), whose fixed suffix starts with the phrase's spilled token for the comma datasets;
- the README's CoOp 16-shot command passes 8 shots (README.md:48).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .coop_base import (coop_prompt_buffers, encode_text, load_dropping, registered_optimizer_and_scheduler,
                        sgd_step, text_encoder, tokenize, write_dassl_checkpoint)

#: prograd.py:201-217: ProGrad's own wording, rearranged so that "{}." ends every template (the phrase before it
#: initialises the context). Differs from CoOp's for Pets, Flowers, Aircraft, DTD and Food101.
CUSTOM_TEMPLATES = {
    "OxfordPets": "a type of pet, a photo of a {}.",
    "OxfordFlowers": "a type of flower, a photo of a {}.",
    "FGVCAircraft": "a type of aircraft, a photo of a {}.",
    "DescribableTextures": "a texture of {}.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a type of food, a photo of {}.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

#: ``LOSS.LAMBDA``: 1.0 in scripts/prograd.sh:15 and the base-to-new scripts; README.md:52: "the 8-shots and
#: 16-shots results on Flowers102, DTD, and EuroSAT are gotten with lambda as 0.8".
LAMBDA_08 = {"OxfordFlowers", "DescribableTextures", "EuroSAT"}

#: Few-shot recipe: configs/trainers/ProGrad/rn50*.yaml + scripts/prograd.sh + README.md:54-58.
CONFIG_BY_SHOTS = {1: "rn50_ep50", 2: "rn50_ep100", 4: "rn50_ep100", 8: "rn50", 16: "rn50"}
EPOCHS_BY_CONFIG = {"rn50_ep50": 50, "rn50_ep100": 100, "rn50": 200}
RECIPE = {
    "backbone": "RN50", "n_ctx": 16, "ctx_init": True, "csc": False, "class_token_position": "end", "prec": "fp16",
    "optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epoch": 1, "warmup_lr": 1e-5,
    "batch_size": 32, "test_batch_size": 100, "T": 1.0, "seeds": (1, 2, 3),
}


def recipe_lambda(dataset: str, shots: int) -> float:
    """``LOSS.LAMBDA`` of the published few-shot runs (README.md:52, prograd.sh:15)."""
    return 0.8 if dataset in LAMBDA_08 and shots in (8, 16) else 1.0


def recipe_epochs(shots: int) -> int:
    """Epochs by shots: 1 -> rn50_ep50 (50), 2 / 4 -> rn50_ep100 (100), 8 / 16 -> rn50 (200) (README.md:54-58)."""
    return EPOCHS_BY_CONFIG[CONFIG_BY_SHOTS[shots]]


def init_phrase(dataset: str) -> str:
    """``CUSTOM_TEMPLATES[dataset].replace(" {}.", "").replace("_", " ")`` (prograd.py:79-81)."""
    return CUSTOM_TEMPLATES[dataset].replace(" {}.", "").replace("_", " ")


def init_context(model, dataset: str, *, n_ctx: int = 16, ctx_init=True, csc: bool = False,
                 n_cls: Optional[int] = None, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, str]:
    """PromptLearner's context (prograd.py:78-110). Returns ``ctx`` and the prompt prefix text.

    Truthy ``ctx_init`` (any value: the string is ignored, the dataset's template is used): phrase =
    :func:`init_phrase`, p = its WORD count (``len(phrase.split(" "))``, asserted <= n_ctx); ``ctx`` = zeros
    (n_ctx, D) with rows ``n_ctx - p ..`` = the phrase's first p token embeddings; prefix = "X" * (n_ctx - p) + " "
    + phrase. ``csc`` is ignored on this path. Quirk: for "a type of pet, a photo of a" p = 8 but the phrase has 9
    BPE tokens (the comma is one), so the context holds "a type of pet , a photo of" and the last "a" is a fixed
    token of ``token_suffix``; the same for Flowers, Aircraft and Food101 ("of" is fixed there). Falsy: CoOp's
    random N(0, 0.02), (n_ctx, D) or (n_cls, n_ctx, D) with ``csc``, prefix "X" * n_ctx."""
    width = model.ln_final.weight.shape[0]
    dtype = model.ln_final.weight.dtype
    if ctx_init:
        phrase = init_phrase(dataset)
        p = len(phrase.split(" "))
        assert n_ctx >= p, f"#tokens ({n_ctx}) should larger equal than #initial prompt tokens ({p}, {phrase})"
        with torch.no_grad():
            embedding = model.token_embedding(tokenize([phrase]))
        ctx = torch.zeros(n_ctx, width, dtype=dtype)
        ctx[n_ctx - p:, :] = embedding[0, 1:1 + p, :]
        return ctx, " ".join(["X"] * (n_ctx - p)) + f" {phrase}"
    shape = (n_cls, n_ctx, width) if csc else (n_ctx, width)
    return torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=generator), " ".join(["X"] * n_ctx)


def prompt_buffers(model, classnames: Sequence[str], prompt_prefix: str, n_ctx: int):
    """``token_prefix``, ``token_suffix``, ``tokenized`` and ``name_lens`` (prograd.py:112-132)."""
    return coop_prompt_buffers(model, classnames, prompt_prefix, n_ctx)


def build_prompts(token_prefix: torch.Tensor, ctx: torch.Tensor, token_suffix: torch.Tensor,
                  class_token_position: str = "end", name_lens: Optional[Sequence[int]] = None) -> torch.Tensor:
    """PromptLearner.forward (prograd.py:134-198) -> (K, 77, D). "end": ``[prefix, ctx, suffix]``; "front": per
    class ``[prefix, suffix[:name_len], ctx, suffix[name_len:]]``. Quirk: "middle" raises NameError in the
    original (``half_n_ctx = n_ctx // 2`` reads an undefined local, prograd.py:153), so it does here."""
    n_cls = token_prefix.shape[0]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    if class_token_position == "end":
        return torch.cat([token_prefix, ctx, token_suffix], dim=1)
    if class_token_position == "middle":
        raise NameError("name 'n_ctx' is not defined (ProGrad's PromptLearner.forward, prograd.py:153)")
    if class_token_position == "front":
        rows = []
        for i in range(n_cls):
            n = name_lens[i]
            rows.append(torch.cat([token_prefix[i:i + 1], token_suffix[i:i + 1, :n], ctx[i:i + 1],
                                   token_suffix[i:i + 1, n:]], dim=1))
        return torch.cat(rows, dim=0)
    raise ValueError(class_token_position)


def zero_shot_text_features(model, classnames: Sequence[str], dataset: str) -> torch.Tensor:
    """The teacher's class features ``CLIP.text_features`` (prograd.py:220-237): a separate CLIP in fp32
    (``clip_model.float()``) encodes ``CUSTOM_TEMPLATES[dataset].format(name.replace("_", " "))``, normalised ->
    (K, E). Frozen, a plain attribute (never saved)."""
    tokens = tokenize([CUSTOM_TEMPLATES[dataset].format(name.replace("_", " ")) for name in classnames])
    with torch.no_grad():
        features = encode_text(model, tokens)
    return features / features.norm(dim=-1, keepdim=True)


def zero_shot_logits(model, image_features: torch.Tensor, zs_text: torch.Tensor) -> torch.Tensor:
    """The teacher's forward (prograd.py:240-249): ``exp(logit_scale) * norm(visual(x)) @ zs_text.t()`` (B, K),
    computed under ``torch.no_grad()`` (prograd.py:376-377) from the teacher's own fp32 image tower: with fp32 the
    same features as the student's. ``image_features`` (B, E) unnormalised."""
    with torch.no_grad():
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * image_features @ zs_text.t()


def student_logits(model, image_features: torch.Tensor, prompts: torch.Tensor,
                   tokenized: torch.Tensor) -> torch.Tensor:
    """CustomCLIP.forward (prograd.py:262-277): CoOp's logits (B, K)."""
    text = text_encoder(model, prompts, tokenized)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_features @ text.t()


def prograd_loss(stu_logits: torch.Tensor, tea_logits: torch.Tensor, labels: torch.Tensor,
                 T: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ProGradLoss.forward (prograd.py:280-293): ``xe = CE(stu, y)``; ``kl = mean_b sum_c -softmax(tea / T) *
    log_softmax(stu / T) * T * T``: a soft cross-entropy (KL plus the teacher's entropy, the same gradient as the
    KL). ``LOSS.T`` is 1.0 in every config."""
    xe_loss = F.cross_entropy(stu_logits, labels)
    tea_prob = F.softmax(tea_logits / T, dim=-1)
    kl_loss = -tea_prob * F.log_softmax(stu_logits / T, -1) * T * T
    return xe_loss, kl_loss.sum(1).mean()


def project_gradient(ce_grad: torch.Tensor, kl_grad: torch.Tensor, lambda_: float = 1.0) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The per-tensor projection of ``prograd_backward_and_update`` (trainer.py:336-345). Returns (the gradient
    handed to the optimizer, the cosine that decided it).

    ``b = kl_grad / ||kl_grad||``, ``a_n = ce_grad / ||ce_grad||``; if ``dot(a_n, b) < 0``: ``ce_grad - lambda *
    dot(ce_grad, b) * b``, else ``ce_grad`` unchanged. With lambda 1 the result is orthogonal to the KL gradient.
    Quirk: a zero gradient on either side makes the cosine NaN, ``NaN < 0`` is False, nothing is projected."""
    b = kl_grad / torch.linalg.norm(kl_grad)
    a_n = ce_grad / torch.linalg.norm(ce_grad)
    cos = torch.dot(a_n.flatten(), b.flatten())
    if cos < 0:
        return ce_grad - lambda_ * torch.dot(ce_grad.flatten(), b.flatten()) * b, cos
    return ce_grad, cos


def prograd_backward_and_update(params: Sequence[torch.nn.Parameter], xe_loss: torch.Tensor, kl_loss: torch.Tensor,
                                optimizer: torch.optim.Optimizer, lambda_: float = 1.0) -> None:
    """The fork's ``SimpleTrainer.prograd_backward_and_update(loss_a=xe, loss_b=kl, lambda_)`` (trainer.py:311-349)
    with its ``.grad`` choreography, for one registered model whose parameters are ``params`` (ProGrad: the prompt
    learner, i.e. ``[ctx]``): zero_grad; ``kl.backward(retain_graph=True)``; clone every ``p.grad``; zero_grad;
    ``xe.backward()``; replace each ``p.grad`` by :func:`project_gradient`; ``optimizer.step()``. The optimizer's
    weight decay and momentum act on the projected gradient."""
    optimizer.zero_grad()
    kl_loss.backward(retain_graph=True)
    kl_grads = [p.grad.clone() for p in params]
    optimizer.zero_grad()
    xe_loss.backward()
    for p, kl_grad in zip(params, kl_grads):
        p.grad = project_gradient(p.grad.clone(), kl_grad, lambda_)[0]
    optimizer.step()


def reference_update_step(model, ctx: torch.Tensor, token_prefix, token_suffix, tokenized, image_features, labels,
                          zs_text, *, lr: float, momentum_buffer: Optional[torch.Tensor] = None,
                          lambda_: float = 1.0, T: float = 1.0, momentum: float = 0.9,
                          weight_decay: float = 5e-4) -> dict:
    """One full ProGrad update of a shared context (prograd.py:360-394 + trainer.py:311-349), written out without
    an optimizer object: forward student and teacher, the two losses, their gradients with respect to ``ctx``,
    the projection, then Dassl's SGD step (:func:`coop_base.sgd_step`; weight decay added to the projected
    gradient). ``ctx`` (n_ctx, D) is not modified. Returns the losses, ``grad_ce``, ``grad_kl``, ``cos``,
    ``grad`` (projected), the new ``ctx`` and ``momentum_buffer``."""
    ctx = ctx.detach().requires_grad_(True)
    stu = student_logits(model, image_features, build_prompts(token_prefix, ctx, token_suffix), tokenized)
    tea = zero_shot_logits(model, image_features, zs_text)
    xe_loss, kl_loss = prograd_loss(stu, tea, labels, T)
    grad_kl, = torch.autograd.grad(kl_loss, ctx, retain_graph=True)
    grad_ce, = torch.autograd.grad(xe_loss, ctx)
    grad, cos = project_gradient(grad_ce, grad_kl, lambda_)
    new_ctx, buf = sgd_step(ctx.detach(), grad, momentum_buffer, lr, momentum=momentum, weight_decay=weight_decay)
    return {"xe_loss": xe_loss.detach(), "kl_loss": kl_loss.detach(), "grad_ce": grad_ce, "grad_kl": grad_kl,
            "cos": cos, "grad": grad, "ctx": new_ctx, "momentum_buffer": buf}


def write_original_checkpoint(directory, tensors: dict, epoch: int, *, dtype=torch.float16,
                              max_epoch: Optional[int] = None, lr: float = 0.002):
    """What a ProGrad run saves: ``<directory>/prompt_learner/model.pth.tar-<epoch>`` (+ ``checkpoint``), the fork's
    four keys (no ``val_result``). ``tensors``: ``ctx`` (16, D) (or (K, 16, D) CSC), ``token_prefix``,
    ``token_suffix``; state order ctx, token_prefix, token_suffix; ``dtype`` fp16 for the recipe's PREC. SGD over
    ``[ctx]``. The zero-shot teacher is not saved. The loader (prograd.py:403-439) deletes token_prefix and
    token_suffix and loads ``ctx`` with strict=False."""
    state = OrderedDict((k, tensors[k].detach().to(dtype)) for k in ("ctx", "token_prefix", "token_suffix"))
    params = [torch.nn.Parameter(state["ctx"].clone())]
    optimizer, scheduler = registered_optimizer_and_scheduler(params, "sgd", lr, epoch, max_epoch or epoch)
    return write_dassl_checkpoint(directory, "prompt_learner", state, epoch, optimizer, scheduler,
                                  with_val_result=False)


def loaded_state(checkpoint: dict) -> OrderedDict:
    """What ``ProGrad.load_model`` (prograd.py:403-439) loads into the prompt learner (strict=False)."""
    return load_dropping(checkpoint["state_dict"], ("token_prefix", "token_suffix"))
