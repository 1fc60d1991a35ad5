"""Zero-shot CLIP (Radford et al., 2021) as a method: hand-crafted prompts, one template or an ensemble.

The class text features are ``encode_text([template.format(c) for c in classnames])``; with several templates
the L2-normalised features of each template are averaged per class and renormalised (CLIP's prompt ensembling,
CoOp's ``ZeroshotCLIP2``; :func:`..parts.handcrafted.class_text_features`). Logits (B, K) = ``logit_scale *
cos(image, text)``. Nothing is learned: a zero-shot run is an ordinary run (same data preparation, run directory
and identity as a trained one) that only evaluates; it exports a ``linear`` head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.templates import DEFAULT_TEMPLATE, resolve_templates
from ..base import Features, Method, cosine_logits
from ..parts.handcrafted import check_class_prompts_fit, class_text_features
from ..parts.options import HandCraftedOptions


@dataclass
class ZeroShotConfig(HandCraftedOptions):
    pass


class ZeroShot(Method):
    name = "zeroshot"
    family = "baselines"
    config_class = ZeroShotConfig
    summary = "zero-shot CLIP: hand-crafted prompts or a prompt ensemble (nothing trained)"
    uses_template = True
    template_field = "templates"

    @classmethod
    def trains(cls, config) -> bool:
        return False

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return resolve_templates(request, dataset_template or DEFAULT_TEMPLATE)

    def __init__(self, config: ZeroShotConfig, backbone, classnames, template: str | None = None):
        super().__init__(config, backbone, classnames)
        # the templates actually used (set names expanded), recorded in method.json / config.yaml
        self.template_request = list(config.templates)
        self.templates = self.expand_templates(config.templates, template)
        self.config = ZeroShotConfig(templates=list(self.templates))
        # the text features are made at the first evaluation: a prompt too long is refused now, before a run
        # directory is written
        check_class_prompts_fit(backbone, self.classnames, self.templates)

    @classmethod
    def data_defaults(cls) -> dict:
        return {"shots": 0}  # evaluates on every test image; samples no training images

    def text_features(self) -> torch.Tensor:
        """(K, E) normalised class text features."""
        return self.once_per_eval(lambda: class_text_features(self.backbone, self.classnames, self.templates))

    def forward(self, feats: Features) -> torch.Tensor:
        return cosine_logits(feats.global_.float(), self.text_features(), self.logit_scale)

    def export_head(self):
        with torch.no_grad():
            text = class_text_features(self.backbone, self.classnames, self.templates).float().cpu()
        return {"text_features": text}, {"kind": "linear", "logit_scale": self.logit_scale,
                                         "templates": list(self.templates)}

    def describe(self) -> dict:
        return {"templates": list(self.templates)}
