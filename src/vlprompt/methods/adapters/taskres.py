"""TaskRes (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023): a learned residual added to
the hand-crafted text classifier.

The classifier is ``t + alpha * x`` with ``t`` (K, E) the class features of hand-crafted prompts (frozen) and ``x``
(K, E) the task residual, zeros at the start (so training starts from zero-shot CLIP); logits (B, K) =
``logit_scale * cos(image, t + alpha * x)``, cross-entropy. Only ``x`` is learned; it belongs to its classes.

What the original code (geekyutao/TaskRes @ 5195359, ``trainers/taskres.py``) computes, and vlprompt with it:

* the base ``t`` is the plain MEAN of the UNnormalised text features of the templates (``torch.stack(...)
  .mean(1)``, taskres.py:140, never renormalised: the residual is added to vectors of CLIP's own norm), with the
  class names as Dassl reads them: underscores kept, no ``replace("_", " ")`` (taskres.py:134: "a photo of a
  american_pit_bull_terrier, a type of pet."). The preset does both (``--average raw``, no ``--clean-names``);
  ``--clean-names`` and ``--average normalised`` give the cleaned names and CLIP's normalised ensembling;
* the templates: ImageNet CoOp's 7 (``IMAGENET_TEMPLATES_SELECT``) + "a photo of a {}." (taskres.py:125-129), every
  other dataset its CoOp template alone (taskres.py:32-48 = CoOp's table). Not reproduced: the list is extended in
  place on the imported module, so a SECOND ImageNet build in one process would count the custom template twice;
  one run builds once;
* ``alpha`` (``TRAINER.TaskRes.RESIDUAL_SCALE``) 0.5, OxfordFlowers 1.0 (train_regular.sh);
* Adam with Dassl's L2 weight decay 5e-4 added to the gradient (torch's Adam ``weight_decay``, not AdamW; it pulls
  ``x`` toward 0), lr 2e-3 (ImageNet 2e-4), batch 256, 100 epochs for 1 / 2 / 4 shots and 200 for 8 / 16,
  Dassl's cosine per epoch after one constant warm-up epoch at 1e-5 (configs/trainers/TaskRes/adam_lr*_B256_ep*
  .yaml; Dassl's defaults); the model after the last epoch is tested (no selection);
* the saved run holds ``base_text_features`` and the evaluation uses the saved one (the loader deletes only
  token_prefix / suffix, taskres.py:337-342): ``base`` is saved with the residual here too, so evaluation, export
  and import use the base the residual was learned on; ImageNet-A / -R take the rows of their 200 classes by name
  (taskres.py:326-333, the first ImageNet class of each name), any other class list is refused;
* precision: the base is computed by the fp16 CLIP on CUDA, then everything trains in fp32 (``self.model.float()``,
  taskres.py:255, through the bare ``except`` of l.199-202) with TF32 matmuls (l.25-28): vlprompt computes in fp32;
* its seed: one (``SEED=1``, scripts/taskres/main.sh:14); the protocols run seeds 1, 2, 3;
* not supported: the "enhanced base" (``--enhanced-base``, a text projection trained separately and shared as
  files on Google Drive; silently the regular base unless CLIP is fp16, taskres.py:146-158): an import of such a
  run is refused.

The original trains on images augmented at every step; vlprompt's default draws cached augmented views
(``--online`` augments at every step, as the original).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CheckpointError
from ..base import opt
from ..parts.handcrafted import ClassFeatureHead
from ..parts.options import ClassFeatureOptions
from ..parts.originals import check_trainer, class_features_import, config_get

#: ``TRAINER.TaskRes.RESIDUAL_SCALE`` in train_regular.sh: 0.5, OxfordFlowers 1.0 (all shots)
ALPHA, ALPHA_FLOWERS = 0.5, 1.0


@dataclass
class TaskResConfig(ClassFeatureOptions):
    alpha: float = opt(ALPHA, "residual scale: the classifier is base + alpha * residual (the paper's recipe 0.5, "
                       "Flowers 1.0)", gt=0)


def imagenet(dataset: str) -> bool:
    return dataset == "imagenet"


class TaskRes(ClassFeatureHead):
    name = "taskres"
    family = "adapters"
    config_class = TaskResConfig
    summary = "TaskRes: a learned residual (from 0) on the hand-crafted text classifier, class-specific"
    original_format = "dassl"
    what = "a TaskRes residual"

    @classmethod
    def preset(cls, data) -> dict:
        """TaskRes' few-shot recipe (train_regular.sh, configs/trainers/TaskRes/adam_lr2e-3_B256_ep100.yaml and its
        ``_ep200`` / ``lr2e-4`` variants; Dassl's defaults for what they leave unset):

        * Adam (``OPTIM.NAME adam``, yaml line 18) with Dassl's weight decay 5e-4 as L2 (defaults.py ``WEIGHT_DECAY``;
          optimizer.py builds ``torch.optim.Adam(weight_decay=)``), betas (0.9, 0.999) and eps 1e-8 (torch's);
        * lr 2e-3, ImageNet 2e-4 (train_regular.sh picks ``adam_lr2e-4_B256_ep200`` for ImageNet; yaml line 19);
        * epochs 100 for 1 / 2 / 4 shots, 200 for 8 / 16 (the ``_ep100`` / ``_ep200`` configs the script picks by
          shots, yaml line 20); all images (shots 0): 200;
        * batch 256 (yaml line 3), cosine with one constant warm-up epoch at 1e-5 (yaml lines 21-24);
        * alpha 0.5, OxfordFlowers 1.0 (train_regular.sh ``RESIDUAL_SCALE``);
        * templates: ImageNet CoOp's 7 + the dataset's "a photo of a {}." (taskres.py:125-129), else the dataset's
          (CoOp's table); names as the files spell them, unnormalised mean (taskres.py:134, 140)."""
        epochs = 100 if 0 < data.shots <= 4 else 200
        lr = 2e-4 if imagenet(data.dataset) else 2e-3
        return {"train": {"optimizer": "adam", "lr": lr, "weight_decay": 5e-4, "adam_eps": 1e-8, "batch_size": 256,
                          "epochs": epochs, "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5},
                "method_options": {
                    "alpha": ALPHA_FLOWERS if data.dataset == "oxford_flowers" else ALPHA,
                    "templates": ["imagenet-select", "dataset"] if imagenet(data.dataset) else ["dataset"],
                    "clean_names": False, "average": "raw"}}

    def __init__(self, config: TaskResConfig, backbone, classnames, template=None, source_names=None):
        super().__init__(config, backbone, classnames, template=template, source_names=source_names)
        self.residual = nn.Parameter(torch.zeros_like(self.base))  # taskres.py:98: zeros, (K, E)

    def classifier(self) -> torch.Tensor:
        """(K, E): ``base + alpha * residual`` (TaskResLearner.forward, taskres.py:100-101)."""
        return self.base + self.config.alpha * self.residual

    @classmethod
    def import_original(cls, run):
        """A geekyutao/TaskRes run: ``prompt_learner/model.pth.tar-N`` with ``text_feature_residuals`` and
        ``base_text_features`` (both (K, E)); alpha from ``TRAINER.TaskRes.RESIDUAL_SCALE`` in log.txt (without
        it, ``--alpha`` must say it). An enhanced-base run is refused: its base comes from a separately trained
        projection."""
        check_trainer(run, "TaskRes", "taskres")
        enhanced = config_get(run.config, "TRAINER.TaskRes.ENHANCED_BASE")
        if enhanced not in (None, "none"):
            raise CheckpointError(f"{run.path}: an enhanced-base TaskRes run ({run.config_file} says ENHANCED_BASE "
                                  f"{enhanced}); vlprompt's taskres builds the regular base only")
        options = {}
        alpha = config_get(run.config, "TRAINER.TaskRes.RESIDUAL_SCALE")
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            options["alpha"] = float(alpha)
        imported = class_features_import(cls, run, learned="residual", saved_name="text_feature_residuals",
                                         options=options)
        if "alpha" not in options:  # the tensors do not tell it, and it scales the residual
            imported.required = ("alpha",)
        return imported
