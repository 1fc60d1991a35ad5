"""Learned context vectors placed around class names: the prompt layout shared by CoOp, CoCoOp and PLOT.

A prompt is ``<sot> ctx_1 .. ctx_M <class name> . <eot> <pad>..`` (class token at the end), or with the class
name in the middle (context split at M // 2) or at the front. The learned context is stored without the class
list: the class-dependent token embeddings (class names, ".", end token, padding) are non-persistent buffers
rebuilt from class names, so a context trained on one class list loads onto another (base-to-new,
cross-dataset, ImageNet to its variants) -- except class-specific contexts (CSC), which belong to their classes.
"""
from __future__ import annotations

from enum import Enum
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import VLPromptError


class ClassTokenPosition(str, Enum):
    END = "end"
    MIDDLE = "middle"
    FRONT = "front"


def clean_init_words(words: Optional[str]) -> Optional[str]:
    if words is None:
        return None
    words = words.replace("_", " ").strip()
    if not words or words.lower() in ("random", "none"):
        return None
    return words


class PromptContext(nn.Module):
    """Learned context and the class-dependent prompt layout.

    Parameters: ``ctx`` of shape (N, C, M, D): N prompt sets (PLOT's N prompts per class; 1 for CoOp), C = 1
    for a context shared by all classes or C = K for class-specific contexts, M context vectors of width D.

    ``encode(shift=None)`` returns text features (G, K, E) with G = N, or G = B when an image-conditioned
    ``shift`` (B, D) is added to every context vector (CoCoOp; N must be 1).
    """

    def __init__(self, text_encoder, classnames: Sequence[str], *, n_ctx: int = 16, csc: bool = False,
                 position: str | ClassTokenPosition = ClassTokenPosition.END, init_words: Optional[str] = None,
                 n_prompts: int = 1, init_std: float = 0.02, text_mode: str = "auto",
                 chunk_size: Optional[int] = 256):
        super().__init__()
        self.text = text_encoder
        self.position = ClassTokenPosition(position)
        self.csc = bool(csc)
        self.n_prompts = int(n_prompts)
        self.text_mode = text_mode
        self.chunk_size = chunk_size
        self.init_words = clean_init_words(init_words)
        dim = text_encoder.width
        if self.n_prompts < 1:
            raise VLPromptError(f"n_prompts must be >= 1, got {n_prompts}")
        if self.init_words is not None:
            tokens = text_encoder.tokenize([self.init_words])
            n_ctx = int(text_encoder.eot_positions(tokens)[0]) - 1
            words = text_encoder.embed(tokens)[0, 1:1 + n_ctx]  # (M, D)
        if n_ctx < 1:
            raise VLPromptError(f"the context needs at least one vector (n_ctx={n_ctx})")
        self.n_ctx = int(n_ctx)
        n_cls_ctx = len(classnames) if self.csc else 1
        ctx = torch.empty(self.n_prompts, n_cls_ctx, self.n_ctx, dim)
        g = torch.Generator().manual_seed(0)
        if self.init_words is None:
            nn.init.normal_(ctx, std=init_std)
        else:
            ctx[:] = words
            if self.n_prompts > 1:  # identical prompts would receive identical updates forever
                ctx[1:] += torch.randn(ctx[1:].shape, generator=g) * init_std
        self.ctx = nn.Parameter(ctx.to(text_encoder.device))
        self.set_classnames(classnames)

    # -- class-dependent buffers ------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Rebuild the class-dependent token embeddings for a (possibly new) class list."""
        classnames = [str(c).replace("_", " ").strip() for c in classnames]
        if not classnames:
            raise VLPromptError("the class list is empty")
        if self.csc and self.ctx.shape[1] != len(classnames):
            raise VLPromptError(f"this context is class-specific for {self.ctx.shape[1]} classes; it cannot be "
                                f"used with a list of {len(classnames)} classes")
        te = self.text
        m = self.n_ctx
        placeholder = " ".join(["X"] * m)
        tokens = te.tokenize([f"{placeholder} {name}." for name in classnames])
        eot = te.eot_positions(tokens)
        if int(eot.max()) >= te.context_length - 1 and (tokens[:, -1] != 0).any():
            too_long = [c for c, e in zip(classnames, eot.tolist()) if e >= te.context_length - 1]
            raise VLPromptError(f"class name too long for the context length {te.context_length} with {m} "
                                f"context vectors: {too_long[0]!r}")
        emb = te.embed(tokens)  # (K, L, D)
        name_lens = (eot - 1 - m - 1).clamp(min=0)  # tokens of the name: between the context and "."
        self.classnames = list(classnames)
        self.register_buffer("sot", emb[0, :1].clone(), persistent=False)  # (1, D)
        self.register_buffer("tail", emb[:, 1 + m:].clone(), persistent=False)  # (K, L-1-M, D)
        self.register_buffer("eot", eot.clone(), persistent=False)  # (K,)
        self.register_buffer("name_lens", name_lens, persistent=False)
        self.register_buffer("index", self._layout_index(name_lens, emb.shape[1] - 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _layout_index(self, name_lens: torch.Tensor, length: int) -> torch.Tensor:
        """(K, length) gather index into ``cat([ctx (M rows), tail (length - M rows)])`` per class, giving the
        token sequence after <sot> for the chosen class-token position."""
        m = self.n_ctx
        j = torch.arange(length)[None].expand(len(name_lens), -1)
        nl = name_lens[:, None].cpu()
        if self.position is ClassTokenPosition.END:
            return j.clone()
        h = m // 2 if self.position is ClassTokenPosition.MIDDLE else 0
        # [ctx[:h], name, ctx[h:], rest]  (front: h = 0)
        idx = torch.where(j < h, j,
              torch.where(j < h + nl, m + (j - h),
              torch.where(j < m + nl, h + (j - h - nl), j)))
        return idx

    @property
    def shared_len(self) -> int:
        """Context vectors right after <sot> that are the same for every class (the shared prefix)."""
        if self.csc:
            return 0
        return {ClassTokenPosition.END: self.n_ctx, ClassTokenPosition.MIDDLE: self.n_ctx // 2,
                ClassTokenPosition.FRONT: 0}[self.position]

    # -- prompts --------------------------------------------------------------------------------
    def prompt_embeddings(self, shift: Optional[torch.Tensor] = None):
        """Prefix (G, P, D) and suffix ((K, S, D) or (G, K, S, D)) of every prompt, and the EOT positions."""
        ctx = self.ctx  # (N, C, M, D)
        if shift is not None:
            if self.n_prompts != 1:
                raise VLPromptError("an image-conditioned context needs a single prompt set")
            ctx = ctx[0][None] + shift[:, None, None, :]  # (B, C, M, D)
        g, c, m, d = ctx.shape
        k = self.num_classes
        p = self.shared_len
        prefix = torch.cat([self.sot.expand(g, 1, d), ctx[:, 0, :p]], dim=1)  # (G, 1 + p, D)
        if self.position is ClassTokenPosition.END and not self.csc:
            return prefix, self.tail, self.eot
        table = torch.cat([ctx.expand(g, k, m, d), self.tail.expand(g, k, *self.tail.shape[1:])], dim=2)
        idx = self.index[None, :, :, None].expand(g, k, self.index.shape[1], d)
        seq = table.gather(2, idx)  # (G, K, L-1, D)
        return prefix, seq[:, :, p:], self.eot

    def encode(self, shift: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Text features (G, K, E), not normalised."""
        prefix, suffix, eot = self.prompt_embeddings(shift)
        return self.text.encode_prompts(prefix, suffix, eot, mode=self.text_mode,
                                        chunk_size=chunk_size or self.chunk_size)

    def full_embeddings(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole token sequences (G, K, L, D) as the reference builds them (for tests and interpretation)."""
        prefix, suffix, _ = self.prompt_embeddings(shift)
        g = prefix.shape[0]
        if suffix.dim() == 3:
            suffix = suffix[None].expand(g, *suffix.shape)
        return torch.cat([prefix[:, None].expand(g, suffix.shape[1], *prefix.shape[1:]), suffix], dim=2)
