"""PromptSRC, prompting with self-regulating constraints (Khattak et al., ICCV 2023): IVLP's prompts in both towers,
regularised toward the frozen CLIP, and averaged over epochs.

The original: muzairkhattak/PromptSRC@bb95c77 ``trainers/promptsrc.py`` (``VLPromptLearner`` l.72-170,
``CustomCLIP`` l.173-211, the trainer l.214-401) on the IVLP blocks of ``clip/model.py`` (the layout, word init and
prompt init of :mod:`..parts.deep`, as IVLP). What it does that produced its numbers, reproduced:

* the loss (``forward_backward`` l.297-313): cross-entropy
  + ``text_loss_weight`` (25) * mean |norm(prompted text) - norm(teacher)| over K * E (``F.l1_loss``)
  + ``image_loss_weight`` (10) * mean |norm(prompted image) - norm(frozen image)| over B * E
  + sum_{b,k} p_zs (log p_zs - log p) / (B * K): the KL divergence from the zero-shot logits'
  distribution, summed and divided by the number of logits (``kl_div(..., reduction="sum", log_target=True) /
  logits.numel()``, T = 1), i.e. the batch-mean KL divided by the number of classes;
* the text teacher (l.113-128): for each of 60 ImageNet templates (``trainers/imagenet_templates.py`` l.3-64) the
  frozen tower's UNNORMALISED features of every class, averaged over the templates and normalised afterwards
  (not CLIP's ensembling, which normalises each first); zero-shot logits = exp(logit_scale) * norm(frozen image)
  @ norm(teacher)^T (l.199-206);
* the frozen image features are those of the very augmented view the prompted tower sees (l.202): here they come
  from the feature cache (the view's cached features, :class:`vlprompt.engine.sources.PairedViews`) instead of a
  second image tower run at every step; ``--online`` augments afresh every step and encodes the frozen features
  then, as the original;
* Gaussian prompt aggregation (l.262-270, l.320-335): after each epoch e the learned prompts times
  w_e = N(e; gpa_mean, gpa_std), normalised over e = 1..epochs, are added to a running sum (previous + current,
  l.348-356), and after the last epoch the prompts become that sum. The sum is training state (saved in every
  checkpoint: a resumed run continues it exactly; the original restarts its counter).

Documented, not reproduced: the original averages the WHOLE state dict in each tensor's dtype (l.338-356), so
the fp16 frozen CLIP weights (and its fp16 context) move by about one ulp: an fp16 artefact; here only the learned
prompts are averaged, in fp32. The original's amp and fp32 paths fail (l.289-295, l.202); its fp16 context is
updated without loss scaling. ``--max-steps`` ending training before the last epoch leaves the prompts
un-aggregated (the average is of completed epochs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import CheckpointError
from ..base import StepOutput, opt
from ..parts.context import check_prompts_fit, clean_classname
from ..parts.deep import DeepPromptMethod, DeepTextOptions, VisionPromptOptions, dassl_tower_import
from ..parts.recipes import DASSL_SGD

#: the teacher's 60 templates, muzairkhattak/PromptSRC ``trainers/imagenet_templates.py`` l.3-64 (a subset of CLIP's
#: 80 ImageNet templates, in the original's order)
TEACHER_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)

#: few-shot GPA (mean, std) by dataset: ``configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml``
#: l.42-47 (30 / 30 active "for ImageNet, Caltech101, OxfordPets, Food101, UCF101 and SUN397", 45 / 5 in a comment
#: "for StanfordCars, Flowers102, FGVCAircraft, DTD and EuroSAT"); other datasets get the active 30 / 30
FEW_SHOT_GPA = {"stanford_cars": (45.0, 5.0), "oxford_flowers": (45.0, 5.0), "fgvc_aircraft": (45.0, 5.0),
                "dtd": (45.0, 5.0), "eurosat": (45.0, 5.0)}


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """w_e = N(e; mean, std) / sum_e' N(e'; mean, std) for e = 1..epochs (the original's ``get_gauss`` and its
    normalisation, l.265-270, l.358-360); the normalising constant of the density cancels, and the exponents are
    shifted by their maximum so that no weight underflows to 0 / 0. Entry e - 1 weighs the prompts after epoch e."""
    z = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(z)
    g = [math.exp(v - top) for v in z]
    total = sum(g)
    return [v / total for v in g]


@dataclass
class PromptSRCConfig(DeepTextOptions, VisionPromptOptions):
    """Defaults: the original's ``train.py`` (l.113-125: 4 + 4 prompts, depth 9 / 9, "a photo of a", weights 25 /
    10, GPA 15 / 1); the published recipes are the preset."""

    n_ctx: Optional[int] = opt(4, "text context vectors M (also the tokens of every deep text prompt): the first M "
                               "tokens of --init are learned, the init's further tokens stay a fixed part of every "
                               "prompt (--init-length n_ctx); M random vectors without --init", min=1)
    n_ctx_vision: int = opt(4, "vision prompt tokens appended after the image tower's positional embedding (and "
                            "replaced by new ones at each deeper prompted block)", min=1)
    vision_depth: int = opt(9, "image layers carrying prompts, counting the input: the appended tokens, then new "
                            "ones replacing them before blocks 1..depth-1 (at most the tower's layers)", min=1)
    text_loss_weight: float = opt(25.0, "weight of the L1 distance of the prompted class text features to the "
                                  "teacher's (the mean of 60 templates' frozen features)", min=0)
    image_loss_weight: float = opt(10.0, "weight of the L1 distance of the prompted image features to the frozen "
                                   "tower's features of the same view", min=0)
    gpa_mean: float = opt(15.0, "Gaussian prompt aggregation: mean epoch of the weights N(e; mean, std) of the "
                          "prompts after each epoch e")
    gpa_std: float = opt(1.0, "Gaussian prompt aggregation: standard deviation of the weights, in epochs", gt=0)


class PromptSRC(DeepPromptMethod):
    name = "promptsrc"
    config_class = PromptSRCConfig
    summary = ("IVLP's prompts in both towers regularised toward the frozen CLIP (L1 to the 60-template teacher "
               "text and to the frozen image features, KL to zero-shot logits) and averaged over epochs")
    inputs = frozenset({"images", "global"})  # the images, and the frozen tower's cached features of the same view
    eval_inputs = frozenset({"images"})

    @classmethod
    def input_kinds(cls, config) -> frozenset:
        return frozenset(cls.inputs)

    @classmethod
    def eval_input_kinds(cls, config) -> frozenset:
        return frozenset(cls.eval_inputs)

    @classmethod
    def preset(cls, data) -> dict:
        """The published recipes, muzairkhattak/PromptSRC ``configs/trainers/PromptSRC/``; all: ViT-B/16 configs,
        N_CTX_TEXT 4, N_CTX_VISION 4, CTX_INIT "a photo of a", TEXT_LOSS_WEIGHT 25, IMAGE_LOSS_WEIGHT 10 (l.34-41),
        SGD lr 0.0025, cosine, one constant warm-up epoch at 1e-5 (l.16-24), batch 4 (l.4); momentum 0.9 and weight
        decay 5e-4 are Dassl's defaults. By the data:

        * base / new classes: base-to-new, ``vit_b16_c2_ep20_batch4_4+4ctx.yaml``: depth 9 / 9, 20 epochs,
          GPA_MEAN 15, GPA_STD 1 (l.38-43);
        * ImageNet, all classes, 16 shots: the source training of the cross-dataset and domain-generalisation
          protocols, ``vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml``: depth 3 / 3, 20 epochs, GPA 6 / 10
          (``scripts/promptsrc/reproduce_xd.sh``);
        * any other all-class data: few-shot, ``vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml``: depth 9 / 9, 50
          epochs, GPA 30 / 30, or 45 / 5 for StanfordCars, Flowers102, FGVCAircraft, DTD and EuroSAT (l.42-47,
          :data:`FEW_SHOT_GPA`). ImageNet's 16-shot few-shot run is the cross-dataset one's data: give it
          ``--text-depth 9 --vision-depth 9 --epochs 50 --gpa-mean 30 --gpa-std 30`` (the few-shot grid does)."""
        common = {"n_ctx": 4, "n_ctx_vision": 4, "init": "a photo of a", "init_length": "n_ctx",
                  "text_loss_weight": 25.0, "image_loss_weight": 10.0}
        train = {**DASSL_SGD, "lr": 0.0025, "batch_size": 4}
        if data.classes in ("base", "new"):
            return {"train": {**train, "epochs": 20},
                    "method_options": {**common, "text_depth": 9, "vision_depth": 9, "gpa_mean": 15.0,
                                       "gpa_std": 1.0}}
        if "imagenet" in data.dataset.lower() and data.shots == 16:
            return {"train": {**train, "epochs": 20},
                    "method_options": {**common, "text_depth": 3, "vision_depth": 3, "gpa_mean": 6.0,
                                       "gpa_std": 10.0}}
        mean, std = FEW_SHOT_GPA.get(data.dataset, (30.0, 30.0))
        return {"train": {**train, "epochs": 50},
                "method_options": {**common, "text_depth": 9, "vision_depth": 9, "gpa_mean": mean, "gpa_std": std}}

    @classmethod
    def import_original(cls, run):
        """A PromptSRC run (``<output>/VLPromptLearner/model.pth.tar-<epoch>``, trainer PromptSRC, TRAINER.PROMPTSRC):
        the GPA-averaged context, deep text prompts and vision prompts (the frozen ZS image encoder it also saved is
        checked against the backbone like the other frozen weights), and the loss weights and GPA of its config."""
        return dassl_tower_import(cls, run, trainer="PromptSRC", section="TRAINER.PROMPTSRC", vision=True,
                                  config_options={"text_loss_weight": "TEXT_LOSS_WEIGHT",
                                                  "image_loss_weight": "IMAGE_LOSS_WEIGHT",
                                                  "gpa_mean": "GPA_MEAN", "gpa_std": "GPA_STD"})

    def __init__(self, config: PromptSRCConfig, backbone, classnames: Sequence[str]):
        super().__init__(config, backbone, classnames)
        self._teacher: Optional[torch.Tensor] = None
        self._gpa: dict[str, torch.Tensor] = {}

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self._teacher = None

    # -- the teacher ----------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_text(self) -> torch.Tensor:
        """(K, E) normalised: the mean over :data:`TEACHER_TEMPLATES` of the frozen tower's unnormalised class text
        features, normalised (computed on first use, once per class list)."""
        if self._teacher is None:
            names = [clean_classname(c) for c in self.classnames]
            prompts = [template.format(n) for template in TEACHER_TEMPLATES for n in names]  # template-major
            check_prompts_fit(self.backbone.tokenizer, prompts, self.backbone.text.context_length,
                              what="teacher prompt")
            feats = self.backbone.encode_text(prompts).float().view(len(TEACHER_TEMPLATES), len(names), -1)
            self._teacher = F.normalize(feats.mean(dim=0), dim=-1)
        return self._teacher

    # -- the step ---------------------------------------------------------------------------------------
    def training_step(self, batch) -> StepOutput:
        feats = batch.feats
        text = F.normalize(self.text_features().float(), dim=-1)  # (K, E)
        image = F.normalize(self.image_features(feats).float(), dim=-1)  # (B, E)
        zs_text = self.teacher_text()
        zs_image = F.normalize(feats.global_.float(), dim=-1)  # the frozen tower on the same view (cached)
        scale = self.logit_scale
        logits = scale * image @ text.t()
        zs_logits = scale * zs_image @ zs_text.t()
        ce = F.cross_entropy(logits, batch.labels)
        scl_text = F.l1_loss(text, zs_text) * self.config.text_loss_weight
        scl_image = F.l1_loss(image, zs_image) * self.config.image_loss_weight
        scl_logits = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1), reduction="sum",
                              log_target=True) / logits.numel()
        loss = ce + (scl_logits + scl_text + scl_image)
        return StepOutput(loss, logits, {"ce": ce.detach(), "scl_text": scl_text.detach(),
                                         "scl_image": scl_image.detach(), "scl_logits": scl_logits.detach()})

    # -- Gaussian prompt aggregation ------------------------------------------------------------------
    def _prompts(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def on_train_epoch_end(self, epoch: int, epochs: int) -> None:
        w = gpa_weights(epochs, self.config.gpa_mean, self.config.gpa_std)[epoch - 1]
        for name, p in self._prompts().items():
            weighted = p.detach() * w
            self._gpa[name] = weighted if name not in self._gpa else self._gpa[name] + weighted
        if epoch == epochs:  # the prompts become their weighted average over the epochs
            for name, p in self._prompts().items():
                p.copy_(self._gpa[name])

    def training_state(self) -> dict[str, torch.Tensor]:
        return {f"gpa.{name}": t for name, t in self._gpa.items()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        prompts = self._prompts()
        gpa = {}
        for key, t in state.items():
            name = key[len("gpa."):] if key.startswith("gpa.") else None
            if name not in prompts or tuple(t.shape) != tuple(prompts[name].shape):
                raise CheckpointError(f"promptsrc: the checkpoint's training state {key!r} {tuple(t.shape)} is not "
                                      f"the running sum of one of its prompts")
            gpa[name] = t.to(prompts[name].device, prompts[name].dtype)
        self._gpa = gpa

    def describe(self) -> dict:
        return {**super().describe(), "teacher_templates": len(TEACHER_TEMPLATES)}
