"""CoOp (Zhou et al., IJCV 2022): a learned context in front of (or around) each class name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Features, Method, MethodConfig, cosine_logits
from .prompts import PromptContext


@dataclass
class CoOpConfig(MethodConfig):
    # context vectors M; None: 16 with a random init, the init words' token count with a word init (giving
    # another number with word init is an error). The built method's config holds the number learned.
    n_ctx: Optional[int] = None
    csc: bool = False  # class-specific context (it then belongs to the training class list)
    class_position: str = "end"  # end | middle | front
    init: Optional[str] = None  # words such as "a photo of a" (one vector per token); None = N(0, init_std)
    init_std: float = 0.02
    text_mode: str = "auto"  # auto | plain | cut | prefix (all equal; auto is the fastest exact one)
    chunk_size: int = 256


class CoOp(Method):
    name = "coop"
    config_class = CoOpConfig

    def __init__(self, config: CoOpConfig, backbone, classnames: Sequence[str], n_prompts: int = 1):
        super().__init__(config, backbone, classnames)
        self.prompt = PromptContext(backbone.text, classnames, n_ctx=config.n_ctx, csc=config.csc,
                                    position=config.class_position, init_words=config.init,
                                    n_prompts=n_prompts, init_std=config.init_std, text_mode=config.text_mode,
                                    chunk_size=config.chunk_size)
        # record what was learned (method.json / config.yaml write this config); the caller's object is left alone
        self.config = dataclasses.replace(config, n_ctx=self.prompt.n_ctx)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.prompt.set_classnames(classnames)  # first: a refused class list leaves the method unchanged
        super().set_classnames(classnames)

    def interpretable_vectors(self) -> list[tuple[dict, torch.Tensor]]:
        """({"prompt": n, "class": class name or None}, (M, D) context vectors) per learned context block."""
        return self.prompt.interpretable_vectors()

    def text_features(self) -> torch.Tensor:
        """(K, E) class text features, not normalised; computed once per evaluation."""
        return self.once_per_eval(lambda: self.prompt.encode()[0])

    def forward(self, feats: Features) -> torch.Tensor:
        return cosine_logits(feats.global_, self.text_features(), self.logit_scale)

    def export_head(self):
        with torch.no_grad():
            text = F.normalize(self.prompt.encode()[0].float(), dim=-1)
        return {"text_features": text}, {"kind": "linear", "logit_scale": self.logit_scale}
