"""OrdinalCLIP (Li et al., NeurIPS 2022): ordinal regression with learned rank prompts.

Each of the ``R`` ranks becomes a prompt ``<sot> ctx_1..ctx_M rank_r(1..T) . <eot> <pad>..``: a context shared
by all ranks (from words, or random N(0, 0.02)) and ``T`` rank tokens per rank, interpolated from ``B`` learned
base rank embeddings (:class:`.ordinal_parts.RankEmbeddings`) or free. CLIP's frozen text tower encodes the
``R`` prompts into "language prototypes" ``(R, E)``; a trainable image encoder
(:mod:`vlprompt.methods.parts.image_encoders`) is trained so that ``logits = exp(logit_scale) * cos(image, prototype)``
(the logit scale frozen) fit the ranks under :func:`.ordinal_parts.ordinal_loss` (cross-entropy + the
text-to-image KL term). Predictions are the argmax rank and the expectation over rank values.

The prompts are built by concatenation (the reference writes each rank into a cloned ``(R, 77, D)`` tensor in a
Python loop, whose backward copies the whole tensor once per rank) and encoded through the text encoder's
shared-prefix path: ``<sot> + context`` is the same for every rank, so its keys and values are computed once and
each rank's few remaining tokens attend to them (exact; see :mod:`vlprompt.text`).

The rank values, image encoder, metrics, export and plots are shared with the baselines of
:mod:`.ordinal_baselines` through :mod:`.ordinal_base`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ...errors import ConfigError
from ..base import opt
from .base import (IMDB_WIKI, MORPH_CONTEXT, TEXT_MODES, OrdinalConfig, OrdinalMethod, PromptPrototypes,
                           RankPrompts, _word_embeddings)
from .parts import INTERPOLATION_KINDS, RankEmbeddings, ordinal_loss

__all__ = ["OrdinalCLIPConfig", "OrdinalCLIP"]


@dataclass
class OrdinalCLIPConfig(OrdinalConfig):
    n_ctx: Optional[int] = opt(None, "context vectors shared by all ranks (default: 10, the reference's, or the "
                               "number of init tokens; another count with init is an error)", min=1)
    init: Optional[str] = opt(None, "context words, e.g. 'the age of the person is' (their token embeddings "
                              "start the context); default: random N(0, init_std)")
    init_std: float = opt(0.02, "standard deviation of the random initialisation of context and rank embeddings",
                          gt=0)
    num_base: Optional[int] = opt(3, "base rank embeddings interpolated into the R ranks (the paper: 3 for "
                                  "MORPH II's 101); 0 or null: one free embedding per rank", min=0)
    interpolation: str = opt("linear", "how ranks are interpolated from the bases: linear (1 - |r - b|/(R-1)), "
                             "inv_prop (1/|r - b|) or normal (exp(-|r - b|^2))", choices=INTERPOLATION_KINDS)
    tokens_per_rank: Optional[int] = opt(None, "tokens T of each rank embedding (default: 1, or with rank_init the "
                                         "longest word's token count; another count with rank_init is an error)",
                                         min=1)
    rank_init: Optional[str] = opt(None, "words that start the bases (or the ranks, when free), comma-separated, "
                                   "or 'classnames'; default: random N(0, init_std)")
    lr_context: float = opt(1.0, "learning-rate multiplier of the context (0 freezes it)", min=0)
    lr_ranks: float = opt(1.0, "learning-rate multiplier of the rank embeddings (0 freezes them)", min=0)
    ce_weight: float = opt(1.0, "weight of the image-to-text cross-entropy in the loss", min=0)
    kl_weight: float = opt(1.0, "weight of the text-to-image KL term in the loss", min=0)
    kl_temperature: float = opt(10.0, "temperature of the KL term's soft targets (the reference's 10)", gt=0)
    text_mode: str = opt("auto", "how the text tower encodes the prompts (all exact): auto (the fastest), plain "
                         "(77 tokens), cut (after the last EOT) or prefix (the shared prefix once)", choices=TEXT_MODES)
    chunk_size: int = opt(256, "prompts encoded per text-tower call (memory bound)", min=1)

    def check(self) -> None:
        super().check()
        if self.ce_weight == 0 and self.kl_weight == 0:
            raise ConfigError("ce_weight and kl_weight are both 0: the loss would be 0")
        if self.lr_context == 0 and self.lr_ranks == 0 and self.lr_image_encoder == 0:
            raise ConfigError("lr_context, lr_ranks and lr_image_encoder are all 0: nothing would be trained")


class OrdinalCLIP(PromptPrototypes, OrdinalMethod):
    """OrdinalCLIP: language prototypes from learned rank prompts, matched by a trained image encoder."""

    name = "ordinalclip"
    config_class = OrdinalCLIPConfig
    summary = "OrdinalCLIP: learned rank prompts (interpolated rank embeddings) + a trained image encoder"

    @classmethod
    def morph_options(cls) -> dict:
        """``morph_compare.yaml``'s ``ordinalclip`` entry (its lines 2-16): the IMDB-WIKI VGG-16
        (``imdb-vgg16.yaml``, line 4), the context from "age estimation: the age of the person is"
        (``init-context-morph.yaml``, line 5), rank embeddings interpolated linearly from 3 bases (lines 6-8:
        ``rank-prompt-learner.yaml``, ``rank-interp-linear.yaml``, ``num-base-rank-3.yaml``), the image encoder,
        context and ranks all trained at the base lr (lines 11-12: ``tune-image.yaml``, ``tune-ctx-rank.yaml``, lr
        1e-4 each); the text tower is CLIP RN50's (line 9, the default backbone)."""
        return {"image_encoder": "vgg16", "image_encoder_weights": IMDB_WIKI, "init": MORPH_CONTEXT, "num_base": 3,
                "interpolation": "linear", "lr_image_encoder": 1.0, "lr_context": 1.0, "lr_ranks": 1.0}

    def __init__(self, config: OrdinalCLIPConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        r = self.num_classes
        te = backbone.text
        num_base = config.num_base or None
        rows = r if num_base is None else num_base
        init, t = None, 1 if config.tokens_per_rank is None else config.tokens_per_rank
        if config.rank_init:
            words = list(classnames) if config.rank_init == "classnames" else \
                [w.strip() for w in config.rank_init.split(",")]
            if len(words) != rows:
                what = "ranks" if num_base is None else "base ranks (num_base)"
                raise ConfigError(f"rank_init has {len(words)} words for {rows} {what}")
            init = _word_embeddings(te, words)
            n_words = init.shape[1]  # the longest word's token count (the reference's rule)
            if config.tokens_per_rank is not None and config.tokens_per_rank != n_words:
                raise ConfigError(f"tokens_per_rank (--tokens-per-rank) = {config.tokens_per_rank} but the longest "
                                  f"rank_init word is {n_words} tokens; drop tokens_per_rank or set it to {n_words}")
            t = n_words
        ranks = RankEmbeddings(r, t, te.width, num_base=num_base, kind=config.interpolation,
                               init_std=config.init_std, init=init).to(backbone.device)
        self.prompts = RankPrompts(te, r, n_ctx=config.n_ctx, init_words=config.init, init_std=config.init_std,
                                   rank_embeddings=ranks, text_mode=config.text_mode, chunk_size=config.chunk_size)
        self._freeze_zero_lr()
        # the config records what is learned (the counts word inits give)
        self.config = dataclasses.replace(config, n_ctx=self.prompts.n_ctx, tokens_per_rank=t)

    def describe(self) -> dict:
        p = self.prompts
        return {**super().describe(), "n_ctx": p.n_ctx, "context_init": p.init_words or "random",
                "tokens_per_rank": p.rank_embeddings.num_tokens,
                "rank_embeddings": ("free" if p.rank_embeddings.num_base is None else
                                    f"{p.rank_embeddings.num_base} bases, {p.rank_embeddings.kind} interpolation")}

    def component_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        return super().component_groups() + [
            ("context", [self.prompts.ctx], self.config.lr_context),
            ("ranks", list(self.prompts.rank_embeddings.parameters()), self.config.lr_ranks)]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None):
        c = self.config
        return ordinal_loss(logits, labels, ce_weight=c.ce_weight, kl_weight=c.kl_weight,
                            kl_temperature=c.kl_temperature)
