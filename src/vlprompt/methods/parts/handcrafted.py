"""Hand-crafted prompts: zero-shot CLIP's class text features, and the base of the methods that learn on them.

* :func:`class_text_features`: ``normalize(encode_text([template.format(c)]))`` per class; with several templates
  the normalised features of each are averaged per class and renormalised (CLIP's prompt ensembling, CoOp's
  ``ZeroshotCLIP2``);
* :class:`TextFeatureAdapter`: a method that learns on those frozen class features (CoOp's text-transform,
  text-bias and fine-tuned image encoder baselines);
* :class:`HandCraftedText`: those features as the fixed reference a learned prompt is trained toward (KgCoOp's
  anchors, ProGrad's zero-shot teacher), encoded only when training needs them.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from ...data.templates import DEFAULT_TEMPLATE, resolve_templates
from ..base import Features, Method, cosine_logits
from .context import check_prompts_fit
from .options import HandCraftedOptions
from .recipes import coop_recipe


def format_prompts(template: str, classnames) -> list[str]:
    """The prompt of each class (underscores in class names become spaces, as in CoOp)."""
    return [template.format(str(c).replace("_", " ")) for c in classnames]


def check_class_prompts_fit(backbone, classnames, templates) -> None:
    """Raise naming the first class whose prompt (of any template) exceeds the text tower's context length."""
    for template in templates:
        check_prompts_fit(backbone.tokenizer, format_prompts(template, classnames), backbone.text.context_length,
                          what="prompt", names=list(classnames))


@torch.no_grad()
def class_text_features(backbone, classnames, templates) -> torch.Tensor:
    """Normalised class text features (K, E): one template ``normalize(encode_text(prompts))``; several: the
    mean over templates of the normalised features of each, renormalised (prompt ensembling). A prompt longer
    than the text tower's context is an error (open_clip's tokenizer would silently truncate it)."""
    from ...errors import VLPromptError

    if not templates:
        raise VLPromptError("no prompt template to build the zero-shot classifier from")
    if not classnames:
        raise VLPromptError("no class names to build the zero-shot classifier from")
    check_class_prompts_fit(backbone, classnames, templates)
    total = None
    for template in templates:
        prompts = format_prompts(template, classnames)
        feats = F.normalize(backbone.encode_text(prompts).float(), dim=-1)
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


class TextFeatureAdapter(Method):
    """Base of the methods that learn on the frozen class text features of hand-crafted prompts.

    ``class_text`` (K, E): normalised zero-shot text features (a non-persistent buffer, rebuilt for every class
    list); subclasses give :meth:`adapted_text` -> (K, E) and keep their learned tensors class-independent."""

    uses_template = True
    template_field = "templates"

    @classmethod
    def preset(cls, data) -> dict:
        """The paper compares these baselines with CoOp on the same few shots without a recipe of their own:
        CoOp's is assumed (:func:`.recipes.coop_recipe`)."""
        return {"train": coop_recipe(data), "method_options": {}}

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return resolve_templates(request, dataset_template or DEFAULT_TEMPLATE)

    def __init__(self, config: HandCraftedOptions, backbone, classnames: Sequence[str], template: str | None = None):
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


class HandCraftedText:
    """The hand-crafted class text features (K, E) of ``templates`` that a learned prompt is trained toward
    (KgCoOp's anchors, ProGrad's zero-shot teacher: :func:`class_text_features`, normalised).

    The prompts are checked to fit the text tower when the class list is set (before a run writes anything); the
    features are encoded on first use -- float32, no gradient, outside any autocast, as the originals' separate
    fp32 CLIP -- and kept until the class list changes. Only training reads them: a method built to evaluate or
    predict never encodes them."""

    def __init__(self, backbone, templates: Sequence[str], classnames: Sequence[str]):
        self.backbone = backbone
        self.templates = list(templates)
        self.set_classnames(classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        classnames = list(classnames)
        check_class_prompts_fit(self.backbone, classnames, self.templates)
        self.classnames = classnames
        self._features = None

    def features(self) -> torch.Tensor:
        """(K, E) normalised class text features, float32, without gradient."""
        if self._features is None:
            with torch.autocast(self.backbone.device.type, enabled=False):
                self._features = class_text_features(self.backbone, self.classnames, self.templates)
        return self._features


__all__ = ["format_prompts", "check_class_prompts_fit", "class_text_features", "TextFeatureAdapter", "HandCraftedText"]
