"""Trainable image encoders for methods that learn the image side (OrdinalCLIP and its baselines).

Every encoder maps preprocessed images ``(B, 3, H, W)`` to features ``(B, E)`` in the joint space of the
backbone (``E = backbone.embed_dim``), so its features can be compared with text prototypes:

* ``clip``: a trainable *copy* of the backbone's image tower (``backbone.model.visual``). The backbone itself
  stays frozen and intact (its text tower keeps serving the prompts, its image tower the cache). Its output
  already lies in the joint space; no projection is added.
* a torchvision classification network (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``vgg16``,
  ``vgg16_bn``, ``mobilenet_v3_small``; ``resnet10`` = torchvision's ``ResNet`` with one ``BasicBlock`` per
  stage, a small encoder for quick runs) whose last classification layer is replaced by a linear projection to
  ``E`` -- as OrdinalCLIP's reference builds its VGG-16 (``Linear(4096, E, bias=False)`` in place of the
  1000-way layer; ResNets get ``Linear(2048 or 512, E)`` in place of ``fc``).

Weights (``weights``): ``None``/``"none"`` -- random initialisation (torchvision's own init); ``"imagenet"``
-- torchvision's ImageNet weights (``weights="DEFAULT"``), which torchvision loads from its cache
(``$TORCH_HOME/hub/checkpoints``) or downloads; a file -- a state dict (``.pt``/``.pth``/``.safetensors``,
optionally under a ``"state_dict"`` key, ``"module."`` prefixes stripped) for the network without its
classification layer, e.g. the reference's IMDB-WIKI VGG-16. For ``clip`` the weights are the backbone's.
Parameters are float32 whatever the checkpoint's dtype.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..data.transforms import CLIP_MEAN, CLIP_STD
from ..errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGE_ENCODERS", "build_image_encoder", "TorchvisionEncoder", "ClipImageEncoder"]


@dataclass(frozen=True)
class _TVSpec:
    builder: str  # torchvision.models.<builder>
    head: str  # dotted path of the classification layer replaced by the projection
    bias: bool  # bias of the projection


_TORCHVISION = {
    "resnet10": _TVSpec("resnet10", "fc", True),  # one BasicBlock per stage: a small encoder (no ImageNet weights)
    "resnet18": _TVSpec("resnet18", "fc", True),
    "resnet34": _TVSpec("resnet34", "fc", True),
    "resnet50": _TVSpec("resnet50", "fc", True),
    "resnet101": _TVSpec("resnet101", "fc", True),
    "vgg16": _TVSpec("vgg16", "classifier.6", False),
    "vgg16_bn": _TVSpec("vgg16_bn", "classifier.6", False),
    "mobilenet_v3_small": _TVSpec("mobilenet_v3_small", "classifier.3", True),
}

#: names accepted by :func:`build_image_encoder`
IMAGE_ENCODERS = ("clip", *_TORCHVISION)

_RANDOM = (None, "", "none", "None", "random")


class ClipImageEncoder(nn.Module):
    """A trainable copy of a CLIP image tower: ``(B, 3, H, W) -> (B, E)`` (the model's own input size)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = copy.deepcopy(visual).float()
        for p in self.visual.parameters():
            p.requires_grad_(True)
        self.visual.train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(images.to(dtype))
        return out[0] if isinstance(out, tuple) else out


class TorchvisionEncoder(nn.Module):
    """A torchvision network whose classification layer is a projection to the joint space ``E``."""

    def __init__(self, name: str, embed_dim: int, weights: Optional[str] = None, input_norm: str = "auto"):
        super().__init__()
        import torchvision

        if name not in _TORCHVISION:
            raise BackboneError(f"unknown image encoder {name!r}; known: {', '.join(IMAGE_ENCODERS)}")
        spec = _TORCHVISION[name]
        self.name = name
        tv_weights = "DEFAULT" if weights == "imagenet" else None
        if spec.builder == "resnet10":
            if tv_weights is not None:
                raise BackboneError("resnet10 has no ImageNet weights in torchvision; use resnet18 or a weights file")
            from torchvision.models.resnet import BasicBlock, ResNet
            builder: Callable = lambda weights=None: ResNet(BasicBlock, [1, 1, 1, 1])  # noqa: E731
        else:
            builder = getattr(torchvision.models, spec.builder)
        try:
            net = builder(weights=tv_weights)
        except Exception as e:  # offline and not cached: urllib / hub errors of many kinds
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise BackboneError(
                f"could not load torchvision's ImageNet weights of {name} ({type(e).__name__}: {e}); they are "
                f"read from {hub} or downloaded. Download them on a machine with internet into that folder, or pass "
                f"a state-dict file as the image encoder weights") from None
        parent, attr = _parent_of(net, spec.head)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise BackboneError(f"{name}: expected a Linear classification layer at {spec.head}, "
                                f"found {type(old).__name__}")
        setattr(parent, attr, nn.Linear(old.in_features, embed_dim, bias=spec.bias))
        self.head_name = spec.head
        self.net = net.float()
        if weights not in _RANDOM and weights != "imagenet":
            self._load_file(str(weights))
        # Images arrive normalised with CLIP's mean/std; networks trained on ImageNet expect ImageNet's. The exact
        # affine map between the two is a persistent buffer, so exported / resumed encoders keep it.
        if input_norm == "auto":
            input_norm = "imagenet" if weights == "imagenet" else "clip"
        if input_norm not in ("clip", "imagenet"):
            raise BackboneError(f"image encoder input_norm must be auto, clip or imagenet, got {input_norm!r}")
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        mean, std = (torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)) if input_norm == "imagenet" \
            else (clip_mean, clip_std)
        self.register_buffer("input_scale", (clip_std / std).view(3, 1, 1))
        self.register_buffer("input_shift", ((clip_mean - mean) / std).view(3, 1, 1))

    def _load_file(self, path: str) -> None:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise BackboneError(f"image encoder weights {path!r}: no such file "
                                f"(use 'none', 'imagenet' or a state-dict file)")
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file
                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BackboneError(f"image encoder weights {path}: cannot read ({type(e).__name__}: {e})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BackboneError(f"image encoder weights {path}: not a state dict of tensors")
        state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
        head = self.head_name + "."
        body = {k: v.float() for k, v in state.items() if not k.startswith(head)}
        own = self.net.state_dict()
        wrong = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
        missing = sorted(k for k in own if not k.startswith(head) and k not in body)
        unexpected = sorted(k for k in body if k not in own)
        if wrong or missing or unexpected:
            raise BackboneError(
                f"image encoder weights {path} do not fit {self.name}: "
                + "; ".join(part for part in (
                    f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                    f"wrong shapes {wrong[:5]}" if wrong else "") if part))
        self.net.load_state_dict(body, strict=False)  # the projection keeps its fresh initialisation

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() * self.input_scale + self.input_shift)


def _parent_of(module: nn.Module, dotted: str):
    parts = dotted.split(".")
    parent = module
    for p in parts[:-1]:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    return parent, parts[-1]


def build_image_encoder(name: str, backbone, weights: Optional[str] = None, input_norm: str = "auto") -> nn.Module:
    """A trainable image encoder ``(B, 3, H, W) -> (B, E)`` on the backbone's device, float32 parameters.

    Args:
        name: ``clip`` or a torchvision name (see :data:`IMAGE_ENCODERS`).
        backbone: the frozen :class:`vlprompt.backbone.Backbone` (its image tower is copied for ``clip``; its
            ``embed_dim`` sets ``E``).
        weights: ``None``/``"none"``, ``"imagenet"`` or a state-dict file (torchvision encoders only).
        input_norm: the normalisation the torchvision network expects (``auto``: ImageNet's with ImageNet
            weights, else CLIP's, which the images already have).
    """
    if name == "clip":
        if weights not in _RANDOM:
            raise BackboneError("the 'clip' image encoder starts from the backbone's own weights; "
                                "image encoder weights apply to torchvision encoders only")
        enc = ClipImageEncoder(backbone.model.visual)
    elif name in _TORCHVISION:
        enc = TorchvisionEncoder(name, backbone.embed_dim, weights, input_norm)
    else:
        raise BackboneError(f"unknown image encoder {name!r}; known: {', '.join(IMAGE_ENCODERS)}")
    return enc.to(backbone.device)
