"""CoOp's "transformation layer" baseline (Zhou et al., IJCV 2022, Sec. 4, comparison with other fine-tuning
methods): a linear layer learned on the text features of the hand-crafted prompts, initialised to the identity.

The class text features ``t`` (K, E) are zero-shot CLIP's (:func:`.zeroshot.class_text_features`: the dataset's
prompt, or an ensemble of templates; L2-normalised), computed once per class list with the frozen text tower.
The layer ``W t + b`` (W (E, E) from the identity, b from 0) is shared by all classes, so it applies to any class
list (base-to-new, cross-dataset); ``logits = logit_scale * cos(image, W t + b)`` on the frozen tower's (cached)
image features. At initialisation the method is zero-shot CLIP with the same templates. The result is fixed
class features: it exports a ``linear`` head.

:class:`HandCraftedConfig` and :class:`TextFeatureAdapter` are shared with :mod:`.text_bias` (the same frozen
features with a learned bias) and :mod:`.finetune_image` (the same classifier, frozen, on a trained image
encoder).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.templates import DEFAULT_TEMPLATE, resolve_templates
from .base import Features, Method, cosine_logits
from .coop import coop_epochs
from .zeroshot import ZeroShotConfig, class_text_features

__all__ = ["HandCraftedConfig", "TextFeatureAdapter", "TextTransformConfig", "TextTransform", "coop_recipe"]


def coop_recipe(data) -> dict:
    """The training recipe of CoOp (IJCV 2022, Sec. 4.1 "Training details"; KaiyangZhou/CoOp
    ``configs/trainers/CoOp/rn50_ep50.yaml`` and the ``*_ep100`` / ``*_ep200`` variants: sgd, lr 0.002, batch 32,
    cosine, one constant warm-up epoch at 1e-5; momentum 0.9 and weight decay 5e-4 from Dassl's defaults; epochs
    by shots as :func:`.coop.coop_epochs`). The paper compares its other fine-tuning baselines with CoOp on the same
    few shots without giving them a recipe of their own: this one is assumed for them."""
    return {"batch_size": 32, "epochs": coop_epochs(data.shots, data.dataset), "optimizer": "sgd", "lr": 0.002,
            "momentum": 0.9, "weight_decay": 5e-4, "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5}


@dataclass
class HandCraftedConfig(ZeroShotConfig):
    """The hand-crafted prompts the class text features come from (the paper's: the dataset's own template);
    the same field and checks as zero-shot's."""


class TextFeatureAdapter(Method):
    """Base of the methods that learn on the frozen class text features of hand-crafted prompts.

    ``class_text`` (K, E): normalised zero-shot text features (a non-persistent buffer, rebuilt for every class
    list); subclasses give :meth:`adapted_text` -> (K, E) and keep their learned tensors class-independent."""

    uses_template = True
    template_field = "templates"

    @classmethod
    def preset(cls, data) -> dict:
        return {"train": coop_recipe(data), "method_options": {}}

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return resolve_templates(request, dataset_template or DEFAULT_TEMPLATE)

    def __init__(self, config: HandCraftedConfig, backbone, classnames: Sequence[str], template: str | None = None):
        super().__init__(config, backbone, classnames)
        # the templates actually used (set names expanded): method.json rebuilds the same classifier anywhere
        self.template_request = list(config.templates)
        self.templates = self.expand_templates(config.templates, template)
        self.config = dataclasses.replace(config, templates=list(self.templates))
        self.register_buffer("class_text", class_text_features(backbone, self.classnames, self.templates),
                             persistent=False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        text = class_text_features(self.backbone, list(classnames), self.templates)
        super().set_classnames(classnames)
        self.class_text = text

    def adapted_text(self) -> torch.Tensor:  # (K, E)
        raise NotImplementedError

    def describe(self) -> dict:
        return {"templates": list(self.templates)}

    def forward(self, feats: Features) -> torch.Tensor:
        return cosine_logits(feats.global_.float(), self.once_per_eval(self.adapted_text).float(), self.logit_scale)

    def export_head(self):
        with torch.no_grad():
            text = F.normalize(self.adapted_text().float(), dim=-1).cpu()
        return {"text_features": text}, {"kind": "linear", "logit_scale": self.logit_scale,
                                         "templates": list(self.templates)}


@dataclass
class TextTransformConfig(HandCraftedConfig):
    pass


class TextTransform(TextFeatureAdapter):
    name = "text-transform"
    config_class = TextTransformConfig
    summary = ("CoOp paper's baseline: a linear layer (from the identity) learned on the text features of the "
               "hand-crafted prompts")

    def __init__(self, config: TextTransformConfig, backbone, classnames: Sequence[str], template: str | None = None):
        super().__init__(config, backbone, classnames, template=template)
        e = self.class_text.shape[-1]
        self.transform = nn.Linear(e, e).to(self.class_text.device)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(e))
            self.transform.bias.zero_()

    def adapted_text(self) -> torch.Tensor:
        """(K, E): ``W t + b`` of the zero-shot class features ``t``."""
        return self.transform(self.class_text)
