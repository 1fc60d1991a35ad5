"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters", IJCV 2023): a
small residual MLP on the frozen image feature, classified against the hand-crafted text features.

``f' = ratio * A(f) + (1 - ratio) * f`` on the image feature ``f`` (B, E) of the frozen tower (not normalised),
``A = ReLU o Linear(E // reduction -> E) o ReLU o Linear(E -> E // reduction)`` without biases; logits (B, K) =
``logit_scale * cos(f', t)`` with ``t`` zero-shot CLIP's class text features; cross-entropy. Only ``A`` is learned
and it does not depend on the classes: a run evaluates on other class lists (base-to-new, cross-dataset).

What the original code (gaopengcuhk/CLIP-Adapter @ 08d07f8, its one file ``clip_adapter.py``; no licence: read,
not copied) computes, and vlprompt with it:

* ``Adapter(1024, 4)`` (clip_adapter.py:55-67, 97): 1024 is RN50's embedding width, hard-coded, so any other
  backbone fails there; here the MLP is as wide as the backbone's embedding (``--reduction`` 4);
* the ratio 0.2 is a literal in the forward (clip_adapter.py:101-105): ``--ratio``, default 0.2;
* the text features are CoOp's hand-crafted prompt of the dataset with ``name.replace("_", " ")``, recomputed
  through the whole text tower at every forward (clip_adapter.py:79-86, 107): the tower is frozen, so they are
  computed once here (the same numbers);
* the whole CLIP runs in fp32 (``clip_model.float()``, clip_adapter.py:128); the adapter starts from nn.Linear's
  default init (uniform in +-1/sqrt(fan_in)), drawn here from the run's seed;
* the model after the last epoch is tested (Dassl, no selection).

The recipe: the repository ships none ("follow CoOp's command", README.md:14; "The complete codes will be
released soon", README.md:16), so the preset is CoOp's command with CoOp's configs: SGD lr 0.002, momentum 0.9,
weight decay 5e-4, batch 32, one constant warm-up epoch at 1e-5 then cosine, epochs 50 / 100 / 100 / 200 / 200
for 1 / 2 / 4 / 8 / 16 shots and 50 for ImageNet (KaiyangZhou/CoOp configs/trainers/CoOp/rn50*.yaml). The
numbers published for it (Tip-Adapter's exp.log, "CLIP-A") came from a recipe that is not released; later
re-implementations compute something else (LP++'s adapter sees normalised features with ratio 0.5, plain SGD
and a per-iteration cosine over 300 epochs; CLAP's runs over TaskRes' unnormalised class features with SGD lr 0.1,
batch 256, 300 epochs): neither is this method's original computation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ConfigError
from ..base import Features, opt
from ..parts.handcrafted import TextFeatureAdapter
from ..parts.options import HandCraftedOptions
from ..parts.originals import ImportedRun, check_known_tensors, check_trainer, dassl_request, shape
from ..parts.recipes import coop_recipe

#: clip_adapter.py:104 (a literal) and 97 (``Adapter(1024, 4)``)
RATIO, REDUCTION = 0.2, 4


@dataclass
class CLIPAdapterConfig(HandCraftedOptions):
    ratio: float = opt(RATIO, "residual ratio: the image feature becomes ratio * A(f) + (1 - ratio) * f (the "
                       "original's 0.2)", gt=0, max=1)
    reduction: int = opt(REDUCTION, "bottleneck of the adapter MLP: E -> E // reduction -> E (the original's 4)",
                         min=1)


class CLIPAdapter(TextFeatureAdapter):
    name = "clip-adapter"
    family = "adapters"
    config_class = CLIPAdapterConfig
    summary = "CLIP-Adapter: a residual MLP on the image feature (ratio 0.2, reduction 4), hand-crafted text"
    head_kind = "prompt"  # the adapter acts on each image: predict rebuilds the method
    original_format = "dassl"
    original_module = "clip_adapter"  # clip_adapter.py:148: register_model("clip_adapter", ...)

    @classmethod
    def preset(cls, data) -> dict:
        """No recipe is shipped; the README says to follow CoOp's command: CoOp's recipe
        (:func:`..parts.recipes.coop_recipe`: SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, one constant
        warm-up epoch at 1e-5, cosine, epochs 50 / 100 / 100 / 200 / 200 by shots, ImageNet 50), ratio 0.2 and
        reduction 4 (clip_adapter.py:97, 104), the dataset's CoOp template (clip_adapter.py:18-34, 79-86)."""
        return {"train": coop_recipe(data), "method_options": {"ratio": RATIO, "reduction": REDUCTION,
                                                                "templates": ["dataset"]}}

    def __init__(self, config: CLIPAdapterConfig, backbone, classnames, template=None):
        super().__init__(config, backbone, classnames, template=template)
        e = backbone.embed_dim
        hidden = e // config.reduction
        if hidden < 1:
            raise ConfigError(f"clip-adapter: --reduction {config.reduction} leaves no hidden unit of the "
                              f"{e}-wide embedding")
        self.adapter = nn.Sequential(nn.Linear(e, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, e, bias=False),
                                     nn.ReLU()).to(backbone.device)

    def forward(self, feats: Features) -> torch.Tensor:
        f = feats.global_.float()
        ratio = self.config.ratio
        mixed = ratio * self.adapter(f) + (1 - ratio) * f  # clip_adapter.py:101-105, on the unnormalised feature
        # class_text is normalised once (the original renormalises the same features at every step)
        return self.logit_scale * F.normalize(mixed, dim=-1) @ self.class_text.t()

    def export_head(self):
        return None  # not fixed class features: the adapter runs on every image

    @classmethod
    def import_original(cls, run):
        """A gaopengcuhk/CLIP-Adapter run (Dassl, the model registered as ``clip_adapter``): ``fc.0.weight``
        (E // r, E) and ``fc.2.weight`` (E, E // r); the reduction from their shapes, the ratio the original's 0.2."""
        check_trainer(run, "CLIP_Adapter", "clip-adapter")
        check_known_tensors(run, {"fc.0.weight", "fc.2.weight"}, "CLIP-Adapter adapter")
        down, up = run.state.get("fc.0.weight"), run.state.get("fc.2.weight")
        if down is None or up is None or down.dim() != 2 or shape(up) != shape(down)[::-1]:
            raise CheckpointError(f"{run.path}: the adapter's fc.0.weight {shape(down) if down is not None else None}"
                                  f" and fc.2.weight {shape(up) if up is not None else None} are not (E // r, E) and "
                                  f"(E, E // r)")
        hidden, e = down.shape
        reduction = e // hidden
        if e // reduction != hidden:
            raise CheckpointError(f"{run.path}: an adapter of {hidden} hidden units on {e}-wide features is not "
                                  f"E // reduction for any reduction")
        request = dassl_request(run.config, run.checkpoint)
        request["method_options"] = {"ratio": RATIO, "reduction": reduction}
        state = {"adapter.0.weight": ("fc.0.weight", down, down), "adapter.2.weight": ("fc.2.weight", up, up)}
        return ImportedRun(cls.name, run.path, state, request, run.info)
