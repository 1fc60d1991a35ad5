"""CLIP-LoRA (Zanella and Ben Ayed, arXiv:2405.18541, 2024): low-rank updates of the attention projections of both
towers, trained by cross-entropy on the hand-crafted prompt through the adapted text tower.

The computation of MaxZanella/CLIP-LoRA@358f0d7 (``loralib/layers.py`` ``LinearLoRA`` l.152-208,
``PlainMultiheadAttentionLoRA`` l.340-530, ``loralib/utils.py`` ``apply_lora`` l.107-134, ``lora.py`` ``run_lora``
l.35-148): each chosen projection (q, k, v by default; o, the output projection, with ``params``) of each chosen
block of each chosen tower computes ``W x + b + (alpha / sqrt(r)) B A dropout(x)``, A (r, d) and B (d, r) learned;
the class text features are the template's prompts ("a photo of a {}.") through the adapted text tower, recomputed
with gradients at every step; logits = 100 * cos(image, text) and cross-entropy. The backbone's own weights are used
as they are (:func:`vlprompt.backbone.patches.lora_applied` swaps the chosen attention modules for wrappers of
themselves for the duration of a call): no copy of a tower is made.

What the original does that produced its numbers, reproduced:

* the scaling alpha / sqrt(r) (``layers.py`` l.40-42; the alpha / r line is commented out): 0.7071 with r 2, alpha 1;
* dropout (0.25) on the INPUT of the low-rank branch only, one mask per projection, in training only (l.176-204),
  drawn on the sequence-first layout the original runs in: with ``text_mode plain`` (the whole 77-token prompts) the
  same RNG state drops the same entries as the original, text tower first, then the image tower, each block's q, k,
  v (then o) in turn. The default (``auto`` = ``cut``: the prompts up to their last end token, exact in evaluation)
  draws masks of the same distribution for the tokens that matter, not the same draws;
* the init: A ~ kaiming_uniform(a = sqrt(5)), B = 0 (``init_lora_param`` l.63-68), drawn from the global RNG in the
  original's order, with the five ``nn.Linear(d, d)`` each adapted attention constructs and overwrites before each
  A (l.361-364, l.163-165): from the same RNG state the same A as the original;
* the logit scale is the original's hard-coded 100 (``main.py`` l.22), not the model's;
* the template "a photo of a {}." for every dataset (its per-dataset templates sit commented out in
  ``datasets/*.py``; the maintainer, issue #1: only this template is used for CLIP-LoRA);
* the blocks: ``all`` of each tower by default; ``bottom`` / ``mid`` / ``up`` (thirds), ``half-bottom`` /
  ``half-up``, ``top3`` (the last three) are the original's tables (``loralib/utils.py`` l.10-44) for 12-block
  towers and ViT-L/14's 24 vision blocks, here computed from each tower's depth, so every open_clip ViT takes them
  (the original's tables have no entry for some backbone / position pairs and no ResNet: a KeyError there);
* the recipe (:meth:`CLIPLoRA.preset`): 500 x shots iterations of batch 32, the last batch of an epoch kept,
  AdamW (lr 2e-4, weight decay 1e-2), cosine per iteration down to 1e-6, no warm-up, no validation, the last
  iterate evaluated.

Not reproduced: the fp16 CLIP and fp16 autocast with a GradScaler of the original (here fp32 learned tensors,
autocast on GPU); evaluating with the update merged into the weights (here ``W x + s B A x``: the same numbers to
float rounding); its few-shot sampler (``random.sample`` per class, val before train, ``datasets/utils.py``
l.210-252): vlprompt's few-shot samplers draw other images for the same seed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ...backbone.patches import LoRA, lora_applied, tower_blocks
from ...data.templates import check_template
from ...errors import CheckpointError, ConfigError, DataError, VLPromptError
from ..base import Features, Method, MethodConfig, cosine_logits, opt
from ..parts.context import check_prompts_fit
from ..parts.handcrafted import class_text_features, format_prompts
from ..parts.originals import ImportedRun

#: the original's logit scale (``main.py`` l.22)
LOGIT_SCALE = 100.0
#: the original's template for every dataset (``datasets/*.py``: ``template[0]``)
TEMPLATE = "a photo of a {}."
#: the towers ``--encoder`` adapts, by the original's names
ENCODERS = {"text": ("text",), "vision": ("image",), "both": ("text", "image")}
#: the blocks of a tower ``--position`` adapts, as fractions of its depth (the original's tables for 12 blocks:
#: bottom 0-3, mid 4-7, up 8-11, half-bottom 0-5, half-up 6-11, top3 9-11, all 0-11; ViT-L/14's 24 vision blocks:
#: half-bottom 0-11, half-up 12-23, all 0-23)
POSITIONS = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top3")
PROJECTIONS = ("q", "k", "v", "o")
#: the original's saved names of the projections (``save_lora`` l.141-160)
SAVED_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
#: CLIP-LoRA's backbone folder names (``save_lora``: the name without "/" and "-", lower case) -> open_clip's
BACKBONE_TAGS = {"vitb16": "ViT-B-16", "vitb32": "ViT-B-32", "vitl14": "ViT-L-14", "vitl14@336px": "ViT-L-14-336"}


def position_blocks(position: str, depth: int) -> list[int]:
    """The block indices of a tower of ``depth`` blocks that ``position`` adapts."""
    third, half = depth // 3, depth // 2
    ranges = {"all": (0, depth), "bottom": (0, third), "mid": (third, 2 * third), "up": (2 * third, depth),
              "half-bottom": (0, half), "half-up": (half, depth), "top3": (max(depth - 3, 0), depth)}
    if position not in ranges:
        raise ConfigError(f"position (--position) must be one of {', '.join(POSITIONS)}, got {position!r}")
    lo, hi = ranges[position]
    return list(range(lo, hi))


@dataclass
class CLIPLoRAConfig(MethodConfig):
    rank: int = opt(2, "LoRA rank r", min=1)
    alpha: float = opt(1.0, "LoRA alpha: the update is scaled by alpha / sqrt(rank) (CLIP-LoRA's scaling)", gt=0)
    dropout: float = opt(0.25, "dropout rate on the input of the low-rank branch, in training (0: none)", min=0)
    encoder: str = opt("both", "the towers that get LoRA: text, vision or both", choices=tuple(ENCODERS))
    position: str = opt("all", "the blocks of each adapted tower: all, bottom / mid / up (thirds of the tower), "
                        "half-bottom / half-up, top3 (the last three)", choices=POSITIONS)
    params: list[str] = opt(default_factory=lambda: ["q", "k", "v"],
                            help="the attention projections that get LoRA: q, k, v and / or o (the output)")
    template: str = opt(TEMPLATE, "the prompt of each class ('{}': the class name), or 'dataset' for the "
                        "dataset's own prompt; CLIP-LoRA uses 'a photo of a {}.' for every dataset")
    text_mode: str = opt("auto", "text path of the adapted text tower: plain (the whole 77 tokens: the original's "
                         "dropout masks draw for draw), cut (up to the last end token: masks of the same "
                         "distribution, less work); auto = cut; evaluation is exact on both",
                         choices=("auto", "plain", "cut"))

    def check(self) -> None:
        if self.dropout >= 1:
            raise ConfigError(f"dropout (--dropout) must be below 1, got {self.dropout!r}")
        bad = [p for p in self.params if p not in PROJECTIONS]
        if bad or not self.params or len(set(self.params)) != len(self.params):
            raise ConfigError(f"params (--params) must name each of q, k, v, o at most once (at least one), got "
                              f"{self.params!r}")
        if self.template != "dataset":
            try:
                check_template(self.template)
            except DataError as e:
                raise ConfigError(f"template (--template): {e}") from e
        if self.encoder == "vision" and self.text_mode != "auto":
            raise ConfigError(f"text_mode (--text-mode) {self.text_mode}: with encoder vision the text tower is not "
                              f"adapted (its class features are computed once)")


class CLIPLoRA(Method):
    name = "clip-lora"
    family = "towers"
    config_class = CLIPLoRAConfig
    summary = ("LoRA on the attention projections of both towers (Zanella and Ben Ayed, 2024): the hand-crafted "
               "prompt through the adapted text tower, 500 x shots iterations")
    inputs = frozenset({"images"})
    head_kind = "prompt"
    uses_template = True
    template_field = "template"
    original_format = "clip-lora"

    @classmethod
    def input_kinds(cls, config: CLIPLoRAConfig) -> frozenset:
        """Images when the image tower is adapted; else its frozen features (cached)."""
        return frozenset({"images"}) if "image" in ENCODERS[config.encoder] else frozenset({"global"})

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return (dataset_template or TEMPLATE) if request == "dataset" else request

    @classmethod
    def preset(cls, data) -> dict:
        """CLIP-LoRA's recipe, the same for every dataset and number of shots (MaxZanella/CLIP-LoRA@358f0d7):
        ``--n_iters`` 500 x shots iterations (``run_utils.py`` l.29, ``lora.py`` l.73), ``--batch_size`` 32
        (``run_utils.py`` l.30; the loader keeps the last partial batch, ``datasets/utils.py`` l.354-375), AdamW
        lr 2e-4 (``run_utils.py`` l.28), weight decay 1e-2 (``lora.py`` l.75; issue #1: the first release's 1e2
        was a typo), betas and eps torch's defaults, ``CosineAnnealingLR(T_max = 500 x shots, eta_min 1e-6)``
        stepped every iteration (``lora.py`` l.76, l.122), no warm-up; the LoRA options' defaults are
        ``run_utils.py`` l.32-37 (encoder both, position all, params q k v, r 2, alpha 1, dropout 0.25). Its
        protocol is few-shot only (1-16 shots of all classes; no base-to-new, its issue #15, and no cross-dataset or
        domain-generalisation recipe was published): with all the training images (shots 0) no iteration count
        was published and ``--epochs`` or ``--iterations`` must say how long to train."""
        train = {"batch_size": 32, "last_batch": "keep", "optimizer": "adamw", "lr": 2e-4, "weight_decay": 1e-2,
                 "adam_eps": 1e-8, "scheduler": "cosine_step", "warmup_epochs": 0, "min_lr": 1e-6}
        if data.shots > 0:
            train["iterations"] = 500 * data.shots
        return {"train": train, "method_options": {}}

    def __init__(self, config: CLIPLoRAConfig, backbone, classnames: Sequence[str], template: Optional[str] = None):
        super().__init__(config, backbone, classnames)
        towers = ENCODERS[config.encoder]
        for tower in towers:
            backbone.require(f"lora_{tower}", "CLIP-LoRA")
        if "text" in towers:
            backbone.require("learned_prompts", "CLIP-LoRA")
        self.template_request = config.template
        self.template = self.expand_templates(config.template, template)
        self.towers = towers
        depth = {t: len(tower_blocks(backbone.model, t)) for t in towers}
        targets = {t: position_blocks(config.position, depth[t]) for t in towers}  # text first: the original's order
        self.blocks = [(t, i) for t in towers for i in targets[t]]  # the original's layer order (layer_<i>)
        with torch.random.fork_rng(devices=[]):  # A is drawn again below, in the original's order
            self.lora = LoRA(backbone.model, targets, config.params, rank=config.rank,
                             scale=config.alpha / math.sqrt(config.rank), dropout=config.dropout)
        self._draw_like_original(backbone)
        self.set_classnames(classnames)

    @torch.no_grad()
    def _draw_like_original(self, backbone) -> None:
        """A of every adapted projection from the global RNG as the original draws it: per adapted attention four
        ``nn.Linear(d, d)`` (q, k, v, out, overwritten), then per projection in ``params`` order one more (its
        ``LinearLoRA``) and A (``layers.py`` l.361-364, l.163-165, l.63-68)."""
        def linear(d):  # what nn.Linear(d, d) draws: weight, then bias
            nn.init.kaiming_uniform_(torch.empty(d, d), a=math.sqrt(5))
            nn.init.uniform_(torch.empty(d), -1 / math.sqrt(d), 1 / math.sqrt(d))

        for tower, i in self.blocks:
            d = tower_blocks(backbone.model, tower)[i].attn.embed_dim
            for _ in range(4):
                linear(d)
            for p in self.config.params:
                linear(d)
                a = torch.empty(self.config.rank, d)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.lora.factors[f"{tower}_{i}_{p}_A"].copy_(a)

    # -- the import of original runs ------------------------------------------------------------------------
    @classmethod
    def import_original(cls, run):
        """A CLIP-LoRA ``lora_weights.pt`` (``save_lora``, ``loralib/utils.py`` l.137-184): ``layer_<i>.<q_proj |
        k_proj | v_proj | proj>.w_lora_<A | B>`` for the i-th adapted attention (text blocks first), its metadata
        (r, alpha, encoder, params, position) as the options, and the shots, seed and backbone its save path names
        (``<backbone>/<dataset>/<shots>shots/seed<seed>/lora_weights.pt``)."""
        meta = run.config or {}
        opts = {}
        for key, ours in (("r", "rank"), ("alpha", "alpha"), ("encoder", "encoder"), ("params", "params"),
                          ("position", "position")):
            if key in meta:
                opts[ours] = list(meta[key]) if key == "params" else meta[key]
        if isinstance(opts.get("alpha"), int) and not isinstance(opts["alpha"], bool):
            opts["alpha"] = float(opts["alpha"])
        request: dict = {"data": {}, "train": {}, "method_options": opts}
        parts = Path(run.path).resolve().parts
        shots = re.fullmatch(r"(\d+)shots", parts[-3]) if len(parts) >= 3 else None
        seed = re.fullmatch(r"seed(\d+)", parts[-2]) if len(parts) >= 2 else None
        if shots and seed:  # save_lora's folders: <backbone>/<dataset>/<shots>shots/seed<seed>/
            request["data"]["shots"] = int(shots.group(1))
            request["seed"] = int(seed.group(1))
            if len(parts) >= 5 and parts[-5] in BACKBONE_TAGS:
                request["backbone"] = BACKBONE_TAGS[parts[-5]]
        layers = {}
        for name, t in run.state.items():
            m = re.fullmatch(r"layer_(\d+)\.(q_proj|k_proj|v_proj|proj)\.w_lora_([AB])", name)
            if m is None:
                raise CheckpointError(f"{run.path}: unexpected tensor {name!r} in a CLIP-LoRA file (known: "
                                      f"layer_<i>.<q_proj|k_proj|v_proj|proj>.w_lora_<A|B>)")
            layers.setdefault(int(m.group(1)), {})[(m.group(2), m.group(3))] = (name, t)
        if sorted(layers) != list(range(len(layers))):
            raise CheckpointError(f"{run.path}: the saved layers are not numbered 0..{len(layers) - 1}")

        def state_for(method) -> dict:
            if len(layers) != len(method.blocks):
                raise CheckpointError(
                    f"{run.path}: the file adapts {len(layers)} attention layers, the configured clip-lora "
                    f"{len(method.blocks)} on the backbone {method.backbone.name} (encoder {method.config.encoder}, "
                    f"position {method.config.position}): the run used another backbone or other options")
            saved = {SAVED_NAMES[p] for p in method.config.params}
            out = {}
            for j, (tower, i) in enumerate(method.blocks):
                names = {proj for proj, _ in layers[j]}
                if names != saved:
                    raise CheckpointError(f"{run.path}: layer_{j} holds {sorted(names)}, the configured params "
                                          f"{method.config.params} are {sorted(saved)}")
                for p in method.config.params:
                    for part in ("A", "B"):
                        name, t = layers[j][(SAVED_NAMES[p], part)]
                        out[f"lora.factors.{tower}_{i}_{p}_{part}"] = (name, t, t)
            return out

        # without save_lora's folders, the shots must be given (the import's request says so)
        return ImportedRun(cls.name, run.path, {}, request, run.info, prepare=state_for)

    # -- classes ---------------------------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str]) -> None:
        prompts = format_prompts(self.template, classnames)
        if "text" in self.towers:
            te = self.backbone.text
            check_prompts_fit(te.tokenizer, prompts, te.context_length, what="prompt")
            tokens = te.tokenize(prompts)
            embeddings, eot, fixed = te.embed(tokens), te.eot_positions(tokens), None
        else:  # the text tower is not adapted: the original's clip_classifier, once
            embeddings = eot = None
            fixed = class_text_features(self.backbone, list(classnames), [self.template])
        super().set_classnames(classnames)
        self.register_buffer("token_embeddings", embeddings, persistent=False)  # (K, L, D)
        self.register_buffer("eot", eot, persistent=False)  # (K,)
        self.register_buffer("class_text", fixed, persistent=False)  # (K, E) normalised

    @property
    def logit_scale(self) -> float:
        return LOGIT_SCALE

    # -- features --------------------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """(K, E) class text features (not normalised) through the adapted text tower; call it inside
        :func:`lora_applied`."""
        if self.class_text is not None:
            return self.class_text
        # auto: cut where the tower is causal (every CLIP text tower), else plain
        return self.backbone.text(self.token_embeddings, self.eot, mode=self.config.text_mode, chunk_size=None)

    def forward(self, feats: Features) -> torch.Tensor:
        with lora_applied(self.backbone.model, self.lora, training=self.training):
            text = self.once_per_eval(self.text_features)  # first: the original's order of dropout draws
            if "image" in self.towers:
                if feats.images is None:
                    raise VLPromptError("clip-lora adapts the image tower: it needs images, not cached features")
                image = self.backbone.encode_image(feats.images, grad=True)
            else:
                image = feats.global_
        return cosine_logits(image.float(), text.float(), LOGIT_SCALE)

    def describe(self) -> dict:
        return {"template": self.template, "scale": self.lora.scale, "adapted_blocks": {
            t: [i for tower, i in self.blocks if tower == t] for t in self.towers},
            "learned_parameters": sum(p.numel() for p in self.trainable_parameters())}


__all__ = ["CLIPLoRAConfig", "CLIPLoRA", "position_blocks", "LOGIT_SCALE", "TEMPLATE"]
