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

Weights (``weights``, the ``image_encoder_weights`` option):

* ``"auto"`` (default): what the OrdinalCLIP paper starts from -- torchvision's ImageNet weights for every
  torchvision encoder that has them (the paper: "VGG-16 pre-trained on ImageNet"; the reference's
  ``imagenet-vgg16.yaml`` / ``imagnet-resnet50.yaml`` load ``.cache/vgg/vgg16_imagenet.pt`` /
  ``.cache/resnet/resnet50_imagenet.pt``), a random start for ``resnet10`` (it has none), the backbone's own
  weights for ``clip``;
* ``"imagenet"``: torchvision's ``IMAGENET1K_V1`` weights (the only ImageNet weights of torchvision 0.11, which
  the reference used; ``DEFAULT`` would give ResNet-50 the later V2 recipe), read from torchvision's cache
  (``$TORCH_HOME/hub/checkpoints``) or downloaded; offline and not cached is an error saying what to pass;
* ``"none"``: random initialisation (torchvision's own init);
* a file: a state dict (``.pt``/``.pth``/``.safetensors``, optionally under a ``"state_dict"`` key, ``"module."``
  prefixes stripped) for the network without its classification layer, e.g. the reference's IMDB-WIKI VGG-16
  (``vgg_imdb_wiki.pt``, what its MORPH II comparison ``morph_compare.yaml`` starts from).

The choice and the source of the weights are logged (logger ``vlprompt``, INFO) and reported by
:func:`describe_encoder` (``results.json``). Parameters are float32 whatever the checkpoint's dtype.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ...data.transforms import CLIP_MEAN, CLIP_STD
from ...errors import BackboneError, ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["IMAGE_ENCODERS", "INPUT_NORMS", "build_image_encoder", "resolve_weights", "describe_encoder",
           "TorchvisionEncoder", "ClipImageEncoder"]


@dataclass(frozen=True)
class _TVSpec:
    builder: str  # torchvision.models.<builder>
    head: str  # dotted path of the classification layer replaced by the projection
    bias: bool  # bias of the projection
    imagenet: Optional[str] = "IMAGENET1K_V1"  # torchvision weights of the ImageNet start (None: there are none)


_TORCHVISION = {
    "resnet10": _TVSpec("resnet10", "fc", True, None),  # one BasicBlock per stage: a small encoder
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
#: the normalisation a torchvision encoder expects of its input
INPUT_NORMS = ("auto", "clip", "imagenet")

_RANDOM = (None, "none")


def has_imagenet_weights(name: str) -> bool:
    return name in _TORCHVISION and _TORCHVISION[name].imagenet is not None


def resolve_weights(name: str, weights: Optional[str] = "auto") -> str:
    """The weights an encoder starts from: ``"backbone"`` (``clip``), ``"imagenet"``, ``"none"`` or a file path.

    ``"auto"``: the paper's start (ImageNet for torchvision encoders that have ImageNet weights; see the module
    docstring). Contradictory requests are a ConfigError naming ``image_encoder_weights``."""
    if name not in IMAGE_ENCODERS:
        raise BackboneError(f"unknown image encoder {name!r}; known: {', '.join(IMAGE_ENCODERS)}")
    if weights is None:
        weights = "none"
    if name == "clip":
        if weights not in ("auto", "none", "backbone"):
            raise ConfigError(f"image_encoder_weights={weights!r}: the 'clip' image encoder starts from the "
                              f"backbone's own weights; image encoder weights apply to torchvision encoders only")
        return "backbone"
    if weights == "auto":
        return "imagenet" if has_imagenet_weights(name) else "none"
    if weights == "imagenet" and not has_imagenet_weights(name):
        raise ConfigError(f"image_encoder_weights=imagenet: {name} has no ImageNet weights in torchvision; use "
                          f"resnet18, a state-dict file or none")
    if weights == "backbone":
        raise ConfigError(f"image_encoder_weights=backbone applies to the 'clip' image encoder only, not {name}")
    return weights


def _tv_weights(name: str):
    """The torchvision weights entry (``WeightsEnum`` member) of an encoder's ImageNet start."""
    import torchvision

    spec = _TORCHVISION[name]
    return torchvision.models.get_model_weights(spec.builder)[spec.imagenet]


def _fetch(weights) -> dict:
    """torchvision's ImageNet state dict: from its cache, else downloaded (hash checked). Tests replace this."""
    return weights.get_state_dict(progress=False, check_hash=True)


def _imagenet_state_dict(name: str) -> tuple[dict, str]:
    """(state dict, description of its source) of an encoder's ImageNet weights."""
    w = _tv_weights(name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    try:
        state = _fetch(w)
    except OSError as e:  # offline and not cached (URLError, timeouts, an unwritable cache are OSErrors)
        raise BackboneError(
            f"{name}: torchvision's ImageNet weights are not in {cached} and could not be downloaded "
            f"({type(e).__name__}: {e}). Put {w.url} there, or pass the weights as a file "
            f"(--method-option image_encoder_weights=/path/to/{name}.pth) or start from random weights "
            f"(--method-option image_encoder_weights=none)") from e
    return state, f"torchvision {type(w).__name__}.{w.name} ({w.url})"


def _read_state_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise BackboneError(f"image encoder weights {path!r}: no such file "
                            f"(image_encoder_weights is auto, none, imagenet or a state-dict file)")
    import pickle

    from safetensors import SafetensorError

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as e:
        raise BackboneError(f"image encoder weights {path}: cannot read ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"image encoder weights {path}: not a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


class ClipImageEncoder(nn.Module):
    """A trainable copy of a CLIP image tower: ``(B, 3, H, W) -> (B, E)`` (the model's own input size)."""

    weights = "backbone"
    weights_source = "a trainable copy of the backbone's image tower"
    input_norm = "clip"

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
    """A torchvision network whose classification layer is a projection to the joint space ``E``.

    ``weights``: ``"auto"``, ``"imagenet"``, ``"none"`` or a state-dict file (see the module docstring);
    ``input_norm``: the normalisation the network expects (``auto``: ImageNet's whenever it starts from trained
    weights -- the reference normalises every encoder's input with ImageNet's statistics --, else CLIP's, which
    the images already have). The resolved ``weights``, ``weights_source`` and ``input_norm`` are attributes.
    """

    def __init__(self, name: str, embed_dim: int, weights: Optional[str] = "auto", input_norm: str = "auto"):
        super().__init__()
        import torchvision

        if name not in _TORCHVISION:
            raise BackboneError(f"unknown image encoder {name!r}; known: {', '.join(IMAGE_ENCODERS)}")
        if input_norm not in INPUT_NORMS:
            raise ConfigError(f"image_encoder_input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
        spec = _TORCHVISION[name]
        self.name = name
        self.weights = resolve_weights(name, weights)
        if spec.builder == "resnet10":
            from torchvision.models.resnet import BasicBlock, ResNet
            net = ResNet(BasicBlock, [1, 1, 1, 1])
        else:
            net = getattr(torchvision.models, spec.builder)(weights=None)
        if self.weights == "imagenet":
            state, self.weights_source = _imagenet_state_dict(name)
            net.load_state_dict(state)  # strict: the whole ImageNet network, before its 1000-way layer goes
        elif self.weights == "none":
            self.weights_source = "random initialisation (torchvision's own)"
        parent, attr = _parent_of(net, spec.head)
        old = getattr(parent, attr)
        if not isinstance(old, nn.Linear):
            raise BackboneError(f"{name}: expected a Linear classification layer at {spec.head}, "
                                f"found {type(old).__name__}")
        setattr(parent, attr, nn.Linear(old.in_features, embed_dim, bias=spec.bias))
        self.head_name = spec.head
        self.net = net.float()
        if self.weights not in ("imagenet", "none"):
            path = os.path.abspath(os.path.expanduser(str(self.weights)))
            self._load_file(path)
            self.weights_source = f"file {path}"
        # Images arrive normalised with CLIP's mean/std; networks trained on ImageNet expect ImageNet's. The exact
        # affine map between the two is a persistent buffer, so exported / resumed encoders keep it.
        if input_norm == "auto":
            input_norm = "clip" if self.weights == "none" else "imagenet"
        self.input_norm = input_norm
        clip_mean, clip_std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        mean, std = (torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)) if input_norm == "imagenet" \
            else (clip_mean, clip_std)
        self.register_buffer("input_scale", (clip_std / std).view(3, 1, 1))
        self.register_buffer("input_shift", ((clip_mean - mean) / std).view(3, 1, 1))

    def _load_file(self, path: str) -> None:
        state = _read_state_file(path)
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


def describe_encoder(name: str, encoder: nn.Module) -> dict:
    """What ``results.json`` and ``log.txt`` say about an encoder: its name, weights, their source, its input
    normalisation."""
    return {"image_encoder": name, "image_encoder_weights": encoder.weights,
            "image_encoder_weights_source": encoder.weights_source, "image_encoder_input_norm": encoder.input_norm}


def build_image_encoder(name: str, backbone, weights: Optional[str] = "auto", input_norm: str = "auto", *,
                        announce: bool = True) -> nn.Module:
    """A trainable image encoder ``(B, 3, H, W) -> (B, E)`` on the backbone's device, float32 parameters.

    Args:
        name: ``clip`` or a torchvision name (see :data:`IMAGE_ENCODERS`).
        backbone: the frozen :class:`vlprompt.backbone.Backbone` (its image tower is copied for ``clip``; its
            ``embed_dim`` sets ``E``).
        weights: ``"auto"`` (the paper's start), ``"imagenet"``, ``"none"`` or a state-dict file (torchvision
            encoders only; see the module docstring).
        input_norm: ``auto``, ``clip`` or ``imagenet`` (torchvision encoders; see :class:`TorchvisionEncoder`).
        announce: log the choice and the source of the weights (not when an exported head is rebuilt).
    """
    if name == "clip":
        resolve_weights(name, weights)
        if input_norm == "imagenet":
            raise ConfigError("image_encoder_input_norm=imagenet: the 'clip' image encoder takes CLIP-normalised "
                              "images; the option applies to torchvision encoders")
        enc = ClipImageEncoder(backbone.model.visual)
    elif name in _TORCHVISION:
        enc = TorchvisionEncoder(name, backbone.embed_dim, weights, input_norm)
    else:
        raise BackboneError(f"unknown image encoder {name!r}; known: {', '.join(IMAGE_ENCODERS)}")
    if announce:
        log.info("image encoder %s: weights %s, from %s; input normalisation %s", name, enc.weights, enc.weights_source,
                 enc.input_norm)
    return enc.to(backbone.device)
