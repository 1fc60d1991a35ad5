"""VPT, visual prompt tuning as the MaPLe repository runs it ("deep vision prompting"; shallow with depth 1):
prompts inside the ViT image tower only, the class text features those of a hand-crafted prompt.

The original: muzairkhattak/multimodal-prompt-learning@69bce21 ``trainers/vpt.py`` (``FixedEmbeddings`` l.67-89,
``CustomCLIP`` l.92-114) on the IVLP blocks of ``clip/model.py`` with language depth 0 (l.33-37). What it does
that produced its numbers, reproduced:

* ``n_ctx_vision`` tokens appended after the positional embedding, before ``ln_pre`` (``clip/model.py``
  l.369-378, l.402-406), replaced by new ones before blocks 1..depth-1 (l.210-241); depth 1 is shallow VPT
  (``train.py`` l.128), depth counts the input layer; N(0, 0.02) init; replaced tokens carry no positional embedding
  (:mod:`..parts.deep`);
* the text: ``encode_text("a photo of a {class}.")`` of the frozen tower for every dataset (l.73-86; the config's
  ``CTX_INIT`` is never read), normalised in the forward; logits = exp(logit_scale) * cosine, cross-entropy
  (l.101-114). ``--templates`` changes the hand-crafted prompt (the default is the original's); several are
  ensembled as in zero-shot CLIP.

Documented, not reproduced: the original runs CLIP in fp32 (``model.float()``, l.41) but casts the prompts
``.half()`` in the blocks (``clip/model.py`` l.238, l.405), so they are rounded to fp16 at every forward (an fp16
artefact); its amp path fails (l.180-186). A ResNet image tower is refused (the original has no parameter to train
there and fails at its first backward). The recipe file ``vit_b16_c2_ep5_batch4_4.yaml`` sets 8 vision tokens
although its name says 4.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..base import Features, cosine_logits, opt
from ..parts.deep import PROMPT_STD, TowerPrompts, VisionPromptOptions, dassl_tower_import, encode_prompted_images
from ..parts.handcrafted import TextFeatureAdapter
from ..parts.options import HandCraftedOptions
from ..parts.recipes import DASSL_SGD

#: the original's prompt for every dataset (``FixedEmbeddings``, ``trainers/vpt.py`` l.73, l.80)
VPT_TEMPLATE = "a photo of a {}."


@dataclass
class VPTConfig(HandCraftedOptions, VisionPromptOptions):
    """Defaults: the original's ``train.py`` (l.123-129: 2 tokens, depth 1, i.e. shallow VPT); the published recipe
    (deep VPT) is the preset."""

    templates: list[str] = opt(default_factory=lambda: [VPT_TEMPLATE],
                               help="the hand-crafted prompt(s) of the class text features (default: the "
                                    "original's 'a photo of a {}.' for every dataset); template strings with '{}' "
                                    "and/or set names: dataset, imagenet80, imagenet-select, ensemble")
    n_ctx_vision: int = opt(2, "vision prompt tokens appended after the image tower's positional embedding (and "
                            "replaced by new ones at each deeper prompted block)", min=1)
    vision_depth: int = opt(1, "image layers carrying prompts, counting the input (1: shallow VPT; deep: the "
                            "appended tokens replaced by new ones before blocks 1..depth-1; at most the tower's "
                            "layers)", min=1)
    init_std: float = opt(PROMPT_STD, "standard deviation of the prompts' random init", gt=0)


class VPT(TextFeatureAdapter):
    name = "vpt"
    family = "towers"
    config_class = VPTConfig
    summary = ("visual prompt tuning: prompts inside the ViT image tower (deep, or shallow with --vision-depth 1), "
               "the class text features of a hand-crafted prompt (MaPLe paper's deep vision prompting)")
    inputs = frozenset({"images"})
    head_kind = "prompt"  # the image side runs the prompted tower: predict rebuilds the method
    original_format = "dassl"

    @classmethod
    def preset(cls, data) -> dict:
        """The published recipe (deep VPT), muzairkhattak/multimodal-prompt-learning
        ``configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml``: N_CTX_VISION 8, PROMPT_DEPTH_VISION 12 (l.34-37), SGD
        lr 0.0025, 5 epochs, cosine, one constant warm-up epoch at 1e-5 (l.16-24), batch 4 (l.4); momentum 0.9 and
        weight decay 5e-4 are Dassl's defaults; the text "a photo of a {}." (``trainers/vpt.py`` l.73). Published
        for base-to-new; ``scripts/vpt/xd_train_vpt.sh`` trains the same config on ImageNet (its test script loads
        epoch 2 of this 5-epoch run and fails as shipped); no few-shot config, and no recipe for shallow VPT (the
        ``train.py`` defaults: ``--n-ctx-vision 2 --vision-depth 1``) was published. The same recipe for every
        data."""
        return {"train": {**DASSL_SGD, "lr": 0.0025, "epochs": 5, "batch_size": 4},
                "method_options": {"n_ctx_vision": 8, "vision_depth": 12, "templates": [VPT_TEMPLATE]}}

    @classmethod
    def import_original(cls, run):
        """A VPT run (``<output>/prompt_learner/model.pth.tar-<epoch>``, trainer VPT, TRAINER.VPT): its vision
        prompts ``image_encoder.VPT`` and ``image_encoder.transformer.resblocks.<i>.VPT_shallow``; the text is the
        original's hand-crafted prompt."""
        return dassl_tower_import(cls, run, trainer="VPT", section="TRAINER.VPT", text=False, vision=True,
                                  options={"templates": [VPT_TEMPLATE]})

    def __init__(self, config: VPTConfig, backbone, classnames: Sequence[str], template: str | None = None):
        super().__init__(config, backbone, classnames, template=template)
        self.deep = TowerPrompts(backbone, self.name, n_vision=config.n_ctx_vision, vision_depth=config.vision_depth,
                                 std=config.init_std)

    def describe(self) -> dict:
        return {**super().describe(), "vision_prompt_blocks": self.deep.vision_blocks,
                "learned_values": sum(p.numel() for p in self.trainable_parameters())}

    def forward(self, feats: Features) -> torch.Tensor:
        image = encode_prompted_images(self.backbone, feats.images, self.deep.vision_prompts(), self.name)
        return cosine_logits(image, self.class_text.float(), self.logit_scale)

    def export_head(self):
        """The image side runs the prompted tower: ``predict`` rebuilds the method from its learned prompts."""
        return None
