"""CoOp (Zhou et al., IJCV 2022): a learned context in front of (or around) each class name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .base import Features, Method, MethodConfig, cosine_logits, opt
from .prompts import PromptContext


#: CoOp's epochs by shots (Zhou et al., IJCV 2022, Sec. 4.1, and the repository's configs/trainers/CoOp/*_ep*.yaml:
#: 1 shot 50, 2-4 shots 100, 8-16 shots 200); ImageNet: 50 whatever the shots (vit_b16_ep50 / rn50_ep50).
EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}

POSITIONS = ("end", "middle", "front")
TEXT_MODES = ("auto", "plain", "cut", "prefix")


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's epochs for a number of shots (0: all images, as 16+ shots) and a dataset (ImageNet 50)."""
    if "imagenet" in dataset.lower():
        return 50
    for k in sorted(EPOCHS_BY_SHOTS):
        if 0 < shots <= k:
            return EPOCHS_BY_SHOTS[k]
    return 200


@dataclass
class CoOpConfig(MethodConfig):
    n_ctx: Optional[int] = opt(None, "context vectors M (default: 16, or the number of --init tokens; another "
                               "number with --init is an error)", min=1)
    csc: bool = opt(False, "class-specific context (it then belongs to the training class list)")
    class_position: str = opt("end", "where the class name goes in the prompt", choices=POSITIONS)
    init: Optional[str] = opt(None, "initialise the context from words, e.g. 'a photo of a' (one vector per token, "
                              "or per word: --init-length); default: random N(0, init_std)")
    init_length: str = opt("tokens", "how --init's length is counted: tokens (one learned vector per BPE token) or "
                           "words (the original CoOp: one per space-separated word; the init's further tokens "
                           "stay fixed before the class name)", choices=("tokens", "words"))
    init_std: float = opt(0.02, "standard deviation of the random context init", gt=0)
    text_mode: str = opt("auto", "text path (all exact; auto picks the fastest)", choices=TEXT_MODES)
    chunk_size: int = opt(256, "prompts per text-tower chunk (bounds memory for large class lists)", min=1)


class CoOp(Method):
    name = "coop"
    config_class = CoOpConfig
    summary = "learned context (unified or class-specific; class token end/middle/front)"

    @classmethod
    def preset(cls, data) -> dict:
        # CoOp's recipe: SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, one constant warm-up epoch at
        # 1e-5, cosine (the TrainConfig defaults), and the epochs by shots above
        return {"train": {"epochs": coop_epochs(data.shots, data.dataset)}}

    def __init__(self, config: CoOpConfig, backbone, classnames: Sequence[str], n_prompts: int = 1):
        super().__init__(config, backbone, classnames)
        self.prompt = PromptContext(backbone.text, classnames, n_ctx=config.n_ctx, csc=config.csc,
                                    position=config.class_position, init_words=config.init,
                                    n_prompts=n_prompts, init_std=config.init_std, text_mode=config.text_mode,
                                    chunk_size=config.chunk_size, init_length=config.init_length)
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
