"""CoOp's "bias" baseline (Zhou et al., IJCV 2022, Sec. 4, comparison with other fine-tuning methods): a bias
learned and added to the text features of the hand-crafted prompts.

``logits = logit_scale * cos(image, t + b)`` with ``t`` (K, E) zero-shot CLIP's normalised class text features
(the dataset's prompt or a template ensemble, frozen) and ``b`` (E,) one learned vector from 0, shared by the
classes (so it applies to any class list); at initialisation the method is zero-shot CLIP with the same
templates. The result is fixed class features: it exports a ``linear`` head. (The paper does not say whether its
bias is one vector or one per class; one shared vector, the counterpart of its shared transformation layer, is
assumed.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..parts.handcrafted import TextFeatureAdapter
from ..parts.options import HandCraftedOptions

__all__ = ["TextBiasConfig", "TextBias"]


@dataclass
class TextBiasConfig(HandCraftedOptions):
    pass


class TextBias(TextFeatureAdapter):
    name = "text-bias"
    family = "baselines"
    config_class = TextBiasConfig
    summary = "CoOp paper's baseline: a bias (from 0) learned on the text features of the hand-crafted prompts"

    def __init__(self, config: TextBiasConfig, backbone, classnames: Sequence[str], template: str | None = None):
        super().__init__(config, backbone, classnames, template=template)
        self.bias = nn.Parameter(torch.zeros(self.class_text.shape[-1], device=self.class_text.device))

    def adapted_text(self) -> torch.Tensor:
        """(K, E): ``t + b``."""
        return self.class_text + self.bias
