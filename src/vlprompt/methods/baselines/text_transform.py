"""CoOp's "transformation layer" baseline (Zhou et al., IJCV 2022, Sec. 4, comparison with other fine-tuning
methods): a linear layer learned on the text features of the hand-crafted prompts, initialised to the identity.

The class text features ``t`` (K, E) are zero-shot CLIP's (:func:`..parts.handcrafted.class_text_features`: the
dataset's prompt, or an ensemble of templates; L2-normalised), computed once per class list with the frozen text
tower. The layer ``W t + b`` (W (E, E) from the identity, b from 0) is shared by all classes, so it applies to any
class list (base-to-new, cross-dataset); ``logits = logit_scale * cos(image, W t + b)`` on the frozen tower's
(cached) image features. At initialisation the method is zero-shot CLIP with the same templates. The result is
fixed class features: it exports a ``linear`` head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..parts.handcrafted import TextFeatureAdapter
from ..parts.options import HandCraftedOptions

__all__ = ["TextTransformConfig", "TextTransform"]


@dataclass
class TextTransformConfig(HandCraftedOptions):
    pass


class TextTransform(TextFeatureAdapter):
    name = "text-transform"
    family = "baselines"
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
