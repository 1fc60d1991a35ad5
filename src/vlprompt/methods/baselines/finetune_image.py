"""CoOp's "fine-tuning CLIP's image encoder" baseline (Zhou et al., IJCV 2022, Sec. 4, comparison with other
fine-tuning methods): the image encoder is trained, the classifier is the text features of the hand-crafted
prompts, frozen.

The classifier ``t`` (K, E) is zero-shot CLIP's (:func:`.zeroshot.class_text_features`, normalised); the image
encoder is a trainable copy of the backbone's image tower (:class:`.image_encoders.ClipImageEncoder`; the backbone
itself stays frozen and intact), and ``logits = logit_scale * cos(encoder(image), t)``. Every step encodes its
augmented images (no cached features: the encoder changes). At initialisation the method is zero-shot CLIP. It
exports a head of its own kind, ``finetune-image``: the encoder's weights and the class features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ...errors import CheckpointError, VLPromptError
from ..base import Features, cosine_logits
from ..parts.image_encoders import ClipImageEncoder
from ..parts.handcrafted import TextFeatureAdapter
from ..parts.options import HandCraftedOptions

__all__ = ["FinetuneImageConfig", "FinetuneImage"]


@dataclass
class FinetuneImageConfig(HandCraftedOptions):
    pass


class FinetuneImage(TextFeatureAdapter):
    name = "finetune-image"
    family = "baselines"
    config_class = FinetuneImageConfig
    summary = ("CoOp paper's baseline: CLIP's image encoder fine-tuned, the classifier the frozen text features of "
               "the hand-crafted prompts")
    inputs: ClassVar[frozenset] = frozenset({"images"})  # it trains its own copy of the image tower
    head_kind: ClassVar[str] = "finetune-image"

    def __init__(self, config: FinetuneImageConfig, backbone, classnames: Sequence[str], template: str | None = None):
        super().__init__(config, backbone, classnames, template=template)
        self.image_encoder = ClipImageEncoder(backbone.model.visual).to(backbone.device)

    def adapted_text(self) -> torch.Tensor:
        return self.class_text  # frozen

    def forward(self, feats: Features) -> torch.Tensor:
        if feats.images is None:
            raise VLPromptError("finetune-image trains its image encoder: it needs images, not cached features")
        return cosine_logits(self.image_encoder(feats.images).float(), self.class_text.float(), self.logit_scale)

    def export_head(self):
        """Kind ``finetune-image``: the class features ``text_features`` (K, E) and the trained encoder's tensors
        (``image_encoder.*``); prediction needs no text tower."""
        tensors = {"text_features": F.normalize(self.class_text.detach().float(), dim=-1).cpu()}
        for k, v in self.image_encoder.state_dict().items():
            tensors[f"image_encoder.{k}"] = v.detach().cpu().contiguous()
        return tensors, {"kind": self.head_kind, "logit_scale": self.logit_scale, "templates": list(self.templates)}

    _head_cache: ClassVar[list] = []  # [(tensors dict, encoder)]: predict calls head_logits once per batch

    @classmethod
    def head_logits(cls, tensors: dict, info: dict, backbone, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of an exported ``finetune-image`` head on preprocessed images (B, 3, H, W)."""
        if "text_features" not in tensors or "logit_scale" not in info:
            raise CheckpointError("finetune-image head: missing text_features or logit_scale")
        if cls._head_cache and cls._head_cache[0][0] is tensors:
            encoder = cls._head_cache[0][1]
        else:
            encoder = ClipImageEncoder(backbone.model.visual)  # the architecture; every tensor is replaced
            state = {k[len("image_encoder."):]: v for k, v in tensors.items() if k.startswith("image_encoder.")}
            try:
                encoder.load_state_dict(state)
            except RuntimeError as e:
                raise CheckpointError(f"finetune-image head: the exported image encoder does not fit the backbone "
                                      f"{info.get('backbone')!r}: {e}") from e
            encoder = encoder.to(backbone.device).eval()
            cls._head_cache[:] = [(tensors, encoder)]
        with torch.no_grad():
            feats = encoder(x.to(backbone.device)).float()
        return cosine_logits(feats, tensors["text_features"].to(feats.device).float(), float(info["logit_scale"]))
