"""The backbone layer: a frozen open_clip model with the views every method needs.

``load_backbone(name, pretrained)`` builds any open_clip model (by name or from a model-config JSON) and
returns a :class:`Backbone` exposing the tokenizer, text encoding of strings, a text encoder that takes token
embeddings (so prompts can be learned, see :mod:`vlprompt.text`), global ``(B, E)`` and local ``(B, M, E)``
image features in the joint space, the logit scale, and the model's transforms. Both towers are frozen.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BackboneError

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = {None, "", "none", "None", "random"}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _register_config(path: Path) -> str:
    """Register a model-config JSON with open_clip; the model name is the file's stem."""
    import open_clip

    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BackboneError(f"model config {path}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise BackboneError(f"model config {path}: an open_clip config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    open_clip.add_model_config(path)
    return path.stem


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone: its open_clip name (or config file) and its weights."""

    name: str
    pretrained: Optional[str]


class Backbone(nn.Module):
    """A frozen CLIP-style model.

    Attributes: ``model`` (the open_clip model, eval mode, no gradients), ``tokenizer``, ``text``
    (a :class:`vlprompt.text.TextEncoder` over the text tower), ``embed_dim`` (E, the joint space),
    ``preprocess`` (the model's own eval transform), ``image_size``, ``device``.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess, spec: BackboneSpec, model_cfg: dict,
                 device: torch.device, precision: str = "amp"):
        super().__init__()
        from .text import TextEncoder

        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.spec = spec
        self.model_cfg = model_cfg
        self.device = device
        self.precision = precision
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.text = TextEncoder.from_model(model, tokenizer, autocast=self.autocast)
        self._fingerprint: Optional[str] = None

    # -- identity -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def fingerprint(self) -> str:
        """A content hash of the architecture and every weight (computed once, on first use).

        Feature caches key on it, so any change of weights invalidates them, whatever their file name.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self.model_cfg, sort_keys=True, default=str).encode())
            for key, tensor in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                t = tensor.detach().to("cpu").contiguous()
                h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
                if t.numel():
                    h.update(t.reshape(-1).view(torch.uint8).numpy())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    def train(self, mode: bool = True):  # the towers stay in eval mode (BatchNorm in RN stems)
        super().train(mode)
        self.model.eval()
        return self

    # -- numerics -------------------------------------------------------------------------------
    def autocast(self):
        """fp32 on CPU (bf16 is many times slower there); autocast to fp16/bf16 on GPU."""
        if self.device.type == "cuda" and self.precision == "amp":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the model (100 for trained CLIP)."""
        return float(self.model.logit_scale.detach().exp().item())

    # -- text -----------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(K, L) int64 token ids, padded to the model's context length."""
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = False, chunk_size: int = 256,
                    fast: bool = True) -> torch.Tensor:
        """Text features (K, E) of strings.

        ``fast`` (default) cuts each chunk after its last end-of-text token when the tower is causal: the same
        numbers as open_clip's ``encode_text`` (tested to 1e-5) at a fraction of the work for short prompts;
        ``fast=False`` calls open_clip's ``encode_text`` itself.
        """
        texts = list(texts)
        out = []
        use_cut = fast and self.text.fast_ok
        for i in range(0, len(texts), chunk_size):
            tokens = self.tokenize(texts[i:i + chunk_size])
            if use_cut:
                out.append(self.text(self.text.embed(tokens), self.text.eot_positions(tokens), mode="cut",
                                     chunk_size=None).float())
            else:
                with self.autocast():
                    out.append(self.model.encode_text(tokens).float())
        feats = torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)
        return F.normalize(feats, dim=-1) if normalize else feats

    # -- images ---------------------------------------------------------------------------------
    @property
    def local_kind(self) -> str:
        visual = self.model.visual
        if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
            return "resnet_attnpool"
        if hasattr(visual, "output_tokens") and hasattr(visual, "ln_post"):
            return "vit_tokens"
        return "none"

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, local: bool = False):
        """Image features in the joint space, not normalised.

        Returns ``(B, E)``, or with ``local=True`` a pair ``((B, E), (B, M, E))``: for a ModifiedResNet the
        attention pool applied at every position of the final grid (M = 49 at 224 px; the pooled position
        equals the global feature), for a ViT the patch tokens after ``ln_post`` times ``proj``.
        """
        images = images.to(self.device, non_blocking=True)
        with self.autocast():
            if not local:
                return self.model.encode_image(images).float()
            kind = self.local_kind
            if kind == "resnet_attnpool":
                tokens = _resnet_attnpool_all(self.model.visual, images)
                return tokens[:, 0].float(), tokens[:, 1:].float()
            if kind == "vit_tokens":
                visual = self.model.visual
                previous = visual.output_tokens
                visual.output_tokens = True
                try:
                    pooled, tokens = visual(images)
                finally:
                    visual.output_tokens = previous
                if visual.proj is not None:
                    tokens = tokens @ visual.proj
                return pooled.float(), tokens.float()
        raise BackboneError(
            f"{self.name}: local image features are supported for ModifiedResNet (RN50...) and "
            f"VisionTransformer towers; this image tower is {type(self.model.visual).__name__}")


def _resnet_attnpool_all(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a ModifiedResNet and its attention pool at every position: (B, 1 + H*W, E).

    Position 0 is the pooled (mean) query and equals ``visual(x)``; positions 1.. are the grid cells in
    row-major order. This is what PLOT's reference takes as local features.
    """
    x = x.to(dtype=visual.conv1.weight.dtype)
    x = visual.stem(x)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    b, c, h, w = x.shape
    x = x.reshape(b, c, h * w).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    if pool.positional_embedding.shape[0] != x.shape[0]:
        raise BackboneError(
            f"attention pool expects a {int((pool.positional_embedding.shape[0] - 1) ** 0.5)}^2 grid, got "
            f"{h}x{w}: feed images of the model's input size")
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    return out.permute(1, 0, 2)  # (B, HW + 1, E)


def load_backbone(name: str, pretrained: Optional[str] = None, device: str | torch.device | None = None, *,
                  precision: str = "amp", quick_gelu: Optional[bool] = None,
                  cache_dir: Optional[str] = None) -> Backbone:
    """Build a frozen open_clip model.

    Args:
        name: an open_clip model name (``RN50``, ``ViT-B-16``...) or a path to an open_clip model-config JSON.
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``...; downloaded and cached as
            open_clip does), a local checkpoint file, or ``None``/``"none"`` for random weights (a loud warning:
            accuracy is meaningless then).
        device: ``cpu``, ``cuda``, ``cuda:1``; default: CUDA when available.
        precision: ``amp`` (autocast on GPU; fp32 on CPU) or ``fp32``.
        quick_gelu: force QuickGELU on or off; default: on for OpenAI weights (tags whose open_clip metadata
            says so), as loading them into the plain GELU config silently changes every number.
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    dev = resolve_device(device)
    if precision not in ("amp", "fp32"):
        raise BackboneError(f"precision must be 'amp' or 'fp32', got {precision!r}")
    model_name = str(name)
    if model_name.endswith(".json") or Path(model_name).is_file():
        path = Path(model_name).expanduser().resolve()
        if not path.is_file():
            raise BackboneError(f"model config file not found: {path}")
        model_name = _register_config(path)
    if open_clip.get_model_config(model_name) is None:
        known = ", ".join(open_clip.list_models()[:12])
        raise BackboneError(f"unknown backbone {name!r}: not an open_clip model name nor a model-config JSON "
                            f"(known names include {known}...; `open_clip.list_models()` lists all)")

    weights = None if pretrained in RANDOM_WEIGHTS else str(pretrained)
    force_qg = False
    if weights is not None and not os.path.isfile(os.path.expanduser(weights)):
        tag_cfg = get_pretrained_cfg(model_name, weights)
        if not tag_cfg:
            tags = list_pretrained_tags_by_model(model_name)
            raise BackboneError(f"pretrained {weights!r} is neither a file nor a known tag of {model_name} "
                                f"(tags: {', '.join(tags) if tags else 'none'})")
        force_qg = bool(tag_cfg.get("quick_gelu", False))
    elif weights is not None:
        weights = str(Path(weights).expanduser().resolve())
    if quick_gelu is not None:
        force_qg = quick_gelu
    if weights is None:
        warnings.warn(f"backbone {model_name} has RANDOM weights (pretrained=None): features and accuracy are "
                      f"meaningless except for tests", stacklevel=2)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=weights, device="cpu", precision="fp32",
                force_quick_gelu=force_qg, cache_dir=cache_dir)
    except RuntimeError as e:
        msg = str(e)
        if weights is not None and not os.path.isfile(weights) and ("download" in msg.lower() or "offline" in msg.lower()
                                                                    or "connect" in msg.lower()):
            raise BackboneError(
                f"could not fetch the {weights!r} weights of {model_name} (offline, or the hub is unreachable; "
                f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download the checkpoint on a "
                f"machine with internet and pass the file: --pretrained /path/to/{model_name}.bin") from None
        raise BackboneError(f"could not build {model_name} with pretrained={weights!r}: {msg}") from None
    except Exception as e:  # a torn, foreign or mismatched checkpoint file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackboneError(f"could not load weights {weights!r} into {model_name}: {first}") from None

    model_cfg = dict(open_clip.get_model_config(model_name))
    if force_qg:
        model_cfg["quick_gelu"] = True
    model = model.to(dev)
    tokenizer = open_clip.get_tokenizer(model_name)
    spec = BackboneSpec(name=str(name), pretrained=weights)
    return Backbone(model, tokenizer, preprocess, spec, model_cfg, dev, precision)
