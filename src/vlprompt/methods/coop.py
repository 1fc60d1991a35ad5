"""CoOp (Zhou et al., IJCV 2022): a learned context in front of (or around) each class name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Features, Method, MethodConfig, cosine_logits
from .prompts import PromptContext


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = 16
    csc: bool = False  # class-specific context
    class_position: str = "end"  # end | middle | front
    init: Optional[str] = None  # words such as "a photo of a" (their count overrides n_ctx); None = N(0, 0.02)
    init_std: float = 0.02
    text_mode: str = "auto"  # auto | plain | cut | prefix (all equal; auto is the fastest exact one)
    chunk_size: int = 256


class CoOp(Method):
    name = "coop"

    def __init__(self, config: CoOpConfig, backbone, classnames: Sequence[str], n_prompts: int = 1):
        super().__init__(config, backbone, classnames)
        self.prompt = PromptContext(backbone.text, classnames, n_ctx=config.n_ctx, csc=config.csc,
                                    position=config.class_position, init_words=config.init,
                                    n_prompts=n_prompts, init_std=config.init_std, text_mode=config.text_mode,
                                    chunk_size=config.chunk_size)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.prompt.set_classnames(classnames)

    def text_features(self) -> torch.Tensor:
        """(K, E) class text features, not normalised; computed once per evaluation."""
        return self.once_per_eval(lambda: self.prompt.encode()[0])

    def forward(self, feats: Features) -> torch.Tensor:
        return cosine_logits(feats.global_, self.text_features(), self.logit_scale)

    def export_head(self):
        with torch.no_grad():
            text = F.normalize(self.prompt.encode()[0].float(), dim=-1)
        return {"text_features": text}, {"kind": "linear", "logit_scale": self.logit_scale}
