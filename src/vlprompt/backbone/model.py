"""The frozen open_clip model (:class:`Backbone`): identity, precision, text and image features, and what it
supports (:meth:`Backbone.supports`: learned prompts in the text tower, prompts inside the image tower, LoRA,
local image features), so that a method refuses at build time what a backbone cannot do."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import BackboneError
from .attention import use_batch_first_self_attention
from .text_encoder import TextEncoder

log = logging.getLogger("vlprompt")

#: the pixel statistics a backbone's preprocess config carries (open_clip's names)
PIXEL_KEYS = ("mean", "std", "interpolation", "resize_mode")

#: ``--precision``: ``fp32`` (no autocast), ``amp`` (autocast on GPU: bf16 where supported, else fp16 with a
#: gradient scaler; fp32 on CPU), ``bf16`` (autocast to bfloat16 on a GPU that supports it or a CPU with bf16
#: matrix units, AMX or avx512_bf16; refused elsewhere), ``auto`` (bf16 where the device has fast bf16, fp16
#: autocast on older GPUs, fp32 on other CPUs)
PRECISIONS = ("amp", "fp32", "bf16", "auto")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (x86 AMX-BF16 or AVX512-BF16): there bf16 GEMMs run about 3x faster
    than fp32 (docs/benchmarks/precision.md); without them bf16 GEMMs are many times slower than fp32 (measured on
    an earlier machine without these units), hence refused there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:  # not Linux: no way to tell here, take the safe answer
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def compute_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype the towers compute in under ``precision`` on ``device`` (None: float32, no autocast); a precision
    the device cannot run is a BackboneError naming ``--precision``."""
    if precision not in PRECISIONS:
        raise BackboneError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "amp" and not cuda):
        return None
    if cuda:
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16:
            raise BackboneError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                                f"use --precision amp (fp16 autocast) or auto")
        return torch.bfloat16 if bf16 else torch.float16
    if device.type == "cpu":
        fast = cpu_has_fast_bf16()
        if precision == "bf16" and not fast:
            raise BackboneError("--precision bf16: this CPU has no bf16 matrix units (AMX or AVX512-BF16), where bf16 "
                                "is many times slower than fp32; use --precision fp32 (or auto, which picks fp32 here)")
        return torch.bfloat16 if fast else None
    if precision == "bf16":
        raise BackboneError(f"--precision bf16 is supported on CUDA and CPUs with bf16 units, not on {device.type}")
    return None


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone: its open_clip name (or config file) and its weights."""

    name: str
    pretrained: Optional[str]


class Backbone(nn.Module):
    """A frozen CLIP-style model.

    Attributes: ``model`` (the open_clip model, eval mode, no gradients), ``tokenizer``, ``text``
    (a :class:`vlprompt.backbone.text_encoder.TextEncoder` over the text tower), ``embed_dim`` (E, the joint space),
    ``preprocess`` (the model's own eval transform), ``preprocess_cfg`` (the JSON-able dict open_clip resolved
    for these weights: size, mode, mean, std, interpolation, resize_mode, fill_color; pass it to
    :func:`vlprompt.data.transforms.build_transforms`), ``pixel_source`` (where its pixel statistics come from, a
    phrase) and ``pixel_fallback`` (the keys of those that are open_clip's defaults for a weights file, which may
    not be the statistics the weights were trained with), ``image_size``, ``device``.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess, spec: BackboneSpec, model_cfg: dict,
                 device: torch.device, precision: str = "amp", preprocess_cfg: Optional[dict] = None,
                 pixel_source: str = "open_clip's preprocess config", pixel_fallback: tuple[str, ...] = ()):
        super().__init__()

        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.spec = spec
        self.model_cfg = model_cfg
        self.device = device
        self.precision = precision
        self.compute_dtype = compute_dtype(precision, device)
        self.preprocess_cfg = _json_preprocess_cfg(preprocess_cfg if preprocess_cfg is not None else
                                                   _model_preprocess_cfg(model))
        self.pixel_source = pixel_source
        self.pixel_fallback = tuple(pixel_fallback)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        if device.type == "cpu":  # measured on CPUs only (vlprompt.backbone.attention says how much it gains)
            use_batch_first_self_attention(self.model)
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
        if any(getattr(m, "_modules", {}).get("attn") is not None and hasattr(m.attn, "in_projection")
               for m in self.model.modules()) or self._prompt_hooks():
            raise BackboneError("the backbone is patched (LoRA or prompts inside a tower): its fingerprint, which keys "
                                "the feature cache, is that of the frozen towers only")
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
        # features computed in half precision are other numbers: their own cache (fp32 keeps the plain hash)
        return self._fingerprint + ("" if self.compute_dtype is None else f"-{self.precision_used}")

    def _prompt_hooks(self) -> bool:
        visual = self.model.visual
        return bool(getattr(getattr(visual, "ln_pre", None), "_forward_pre_hooks", None))

    @property
    def pixel_statistics(self) -> dict:
        """The pixel statistics the transforms use (``mean``, ``std``, ``interpolation``, ``resize_mode``) and
        ``source``: where they come from. Runs record it in results.json and method.json (eval, export and
        predict load the backbone with the same statistics)."""
        return {**{k: self.preprocess_cfg[k] for k in PIXEL_KEYS}, "source": self.pixel_source}

    def train(self, mode: bool = True):  # the towers stay in eval mode (BatchNorm in RN stems)
        super().train(mode)
        self.model.eval()
        return self

    # -- numerics -------------------------------------------------------------------------------
    def autocast(self):
        """Autocast to the compute dtype of ``precision`` on this device (:func:`compute_dtype`); none in fp32.
        Learned tensors stay float32 whatever the precision (autocast casts their copies for the matmuls)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        if self.device.type != "cpu":
            return torch.autocast(self.device.type, dtype=self.compute_dtype)
        # on a CPU, attention in half precision that will be differentiated runs through the math kernel: the flash
        # kernel's backward there is many times slower on the short sequences of prompts (a CoOp step under bf16:
        # 1.54 s with it, 0.81 s without, fp32 1.17-1.28 s; benchmarks/step_profile.py); its forward is the faster
        # one (a ViT-B/16 image tower under bf16: 12.6 images/s, 6.2 through the math kernel), so it is kept where
        # no gradient is taken
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cpu", dtype=self.compute_dtype))
        if torch.is_grad_enabled():
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    @property
    def precision_used(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: what the towers compute in (results.json records it)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.compute_dtype]

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
    def supports(self, feature: str) -> Optional[str]:
        """None when this backbone supports ``feature``, else why not (one line for the method's error):

        * ``learned_prompts``: token embeddings into the text tower (CoOp and every prompt learner);
        * ``deep_text``: per-layer text prompts (IVLP, MaPLe, PromptSRC);
        * ``deep_vision``: prompts inside the image tower (VPT, IVLP, MaPLe, PromptSRC: a ViT pooling its class token);
        * ``lora_text`` / ``lora_image``: LoRA on the attention projections of the tower's blocks;
        * ``local``: local image features (PLOT)."""
        from .patches import tower_blocks, vit_tower

        if feature in ("learned_prompts", "deep_text"):
            if self.text.unsupported:
                return self.text.unsupported
            if feature == "deep_text" and not self.text._blocks:
                return "the text tower has no residual blocks to prompt"
            return None
        if feature == "deep_vision":
            return vit_tower(self.model.visual)
        if feature in ("lora_text", "lora_image"):
            try:
                tower_blocks(self.model, feature.split("_")[1])
            except BackboneError as e:
                return str(e)
            return None
        if feature == "local":
            return None if self.local_kind != "none" else f"no local features from a {type(self.model.visual).__name__}"
        raise BackboneError(f"unknown backbone feature {feature!r}")

    def require(self, feature: str, who: str) -> None:
        """Raise BackboneError (one line naming ``who`` and the backbone) when ``feature`` is not supported."""
        why = self.supports(feature)
        if why:
            raise BackboneError(f"{who} needs {feature.replace('_', ' ')} in the backbone {self.name}: {why}")

    @property
    def local_kind(self) -> str:
        visual = self.model.visual
        if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
            return "resnet_attnpool"
        if hasattr(visual, "output_tokens") and hasattr(visual, "ln_post"):
            return "vit_tokens"
        return "none"

    def encode_image(self, images: torch.Tensor, local: bool = False, *, prompts=None, grad: bool = False):
        """Image features in the joint space, not normalised.

        Returns ``(B, E)``, or with ``local=True`` a pair ``((B, E), (B, M, E))``: for a ModifiedResNet the
        attention pool applied at every position of the final grid (M = 49 at 224 px; the pooled position
        equals the global feature), for a ViT the patch tokens after ``ln_post`` times ``proj``.

        ``prompts``: :class:`~vlprompt.backbone.patches.VisionLayerPrompts` inside a ViT tower (applied for this
        call only); ``grad``: keep the graph (prompts or LoRA being learned), else the frozen tower runs without
        gradients.
        """
        from .patches import vision_prompts

        if prompts is not None and local:
            raise BackboneError("local features with prompts inside the image tower are not supported")
        context = contextlib.nullcontext() if grad else torch.no_grad()
        with context, vision_prompts(self.model.visual, prompts):
            return self._encode_image(images, local)

    def _encode_image(self, images: torch.Tensor, local: bool):
        images = images.to(self.device, non_blocking=True)
        if self._channels_last():
            images = images.contiguous(memory_format=torch.channels_last)
        folded = None if torch.is_grad_enabled() else self._folded_resnet()
        with self.autocast():
            if not local:
                if folded is not None:
                    return folded(images).float()
                return self.model.encode_image(images).float()
            kind = self.local_kind
            if kind == "resnet_attnpool":
                tokens = _resnet_attnpool_all(folded if folded is not None else self.model.visual, images)
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


    def _folded_resnet(self) -> Optional[nn.Module]:
        """The frozen ResNet image tower with every batch norm folded into the convolution before it, for encoding
        without gradients on a CPU: ``conv(x, W * g / s) + (b - m) * g / s + beta`` is ``bn(conv(x, W))`` in eval mode
        (``torch.nn.utils.fusion.fuse_conv_bn_eval``), one pass over the activations fewer per convolution. RN50,
        batch 32, 1 thread: 1.22x in fp32 (features within 3e-7 relative), 1.33x under bf16 (docs/benchmarks/
        extract.md). A copy (the backbone's own tower keeps its batch norms: a trainable copy of it, its state dict
        and fingerprint are unchanged), rebuilt when any of the tower's tensors changed. ``None`` for other towers,
        and on GPUs (fp16 autocast: a folded weight may leave fp16's range; not measured there)."""
        if self.device.type != "cpu" or self.local_kind != "resnet_attnpool":
            return None
        visual = self.model.visual
        key = (id(visual), tuple((id(t), t._version) for t in (*visual.parameters(), *visual.buffers())))
        cached = self.__dict__.get("_folded_visual")
        if cached is None or cached[0] != key:
            folded = fold_batch_norms(visual)
            if self._channels_last():
                folded.to(memory_format=torch.channels_last)
            # checked once against the tower itself (fp32, one random image): a folding that does not compute what
            # the tower computes is not used
            x = torch.randn(1, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                a, b = visual(x.to(self.device)).float(), folded(x.to(self.device)).float()
            if not float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()):
                log.warning("%s: the image tower with its batch norms folded does not compute what the tower "
                            "computes (max difference %.3g); encoding with the tower as it is", self.name,
                            float((a - b).abs().max()))
                folded = None
            cached = (key, folded)
            self.__dict__["_folded_visual"] = cached
        return cached[1]

    def _channels_last(self) -> bool:
        """Whether the image tower runs in channels_last memory format (decided, and the tower converted, once).

        A ResNet tower does: oneDNN's (and cuDNN's) convolutions are faster in it -- RN50 at 224 px, batch 16, on
        2 AVX2 cores: 81 -> 107 GFLOP/s (benchmarks/extract_speed.py) -- and its features equal the plain
        layout's to float32 rounding (tested: tests/test_cache.py). A ViT only has one convolution (the patch
        embedding): it stays as it is."""
        decided = self.__dict__.get("_image_channels_last")
        if decided is None:
            decided = self.local_kind == "resnet_attnpool"
            if decided:
                self.model.visual.to(memory_format=torch.channels_last)
            self.__dict__["_image_channels_last"] = decided
        return decided


def _model_preprocess_cfg(model: nn.Module) -> dict:
    """What open_clip attached to the model (``create_model`` sets it from the tag, hf-hub / local-dir config and
    the tower's image size)."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(model) or {})
    if not cfg:
        raise BackboneError(f"{type(model).__name__}: open_clip attached no preprocess config to this model")
    return cfg


def _json_preprocess_cfg(cfg: dict) -> dict:
    from ..data.transforms import check_preprocess_cfg

    return check_preprocess_cfg({k: v for k, v in cfg.items()})


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every ``Conv2d`` directly followed by a ``BatchNorm2d`` (the order of their
    registration within a module, as open_clip's ModifiedResNet and its downsample ``Sequential`` declare them)
    is one convolution with the batch norm folded in (eval-mode statistics), the batch norm an ``Identity``.
    Raises ``BackboneError`` when a batch norm follows no convolution of matching width (nothing is folded
    silently wrong)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(module).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if (isinstance(bn, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)
                    and conv.out_channels == bn.num_features and bn.track_running_stats):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise BackboneError(f"cannot fold the batch norms {', '.join(left)}: no convolution of their width precedes them")
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


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



# ------------------------------------------------------------------------------------------------------------
# pixel statistics: a weights file gets those of its architecture's pretrained tags, when they all agree
# ------------------------------------------------------------------------------------------------------------
