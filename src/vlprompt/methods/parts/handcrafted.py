"""Hand-crafted prompts: zero-shot CLIP's class text features, and the base of the methods that learn on them.

* :func:`class_text_features`: ``normalize(encode_text([template.format(c)]))`` per class; with several templates
  the normalised features of each are averaged per class and renormalised (CLIP's prompt ensembling, CoOp's
  ``ZeroshotCLIP2``); or, as TaskRes' and CLAP's code build their class features, the plain mean of the
  unnormalised features of the templates filled with the class names as the dataset's files spell them;
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


def format_prompts(template: str, classnames, clean: bool = True) -> list[str]:
    """The prompt of each class; ``clean``: underscores in class names become spaces, as in CoOp (else the names
    go in as given)."""
    return [template.format(str(c).replace("_", " ") if clean else str(c)) for c in classnames]


#: how :func:`class_text_features` combines the templates of a class: ``normalised`` (CLIP's prompt ensembling)
#: or ``raw`` (the mean of the unnormalised features, TaskRes' and CLAP's class features)
AVERAGES = ("normalised", "raw")


def check_class_prompts_fit(backbone, classnames, templates, clean_names: bool = True) -> None:
    """Raise naming the first class whose prompt (of any template) exceeds the text tower's context length."""
    for template in templates:
        check_prompts_fit(backbone.tokenizer, format_prompts(template, classnames, clean_names),
                          backbone.text.context_length,
                          what="prompt", names=list(classnames))


@torch.no_grad()
def class_text_features(backbone, classnames, templates, *, clean_names: bool = True,
                        average: str = "normalised") -> torch.Tensor:
    """Class text features (K, E) of hand-crafted prompts.

    ``average="normalised"`` (zero-shot CLIP): one template ``normalize(encode_text(prompts))``; several: the mean
    over templates of the normalised features of each, renormalised (prompt ensembling). ``average="raw"``: the
    plain mean over templates of the UNnormalised features, not normalised (TaskRes' ``_get_base_text_features``,
    CLAP's; their norm matters: a learned residual or penalty acts on these vectors). ``clean_names``: underscores
    become spaces (CoOp); else the names go into the prompts as given. A prompt longer than the text tower's
    context is an error (open_clip's tokenizer would silently truncate it)."""
    from ...errors import VLPromptError

    if average not in AVERAGES:
        raise VLPromptError(f"average must be one of {', '.join(AVERAGES)}, got {average!r}")
    if not templates:
        raise VLPromptError("no prompt template to build the zero-shot classifier from")
    if not classnames:
        raise VLPromptError("no class names to build the zero-shot classifier from")
    check_class_prompts_fit(backbone, classnames, templates, clean_names)
    total = None
    for template in templates:
        prompts = format_prompts(template, classnames, clean_names)
        feats = backbone.encode_text(prompts).float()
        if average == "normalised":
            feats = F.normalize(feats, dim=-1)
        total = feats if total is None else total + feats
    mean = total / len(templates)
    return F.normalize(mean, dim=-1) if average == "normalised" else mean


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


class ClassFeatureHead(Method):
    """Base of the methods that learn a class-specific classifier (K, E) on hand-crafted class features (TaskRes'
    residual, CLAP's prototypes): logits (B, K) = ``logit_scale * cos(image, classifier)``.

    ``base`` (K, E): the class features of :class:`.options.ClassFeatureOptions` (by default as the originals build
    them: the names as the dataset's files spell them -- ``source_names``, which a run passes; without them the
    class names as given -- and the unnormalised mean over templates). It
    is a persistent buffer, saved with the learned tensors as the originals save theirs, so an evaluation, an
    export or an import uses the very base the classifier was learned on. The classifier belongs to its classes:
    another class list is refused, except a sub-list of the trained names (ImageNet-A / -R), whose rows are
    taken by name as the originals re-index theirs (:meth:`Method.trained_class_rows`). Subclasses give
    :meth:`classifier` and ``what`` (the refusal's wording)."""

    uses_template = True
    uses_source_names = True
    #: what is class-specific, for the refusal of another class list
    what: str = "a class-specific classifier"

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return resolve_templates(request, dataset_template or DEFAULT_TEMPLATE)

    def __init__(self, config, backbone, classnames: Sequence[str], template: str | None = None,
                 source_names: Sequence[str] | None = None):
        from ...errors import VLPromptError

        super().__init__(config, backbone, classnames)
        self.templates = self.expand_templates(config.templates, template)
        self.config = dataclasses.replace(config, templates=list(self.templates))
        names = list(self.classnames) if (config.clean_names or source_names is None) else list(source_names)
        if len(names) != len(self.classnames):
            raise VLPromptError(f"{self.name}: {len(names)} source class names for {len(self.classnames)} classes")
        self.prompt_names = names
        self.register_buffer("base", class_text_features(backbone, names, self.templates,
                                                         clean_names=config.clean_names, average=config.average))
        self.trained_classnames = list(self.classnames)
        self._rows = None  # classifier rows of a sub-list of the trained classes

    def classifier(self) -> torch.Tensor:
        """(K_trained, E): the class weights, not normalised."""
        raise NotImplementedError

    def class_weights(self) -> torch.Tensor:
        """(K, E): the classifier's rows of the current class list."""
        w = self.classifier()
        return w if self._rows is None else w[self._rows.to(w.device)]

    def forward(self, feats: Features) -> torch.Tensor:
        return cosine_logits(feats.global_.float(), self.once_per_eval(self.class_weights).float(), self.logit_scale)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        rows = self.trained_class_rows(classnames, self.what, trained=self.trained_classnames)
        super().set_classnames(classnames)
        self._rows = None if rows is None else torch.tensor(rows)

    def describe(self) -> dict:
        return {"templates": list(self.templates), "clean_names": self.config.clean_names,
                "average": self.config.average,
                "prompts": format_prompts(self.templates[0], self.prompt_names[:3], self.config.clean_names)}

    def export_head(self):
        with torch.no_grad():
            text = F.normalize(self.class_weights().float(), dim=-1).cpu()
        return {"text_features": text}, {"kind": "linear", "logit_scale": self.logit_scale,
                                         "templates": list(self.templates)}


__all__ = ["AVERAGES", "format_prompts", "check_class_prompts_fit", "class_text_features", "TextFeatureAdapter",
           "HandCraftedText", "ClassFeatureHead"]
