"""Prompts inside the towers, layer by layer: the layout of muzairkhattak/multimodal-prompt-learning (IVLP, deep
language prompting, VPT, MaPLe) and muzairkhattak/PromptSRC, built on :mod:`vlprompt.backbone.patches`.

"Depth D" counts the layers that carry prompts, the input included (the original's ``prompts_needed``,
``clip/model.py`` l.210-221, issue #72): in the text tower the learned context (:class:`.context.PromptContext`) is
the input, and new prompts of the same length REPLACE the hidden states of positions 1..n before blocks 1..D-1
(l.243-252); in a ViT image tower n tokens are APPENDED after the positional embedding, before ``ln_pre``
(l.369-378, l.402-406), and new ones replace the last n tokens before blocks 1..D-1 (l.234-241). Replaced tokens
carry no positional embedding. Every prompt that is not word-initialised is drawn from N(0, 0.02) (l.210-221,
l.369-378). Widths and block counts are read from the backbone (the originals hard-code ViT-B's 512 / 768); a depth
above a tower's layer count is refused (the originals silently stop at the last block); ResNet image towers are
refused (they have no tokens: the original silently builds no vision prompt there).

* :class:`LayerPromptSet`: the prompts of chosen blocks of one tower (``{block: (n, width)}``);
* :class:`TowerPrompts`: IVLP's per-layer prompts of both towers, each part optional: deep text prompts, vision
  input prompts and deep vision prompts (a method with a learned text context adds it from
  :class:`.context.PromptContext`, MaPLe computes its vision prompts from its text prompts instead);
* :class:`DeepTextOptions`, :class:`VisionPromptOptions`: their options, declared once;
* :class:`DeepPromptMethod`: the base of the methods that learn a text context with deep text prompts and,
  optionally, prompts inside the ViT (IVLP, deep language prompting, PromptSRC);
* :func:`dassl_tower_import`: the import of their original checkpoints (whole ``CustomCLIP`` state dicts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ...backbone.patches import TextLayerPrompts, VisionLayerPrompts
from ...errors import CheckpointError, ConfigError, VLPromptError
from ..base import Features, MethodConfig, cosine_logits, opt
from .context import ContextPromptMethod
from .options import INIT_LENGTHS, ContextOptions
from .originals import (ImportedRun, OriginalRun, check_prefix, check_suffix, check_trainer, close, config_get,
                        dassl_request, shape)

#: the originals' std of every prompt that is not word-initialised (``nn.init.normal_(std=0.02)``)
PROMPT_STD = 0.02


# -- options -----------------------------------------------------------------------------------------------------
@dataclass
class DeepTextOptions(ContextOptions):
    """A learned text context with deep text prompts of the same length (IVLP, deep language prompting, PromptSRC)."""

    n_ctx: Optional[int] = opt(2, "text context vectors M (also the tokens of every deep text prompt): the first M "
                               "tokens of --init are learned, the init's further tokens stay a fixed part of every "
                               "prompt (--init-length n_ctx); M random vectors without --init", min=1)
    init: Optional[str] = opt("a photo of a", "words the context starts from ('none': random N(0, init_std))")
    init_length: str = opt("n_ctx", "how --init's length is counted: n_ctx (the originals: the first --n-ctx tokens "
                           "learned), tokens (every token learned) or words (one per space-separated word)",
                           choices=INIT_LENGTHS)
    init_std: float = opt(PROMPT_STD, "standard deviation of the random init of the context (without --init) "
                          "and of every prompt inside the towers", gt=0)
    text_depth: int = opt(9, "text layers carrying prompts, counting the input: the context, then new prompts "
                          "replacing it before blocks 1..depth-1 (at most the text tower's layers)", min=1)

    def check(self) -> None:
        super().check()
        if self.class_position != "end" and self.text_depth > 1:
            raise ConfigError(f"class_position (--class-position) {self.class_position}: deep text prompts replace "
                              f"positions 1..n_ctx, which must be the context (the class name after it, 'end'); "
                              f"text_depth (--text-depth) is {self.text_depth}")


@dataclass
class VisionPromptOptions(MethodConfig):
    """Prompts inside a ViT image tower (VPT, IVLP, PromptSRC)."""

    n_ctx_vision: int = opt(2, "vision prompt tokens appended after the image tower's positional embedding (and "
                            "replaced by new ones at each deeper prompted block)", min=0)
    vision_depth: int = opt(9, "image layers carrying prompts, counting the input: the appended tokens, then new "
                            "ones replacing them before blocks 1..depth-1 (1: shallow; at most the tower's layers)",
                            min=0)

    def check(self) -> None:
        super().check()
        if (self.n_ctx_vision == 0) != (self.vision_depth == 0):
            raise ConfigError(f"n_ctx_vision (--n-ctx-vision) {self.n_ctx_vision} with vision_depth (--vision-depth) "
                              f"{self.vision_depth}: vision prompts need both above 0 (or both 0: none)")


# -- the prompts -------------------------------------------------------------------------------------------------
def prompted_blocks(depth: int, num_blocks: int, field: str, tower: str, backbone_name: str) -> list[int]:
    """The blocks that get new prompts at ``depth`` (1..depth-1); a depth above the tower's layers is refused."""
    if depth > num_blocks:
        raise ConfigError(f"{field} (--{field.replace('_', '-')}) {depth} exceeds the {num_blocks} layers of the "
                          f"{tower} tower of {backbone_name} (the depth counts the layers that carry prompts)")
    return list(range(1, depth))


def vision_tower(backbone) -> tuple[int, int]:
    """(width, blocks) of the backbone's ViT image tower."""
    visual = backbone.model.visual
    return int(visual.positional_embedding.shape[-1]), len(visual.transformer.resblocks)


def normal_prompts(n: int, width: int, device, std: float = PROMPT_STD) -> nn.Parameter:
    """(n, width) float32 drawn from N(0, std) with the global RNG (the run's seed)."""
    return nn.Parameter(nn.init.normal_(torch.empty(n, width), std=std).to(device))


class LayerPromptSet(nn.ParameterDict):
    """Prompts of chosen blocks of one tower: ``self[str(block)]`` (n, width), N(0, std) at first."""

    def __init__(self, blocks: Sequence[int], n: int, width: int, device, std: float = PROMPT_STD):
        super().__init__({str(i): normal_prompts(n, width, device, std) for i in blocks})

    def layers(self) -> dict[int, torch.Tensor]:
        """``{block index: (n, width)}``."""
        return {int(k): v for k, v in self.items()}


class TowerPrompts(nn.Module):
    """IVLP's prompts of both towers (each part optional): ``text`` deep prompts (n_text, D) before text blocks
    1..text_depth-1; ``vision_input`` (n_vision, W) appended to the ViT's tokens and ``vision`` deep prompts
    (n_vision, W) before image blocks 1..vision_depth-1. Learned-state names: ``text.<block>``,
    ``vision_input``, ``vision.<block>``."""

    def __init__(self, backbone, who: str, *, n_text: int = 0, text_depth: int = 0, n_vision: int = 0,
                 vision_depth: int = 0, std: float = PROMPT_STD):
        super().__init__()
        device = backbone.device
        self.text = None
        if text_depth > 1:
            backbone.require("deep_text", who)
            blocks = prompted_blocks(text_depth, len(backbone.text._blocks), "text_depth", "text", backbone.name)
            self.text = LayerPromptSet(blocks, n_text, backbone.text.width, device, std)
        self.vision = None
        self.register_parameter("vision_input", None)
        if vision_depth > 0:
            backbone.require("deep_vision", who)
            width, num = vision_tower(backbone)
            blocks = prompted_blocks(vision_depth, num, "vision_depth", "image", backbone.name)
            self.vision_input = normal_prompts(n_vision, width, device, std)
            self.vision = LayerPromptSet(blocks, n_vision, width, device, std)

    def text_prompts(self) -> Optional[TextLayerPrompts]:
        """The deep text prompts for the text encoder (None without any)."""
        return TextLayerPrompts(self.text.layers()) if self.text is not None and len(self.text) else None

    def vision_prompts(self) -> Optional[VisionLayerPrompts]:
        """The prompts of the image tower (None without any)."""
        if self.vision_input is None:
            return None
        return VisionLayerPrompts(self.vision_input, self.vision.layers())

    @property
    def text_blocks(self) -> list[int]:
        return sorted(self.text.layers()) if self.text is not None else []

    @property
    def vision_blocks(self) -> list[int]:
        return sorted(self.vision.layers()) if self.vision is not None else []


def encode_prompted_images(backbone, images: Optional[torch.Tensor], prompts: Optional[VisionLayerPrompts],
                           who: str) -> torch.Tensor:
    """(B, E) image features of the prompted ViT, with gradients when they are enabled."""
    if images is None:
        raise VLPromptError(f"{who} runs the image tower with its prompts: it needs the images, not cached features")
    return backbone.encode_image(images, prompts=prompts, grad=torch.is_grad_enabled())


# -- the methods' base -----------------------------------------------------------------------------------------
class DeepPromptMethod(ContextPromptMethod):
    """A learned text context with deep text prompts (``self.prompt``, ``self.deep.text``) and, when the config has
    vision prompts, prompts inside the ViT image tower (``self.deep.vision_input``, ``self.deep.vision``):
    logits = logit_scale * cos(prompted image (B, E), prompted text (K, E)) (the originals' ``CustomCLIP.forward``,
    e.g. ``trainers/independentVL.py`` l.164-179). Without vision prompts the image features are the frozen tower's,
    read from the feature cache (the same numbers as running the tower, without running it every step)."""

    family = "towers"
    inputs = frozenset({"images"})
    head_kind = "prompt"  # the image side runs the prompted tower: predict rebuilds the method
    original_format = "dassl"

    @classmethod
    def has_vision(cls, config) -> bool:
        return getattr(config, "vision_depth", 0) > 0

    @classmethod
    def input_kinds(cls, config) -> frozenset:
        return frozenset({"images"}) if cls.has_vision(config) else frozenset({"global"})

    @classmethod
    def eval_input_kinds(cls, config) -> frozenset:
        return cls.input_kinds(config)

    def __init__(self, config, backbone, classnames: Sequence[str]):
        backbone.require("learned_prompts", type(self).name)
        super().__init__(config, backbone, classnames)
        self.deep = TowerPrompts(backbone, self.name, n_text=self.prompt.n_ctx, text_depth=config.text_depth,
                                 n_vision=getattr(config, "n_ctx_vision", 0),
                                 vision_depth=getattr(config, "vision_depth", 0), std=config.init_std)

    def describe(self) -> dict:
        return {"text_prompt_blocks": self.deep.text_blocks, "vision_prompt_blocks": self.deep.vision_blocks,
                "learned_values": sum(p.numel() for p in self.trainable_parameters())}

    def encode_text(self) -> torch.Tensor:
        """(K, E) prompted class text features, not normalised."""
        return self.prompt.encode(layer_prompts=self.deep.text_prompts())[0]

    def text_features(self) -> torch.Tensor:
        """:meth:`encode_text`, computed once per evaluation."""
        return self.once_per_eval(self.encode_text)

    def image_features(self, feats: Features) -> torch.Tensor:
        """(B, E) image features, not normalised: the prompted ViT on the images, or the frozen tower's (cached)."""
        if self.deep.vision_input is None:
            if feats.global_ is None:
                raise VLPromptError(f"{self.name} without vision prompts reads the frozen image features")
            return feats.global_.float()
        return encode_prompted_images(self.backbone, feats.images, self.deep.vision_prompts(), self.name)

    def forward(self, feats: Features) -> torch.Tensor:
        return cosine_logits(self.image_features(feats), self.text_features(), self.logit_scale)


# -- the originals' checkpoints ----------------------------------------------------------------------------------
#: prefixes of the frozen CLIP weights a ``CustomCLIP`` state dict holds besides the learned tensors
FROZEN_PREFIXES = ("text_encoder.", "image_encoder.", "prompt_learner.ZS_image_encoder.")


def _deep_tensors(state: dict, prefix: str) -> list[tuple[int, str, torch.Tensor]]:
    """``(block, name, tensor)`` of ``<prefix>.transformer.resblocks.<i>.VPT_shallow``, blocks 1, 2, ... in order
    (the original creates them contiguous from block 1)."""
    found = {}
    for name, t in state.items():
        head, _, tail = name.partition(".transformer.resblocks.")
        if head == prefix and tail.endswith(".VPT_shallow"):
            found[int(tail.split(".")[0])] = (name, t)
    blocks = sorted(found)
    if blocks and blocks != list(range(1, len(blocks) + 1)):
        raise CheckpointError(f"{prefix} prompts at blocks {blocks}: the original prompts blocks 1..depth-1")
    return [(i, *found[i]) for i in blocks]


def check_frozen_weights(method, state: dict, path) -> None:
    """The run's saved frozen CLIP weights (fp32 in every recipe: the positional embeddings) against the
    backbone's: another architecture or other weights show there."""
    model = method.backbone.model
    pairs = [("text_encoder.positional_embedding", model.positional_embedding)]
    if hasattr(model.visual, "positional_embedding"):
        pairs.append(("image_encoder.positional_embedding", model.visual.positional_embedding))
    for name, own in pairs:
        saved = state.get(name)
        if saved is not None and not close(saved, own):
            raise CheckpointError(f"{path}: the run's frozen CLIP weights ({name} {shape(saved)}) differ from the "
                                  f"backbone {method.backbone.name}'s {tuple(own.shape)}: the run used another "
                                  f"backbone or other weights (--backbone / --pretrained)")


def dassl_tower_import(cls, run: OriginalRun, *, trainer: str, section: str, text: bool = True,
                       vision: bool = True, options: Optional[dict] = None,
                       config_options: Optional[dict] = None) -> ImportedRun:
    """The import of an original run whose checkpoint holds the whole ``CustomCLIP`` (IVLP, deep language prompting,
    VPT, PromptSRC; ``<output>/<model name>/model.pth.tar-<epoch>``): the learned tensors by their original names
    -- ``prompt_learner.ctx`` (n, D), ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` (n, D),
    ``image_encoder.VPT`` and ``image_encoder.transformer.resblocks.<i>.VPT_shallow`` (n_v, W) -- mapped onto
    ``prompt.ctx``, ``deep.text.<i>``, ``deep.vision_input``, ``deep.vision.<i>``; the depths and lengths from the
    tensors (the original stops at the tower's last block whatever its config says); the word init and the recipe
    from the run's configuration (``section``: ``TRAINER.IVLP``...; ``CTX_INIT`` is used only with at most 4
    context vectors, as the original does); the frozen CLIP weights it saved checked against the backbone, the
    saved class-token buffers against the rebuilt ones. ``vision``: vision prompts required (True) or refused
    (False). ``config_options``: ``{method option: key in section}`` read from the configuration."""
    check_trainer(run, trainer, cls.name)
    state = run.state
    learned = {"prompt_learner.ctx", "image_encoder.VPT"} | {n for n in state if n.endswith(".VPT_shallow")
                                                             and not n.startswith("prompt_learner.")}
    fixed = {"logit_scale", "prompt_learner.token_prefix", "prompt_learner.token_suffix"}
    for name in state:
        if name not in learned | fixed and not name.startswith(FROZEN_PREFIXES):
            raise CheckpointError(f"{run.path}: unexpected tensor {name!r} in a {trainer} checkpoint")
    mapped: dict = {}
    opts = dict(options or {})
    if text:
        ctx = state.get("prompt_learner.ctx")
        if ctx is None or ctx.dim() != 2:
            raise CheckpointError(f"{run.path}: prompt_learner.ctx has shape {shape(ctx) if ctx is not None else None}"
                                  f"; the {trainer} prompt learner saves (n_ctx, dim)")
        mapped["prompt.ctx"] = ("prompt_learner.ctx", ctx, ctx[None, None])
        deep_text = _deep_tensors(state, "text_encoder")
        for i, name, t in deep_text:
            if shape(t) != shape(ctx):
                raise CheckpointError(f"{run.path}: {name} has shape {shape(t)}, the context {shape(ctx)}")
            mapped[f"deep.text.{i}"] = (name, t, t)
        n_ctx = int(ctx.shape[0])
        opts.update(n_ctx=n_ctx, text_depth=len(deep_text) + 1, init_length="n_ctx")
        init = config_get(run.config, f"{section}.CTX_INIT")
        if run.config is not None:  # the original drops the init beyond 4 context vectors
            opts["init"] = str(init).replace("_", " ") if init and n_ctx <= 4 else None
    elif any(n.startswith("text_encoder.") and n.endswith(".VPT_shallow") for n in state) or \
            "prompt_learner.ctx" in state:
        raise CheckpointError(f"{run.path}: a {trainer} checkpoint holds no text prompts, this one does")
    shallow = state.get("image_encoder.VPT")
    deep_vision = _deep_tensors(state, "image_encoder")
    if shallow is None and deep_vision:
        raise CheckpointError(f"{run.path}: deep vision prompts without image_encoder.VPT")
    if vision and shallow is None:
        raise CheckpointError(f"{run.path}: no vision prompts (image_encoder.VPT): the {trainer} run trained none "
                              f"(a ResNet image tower, or vision depth 0)" + (
                                  "; a run with text prompts only imports with --from deep-language" if text else ""))
    if not vision and shallow is not None:
        raise CheckpointError(f"{run.path}: the run has vision prompts (image_encoder.VPT): import it with --from ivlp")
    if shallow is not None:
        mapped["deep.vision_input"] = ("image_encoder.VPT", shallow, shallow)
        for i, name, t in deep_vision:
            if shape(t) != shape(shallow):
                raise CheckpointError(f"{run.path}: {name} has shape {shape(t)}, image_encoder.VPT {shape(shallow)}")
            mapped[f"deep.vision.{i}"] = (name, t, t)
        opts.update(n_ctx_vision=int(shallow.shape[0]), vision_depth=len(deep_vision) + 1)
    for option, key in (config_options or {}).items():
        value = config_get(run.config, f"{section}.{key}")
        if value is not None:
            opts[option] = value
    request = dassl_request(run.config, run.checkpoint)
    request["method_options"] = opts
    imported = ImportedRun(cls.name, run.path, mapped, request, run.info,
                           required=("init",) if text and run.config is None else ())
    imported.checks.append(lambda m: check_frozen_weights(m, state, run.path))
    if "prompt_learner.token_prefix" in state:
        imported.checks.append(lambda m: check_prefix(m, state["prompt_learner.token_prefix"], run.path))
    if "prompt_learner.token_suffix" in state:
        imported.checks.append(lambda m: check_suffix(m, state["prompt_learner.token_suffix"], run.path))
    return imported


__all__ = ["PROMPT_STD", "DeepTextOptions", "VisionPromptOptions", "prompted_blocks", "vision_tower", "normal_prompts",
           "LayerPromptSet", "TowerPrompts", "encode_prompted_images", "DeepPromptMethod", "FROZEN_PREFIXES",
           "check_frozen_weights", "dassl_tower_import"]
