"""CLIP-Adapter, written out from gaopengcuhk/CLIP-Adapter @ 08d07f8b2ecafc6f1479fe636b26d464d7a5574e.

The repository has NO licence: it was read, nothing is copied. ``clip_adapter.py:N`` is its only code file,
a Dassl trainer to drop into CoOp's ``trainers/`` ("follow CoOp's command", README.md:14; "The complete codes
will be released soon", README.md:16: no config, script or recipe is shipped). A bottleneck MLP on the frozen
image feature, mixed residually: ``f' = 0.2 * A(f) + 0.8 * f``; text features are CoOp's hand-crafted prompts.

Quirks (each also in the docstring of the function concerned):

- the adapter is ``Adapter(1024, 4)``: 1024 is RN50's embedding width, hard-coded (clip_adapter.py:97): any other
  backbone fails at the first Linear; written here for any width;
- the residual ratio 0.2 is a literal in the forward (clip_adapter.py:104), not a config value;
- the text features are recomputed through the whole text tower at EVERY forward (clip_adapter.py:107, 79-86;
  the same values each time: the tower is frozen), with ``.to('cuda')`` hard-coded;
- whole CLIP in fp32 (``clip_model.float()``, clip_adapter.py:128);
- the model is registered as "clip_adapter": checkpoints are ``clip_adapter/model.pth.tar-N`` holding the
  adapter's ``fc.0.weight`` and ``fc.2.weight`` only (clip_adapter.py:148).

Two later re-implementations whose CLIP-Adapter numbers are often quoted compute something else
(:func:`lpp_logits`, :func:`clap_logits`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .coop_base import (cosine_logits, encode_text, load_dropping, registered_optimizer_and_scheduler, tokenize,
                        write_dassl_checkpoint)

#: clip_adapter.py:18-34 (the same as KaiyangZhou/CoOp's trainers/zsclip.py:13-29).
CUSTOM_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

#: clip_adapter.py:104.
RATIO = 0.2


def init_adapter(c_in: int, reduction: int = 4, generator: Optional[torch.Generator] = None) -> OrderedDict:
    """``Adapter(c_in, reduction)`` (clip_adapter.py:55-63): ``fc = Sequential(Linear(c_in, c_in // 4, bias=False),
    ReLU, Linear(c_in // 4, c_in, bias=False), ReLU)``; state ``fc.0.weight`` (c_in // 4, c_in), ``fc.2.weight``
    (c_in, c_in // 4), nn.Linear's default init (U(+-1/sqrt(fan_in))). The original hard-codes ``c_in = 1024``."""
    hidden = c_in // reduction
    w1 = torch.empty(hidden, c_in).uniform_(-1 / math.sqrt(c_in), 1 / math.sqrt(c_in), generator=generator)
    w2 = torch.empty(c_in, hidden).uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden), generator=generator)
    return OrderedDict([("fc.0.weight", w1), ("fc.2.weight", w2)])


def adapter(x: torch.Tensor, weights) -> torch.Tensor:
    """Adapter.forward (clip_adapter.py:65-67): ``relu(relu(x @ W1.t()) @ W2.t())``, (B, c_in) -> (B, c_in). The
    last ReLU makes ``A(f)`` non-negative."""
    return F.relu(F.relu(x @ weights["fc.0.weight"].t()) @ weights["fc.2.weight"].t())


def text_features(model, classnames: Sequence[str], dataset: str) -> torch.Tensor:
    """TextEncoder.forward (clip_adapter.py:79-86): ``encode_text`` of
    ``CUSTOM_TEMPLATES[dataset].format(name.replace("_", " "))`` (K, E), not normalised (the forward normalises)."""
    tokens = tokenize([CUSTOM_TEMPLATES[dataset].format(name.replace("_", " ")) for name in classnames])
    return encode_text(model, tokens)


def logits(model, image_features: torch.Tensor, weights, text: torch.Tensor, ratio: float = RATIO) -> torch.Tensor:
    """CustomCLIP.forward (clip_adapter.py:100-115): ``f' = ratio * A(f) + (1 - ratio) * f`` on the UNNORMALISED
    image feature ``f = visual(image)`` (B, E), then ``exp(logit_scale) * norm(f') @ norm(text).t()`` (B, K).
    Training loss: ``F.cross_entropy(logits, label)`` (clip_adapter.py:155-159)."""
    mixed = ratio * adapter(image_features, weights) + (1 - ratio) * image_features
    return cosine_logits(model, mixed, text)


def lpp_logits(model, image_features: torch.Tensor, weights, text_weights: torch.Tensor,
               alpha: float = 0.5) -> torch.Tensor:
    """The CLIP-Adapter of FereshteShakeri/FewShot-CLIP-Strong-Baseline (LP++) @ f81054f9
    (methods/clip_adapter.py:235-255; no licence, read only). Differs from the original: the adapter sees the
    L2-NORMALISED image feature (l.136-137), the ratio is ``alpha_ca`` (0.5 in configs/base.yaml:32), the mixed
    feature is NOT renormalised (l.250 commented out), and ``text_weights`` (E, K) is Tip-Adapter's classifier
    (per-template normalised mean, renormalised). ``exp(logit_scale) * f' @ text_weights``."""
    f = image_features / image_features.norm(dim=-1, keepdim=True)
    mixed = alpha * adapter(f, weights) + (1 - alpha) * f
    return model.logit_scale.exp() * mixed @ text_weights


def clap_logits(model, image_features: torch.Tensor, weights, base: torch.Tensor,
                ratio: float = RATIO) -> torch.Tensor:
    """The "ClipA" baseline of jusiro/CLAP @ dbdf4095 (trainers/adapters.py:179-191, 372-389; MIT). The same mix as
    the original on the unnormalised feature, an MLP as wide as the features (no 1024), but the class prototypes
    are TaskRes' base classifier (``originals.taskres.base_text_features``: unnormalised template average, raw names,
    ImageNet 7 + 1 templates; CLAP l.91-128), normalised in the forward."""
    mixed = ratio * adapter(image_features, weights) + (1 - ratio) * image_features
    return cosine_logits(model, mixed, base)


def write_original_checkpoint(directory, tensors: dict, epoch: int, *, optimizer: str = "sgd", lr: float = 0.002,
                              max_epoch: Optional[int] = None, with_val_result: bool = False):
    """What a CLIP-Adapter run saves: ``<directory>/clip_adapter/model.pth.tar-<epoch>`` (+ ``checkpoint``), state
    ``fc.0.weight``, ``fc.2.weight`` (fp32). The optimizer is whatever config the user ran (none is shipped;
    CoOp's rn50.yaml: SGD lr 0.002, the default here; Dassl's own default would be Adam lr 3e-4). Dassl of
    2021 wrote no ``val_result`` key (upstream added it in August 2022). The loader (clip_adapter.py:178-217)
    deletes token_prefix / token_suffix (absent) and loads with strict=False."""
    state = OrderedDict((k, tensors[k].detach().float()) for k in ("fc.0.weight", "fc.2.weight"))
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    optim, scheduler = registered_optimizer_and_scheduler(params, optimizer, lr, epoch, max_epoch or epoch)
    return write_dassl_checkpoint(directory, "clip_adapter", state, epoch, optim, scheduler,
                                  with_val_result=with_val_result)


def loaded_state(checkpoint: dict) -> OrderedDict:
    """What ``CLIP_Adapter.load_model`` (clip_adapter.py:178-217) loads into the adapter (strict=False)."""
    return load_dropping(checkpoint["state_dict"], ("token_prefix", "token_suffix"))
