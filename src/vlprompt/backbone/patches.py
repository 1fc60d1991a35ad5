"""Extension points inside the towers: per-layer prompts and LoRA, without a copied forward of open_clip's towers.

* :class:`TextLayerPrompts`: deep prompts of the text tower (IVLP, MaPLe, PromptSRC): before block ``i`` the hidden
  states of positions ``start .. start + P - 1`` (after the start token) are replaced by ``layers[i]`` (P, D); the
  replaced tokens carry no positional embedding. They are given to the text encoder explicitly
  (:meth:`~vlprompt.backbone.text_encoder.TextEncoder.encode_prompts`): every text path (plain, cut, shared
  prefix) honours them, and the shared-prefix path keeps its speed (the prompt positions are part of the prefix,
  replaced in every layer of its key/value computation).
* :class:`VisionLayerPrompts`: prompts of a ViT image tower (VPT, IVLP, MaPLe): ``input`` (P, D) appended after the
  positional embedding, before ``ln_pre``; before block ``i`` the last P tokens replaced by ``layers[i]``.
  Applied by forward pre-hooks on open_clip's own modules inside :func:`vision_prompts` only.
* :class:`LoRA`: low-rank updates of the attention projections (q, k, v, out) of chosen blocks of either tower
  (CLIP-LoRA), applied inside :func:`lora_applied` only, by replacing each chosen block's attention module with a
  :class:`LoRAAttention` that keeps the original's weights and adds ``scale * B A dropout(x)`` to its
  projections. Why module replacement and not ``torch.nn.utils.parametrize`` (or PEFT, whose LoRA for
  ``nn.MultiheadAttention`` also works by merging the update into ``in_proj_weight``): CLIP-LoRA applies dropout
  to the input of the low-rank branch, ``W x + s B A drop(x)``, which no reparametrisation of the weight can
  express in training; merging is exact only without dropout. ``LoRAAttention`` computes open_clip's
  attention with the same kernel (``scaled_dot_product_attention``) and exposes its projections to the text
  encoder's shared-prefix path, so that path stays exact and fast.

Rules (each pinned by a test): the shared backbone changes only inside these context managers and is restored on
exit (also on an exception); while a tower is patched, :attr:`Backbone.fingerprint` refuses to answer, so the
feature cache can never file features of a patched tower under the unpatched tower's key; a method never keeps
a patched backbone between calls.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BackboneError
from .attention import packed_self_attention


# -- per-layer prompts ---------------------------------------------------------------------------------------
@dataclass
class TextLayerPrompts:
    """Deep text prompts: ``layers[i]`` (P, D), or (G, P, D) one per prompt group, replaces the hidden states of
    positions ``start .. start + P - 1`` before block ``i`` (``i >= 1``; block 0's prompts are the input tokens
    themselves, which carry the positional embedding)."""

    layers: dict = field(default_factory=dict)
    start: int = 1

    def check(self, num_blocks: int, width: int) -> "TextLayerPrompts":
        for i, t in self.layers.items():
            if not isinstance(i, int) or not 1 <= i < num_blocks:
                raise BackboneError(f"text layer prompts: block {i!r} is not one of 1..{num_blocks - 1}")
            if t.dim() not in (2, 3) or t.shape[-1] != width:
                raise BackboneError(f"text layer prompts of block {i}: shape {tuple(t.shape)}, expected (P, {width}) "
                                    f"or (G, P, {width})")
        return self

    @property
    def end(self) -> int:
        """One past the last replaced position (``start + P``, the longest of the layers)."""
        return self.start + max((t.shape[-2] for t in self.layers.values()), default=0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.layers[i] for i in sorted(self.layers)]


def replace_positions(h: torch.Tensor, tokens: torch.Tensor, start: int, groups: Optional[int] = None) -> torch.Tensor:
    """``h`` (N, L, D) with positions ``start .. start + P - 1`` replaced by ``tokens`` (P, D), or by (G, P, D)
    when the N rows are G groups of N / G consecutive rows (``groups = G``)."""
    n = h.shape[0]
    if tokens.dim() == 2:
        t = tokens.to(h.dtype).expand(n, *tokens.shape)
    else:
        g = tokens.shape[0]
        if n % g:
            raise BackboneError(f"{n} prompt rows cannot be split into {g} groups of layer prompts")
        t = tokens.to(h.dtype).repeat_interleave(n // g, dim=0)
    p = t.shape[1]
    return torch.cat([h[:, :start], t, h[:, start + p:]], dim=1)


@dataclass
class VisionLayerPrompts:
    """Prompts of a ViT image tower: ``input`` (P, D) or (B, P, D) appended after the positional embedding (before
    ``ln_pre``, so they are normalised with the patches); ``layers[i]`` (P, D) replaces the last P tokens before
    block ``i >= 1`` (VPT-deep, IVLP, MaPLe)."""

    input: Optional[torch.Tensor] = None
    layers: dict = field(default_factory=dict)

    def check(self, num_blocks: int, width: int) -> "VisionLayerPrompts":
        if self.input is None and self.layers:
            raise BackboneError("vision layer prompts need input prompts: deeper layers replace them")
        sizes = set()
        for name, t in ([("input", self.input)] if self.input is not None else []) + list(self.layers.items()):
            if name != "input" and (not isinstance(name, int) or not 1 <= name < num_blocks):
                raise BackboneError(f"vision layer prompts: block {name!r} is not one of 1..{num_blocks - 1}")
            if t.dim() not in (2, 3) or t.shape[-1] != width:
                raise BackboneError(f"vision prompts ({name}): shape {tuple(t.shape)}, expected (P, {width})")
            sizes.add(t.shape[-2])
        if len(sizes) > 1:
            raise BackboneError(f"vision prompts of every layer must have the same number of tokens, got {sizes}")
        return self

    @property
    def count(self) -> int:
        return 0 if self.input is None else int(self.input.shape[-2])


def vit_tower(visual: nn.Module) -> Optional[str]:
    """Why prompts cannot go inside this image tower, or None when they can (an open_clip VisionTransformer with a
    batch-first transformer, ``ln_pre`` and the class token's pooling)."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        return f"the image tower is a {type(visual).__name__}, not a ViT (ResNet towers have no tokens to prompt)"
    if getattr(visual, "attn_pool", None) is not None:
        return "the ViT pools with an attention pooler"
    if getattr(visual, "pool_type", "tok") != "tok":
        return f"the ViT pools with {visual.pool_type!r}, not its class token (prompt tokens would be pooled too)"
    if not getattr(visual.transformer, "batch_first", False):
        return "the ViT's transformer is not batch-first"
    if type(getattr(visual, "ln_pre", None)) is nn.Identity:
        return "the ViT has no ln_pre"
    return None


@contextlib.contextmanager
def vision_prompts(visual: nn.Module, prompts: Optional[VisionLayerPrompts]) -> Iterator[None]:
    """Within this block, ``visual`` (an open_clip VisionTransformer) runs with ``prompts``: forward pre-hooks on
    ``ln_pre`` (append the input prompts) and on the chosen blocks (replace the last P tokens), removed on exit."""
    if prompts is None or prompts.input is None:
        yield
        return
    why = vit_tower(visual)
    if why:
        raise BackboneError(f"prompts inside the image tower: {why}")
    blocks = list(visual.transformer.resblocks)
    prompts.check(len(blocks), int(visual.positional_embedding.shape[-1]))
    p = prompts.count

    def append(module, args):
        x = args[0]
        t = prompts.input.to(x.dtype)
        t = t.expand(x.shape[0], *t.shape) if t.dim() == 2 else t
        return (torch.cat([x, t], dim=1), *args[1:])

    def replacer(tokens):
        def hook(module, args, kwargs):
            x = args[0]
            t = tokens.to(x.dtype).expand(x.shape[0], *tokens.shape)
            return (torch.cat([x[:, :-p], t], dim=1), *args[1:]), kwargs
        return hook

    handles = [visual.ln_pre.register_forward_pre_hook(append)]
    try:
        for i, tokens in prompts.layers.items():
            handles.append(blocks[i].register_forward_pre_hook(replacer(tokens), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# -- LoRA ----------------------------------------------------------------------------------------------------
PROJECTIONS = ("q", "k", "v", "o")


class LoRAAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (batch-first, q/k/v packed in ``in_proj_weight``) with low-rank updates of some
    of its projections: ``proj(x) = W x + b + scale * B A dropout(x)`` for each of ``q``, ``k``, ``v``, ``o`` in
    ``factors``. The original module's weights are used as they are (not copied); the attention itself is
    ``scaled_dot_product_attention``, as open_clip's own attention computes it.

    ``factors[name] = (A (r, D_in), B (D_out, r))``; ``dropout``: the rate applied to the branch's input in
    training (CLIP-LoRA's)."""

    def __init__(self, attn: nn.MultiheadAttention, factors: dict, scale: float, dropout: float = 0.0):
        super().__init__()
        if not (isinstance(attn, nn.MultiheadAttention) and attn._qkv_same_embed_dim and attn.batch_first):
            raise BackboneError("LoRA needs batch-first nn.MultiheadAttention blocks with packed q/k/v projections")
        object.__setattr__(self, "base", attn)  # not a submodule: its weights stay the backbone's
        self.factors = factors
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.num_heads = attn.num_heads
        self.batch_first = True
        self._qkv_same_embed_dim = True

    def _branch(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        f = self.factors.get(name)
        if f is None:
            return None
        a, b = f
        if self.training and self.dropout > 0:
            # the mask drawn on the sequence-first (L, N, D) layout CLIP-LoRA's attention runs in, so that the same
            # RNG state drops the same entries as the original
            x = F.dropout(x.transpose(0, 1).contiguous(), self.dropout, training=True).transpose(0, 1)
        return self.scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

    def in_projection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (N, L, D) of the (normalised) input."""
        q, k, v = F.linear(x, self.base.in_proj_weight, self.base.in_proj_bias).chunk(3, dim=-1)
        out = []
        for name, t in zip("qkv", (q, k, v)):
            delta = self._branch(name, x)
            out.append(t if delta is None else t + delta)
        return out[0], out[1], out[2]

    def out_projection(self, o: torch.Tensor) -> torch.Tensor:
        y = self.base.out_proj(o)
        delta = self._branch("o", o)
        return y if delta is None else y + delta

    @property
    def training(self) -> bool:  # the wrapped module's mode (the backbone's towers stay in eval mode)
        return self.__dict__.get("_lora_training", False)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_lora_training"] = bool(mode)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **kwargs):
        if key is not None and key is not query or value is not None and value is not query:
            raise BackboneError("LoRA attention supports self-attention only")
        return packed_self_attention(query, self.num_heads, self.in_projection, self.out_projection, attn_mask), None


class LoRA(nn.Module):
    """Low-rank factors for the attention projections of chosen blocks of the text and / or image tower.

    ``targets``: ``{"text": [block indices], "image": [block indices]}``; ``projections``: a subset of
    ``q, k, v, o``; ``rank`` r; ``scale``: the factor of the update (CLIP-LoRA: alpha / sqrt(r)); ``dropout`` on
    the branch's input in training. Parameters are named ``<tower>.<block>.<projection>.A`` / ``.B`` (A (r, D) from
    Kaiming-uniform, B zero: the update starts at 0, so the model starts as the frozen backbone)."""

    def __init__(self, model: nn.Module, targets: dict, projections: Sequence[str] = ("q", "k", "v"), *,
                 rank: int = 2, scale: float = 1.0, dropout: float = 0.0, generator: Optional[torch.Generator] = None):
        super().__init__()
        if rank < 1:
            raise BackboneError(f"LoRA rank must be >= 1, got {rank}")
        bad = [p for p in projections if p not in PROJECTIONS]
        if bad or not projections:
            raise BackboneError(f"LoRA projections must be a subset of {', '.join(PROJECTIONS)}, got {list(projections)}")
        self.targets = {tower: sorted(set(map(int, blocks))) for tower, blocks in targets.items() if blocks}
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self.rank, self.scale, self.dropout = int(rank), float(scale), float(dropout)
        self.factors = nn.ParameterDict()
        device = next(model.parameters()).device
        for tower, blocks in self.targets.items():
            resblocks = tower_blocks(model, tower)
            for i in blocks:
                if not 0 <= i < len(resblocks):
                    raise BackboneError(f"LoRA: the {tower} tower has blocks 0..{len(resblocks) - 1}, not {i}")
                attn = resblocks[i].attn
                d = attn.embed_dim
                for p in self.projections:
                    a = torch.empty(self.rank, d, device=device)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                    self.factors[f"{tower}_{i}_{p}_A"] = nn.Parameter(a)
                    self.factors[f"{tower}_{i}_{p}_B"] = nn.Parameter(torch.zeros(d, self.rank, device=device))

    def block_factors(self, tower: str, i: int) -> dict:
        return {p: (self.factors[f"{tower}_{i}_{p}_A"], self.factors[f"{tower}_{i}_{p}_B"]) for p in self.projections}


def tower_blocks(model: nn.Module, tower: str) -> list:
    """The residual blocks of ``tower`` ("text" or "image") of an open_clip CLIP."""
    if tower == "text":
        text = model.text if hasattr(model, "text") else model
        blocks = getattr(getattr(text, "transformer", None), "resblocks", None)
    elif tower == "image":
        blocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
    else:
        raise BackboneError(f"unknown tower {tower!r} (text | image)")
    if blocks is None or not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
        raise BackboneError(f"LoRA needs a transformer {tower} tower with nn.MultiheadAttention blocks")
    return list(blocks)


@contextlib.contextmanager
def lora_applied(model: nn.Module, lora: Optional[LoRA], training: bool = False) -> Iterator[None]:
    """Within this block, the chosen attention modules of ``model`` are :class:`LoRAAttention` wrappers of
    themselves with ``lora``'s factors (dropout active when ``training``); the originals are put back on exit."""
    if lora is None:
        yield
        return
    swapped = []
    try:
        for tower, blocks in lora.targets.items():
            resblocks = tower_blocks(model, tower)
            for i in blocks:
                block = resblocks[i]
                wrapper = LoRAAttention(block.attn, lora.block_factors(tower, i), lora.scale, lora.dropout)
                wrapper.training = training
                swapped.append((block, block.attn))
                block._modules["attn"] = wrapper  # not setattr: nn.Module would also register it as a child
        yield
    finally:
        for block, attn in reversed(swapped):
            block._modules["attn"] = attn


__all__ = ["TextLayerPrompts", "VisionLayerPrompts", "replace_positions", "vit_tower", "vision_prompts", "LoRA",
           "LoRAAttention", "lora_applied", "tower_blocks", "PROJECTIONS"]
