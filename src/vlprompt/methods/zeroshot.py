"""Zero-shot CLIP (Radford et al., 2021) as a method: hand-crafted prompts, one template or an ensemble.

The class text features are ``encode_text([template.format(c) for c in classnames])``; with several templates
the L2-normalised features of each template are averaged per class and renormalised (CLIP's prompt ensembling,
CoOp's ``ZeroshotCLIP2``). Logits (B, K) = ``logit_scale * cos(image, text)``. Nothing is learned: a zero-shot
run is an ordinary run (same data preparation, run directory and identity as a trained one) whose "training"
is empty; it exports a ``linear`` head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.templates import DEFAULT_TEMPLATE, resolve_templates
from .base import Features, Method, MethodConfig, cosine_logits, opt
from .prompts import check_prompts_fit


@dataclass
class ZeroShotConfig(MethodConfig):
    templates: list[str] = opt(default_factory=lambda: ["dataset"],
                          help="prompt templates with '{}' for the class name and/or set names: dataset (the "
                               "dataset's own prompt), imagenet80 (CLIP's 80), imagenet-select (CoOp's 7), "
                               "ensemble (CoOp's 7 + the dataset's); several are ensembled")

    def check(self) -> None:
        from ..data.templates import TEMPLATE_SETS, check_template
        from ..errors import ConfigError, DataError

        if not self.templates:
            raise ConfigError("templates (--templates) must name at least one template")
        for t in self.templates:
            if t.strip().lower() in TEMPLATE_SETS:
                continue
            try:
                check_template(t)
            except DataError as e:
                raise ConfigError(f"templates (--templates): unknown prompt template set {t!r} (sets: "
                                  f"{', '.join(TEMPLATE_SETS)}), and not a template: {e}") from e


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
    from ..errors import VLPromptError

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


class ZeroShot(Method):
    name = "zeroshot"
    config_class = ZeroShotConfig
    summary = "zero-shot CLIP: hand-crafted prompts or a prompt ensemble (nothing trained)"
    learns = "none"
    uses_template = True
    template_field = "templates"

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
    def expand_templates(cls, request, dataset_template):
        return resolve_templates(request, dataset_template or DEFAULT_TEMPLATE)

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
