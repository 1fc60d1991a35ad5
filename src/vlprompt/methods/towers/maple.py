"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts in both towers, each vision prompt a learned linear map
of its text prompt.

The computation of muzairkhattak/multimodal-prompt-learning@69bce21 ``trainers/maple.py`` (``MultiModalPromptLearner``
l.69-176, ``CustomCLIP`` l.179-204) on the MaPLe blocks of its ``clip/model.py`` (l.259-331, l.425-476), with n =
``n_ctx`` context vectors, depth J, text width D and vision width W (both read from the model):

* text: ``[<sot>, ctx (n, D), the rest of the init, class name, ".", <eot>]``; before text block j (1 <= j < J) the
  hidden states of positions 1..n are replaced by the deep text prompt ``deep_text[j - 1]`` (n, D) (replaced tokens
  carry no positional embedding);
* image: ``proj(ctx)`` (n, W) appended after the positional embedding, before ``ln_pre``; before vision block j the
  last n tokens are replaced by ``deep_proj[j - 1](deep_text[j - 1])``: gradients reach the text prompts through
  both towers;
* logits = exp(logit_scale) * cos(image, text), cross-entropy in training (the same forward in both modes).

What the original does that produced its numbers, reproduced:

* the word init (``maple.py`` l.84-97, 121-131): with "a photo of a" and n 2, "a photo" is learned and "of a" stays
  a fixed part of every prompt (``init_length="n_ctx"`` of :class:`..parts.context.PromptContext`, which refuses an
  init of fewer tokens than n, and keeps an init the user gives with n > 4, where the original silently drops it);
* the J-1 coupling layers start as deep copies of ONE initialised ``nn.Linear(D, W)`` (l.116-117, ``_get_clones``
  l.207-208): all identical at the start; the deep text prompts are N(0, 0.02) (l.111-114), never word-initialised;
* the draw order from the global RNG (ctx when random, proj, the J-1 deep text prompts, the one cloned Linear):
  from the same RNG state the same initial tensors as the original (its fp16 rounding of ctx and proj aside);
* the widths the original hard-codes (512 -> D, 768 -> W, l.103, l.111, l.116) are read from the model, so ViT-B/32,
  B/16 and L/14 all work (the original needs hand edits for L/14: its issues #46, #73).

Not reproduced (fp16 artefacts): ctx and proj are fp16 parameters updated by SGD without loss scaling and every
prompt is cast ``.half()`` in the blocks (``clip/model.py`` l.299-326, l.456-458); here the learned tensors are fp32
and the towers run under autocast on GPU. The original's PREC fp32 and amp paths fail (``self.proj.half()`` is
unconditional, l.104; read from code). A depth larger than a tower's block count (the original's unused extra
prompts) and ResNet image towers (a TypeError there, its issue #49) are refused with one line.

The text side runs its shared prefix once: ``<sot>``, the context and the fixed words of the init are the same for
every class, and the deep prompts fall inside them, so the text encoder's shared-prefix path encodes them once per
step and each class's tokens attend to them (exact; ``tests/test_maple.py``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ...backbone.patches import TextLayerPrompts, VisionLayerPrompts, tower_blocks
from ...errors import CheckpointError, ConfigError, VLPromptError
from ..base import Features, Method, MethodConfig, cosine_logits, opt
from ..parts.context import PromptContext, clean_init_words
from ..parts.options import TEXT_MODES
from ..parts.originals import check_frozen_towers, check_trainer, config_get, dassl_context_import, shape
from ..parts.recipes import DASSL_SGD

#: the base-to-new recipe, configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: batch 4 (l.3), lr 0.0035 (l.17),
#: 5 epochs (l.18), N_CTX 2 (l.33), CTX_INIT "a photo of a" (l.34), PROMPT_DEPTH 9 (l.36)
BASE2NEW = {"train": {"batch_size": 4, "lr": 0.0035, "epochs": 5},
            "method_options": {"n_ctx": 2, "init": "a photo of a", "depth": 9}}
#: the cross-dataset / domain-generalisation recipe (ImageNet, all classes, 16 shots),
#: configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml: batch 4 (l.3), lr 0.0026 (l.17),
#: 2 epochs (l.18), N_CTX 2 (l.33), CTX_INIT "a photo of a" (l.34), PROMPT_DEPTH 3 (l.36)
CROSS_DATASETS = {"train": {"batch_size": 4, "lr": 0.0026, "epochs": 2},
                  "method_options": {"n_ctx": 2, "init": "a photo of a", "depth": 3}}


@dataclass
class MaPLeConfig(MethodConfig):
    n_ctx: int = opt(2, "learned text context vectors n: the first n tokens of --init (MaPLe's N_CTX); the vision "
                     "prompts are n tokens too", min=1)
    init: Optional[str] = opt("a photo of a", "the words the context starts from: its first n_ctx tokens are "
                              "learned, its further tokens stay fixed before each class name (the original's rule: "
                              "'a photo of a' with n_ctx 2 learns 'a photo'); 'none': random N(0, 0.02)")
    depth: int = opt(9, "prompt depth J: the blocks carrying prompts in each tower, counting the input (deep prompts "
                     "replace text positions 1..n and the last n image tokens before blocks 1..J-1)", min=1)
    text_mode: str = opt("auto", "text path (all exact; auto runs the shared prefix once)", choices=TEXT_MODES)
    chunk_size: int = opt(256, "prompts per text-tower chunk (bounds memory for large class lists)", min=1)


class MaPLe(Method):
    name = "maple"
    family = "towers"
    config_class = MaPLeConfig
    summary = ("multi-modal prompts (Khattak et al., CVPR 2023): a text context and deep text prompts, each vision "
               "prompt a learned linear map of its text prompt, in the first J blocks of both towers (ViT)")
    inputs = frozenset({"images"})  # the image tower runs with its prompts at every step
    head_kind = "prompt"
    original_format = "dassl"

    @classmethod
    def preset(cls, data) -> dict:
        """The original's recipes (muzairkhattak/multimodal-prompt-learning@69bce21): :data:`CROSS_DATASETS` when
        training on ImageNet's whole class list (the cross-dataset and domain-generalisation source runs,
        ``scripts/maple/xd_train_maple.sh``), else :data:`BASE2NEW` (``scripts/maple/base2new_train_maple.sh``; no
        few-shot recipe was published -- PromptSRC's issues #14 and #21 -- and ``train.py``'s defaults, l.104-110,
        are this one's). Both on Dassl's SGD (:data:`..parts.recipes.DASSL_SGD`: momentum 0.9, weight decay 5e-4,
        cosine per epoch after one constant warm-up epoch at 1e-5 counted inside the epochs; the configs' OPTIM,
        Dassl's ``defaults.py``)."""
        recipe = CROSS_DATASETS if (data.dataset == "imagenet" and data.classes == "all") else BASE2NEW
        return {"train": {**DASSL_SGD, **recipe["train"]}, "method_options": dict(recipe["method_options"])}

    def __init__(self, config: MaPLeConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        backbone.require("deep_text", "MaPLe")
        backbone.require("deep_vision", "MaPLe")
        visual = backbone.model.visual
        blocks = {"text": len(tower_blocks(backbone.model, "text")), "image": len(visual.transformer.resblocks)}
        if config.depth > min(blocks.values()):
            raise ConfigError(f"depth (--depth) {config.depth} exceeds the blocks of the backbone {backbone.name} "
                              f"({blocks['text']} text, {blocks['image']} image): at most {min(blocks.values())}")
        # the original's draws, in its order: ctx (when random), proj, the deep text prompts, the one cloned Linear
        init = clean_init_words(config.init)
        self.prompt = PromptContext(backbone.text, classnames, n_ctx=config.n_ctx, init_words=init,
                                    init_length="n_ctx" if init else "tokens", text_mode=config.text_mode,
                                    chunk_size=config.chunk_size)
        n, d = config.n_ctx, backbone.text.width
        w = int(visual.positional_embedding.shape[-1])
        self.proj = nn.Linear(d, w)
        self.deep_text = nn.ParameterList([nn.Parameter(nn.init.normal_(torch.empty(n, d), std=0.02))
                                           for _ in range(config.depth - 1)])
        single = nn.Linear(d, w)
        self.deep_proj = nn.ModuleList([copy.deepcopy(single) for _ in range(config.depth - 1)])
        self.to(backbone.device)
        self.text_width, self.vision_width = d, w
        init = self.prompt.init_words
        self.init_tokens = backbone.text.token_count(init) if init else n
        self._check_fixed_words()
        self.config = dataclasses.replace(config, init=init)

    def _check_fixed_words(self) -> None:
        """The init's tokens after the learned ones ("of a") are the same for every class: they join the shared
        prefix (a tokenizer merging them with a class name would make them class tokens)."""
        fixed = self.init_tokens - self.config.n_ctx
        tail = self.prompt.tail
        self.shared_fixed = fixed if bool((tail[:, :fixed] == tail[:1, :fixed]).all()) else 0

    # -- the import of original runs ------------------------------------------------------------------------
    @classmethod
    def import_original(cls, run):
        """A MaPLe run (``<output>/MultiModalPromptLearner/model.pth.tar-<epoch>``: the whole CustomCLIP's state
        dict): ``prompt_learner.ctx`` (n, D), ``prompt_learner.proj.*``, ``prompt_learner.compound_prompts_text.<j>``
        and ``prompt_learner.compound_prompt_projections.<j>.*``, the configuration (TRAINER.MAPLE: N_CTX, CTX_INIT,
        PROMPT_DEPTH) from log.txt; checks the saved class tokens and the saved frozen CLIP weights against the
        rebuilt method and its backbone."""
        check_trainer(run, "MaPLe", "maple")
        sd = run.state
        pl = "prompt_learner."
        fixed = {"logit_scale", pl + "token_prefix", pl + "token_suffix"}
        learned = {k for k in sd if k.startswith(pl) and k not in fixed}
        for k in sd:
            if not (k in fixed or k in learned or k.startswith(("image_encoder.", "text_encoder."))):
                raise CheckpointError(f"{run.path}: unexpected tensor {k!r} in a MaPLe checkpoint")
        ctx = sd.get(pl + "ctx")
        if ctx is None or ctx.dim() != 2:
            raise CheckpointError(f"{run.path}: prompt_learner.ctx has shape "
                                  f"{shape(ctx) if ctx is not None else None}; MaPLe saves (n_ctx, dim)")
        deep = 0
        while pl + f"compound_prompts_text.{deep}" in sd:
            deep += 1
        extra = {}
        for name, ours in (("proj.weight", "proj.weight"), ("proj.bias", "proj.bias")):
            extra[ours] = _saved(run, pl + name)
        for j in range(deep):
            extra[f"deep_text.{j}"] = _saved(run, pl + f"compound_prompts_text.{j}")
            for p in ("weight", "bias"):
                extra[f"deep_proj.{j}.{p}"] = _saved(run, pl + f"compound_prompt_projections.{j}.{p}")
        unknown = sorted(learned - {name for name, _, _ in extra.values()} - {pl + "ctx"})
        if unknown:
            raise CheckpointError(f"{run.path}: unexpected tensor {unknown[0]!r} in a MaPLe prompt learner (its deep "
                                  f"prompts must be numbered 0..J-2)")
        depth = config_get(run.config, "TRAINER.MAPLE.PROMPT_DEPTH")
        if depth is not None and depth != deep + 1:
            raise CheckpointError(f"{run.path}: {run.config_file} says PROMPT_DEPTH {depth}, the checkpoint holds "
                                  f"{deep} deep prompts (depth {deep + 1})")
        imported = dassl_context_import(cls, run, ctx=ctx, mapped=ctx[None, None], section="TRAINER.MAPLE",
                                        options={"depth": deep + 1}, extra_state=extra, class_position=False,
                                        counts_words=False)
        opts = imported.request["method_options"]
        if opts["n_ctx"] > 4:  # the original ignores CTX_INIT there: its context was random
            opts["init"] = None
        imported.checks.append(lambda m: check_frozen_towers(m.backbone, sd, run.path, {"text_encoder.": "",
                                                                                         "image_encoder.": "visual."}))
        return imported

    # -- prompts ---------------------------------------------------------------------------------------------
    def text_layer_prompts(self) -> TextLayerPrompts:
        """Before text block j (1 <= j < J): ``deep_text[j - 1]`` (n, D) at positions 1..n."""
        return TextLayerPrompts({j + 1: t for j, t in enumerate(self.deep_text)}, start=1)

    def vision_layer_prompts(self) -> VisionLayerPrompts:
        """Input: ``proj(ctx)`` (n, W) after the positional embedding; before vision block j (1 <= j < J):
        ``deep_proj[j - 1](deep_text[j - 1])`` (n, W)."""
        return VisionLayerPrompts(self.proj(self.prompt.ctx[0, 0]),
                                  {j + 1: lin(t) for j, (lin, t) in enumerate(zip(self.deep_proj, self.deep_text))})

    def text_features(self) -> torch.Tensor:
        """(K, E) class text features, not normalised: the shared prefix (<sot>, the context, the init's fixed
        words) once, each class's tokens attending to it."""
        prefix, suffix, eot = self.prompt.prompt_embeddings()  # (1, 1 + n, D), (K, S, D), (K,)
        f = self.shared_fixed
        if f:
            prefix = torch.cat([prefix, suffix[:1, :f]], dim=1)
            suffix = suffix[:, f:]
        return self.backbone.text.encode_prompts(prefix[0], suffix, eot, mode=self.config.text_mode,
                                                 chunk_size=self.config.chunk_size,
                                                 layer_prompts=self.text_layer_prompts())

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, E) image features of the prompted image tower, not normalised."""
        return self.backbone.encode_image(images, prompts=self.vision_layer_prompts(), grad=True)

    def forward(self, feats: Features) -> torch.Tensor:
        if feats.images is None:
            raise VLPromptError("MaPLe runs the image tower with its prompts: it needs images, not cached features")
        text = self.once_per_eval(self.text_features)
        return cosine_logits(self.image_features(feats.images), text, self.logit_scale)

    # -- classes ---------------------------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.prompt.set_classnames(classnames)  # first: a refused class list leaves the method unchanged
        self._check_fixed_words()
        super().set_classnames(classnames)

    def interpretable_vectors(self) -> list[tuple[dict, torch.Tensor]]:
        """The text context vectors (the deep prompts are hidden states, not token embeddings)."""
        return self.prompt.interpretable_vectors()

    def describe(self) -> dict:
        n = self.config.n_ctx
        words = {}
        init = self.prompt.init_words
        decode = getattr(self.backbone.tokenizer, "decode", None)
        if init and callable(decode):
            ids = self.backbone.text.tokenize([init])[0, 1:1 + self.init_tokens].tolist()
            words = {"learned_init_words": decode(ids[:n]).strip(), "fixed_init_words": decode(ids[n:]).strip()}
        return {"n_ctx": n, "depth": self.config.depth, **words, "text_width": self.text_width,
                "vision_width": self.vision_width,
                "learned_parameters": sum(p.numel() for p in self.trainable_parameters())}


def _saved(run, name: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    t = run.state.get(name)
    if t is None:
        raise CheckpointError(f"{run.path}: no {name} in the MaPLe checkpoint")
    return name, t, t


__all__ = ["MaPLeConfig", "MaPLe", "BASE2NEW", "CROSS_DATASETS"]
