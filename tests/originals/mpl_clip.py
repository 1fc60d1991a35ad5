"""The prompted CLIP of muzairkhattak/multimodal-prompt-learning, written out on open_clip modules.

Source: muzairkhattak/multimodal-prompt-learning@69bce21ae8eda80ad6187534b2dce09cf6c59e17 ``clip/model.py``
(``ResidualAttentionBlock_IVLP`` l.191-256, ``ResidualAttentionBlock_MaPLe`` l.259-331, ``Transformer`` l.334-359,
``VisionTransformer`` l.362-422, ``VisionTransformer_MaPLe`` l.425-476, ``convert_weights`` l.630-651) and the
prompt learners of its ``trainers/`` (and of muzairkhattak/PromptSRC@bb95c77b634d63488f2cad81ff4a72d53bdd06d5,
whose ``clip/model.py`` is the same code: its line numbers after l.361 are one higher, after l.398 two higher).

The original runs OpenAI's CLIP class (sequence-first); open_clip's CLIP has the same parameter names and shapes and
its transformer is batch-first, so the blocks are run here one by one on (N, L, D) tensors, with no permutes.
Everything is fp32. The original's fp16 artefacts (prompts cast ``.half()`` in every block, fp16 ``ctx`` and
``token_prefix/suffix``) are left out and documented where they occur.

What the two block kinds do, read from the code:

- text: at block i >= 1 (0-based) that carries a prompt, positions 1..n of the hidden state are REPLACED by the
  block's prompt (``x = cat[x[:1], prompt, x[1 + n:]]``, l.243-252 / l.314-326); block 0's prompts are the input
  context of the prompt learner (with the positional embedding added to them like to every input token);
- vision: the input prompts are APPENDED after ``x + positional_embedding`` and before ``ln_pre`` (l.402-406 /
  l.454-458): sequence = [CLS, patches, prompts]; at block i >= 1 carrying a prompt, the LAST n tokens are
  replaced (``x = cat[x[:L - n], prompt]``, l.234-241 / l.299-312).
Replaced tokens carry no positional embedding (they overwrite hidden states). The image feature is
``ln_post(x[:, 0]) @ proj``; the text keeps CLIP's causal mask and is pooled at the EOT token.

IVLP / VPT blocks get their own ``VPT_shallow`` parameter iff ``0 < i < prompts_needed`` (l.210-223, l.342-348):
depth D means D layers carry prompts, counting the input layer, so blocks 1..D-1 (of those that exist). MaPLe
blocks replace with ``deeper_prompts[counter]`` at every block after the first while ``counter`` has an entry
(l.293-328): the same placement, given a list of D-1 deep prompts. Both are :func:`text_features` /
:func:`image_features` with a list ``deep_prompts`` whose entry j is used at block j + 1.

ResNet towers (``ModifiedResNet``, l.93-150) are untouched by the original: no prompt is ever built for them.

The functions of this module and of ivlp / vpt / maple / promptsrc were checked once against the original modules run
on the same weights (logits, losses, gradients, state-dict names / order / dtypes, checkpoints read back by the
originals' loaders): RECIPES_towers.md section 9.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import open_clip
import torch
import torch.nn as nn

REPO = "muzairkhattak/multimodal-prompt-learning@69bce21ae8eda80ad6187534b2dce09cf6c59e17"
PROMPTSRC_REPO = "muzairkhattak/PromptSRC@bb95c77b634d63488f2cad81ff4a72d53bdd06d5"
CONTEXT_LENGTH = 77

_tokenizer = open_clip.get_tokenizer("RN50")  # CLIP's BPE: the original's clip.tokenize and _tokenizer.encode


def tokenize(texts: Sequence[str]) -> torch.Tensor:
    """clip/clip.py ``tokenize(texts)`` (context 77, truncate=False): (K, 77) int64, SOT + BPE + EOT, zero padded.

    The original raises on a text longer than the context; open_clip's tokenizer would cut it silently, so the
    check is made here."""
    for text in texts:
        if len(_tokenizer.encode(text)) + 2 > CONTEXT_LENGTH:
            raise RuntimeError(f"Input {text} is too long for context length {CONTEXT_LENGTH}")
    return _tokenizer(list(texts))


def bpe_length(text: str) -> int:
    """``len(_tokenizer.encode(text))``: the original's ``name_lens`` (unused by these trainers' forwards)."""
    return len(_tokenizer.encode(text))


def is_vit(model) -> bool:
    return isinstance(model.visual, open_clip.transformer.VisionTransformer)


def check_vit(model) -> nn.Module:
    """The open_clip ViT laid out like OpenAI's (CLS pooling after ``ln_post``, no attention pooler, no patch
    dropout at work): the only image tower the original prompts. Returns ``model.visual``."""
    visual = model.visual
    if not is_vit(model):
        raise TypeError(f"{type(visual).__name__}: the original prompts only OpenAI-style ViT image towers")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError("this ViT does not pool like OpenAI's CLIP (ln_post(x[:, 0]) @ proj)")
    if not isinstance(visual.patch_dropout, nn.Identity) and visual.training:
        raise ValueError("patch dropout is active: the original has none")
    return visual


def text_width(model) -> int:
    """``clip_model.ln_final.weight.shape[0]`` (the original's ``ctx_dim``)."""
    return model.ln_final.weight.shape[0]


def vision_width(model) -> int:
    """The ViT's width (the original's hard-coded 768 of ViT-B)."""
    return check_vit(model).conv1.weight.shape[0]


# -- initialisation ------------------------------------------------------------------------------------------
def normal_prompts(n: int, width: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``torch.empty(n, width)`` + ``nn.init.normal_(std=0.02)``: every prompt that is not word-initialised
    (ctx without CTX_INIT, ``VPT``, ``VPT_shallow``, MaPLe's ``compound_prompts_text``). (n, width)."""
    return nn.init.normal_(torch.empty(n, width), std=0.02, generator=generator)


def linear_init(in_features: int, out_features: int,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``nn.Linear(in_features, out_features)`` draws (torch's ``reset_parameters``): weight
    kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), then the bias U(-1/sqrt(in), 1/sqrt(in)).
    With ``generator=None`` it consumes the global RNG exactly as constructing the module would.
    Returns weight (out, in), bias (out,)."""
    weight = nn.init.kaiming_uniform_(torch.empty(out_features, in_features), a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
    bias = nn.init.uniform_(torch.empty(out_features), -bound, bound, generator=generator)
    return weight, bias


def context_init(model, n_ctx: int, ctx_init: Optional[str],
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, str]:
    """The context init rule shared by MaPLe, IVLP and PromptSRC: ``trainers/maple.py`` l.84-97,
    ``trainers/independentVL.py`` l.82-95, PromptSRC ``trainers/promptsrc.py`` l.88-101.

    Returns ctx (n_ctx, D) and the ``prompt_prefix`` string the class prompts are built from.

    - ``if ctx_init and n_ctx <= 4``: ctx = rows 1..n_ctx of ``token_embedding(tokenize(ctx_init))`` and
      prompt_prefix = the WHOLE init text. Quirks: with the recipes' n_ctx=2 and "a photo of a", ctx = the
      embeddings of "a photo" and "of a" stays a fixed part of every prompt ("a photo of a {class}."); with
      more ctx than init tokens (e.g. n_ctx=4, "a photo") the rows past the init are the EOT and padding
      embeddings, and the class tokens then fall inside the cut (see :func:`class_prompts`).
    - else (no init, or n_ctx > 4: the init text is then silently ignored): N(0, 0.02) and prefix "X X ... X".
    The original draws/keeps ctx in the CLIP dtype (fp16 in every recipe except VPT's): fp32 here.
    ``ctx_init`` has "_" replaced by " " first (l.86).
    """
    width = text_width(model)
    if ctx_init and n_ctx <= 4:
        ctx_init = ctx_init.replace("_", " ")
        with torch.no_grad():
            embedding = model.token_embedding(tokenize([ctx_init]))
        return embedding[0, 1:1 + n_ctx, :].clone(), ctx_init
    return normal_prompts(n_ctx, width, generator), " ".join(["X"] * n_ctx)


def class_prompts(model, classnames: Sequence[str], prompt_prefix: str, n_ctx: int) -> dict:
    """The prompt learners' fixed parts (``trainers/maple.py`` l.119-136, ``independentVL.py`` l.102-119,
    ``promptsrc.py`` l.108-138): each class's sentence ``prompt_prefix + " " + name + "."`` (names with "_" -> " ")
    tokenized whole; ``token_prefix`` = its SOT embedding (K, 1, D), ``token_suffix`` = its embeddings from
    position 1 + n_ctx on (K, 77 - 1 - n_ctx, D), ``tokenized_prompts`` (K, 77) (pooling finds EOT by argmax).

    Both buffers are saved in checkpoints and deleted by the original's ``load_model`` (rebuilt for the current
    class list). The original keeps them in fp16."""
    names = [name.replace("_", " ") for name in classnames]
    tokenized = tokenize([prompt_prefix + " " + name + "." for name in names])
    with torch.no_grad():
        embedding = model.token_embedding(tokenized)
    return {"token_prefix": embedding[:, :1, :].clone(), "token_suffix": embedding[:, 1 + n_ctx:, :].clone(),
            "tokenized_prompts": tokenized, "name_lens": [bpe_length(n) for n in names]}


def construct_prompts(ctx: torch.Tensor, token_prefix: torch.Tensor, token_suffix: torch.Tensor) -> torch.Tensor:
    """``construct_prompts`` + ``forward`` of the prompt learners (``maple.py`` l.138-167): ctx (n, D) shared by
    all classes -> prompts (K, 77, D) = [SOT, ctx, suffix]."""
    k = token_prefix.shape[0]
    return torch.cat([token_prefix, ctx.unsqueeze(0).expand(k, -1, -1), token_suffix], dim=1)


# -- the prompted towers -------------------------------------------------------------------------------------
def _expand(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    return prompt.unsqueeze(0).expand(batch, -1, -1)


def text_features(model, prompts: torch.Tensor, tokenized_prompts: torch.Tensor,
                  deep_prompts: Sequence[torch.Tensor] = (), return_block_inputs: bool = False):
    """The prompted text encoder (``TextEncoder.forward`` of the trainers, e.g. ``trainers/maple.py`` l.52-66,
    ``independentVL.py`` l.51-62, with the blocks of ``clip/model.py`` l.229-256 / l.287-331).

    prompts (K, 77, D) input embeddings; ``deep_prompts[j]`` (n_j, D) replaces positions 1..n_j of the hidden
    state entering block j + 1 (entries past the last block are unused, as in the original).
    Returns the unnormalised text features (K, E); with ``return_block_inputs`` also the list of the hidden
    states each block received (after the replacement), for placement checks."""
    blocks = model.transformer.resblocks
    x = prompts + model.positional_embedding.to(prompts.dtype)
    length = x.shape[1]
    mask = model.attn_mask[:length, :length]
    inputs = []
    for i, block in enumerate(blocks):
        if 1 <= i <= len(deep_prompts):
            prompt = deep_prompts[i - 1]
            x = torch.cat([x[:, :1], _expand(prompt, x.shape[0]).to(x.dtype), x[:, 1 + prompt.shape[0]:]], dim=1)
        inputs.append(x)
        x = block(x, attn_mask=mask)
    x = model.ln_final(x)
    features = x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ model.text_projection
    return (features, inputs) if return_block_inputs else features


def image_features(model, images: torch.Tensor, shallow_prompts: Optional[torch.Tensor] = None,
                   deep_prompts: Sequence[torch.Tensor] = (), return_block_inputs: bool = False):
    """The prompted ViT (``VisionTransformer.forward`` l.393-422 and ``VisionTransformer_MaPLe.forward``
    l.445-476 of ``clip/model.py``).

    images (B, 3, H, W); ``shallow_prompts`` (n, W) appended after the positional embedding, before ``ln_pre``
    (IVLP/VPT: ``visual.VPT``; MaPLe: ``proj(ctx)``); ``deep_prompts[j]`` (n, W) replaces the last n tokens of the
    hidden state entering block j + 1. Returns the unnormalised image features (B, E) (and the block inputs).
    The original casts every prompt ``.half()`` here (l.238, l.405, l.457): in VPT, whose CLIP runs in fp32, that
    rounds the prompts to fp16 at every forward; not done here."""
    visual = check_vit(model)
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, grid ** 2, W)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    if shallow_prompts is not None:
        x = torch.cat([x, _expand(shallow_prompts, x.shape[0]).to(x.dtype)], dim=1)
    x = visual.ln_pre(x)
    inputs = []
    for i, block in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep_prompts):
            prompt = deep_prompts[i - 1]
            x = torch.cat([x[:, :x.shape[1] - prompt.shape[0]], _expand(prompt, x.shape[0]).to(x.dtype)], dim=1)
        inputs.append(x)
        x = block(x)
    features = visual.ln_post(x[:, 0]) @ visual.proj
    return (features, inputs) if return_block_inputs else features


def cosine_logits(model, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``CustomCLIP.forward`` (e.g. ``trainers/maple.py`` l.197-199): exp(logit_scale) * norm(img) @ norm(txt).T,
    (B, E) x (K, E) -> (B, K). Trained CLIP's logit_scale.exp() is 100."""
    image_feats = image_feats / image_feats.norm(dim=-1, keepdim=True)
    text_feats = text_feats / text_feats.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_feats @ text_feats.t()


def deep_prompt_list(tensors: dict, prefix: str) -> list[torch.Tensor]:
    """IVLP/VPT's per-block prompts by their state-dict names ``<prefix>.transformer.resblocks.<i>.VPT_shallow``,
    i = 1, 2, ... (contiguous, as the original creates them): the list for :func:`text_features` /
    :func:`image_features`."""
    out, i = [], 1
    while f"{prefix}.transformer.resblocks.{i}.VPT_shallow" in tensors:
        out.append(tensors[f"{prefix}.transformer.resblocks.{i}.VPT_shallow"])
        i += 1
    return out


# -- the saved layout ----------------------------------------------------------------------------------------
_BLOCK_KEYS = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
               "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
               "ln_2.weight", "ln_2.bias")


def fp16_names(model) -> set[str]:
    """The open_clip parameter names that OpenAI's ``convert_weights`` (``clip/model.py`` l.630-651) holds in fp16:
    Conv/Linear weights and biases, MultiheadAttention's in_proj weight and bias, and the ``proj`` /
    ``text_projection`` attributes. Embeddings, LayerNorms, class/positional embeddings and logit_scale stay fp32."""
    names = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            names.update(prefix + p for p in ("weight", "bias") if getattr(module, p, None) is not None)
        if isinstance(module, nn.MultiheadAttention):
            names.update(prefix + p for p in ("in_proj_weight", "in_proj_bias") if getattr(module, p) is not None)
        for attr in ("proj", "text_projection"):
            if isinstance(getattr(module, attr, None), nn.Parameter):
                names.add(prefix + attr)
    return names


def _vit_layout(n_blocks: int, with_vpt: bool, deep_blocks: Iterable[int]) -> list[str]:
    """OpenAI ``VisionTransformer``'s state-dict order (own parameters, then children in registration order)."""
    deep = set(deep_blocks)
    keys = (["VPT"] if with_vpt else []) + ["class_embedding", "positional_embedding", "proj", "conv1.weight",
                                            "ln_pre.weight", "ln_pre.bias"]
    for i in range(n_blocks):
        keys += ([f"transformer.resblocks.{i}.VPT_shallow"] if i in deep else [])
        keys += [f"transformer.resblocks.{i}.{k}" for k in _BLOCK_KEYS]
    return keys + ["ln_post.weight", "ln_post.bias"]


def _text_layout(n_blocks: int, deep_blocks: Iterable[int]) -> list[str]:
    """The trainers' ``TextEncoder`` state-dict order (positional_embedding, text_projection, blocks, ln_final)."""
    deep = set(deep_blocks)
    keys = ["positional_embedding", "text_projection"]
    for i in range(n_blocks):
        keys += ([f"transformer.resblocks.{i}.VPT_shallow"] if i in deep else [])
        keys += [f"transformer.resblocks.{i}.{k}" for k in _BLOCK_KEYS]
    return keys + ["ln_final.weight", "ln_final.bias"]


def visual_state(model, learned: dict, prefix: str, fp16: bool) -> "OrderedDict[str, torch.Tensor]":
    """The image tower as the original's state dict holds it under ``prefix`` (``image_encoder`` or
    ``prompt_learner.ZS_image_encoder``), with the learned ``<prefix>.VPT`` / ``...VPT_shallow`` in place.
    ResNet towers keep open_clip's order (their names are OpenAI's)."""
    weights = {k[len("visual."):]: v for k, v in model.state_dict().items() if k.startswith("visual.")}
    half = {k[len("visual."):] for k in fp16_names(model) if k.startswith("visual.")} if fp16 else set()
    if is_vit(model):
        deep = [int(k.split(".")[-2]) for k in learned if k.startswith(f"{prefix}.transformer.resblocks.")]
        layout = _vit_layout(len(model.visual.transformer.resblocks), f"{prefix}.VPT" in learned, deep)
        if set(weights) - set(layout):
            raise ValueError(f"image tower parameters the original does not have: {sorted(set(weights) - set(layout))}")
    else:
        layout = list(weights)
    out = OrderedDict()
    for key in layout:
        if f"{prefix}.{key}" in learned:
            out[f"{prefix}.{key}"] = learned[f"{prefix}.{key}"].detach().clone()
        else:
            value = weights[key].detach().clone()
            out[f"{prefix}.{key}"] = value.half() if key in half else value
    return out


def text_state(model, learned: dict, fp16: bool) -> "OrderedDict[str, torch.Tensor]":
    """The trainers' ``text_encoder.*`` entries (the text tower minus token_embedding, which CustomCLIP does not
    hold), with the learned ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` in place."""
    sd = model.state_dict()
    half = fp16_names(model) if fp16 else set()
    deep = [int(k.split(".")[-2]) for k in learned if k.startswith("text_encoder.transformer.resblocks.")]
    layout = _text_layout(len(model.transformer.resblocks), deep)
    text_keys = {k for k in sd if not k.startswith("visual.") and k not in ("token_embedding.weight", "logit_scale")}
    if text_keys - set(layout):
        raise ValueError(f"text tower parameters the original does not have: {sorted(text_keys - set(layout))}")
    out = OrderedDict()
    for key in layout:
        name = f"text_encoder.{key}"
        if name in learned:
            out[name] = learned[name].detach().clone()
        else:
            out[name] = sd[key].detach().clone().half() if key in half else sd[key].detach().clone()
    return out


def buffer_names(model) -> set[str]:
    """open_clip's persistent buffers (ResNet BatchNorm statistics): not parameters, so not in the optimizer."""
    return {name for name, _ in model.named_buffers() if name in model.state_dict()}
