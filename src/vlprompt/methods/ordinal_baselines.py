"""OrdinalCLIP's baselines, on the same image encoder, data, metrics and outputs as :mod:`.ordinalclip`.

* ``rank-linear`` (:class:`RankLinear`): the image encoder and a linear classification head over the ranks,
  trained with cross-entropy (the paper's "CNN" baseline; ``head=cosine`` with ``loss=ordinal`` is exactly the
  reference's ``Baseline`` model: a bias-free normalised linear layer scaled by the logit scale, trained with
  OrdinalCLIP's loss).
* ``rank-regression`` (:class:`RankRegression`): the image encoder and a linear layer giving one value per
  image, trained with an L1 or L2 loss on the standardised target.
* ``rank-zeroshot`` (:class:`RankZeroShot`): frozen CLIP, one sentence per rank ("a photo of a {} year old
  person.", configurable); nothing is trained.
* ``rank-coop`` (:class:`RankCoOp`): CoOp on ranks: a learned context shared by all ranks followed by each
  rank's words ("25", "0-2", "1950s"), fixed (``lr_ranks = 0``, default) or fine-tuned from their embeddings
  (the reference's CoOp configuration on MORPH tunes both).

Every method outputs ``(B, R)`` logits so the engine, the metrics (MAE / accuracy of argmax and expectation)
and the export treat them alike. For the regression the logits are ``-(z - u_r)^2 / (2 tau^2)`` with ``z`` the
regressed value and ``u_r`` the rank values, both standardised: the argmax is the nearest rank, and ``z`` is
recovered exactly from any two columns, so the "expectation" metrics of ``rank-regression`` are those of the
regressed value itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import VLPromptError
from ..ordinal import ordinal_loss
from .base import Features, MethodConfig
from .ordinalclip import OrdinalConfig, OrdinalMethod, PromptPrototypes, RankPrompts

__all__ = ["RankLinear", "RankLinearConfig", "RankRegression", "RankRegressionConfig", "RankZeroShot",
           "RankZeroShotConfig", "RankCoOp", "RankCoOpConfig", "regression_values"]


# --------------------------------------------------------------------------------------------------
# rank-linear
# --------------------------------------------------------------------------------------------------
@dataclass
class RankLinearConfig(OrdinalConfig):
    head: str = "linear"  # linear: W f + b | cosine: logit_scale * cos(f, w_r), bias-free (the reference's Baseline)
    loss: str = "ce"  # ce | ordinal (OrdinalCLIP's CE + KL)
    lr_head: float = 1.0


class RankLinear(OrdinalMethod):
    """Image encoder + a linear head over the ranks."""

    name = "rank-linear"

    def __init__(self, config: RankLinearConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        if config.head not in ("linear", "cosine"):
            raise VLPromptError(f"rank-linear: head must be 'linear' or 'cosine', got {config.head!r}")
        if config.loss not in ("ce", "ordinal"):
            raise VLPromptError(f"rank-linear: loss must be 'ce' or 'ordinal', got {config.loss!r}")
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
        if self.config.loss == "ordinal":
            return ordinal_loss(logits, labels)
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce_loss": loss.detach()}

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
    loss: str = "l1"  # l1 | l2, on the standardised target
    lr_head: float = 1.0


def regression_values(logits: torch.Tensor, units: torch.Tensor, tau: float, mean: float, scale: float) -> torch.Tensor:
    """The regressed values ``(N,)`` (rank-value units) behind regression logits ``-(z - u_r)^2 / (2 tau^2)``:
    ``z = tau^2 (l_last - l_first) / (u_last - u_first) + (u_last + u_first) / 2``, in float64."""
    lg = logits.double()
    u = units.double().to(lg.device)
    z = tau ** 2 * (lg[:, -1] - lg[:, 0]) / (u[-1] - u[0]) + (u[-1] + u[0]) / 2
    return (mean + scale * z).float()


class RankRegression(OrdinalMethod):
    """Image encoder + a linear layer regressing the (standardised) value."""

    name = "rank-regression"

    def __init__(self, config: RankRegressionConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        if config.loss not in ("l1", "l2"):
            raise VLPromptError(f"rank-regression: loss must be 'l1' or 'l2', got {config.loss!r}")
        self.head = nn.Linear(backbone.embed_dim, 1).to(backbone.device)
        self._freeze_zero_lr()
        self._set_units()

    def _set_units(self) -> None:
        rv = self.rank_values.double()
        self.mean = float(rv.mean())
        self.scale = float(rv.std()) or 1.0
        units = (rv - self.mean) / self.scale
        # the softmax over these logits is a discretised Gaussian one rank spacing wide around the value
        self.tau = float((units[-1] - units[0]) / (len(units) - 1))
        self.register_buffer("rank_units", units.float(), persistent=False)

    def set_classnames(self, classnames):
        super().set_classnames(classnames)
        self._set_units()

    def component_groups(self):
        return super().component_groups() + [("head", list(self.head.parameters()), self.config.lr_head)]

    def regress(self, feats: Features) -> torch.Tensor:
        """``(B,)`` standardised predicted values."""
        return self.head(self.image_features(feats))[:, 0]

    def forward(self, feats: Features) -> torch.Tensor:
        z = self.regress(feats).float()
        return -(z[:, None] - self.rank_units[None, :]).square() / (2.0 * self.tau ** 2)

    def loss(self, logits, labels, targets=None):
        z = self._z_from_logits(logits)
        u = (self.target_values(labels, targets) - self.mean) / self.scale
        loss = (z - u).abs().mean() if self.config.loss == "l1" else (z - u).square().mean()
        return loss, {f"{self.config.loss}_loss": loss.detach()}

    def _z_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        u = self.rank_units.to(logits.device)
        return self.tau ** 2 * (logits[:, -1] - logits[:, 0]) / (u[-1] - u[0]) + (u[-1] + u[0]) / 2

    def predictions(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``argmax``: the nearest rank's value; ``expectation``: the regressed value itself."""
        logits = logits.float()
        idx = logits.argmax(dim=-1)
        value = regression_values(logits, self.rank_units.cpu(), self.tau, self.mean, self.scale).to(logits.device)
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
    template: str = "a photo of a {} year old person."  # "{}" = the rank's words (its class name)
    rank_words: Optional[str] = None  # comma-separated words per rank; default: the class names
    rank_values: Optional[list] = None


class RankZeroShot(OrdinalMethod):
    """Zero-shot CLIP over rank sentences: nothing is learned; the frozen image tower's features are used."""

    name = "rank-zeroshot"
    train_defaults = {"epochs": 0}

    def __init__(self, config: RankZeroShotConfig, backbone, classnames: Sequence[str]):
        if "{}" not in config.template:
            raise VLPromptError(f"rank-zeroshot: the template must contain '{{}}', got {config.template!r}")
        super().__init__(config, backbone, classnames, own_image_encoder=False)
        self._encode_ranks()

    def _words(self) -> list[str]:
        if self.config.rank_words:
            words = [w.strip() for w in self.config.rank_words.split(",")]
            if len(words) != self.num_classes:
                raise VLPromptError(f"rank_words has {len(words)} words for {self.num_classes} ranks")
            return words
        return [str(c).replace("_", " ") for c in self.classnames]

    def _encode_ranks(self) -> None:
        sentences = [self.config.template.format(w) for w in self._words()]
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
    n_ctx: int = 10
    init: Optional[str] = None  # context words; None = N(0, init_std)
    init_std: float = 0.02
    rank_words: Optional[str] = None  # comma-separated words per rank; default: the class names
    lr_context: float = 1.0
    lr_ranks: float = 0.0  # 0: fixed rank words (CoOp); > 0: the rank words' embeddings are fine-tuned too
    loss: str = "ordinal"  # ordinal (CE + KL, as the reference trains it) | ce
    text_mode: str = "auto"
    chunk_size: int = 256


class RankCoOp(PromptPrototypes, OrdinalMethod):
    """CoOp on ranks: a learned context shared by all ranks, followed by each rank's words."""

    name = "rank-coop"

    def __init__(self, config: RankCoOpConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        if config.loss not in ("ce", "ordinal"):
            raise VLPromptError(f"rank-coop: loss must be 'ce' or 'ordinal', got {config.loss!r}")
        if config.rank_words:
            words = [w.strip() for w in config.rank_words.split(",")]
        else:
            words = list(classnames)
        self.prompts = RankPrompts(backbone.text, self.num_classes, n_ctx=config.n_ctx, init_words=config.init,
                                   init_std=config.init_std, rank_words=words, learn_words=config.lr_ranks > 0,
                                   text_mode=config.text_mode, chunk_size=config.chunk_size)
        self._freeze_zero_lr()

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
        if self.config.loss == "ordinal":
            return ordinal_loss(logits, labels)
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce_loss": loss.detach()}

    def prototypes(self) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.prompts.encode().float(), dim=-1)
