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
each rank's few remaining tokens attend to them (exact; see :mod:`vlprompt.backbone.text_encoder`).

The rank values, image encoder, metrics, export and plots are shared with the baselines of
:mod:`.ordinal_baselines` through :mod:`.ordinal_base`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ..base import opt
from ..parts.originals import ImportedRun, close, config_get, shape
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
    original_format = "lightning"

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

    @classmethod
    def import_original(cls, run):
        """An xk-huang/OrdinalCLIP Lightning checkpoint: ``state_dict`` with ``module.`` keys (the prompt learner's
        ``context_embeds`` and ``rank_embeds``, the image encoder, the frozen CLIP text tower, ``logit_scale``) and
        its ``config.yaml``; the text tower and logit scale are checked against the backbone's."""
        sd, cfg, path = run.state, run.config, run.path
        pl = config_get(cfg, "runner_cfg.model_cfg.prompt_learner_cfg", {}) or {}
        model_cfg = config_get(cfg, "runner_cfg.model_cfg", {}) or {}
        if pl.get("rank_specific_context"):
            raise CheckpointError(f"{run.config_file}: rank_specific_context is true; vlprompt's OrdinalCLIP shares "
                                  f"one context across ranks")
        if pl.get("rank_tokens_position", "tail") != "tail":
            raise CheckpointError(f"{run.config_file}: rank_tokens_position {pl['rank_tokens_position']!r}; "
                                  f"vlprompt's OrdinalCLIP puts the rank tokens after the context (tail)")
        pre = "module."
        ctx_key, rank_key = pre + "prompt_learner.context_embeds", pre + "prompt_learner.rank_embeds"
        for key in (ctx_key, rank_key):
            if key not in sd:
                raise CheckpointError(f"{path}: no {key!r} in state_dict (not an OrdinalCLIP checkpoint?)")
        ctx, ranks = sd[ctx_key], sd[rank_key]
        if ctx.dim() != 2:
            raise CheckpointError(f"{path}: {ctx_key} has shape {shape(ctx)}; a context shared by the ranks is "
                                  f"(n_ctx, dim) (rank-specific contexts are not supported)")
        if ranks.dim() != 3:
            raise CheckpointError(f"{path}: {rank_key} has shape {shape(ranks)}, expected (ranks, tokens, dim)")
        opts: dict = {"n_ctx": int(ctx.shape[0]), "tokens_per_rank": int(ranks.shape[1]), "init": None,
                      "rank_init": None}
        kind = pl.get("type")
        if kind == "RankPromptLearner":
            opts["num_base"] = int(ranks.shape[0])
        elif kind == "PlainPromptLearner":
            opts["num_base"] = 0
        elif kind is not None:
            raise CheckpointError(f"{run.config_file}: prompt learner {kind!r}; known: RankPromptLearner, "
                                  f"PlainPromptLearner")
        if pl.get("interpolation_type"):
            opts["interpolation"] = pl["interpolation_type"]
        state = {"prompts.ctx": (ctx_key, ctx, ctx)}
        rank_dst = "prompts.rank_embeddings.embeds" if opts.get("num_base") == 0 else "prompts.rank_embeddings.base"
        state[rank_dst] = (rank_key, ranks, ranks)
        enc_keys = {k[len(pre + "image_encoder."):]: v for k, v in sd.items() if k.startswith(pre + "image_encoder.")}
        image_name = model_cfg.get("image_encoder_name")
        text_name = model_cfg.get("text_encoder_name")
        if image_name is None:  # no config: what the tensors are
            image_name = ("vgg16" if "features.0.weight" in enc_keys else
                          ("clip" if "conv1.weight" in enc_keys else None))
        elif image_name == text_name:
            image_name = "clip"
        if image_name == "clip":
            opts.update(image_encoder="clip", image_encoder_weights="auto")
            prefix = "image_encoder.visual."
        elif image_name == "vgg16":
            # the reference normalises every encoder's input with ImageNet's statistics (its data_cfg)
            opts.update(image_encoder="vgg16", image_encoder_weights="none", image_encoder_input_norm="imagenet")
            prefix = "image_encoder.net."
        else:
            raise CheckpointError(f"{path}: image encoder {image_name!r}; the importer knows CLIP's and vgg16")
        for k, v in enc_keys.items():
            state[prefix + k] = (pre + "image_encoder." + k, v, v)
        request: dict = {"data": {}, "train": {}, "method_options": opts}
        seed = config_get(cfg, "runner_cfg.seed")
        if isinstance(seed, int) and seed >= 0:
            request["seed"] = seed
        train = request["train"]
        oc = config_get(cfg, "runner_cfg.optimizer_and_scheduler_cfg.optimizer_cfg", {}) or {}
        if oc.get("optimizer_name") in ("sgd", "adam", "adamw", "radam"):
            train["optimizer"] = oc["optimizer_name"]
        for key in ("lr", "weight_decay"):
            if isinstance(oc.get(key), (int, float)):
                train[key] = oc[key]
        epochs = config_get(cfg, "trainer_cfg.max_epochs")
        if isinstance(epochs, int) and epochs > 0:
            train["epochs"] = epochs
        batch = config_get(cfg, "data_cfg.train_dataloder_cfg.batch_size")
        if isinstance(batch, int) and batch > 0:
            train["batch_size"] = batch
        lw = config_get(cfg, "runner_cfg.loss_weights", {}) or {}
        for key, ours in (("ce_loss", "ce_weight"), ("kl_loss", "kl_weight")):
            if isinstance(lw.get(key), (int, float)):
                opts[ours] = lw[key]
        info = {**run.info, "init_context": pl.get("init_context"), "num_ranks": pl.get("num_ranks"),
                "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()
                           if not k.startswith(pre + "text_encoder.")}}
        text = {k[len(pre + "text_encoder."):]: v for k, v in sd.items() if k.startswith(pre + "text_encoder.")}
        scale = sd.get(pre + "logit_scale")
        unknown = sorted(k for k in sd if not k.startswith((pre + "image_encoder.", pre + "text_encoder.",
                                                            pre + "prompt_learner.")) and k != pre + "logit_scale")
        if unknown:
            raise CheckpointError(f"{path}: unexpected tensor {unknown[0]!r} in the OrdinalCLIP state_dict")
        imported = ImportedRun(cls.name, path, state, request, info,
                               optional=("image_encoder.input_scale", "image_encoder.input_shift"))
        imported.checks.append(lambda m: _check_text_tower(m, text, scale, path))
        return imported


def _check_text_tower(method, text: dict, scale, path) -> None:
    """The checkpoint's frozen CLIP text tower and logit scale must be the backbone's (else its prompts were
    learned for another text tower and the numbers would be wrong)."""
    own = method.backbone.model.state_dict()
    for k, v in text.items():
        if k in own and not close(v, own[k].to(v.dtype)):
            raise CheckpointError(f"{path}: the checkpoint's text tower differs from this backbone's at {k!r} "
                                  f"(other CLIP weights, or a text tower trained with lr_text_encoder > 0): give "
                                  f"the --backbone / --pretrained the run used")
    if scale is not None and abs(float(scale.float().exp()) - method.logit_scale) > 1e-3 * method.logit_scale:
        raise CheckpointError(f"{path}: the checkpoint's logit scale exp({float(scale):.4f}) = "
                              f"{float(scale.float().exp()):.3f} differs from this backbone's {method.logit_scale:.3f} "
                              f"(a run with lr_logit_scale > 0 is not supported)")
