"""CoCoOp (Zhou et al., CVPR 2022): the context conditioned on each image through a small meta-network.

The reference runs one image at a time (its text tower encodes K prompts per image). Here a whole batch runs
at once: each image's ``<sot> + context`` prefix is computed once and the class tokens attend to it (the text
encoder's grouped shared-prefix path), in chunks that bound memory.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Features, Method, MethodConfig, opt
from .coop import POSITIONS, TEXT_MODES
from .prompts import PromptContext


@dataclass
class CoCoOpConfig(MethodConfig):
    n_ctx: Optional[int] = opt(None, "context vectors M (default: the number of --init tokens, 4 for the paper's "
                               "'a photo of a'; 16 with a random init)", min=1)
    init: Optional[str] = opt("a photo of a", "initialise the context from words ('none': random N(0, init_std))")
    class_position: str = opt("end", "where the class name goes in the prompt", choices=POSITIONS)
    init_std: float = opt(0.02, "standard deviation of the random context init", gt=0)
    text_mode: str = opt("auto", "text path (all exact; auto picks the fastest)", choices=TEXT_MODES)
    chunk_size: int = opt(256, "prompts per text-tower chunk", min=1)
    image_chunk: int = opt(8, "images whose K prompts are encoded together", min=1)


class CoCoOp(Method):
    name = "cocoop"
    config_class = CoCoOpConfig
    summary = "context conditioned on each image by a meta-network"

    @classmethod
    def preset(cls, data) -> dict:
        # the paper's schedule (Zhou et al., CVPR 2022, Sec. 4 and configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1
        # _ctxv1.yaml): 10 epochs, SGD lr 0.002. The reference steps once per image (batch 1); vlprompt's batched
        # path makes larger batches cheap, but `--batch-size 1` reproduces the reference's step count.
        return {"train": {"epochs": 10}}

    def __init__(self, config: CoCoOpConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        self.prompt = PromptContext(backbone.text, classnames, n_ctx=config.n_ctx, csc=False,
                                    position=config.class_position, init_words=config.init,
                                    init_std=config.init_std, text_mode=config.text_mode,
                                    chunk_size=config.chunk_size)
        self.config = dataclasses.replace(config, n_ctx=self.prompt.n_ctx)  # what was learned (method.json)
        e, d = backbone.embed_dim, backbone.text.width
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(e, max(e // 16, 1))),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(max(e // 16, 1), d)),
        ])).to(backbone.device)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.prompt.set_classnames(classnames)
        super().set_classnames(classnames)

    def interpretable_vectors(self) -> list[tuple[dict, torch.Tensor]]:
        """({"prompt": 0, "class": None}, (M, D)): the learned context before the image-conditioned shift."""
        return self.prompt.interpretable_vectors()

    def forward(self, feats: Features) -> torch.Tensor:
        image = F.normalize(feats.global_.float(), dim=-1)  # (B, E)
        shift = self.meta_net(image)  # (B, D)
        logits = []
        step = max(int(self.config.image_chunk), 1)
        for i in range(0, image.shape[0], step):
            text = F.normalize(self.prompt.encode(shift[i:i + step]), dim=-1)  # (b, K, E)
            logits.append(self.logit_scale * torch.einsum("be,bke->bk", image[i:i + step], text))
        return torch.cat(logits)

    def forward_per_image(self, feats: Features) -> torch.Tensor:
        """The reference's computation, one image at a time and full-length prompts (for tests)."""
        image = F.normalize(feats.global_.float(), dim=-1)
        shift = self.meta_net(image)
        rows = []
        for b in range(image.shape[0]):
            prefix, suffix, eot = self.prompt.prompt_embeddings(shift[b:b + 1])
            text = self.backbone.text.encode_prompts(prefix, suffix, eot, mode="plain")[0]
            rows.append(self.logit_scale * F.normalize(text, dim=-1) @ image[b])
        return torch.stack(rows)

    def export_head(self):
        """CoCoOp's text features depend on each image: the head keeps the learned context and meta-network,
        and ``predict`` runs the text tower (there is no fixed class head to export)."""
        return None
