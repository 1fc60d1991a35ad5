"""OrdinalCLIP's baselines, on the same image encoder, data, metrics and outputs as :mod:`.ordinalclip`.

* ``rank-linear`` (:class:`RankLinear`): the image encoder and a linear classification head over the ranks,
  trained with cross-entropy (the paper's "CNN" baseline; ``head=cosine`` with ``loss=ordinal`` is exactly the
  reference's ``Baseline`` model: a bias-free normalised linear layer scaled by the logit scale, trained with
  OrdinalCLIP's loss).
* ``rank-regression`` (:class:`RankRegression`): the image encoder and a linear layer giving one value per
  image, trained with an L1 or L2 loss on the standardised target.
* ``rank-zeroshot`` (:class:`RankZeroShot`): frozen CLIP, one sentence per rank (the dataset's prompt template,
  e.g. "a photo of a {} year old person.", or ``template``); nothing is trained.
* ``rank-coop`` (:class:`RankCoOp`): CoOp on ranks: a learned context shared by all ranks followed by each
  rank's words ("25", "0-2", "1950s"), fixed (``lr_ranks = 0``, default) or fine-tuned from their embeddings
  (the reference's CoOp configuration on MORPH tunes both).

Every method outputs ``(B, R)`` logits so the engine, the metrics (MAE / accuracy of argmax and expectation)
and the export treat them alike. For the regression the logits are ``-(z - u_r)^2 / (2 tau^2)`` with ``z`` the
regressed value and ``u_r`` the rank values, both standardised: the argmax is the nearest rank, and ``z`` is
recovered exactly from any two columns, so the "expectation" metrics of ``rank-regression`` are those of the
regressed value itself (:func:`.ordinal_parts.regression_decode`, the one way back from the logits).

This module and :mod:`.ordinalclip` share :mod:`.ordinal_base`; neither imports the other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.templates import DEFAULT_TEMPLATE
from ...errors import ConfigError, VLPromptError
from ..base import Features, MethodConfig, opt
from .base import (IMDB_WIKI, MORPH_CONTEXT, TEXT_MODES, OrdinalConfig, OrdinalMethod, PromptPrototypes,
                           RankPrompts, _check_rank_values)
from .parts import ordinal_loss, regression_decode, regression_logits, regression_units
from ..parts.context import check_prompts_fit

__all__ = ["RankLinear", "RankLinearConfig", "RankRegression", "RankRegressionConfig", "RankZeroShot",
           "RankZeroShotConfig", "RankCoOp", "RankCoOpConfig"]


def _ce_or_ordinal(kind: str, logits: torch.Tensor, labels: torch.Tensor):
    if kind == "ordinal":
        return ordinal_loss(logits, labels)
    loss = F.cross_entropy(logits, labels)
    return loss, {"ce_loss": loss.detach()}


# --------------------------------------------------------------------------------------------------
# rank-linear
# --------------------------------------------------------------------------------------------------
@dataclass
class RankLinearConfig(OrdinalConfig):
    head: str = opt("linear", "linear: W f + b; cosine: logit_scale * cos(f, w_r), bias-free (the reference's "
                    "Baseline)", choices=("linear", "cosine"))
    loss: str = opt("ce", "ce (cross-entropy) or ordinal (OrdinalCLIP's cross-entropy + KL)",
                    choices=("ce", "ordinal"))
    lr_head: float = opt(1.0, "learning-rate multiplier of the head (0 freezes it)", min=0)


class RankLinear(OrdinalMethod):
    """Image encoder + a linear head over the ranks."""

    name = "rank-linear"
    config_class = RankLinearConfig
    summary = "OrdinalCLIP's CNN baseline: a trained image encoder + a linear head over the ranks"

    @classmethod
    def morph_options(cls) -> dict:
        """``morph_compare.yaml``'s ``cnn`` entry (its lines 34-44): the IMDB-WIKI VGG-16 (line 37) with the
        reference's ``Baseline`` model (line 39, ``ordinalclip/models/baseline.py``: a bias-free linear layer over
        the normalised features, cosine logits scaled by 100, trained with the default loss weights ce 1 + kl 1),
        the whole encoder trained (line 40)."""
        return {"image_encoder": "vgg16", "image_encoder_weights": IMDB_WIKI, "head": "cosine", "loss": "ordinal",
                "lr_image_encoder": 1.0, "lr_head": 1.0}

    def __init__(self, config: RankLinearConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        self.head = nn.Linear(backbone.embed_dim, self.num_classes, bias=config.head == "linear").to(backbone.device)
        self._freeze_zero_lr()

    def component_groups(self):
        return super().component_groups() + [("head", list(self.head.parameters()), self.config.lr_head)]

    def forward(self, feats: Features) -> torch.Tensor:
        f = self.image_features(feats)
        if self.config.head == "cosine":
            return self.logit_scale * F.normalize(f, dim=-1) @ F.normalize(self.head.weight, dim=-1).t()
        return self.head(f)

    def loss(self, logits, labels, targets=None):
        return _ce_or_ordinal(self.config.loss, logits, labels)

    def prototypes(self) -> torch.Tensor:
        """The head's weight rows ``(R, E)`` (their ordinality is what the paper compares)."""
        return F.normalize(self.head.weight.detach().float(), dim=-1)

    def _export_tensors(self):
        if self.config.head == "cosine":
            return {"prototypes": self.prototypes().cpu()}, {"head": "cosine", "logit_scale": self.logit_scale}
        return ({"weight": self.head.weight.detach().float().cpu(), "bias": self.head.bias.detach().float().cpu()},
                {"head": "linear"})


# --------------------------------------------------------------------------------------------------
# rank-regression
# --------------------------------------------------------------------------------------------------
@dataclass
class RankRegressionConfig(OrdinalConfig):
    loss: str = opt("l1", "l1 or l2 on the standardised target", choices=("l1", "l2"))
    lr_head: float = opt(1.0, "learning-rate multiplier of the regression layer (0 freezes it)", min=0)


class RankRegression(OrdinalMethod):
    """Image encoder + a linear layer regressing the (standardised) value."""

    name = "rank-regression"
    config_class = RankRegressionConfig
    summary = "regression baseline: a trained image encoder + one linear output, L1/L2 on the standardised value"

    def __init__(self, config: RankRegressionConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        self.head = nn.Linear(backbone.embed_dim, 1).to(backbone.device)
        self._freeze_zero_lr()
        self._set_units()

    def _set_units(self) -> None:
        units, self.mean, self.scale, self.tau = regression_units(self.rank_values.cpu())
        self.register_buffer("rank_units", units.to(self.rank_values.device), persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self._set_units()

    def component_groups(self):
        return super().component_groups() + [("head", list(self.head.parameters()), self.config.lr_head)]

    def regress(self, feats: Features) -> torch.Tensor:
        """``(B,)`` standardised predicted values."""
        return self.head(self.image_features(feats))[:, 0]

    def forward(self, feats: Features) -> torch.Tensor:
        return regression_logits(self.regress(feats).float(), self.rank_units, self.tau)

    def loss(self, logits, labels, targets=None):
        z = regression_decode(logits, self.rank_units, self.tau)  # standardised
        u = (self.target_values(labels, targets) - self.mean) / self.scale
        loss = (z - u).abs().mean() if self.config.loss == "l1" else (z - u).square().mean()
        return loss, {f"{self.config.loss}_loss": loss.detach()}

    def predictions(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``argmax``: the nearest rank's value; ``expectation``: the regressed value itself."""
        logits = logits.float()
        idx = logits.argmax(dim=-1)
        value = regression_decode(logits, self.rank_units, self.tau, self.mean, self.scale)
        return {"argmax": self.rank_values.to(logits.device)[idx], "expectation": value, "index": idx}

    def _export_tensors(self):
        return ({"weight": self.head.weight.detach().float().cpu(), "bias": self.head.bias.detach().float().cpu(),
                 "rank_units": self.rank_units.cpu()},
                {"head": "regression", "tau": self.tau, "mean": self.mean, "scale": self.scale})


# --------------------------------------------------------------------------------------------------
# rank-zeroshot
# --------------------------------------------------------------------------------------------------
@dataclass
class RankZeroShotConfig(MethodConfig):
    template: Optional[str] = opt(None, "the sentence of each rank, '{}' standing for its words (default: the "
                                  "dataset's prompt template, e.g. 'a photo of a {} year old person.')")
    rank_words: Optional[str] = opt(None, "comma-separated words per rank (default: the class names)")
    rank_values: Optional[list[float]] = opt(None, "the value of each rank (default: the class names when all are "
                                      "numbers, else the rank indices 0..R-1)")

    def check(self) -> None:
        if self.template is not None and "{}" not in self.template:
            raise ConfigError(f"template must contain '{{}}' (the rank's words), got {self.template!r}")
        _check_rank_values(self.rank_values)


class RankZeroShot(OrdinalMethod):
    """Zero-shot CLIP over rank sentences: nothing is learned; the frozen image tower's features are used."""

    name = "rank-zeroshot"
    config_class = RankZeroShotConfig
    summary = "zero-shot CLIP over rank sentences (nothing trained)"
    uses_template = True
    template_field = "template"

    @classmethod
    def trains(cls, config) -> bool:
        return False

    def __init__(self, config: RankZeroShotConfig, backbone, classnames: Sequence[str], *,
                 template: Optional[str] = None):
        # the sentence actually used is recorded in the config (method.json), so a reloaded run does not depend
        # on which template its loader passes
        resolved = self.expand_templates(config.template, template)
        if "{}" not in resolved:
            raise ConfigError(f"rank-zeroshot: the template must contain '{{}}', got {resolved!r}")
        super().__init__(dataclasses.replace(config, template=resolved), backbone, classnames,
                         own_image_encoder=False)
        self.template_request = config.template
        self._encode_ranks()

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return request or dataset_template or DEFAULT_TEMPLATE

    @classmethod
    def preset(cls, data) -> dict:
        return {"train": {}, "method_options": {}}  # nothing to train

    @classmethod
    def trains_own_image_encoder(cls, config) -> bool:
        return False

    def selection(self):
        return None

    def describe(self) -> dict:
        return {"image_encoder": "the backbone's frozen image tower", "template": self.config.template,
                "num_ranks": self.num_classes, "rank_words": ", ".join(self._words()[:3]) + ", ..."}

    def _words(self) -> list[str]:
        if self.config.rank_words:
            words = [w.strip() for w in self.config.rank_words.split(",")]
            if len(words) != self.num_classes:
                raise ConfigError(f"rank_words has {len(words)} words for {self.num_classes} ranks")
            return words
        return [str(c).replace("_", " ") for c in self.classnames]

    def _encode_ranks(self) -> None:
        words = self._words()
        sentences = [self.config.template.format(w) for w in words]
        check_prompts_fit(self.backbone.tokenizer, sentences, self.backbone.text.context_length,
                          what="rank sentence", names=words)  # open_clip would cut it silently
        text = self.backbone.encode_text(sentences, normalize=True)
        self.register_buffer("text", text, persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self._encode_ranks()

    def forward(self, feats: Features) -> torch.Tensor:
        image = F.normalize(self.image_features(feats), dim=-1)
        return self.logit_scale * image @ self.text.t()

    def prototypes(self) -> torch.Tensor:
        return self.text.float()


# --------------------------------------------------------------------------------------------------
# rank-coop
# --------------------------------------------------------------------------------------------------
@dataclass
class RankCoOpConfig(OrdinalConfig):
    n_ctx: Optional[int] = opt(None, "context vectors shared by all ranks (default: 10, or the number of init "
                               "tokens; another count with init is an error)", min=1)
    init: Optional[str] = opt(None, "context words (their token embeddings start the context); default: random "
                              "N(0, init_std)")
    init_std: float = opt(0.02, "standard deviation of the random context initialisation", gt=0)
    rank_words: Optional[str] = opt(None, "comma-separated words per rank (default: the class names)")
    lr_context: float = opt(1.0, "learning-rate multiplier of the context (0 freezes it)", min=0)
    lr_ranks: float = opt(0.0, "0: fixed rank words (CoOp); > 0: the rank words' embeddings are fine-tuned too, "
                          "with this learning-rate multiplier (the reference's CoOp on MORPH II)", min=0)
    loss: str = opt("ordinal", "ordinal (cross-entropy + KL, as the reference trains it) or ce",
                    choices=("ordinal", "ce"))
    text_mode: str = opt("auto", "how the text tower encodes the prompts (all exact): auto, plain, cut or prefix",
                         choices=TEXT_MODES)
    chunk_size: int = opt(256, "prompts encoded per text-tower call (memory bound)", min=1)


class RankCoOp(PromptPrototypes, OrdinalMethod):
    """CoOp on ranks: a learned context shared by all ranks, followed by each rank's words."""

    name = "rank-coop"
    config_class = RankCoOpConfig
    summary = "CoOp on ranks: a learned context shared by all ranks before each rank's words"

    @classmethod
    def morph_options(cls) -> dict:
        """``morph_compare.yaml``'s ``coop`` entry (its lines 18-32): the IMDB-WIKI VGG-16 (line 21), the context
        from "age estimation: the age of the person is" (line 22), the rank words of the class names
        (``init-rank-morph.yaml``, line 23: ``data/MORPH/classnames.txt``), context and rank words both trained
        (``tune-ctx-rank.yaml``, line 28), and the image encoder (line 27)."""
        return {"image_encoder": "vgg16", "image_encoder_weights": IMDB_WIKI, "init": MORPH_CONTEXT,
                "lr_image_encoder": 1.0, "lr_context": 1.0, "lr_ranks": 1.0}

    def __init__(self, config: RankCoOpConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        if config.rank_words:
            words = [w.strip() for w in config.rank_words.split(",")]
        else:
            words = list(classnames)
        self.prompts = RankPrompts(backbone.text, self.num_classes, n_ctx=config.n_ctx, init_words=config.init,
                                   init_std=config.init_std, rank_words=words, learn_words=config.lr_ranks > 0,
                                   text_mode=config.text_mode, chunk_size=config.chunk_size)
        self._freeze_zero_lr()
        self.config = dataclasses.replace(config, n_ctx=self.prompts.n_ctx)  # the count learned

    def describe(self) -> dict:
        return {**super().describe(), "n_ctx": self.prompts.n_ctx, "context_init": self.prompts.init_words or "random",
                "rank_words": "learned from their embeddings" if self.prompts.word_embeds is not None else "fixed"}

    def set_classnames(self, classnames):
        if list(classnames) != list(self.classnames) and not self.config.rank_words:
            raise VLPromptError("rank-coop's prompts hold the training class names as rank words; evaluate it on "
                                "the same ranks")
        super().set_classnames(classnames)

    def component_groups(self):
        groups = super().component_groups() + [("context", [self.prompts.ctx], self.config.lr_context)]
        if self.prompts.word_embeds is not None:
            groups.append(("ranks", [self.prompts.word_embeds], self.config.lr_ranks))
        return groups

    def loss(self, logits, labels, targets=None):
        return _ce_or_ordinal(self.config.loss, logits, labels)
