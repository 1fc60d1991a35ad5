"""CLAP, the CLass-Adaptive linear Probe (Silva-Rodríguez et al., "A Closer Look at the Few-Shot Adaptation of
Large Vision-Language Models", CVPR 2024), and ZS-LP, its zero-shot-initialised linear probe (``--constraint
none``).

A linear probe of class prototypes ``w`` (K, E) started from the zero-shot class features ``t`` (K, E): logits
(B, K) = ``logit_scale * cos(image, w)``; loss = cross-entropy + ``mean_c lambda_c ||w_c - t_c||^2`` (CLAP's
penalty toward the zero-shot prototypes). The multipliers ``lambda_c`` are set once before training: the mean
zero-shot softmax probability of the true class over class c's augmented support features. The prototypes belong
to their classes.

What the original code (jusiro/CLAP @ dbdf4095, MIT; everything in ``trainers/adapters.py``, run by
``scripts/adapt.sh ... ZS l2`` for CLAP and ``ZS none`` for ZS-LP) computes, and vlprompt with it:

* ``t``: the plain MEAN of the UNnormalised text features of the templates, with the class names as Dassl reads
  them (underscores kept: adapters.py:91-128), ImageNet CoOp's 7 + "a photo of a {}.", other datasets their CoOp
  template (adapters.py:31-47, 112-116) -- the preset (no ``--clean-names``, ``--average raw``); ``t`` is saved with
  the prototypes (``base_text_features``) and the original evaluates with the saved one, as here;
* the support set is 20 augmented passes over the K-shot images (``epochs_aumentation``, adapters.py:142-143), the
  train augmentation of Dassl (RandomResizedCrop(224, scale 0.08-1) + flip), features not normalised: 20 cached
  views (``--views 20``) of the same augmentation, read whole by :meth:`CLAP.setup`;
* ``lambda_c`` (init_lagrangian_multipliers, adapters.py:232-252) from the logits that the model, as initialised,
  gives the 20 N support features (extract_features, adapters.py:788-827): the zero-shot prototypes for ZS-LP and
  CLAP; with ``--init random`` the random ones, as there. ``--multipliers`` gives its other rules (the substrings
  ``balanced``, ``corrected``, ``constant`` of CONSTRAINT); ``--constraint cosine`` uses ``1 - cos(w_c, t_c)``
  (adapters.py:219-230). Not supported: the ``adaptative`` outer step (no released script runs it);
* SGD lr 0.1, momentum 0.9, weight decay 0, batch 256, 300 epochs, Dassl's cosine per epoch after one constant
  warm-up epoch at 1e-5 counted inside the 300 (configs/trainers/SGD_lr1e-1_B256_ep300.yaml, Dassl defaults);
* an "epoch" of the original (run_epoch, adapters.py:431-456) is ``len(train_loader_x)`` steps -- the batches of
  256 that the N support IMAGES make (N // 256, or 1 when N < 256) -- each a slice of ONE fresh shuffle of the 20 N
  support features: an epoch sees about N of the 20 N features, and a batch can hold several views of one image.
  That is what produced its numbers, and ``--sampling pool`` (the preset) draws the batches that way from the 20
  cached views; ``--sampling images`` gives every image once per epoch instead;
* no validation and no selection: the model after the last epoch is the result (its per-step accuracy on the
  whole test set, adapters.py:711-724, is only logged there; vlprompt never looks at the test set in training);
* precision: fp16 text features, then fp32 with TF32 matmuls (adapters.py:24-27, 520): vlprompt computes in fp32;
* seeds 1, 2, 3 (scripts/adapt.sh:16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ConfigError, VLPromptError
from ..base import Batch, StepOutput, opt
from ..parts.handcrafted import ClassFeatureHead
from ..parts.options import ClassFeatureOptions
from ..parts.originals import check_trainer, class_features_import, config_get

#: CONSTRAINT of the released scripts: l2 (CLAP), none (ZS-LP); cosine is the code's other distance
CONSTRAINTS = ("l2", "cosine", "none")
#: init_lagrangian_multipliers' rules (adapters.py:232-252): the substrings of CONSTRAINT it looks for
MULTIPLIERS = ("zeroshot", "balanced", "corrected", "constant")


@dataclass
class CLAPConfig(ClassFeatureOptions):
    constraint: str = opt("l2", "penalty toward the zero-shot prototypes: l2 (CLAP: mean_c lambda_c ||w_c - t_c||^2), "
                          "cosine (lambda_c (1 - cos(w_c, t_c))) or none (ZS-LP: the zero-shot-initialised linear "
                          "probe)", choices=CONSTRAINTS)
    multipliers: str = opt("zeroshot", "lambda_c of the penalty: zeroshot (CLAP: the mean zero-shot probability of "
                           "the true class over the class's augmented support features), balanced (all 1), "
                           "corrected (zeroshot scaled to a mean of 1), constant (all the mean of zeroshot)",
                           choices=MULTIPLIERS)
    init: str = opt("zeroshot", "the prototypes start as the zero-shot class features (ZS-LP, CLAP) or random "
                    "(Kaiming normal: CLAP's plain linear-probe baseline)", choices=("zeroshot", "random"))

    def check(self) -> None:
        super().check()
        if self.constraint == "none" and self.multipliers != "zeroshot":
            raise ConfigError(f"clap: --multipliers {self.multipliers} weights the penalty, and --constraint none "
                              f"has none")


class CLAP(ClassFeatureHead):
    name = "clap"
    family = "adapters"
    config_class = CLAPConfig
    summary = "CLAP: zero-shot-initialised linear probe with a class-adaptive penalty (--constraint none: ZS-LP)"
    setup_reads = frozenset({"train_views"})
    original_format = "dassl"
    original_module = "adapter"  # adapters.py:524: register_model("adapter", ...)
    what = "a CLAP / ZS-LP linear probe"

    @classmethod
    def preset(cls, data) -> dict:
        """The recipe of ``scripts/adapt.sh`` (CONFIG ``SGD_lr1e-1_B256_ep300``, INIT ``ZS``, CONSTRAINT ``l2``):

        * SGD lr 0.1 (yaml line 16), momentum 0.9 and dampening 0 (Dassl's defaults), weight decay 0 (yaml line 17);
        * 300 epochs (line 18), cosine per epoch (line 19) after 1 constant warm-up epoch at 1e-5 (lines 20-22);
        * batch 256 (line 3); 20 augmented views of the support set (adapters.py:143), drawn as the original's
          epochs draw them (``sampling: pool``, adapters.py:431-456);
        * templates: ImageNet CoOp's 7 + the dataset's "a photo of a {}.", else the dataset's (adapters.py:31-47,
          112-116); names as the files spell them, unnormalised mean (adapters.py:91-128)."""
        return {"train": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256,
                          "epochs": 300, "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "views": 20,
                          "sampling": "pool"},
                "method_options": {
                    "templates": ["imagenet-select", "dataset"] if data.dataset == "imagenet" else ["dataset"],
                    "clean_names": False, "average": "raw", "constraint": "l2", "multipliers": "zeroshot",
                    "init": "zeroshot"}}

    def __init__(self, config: CLAPConfig, backbone, classnames, template=None, source_names=None):
        super().__init__(config, backbone, classnames, template=template, source_names=source_names)
        if config.init == "random":  # adapters.py:145-147: kaiming_normal_ of an empty (K, E) (torch's global RNG)
            start = nn.init.kaiming_normal_(torch.empty(tuple(self.base.shape))).to(self.base.device)
        else:  # adapters.py:148-150: a copy of the zero-shot class features
            start = self.base.clone()
        self.prototypes = nn.Parameter(start)
        #: lambda_c (K,), set by setup(); not saved: the evaluation does not use them
        self.multipliers: Optional[torch.Tensor] = None

    def classifier(self) -> torch.Tensor:
        return self.prototypes

    def setup(self, train, val) -> dict:
        """The multipliers from the logits of every cached augmented view of the support images (V, N, E) under the
        prototypes as initialised (init_lagrangian_multipliers on extract_features' logits, adapters.py:232-252,
        559-564)."""
        if self.config.constraint == "none":
            return {}
        labels = train.labels.to(self.base.device)
        lam = self.compute_multipliers(train.views().global_, labels)
        self.multipliers = lam
        return {"multipliers": {"min": float(lam.min()), "mean": float(lam.mean()), "max": float(lam.max())}}

    @torch.no_grad()
    def compute_multipliers(self, views: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """lambda (K,) of :attr:`CLAPConfig.multipliers` from features (V, N, E) of V views of the N support images
        with labels (N,): ``zeroshot`` is diag(softmax(logits)^T onehot) / counts, the mean probability of the true
        class over a class's V N features."""
        k = self.num_classes
        rule = self.config.multipliers
        if rule == "balanced":
            return torch.ones(k, device=self.base.device)
        counts = torch.bincount(labels, minlength=k).float() * views.shape[0]
        if bool((counts == 0).any()):
            missing = self.classnames[int((counts == 0).nonzero()[0, 0])]
            raise VLPromptError(f"clap: class {missing!r} has no training image, and its multiplier is the mean "
                                f"zero-shot probability over its images")
        total = torch.zeros(k, device=self.base.device)
        weights = F.normalize(self.prototypes.detach().float(), dim=-1)
        for v in range(views.shape[0]):  # a view at a time: V N K logits can be large (ImageNet: 320k x 1000)
            for i in range(0, views.shape[1], 4096):
                f = views[v, i:i + 4096].to(self.base.device).float()
                y = labels[i:i + 4096]
                logits = self.logit_scale * F.normalize(f, dim=-1) @ weights.t()
                p_true = logits.log_softmax(-1).gather(1, y[:, None]).squeeze(1).exp()
                total.index_add_(0, y, p_true)
        lam = total / counts
        if rule == "corrected":
            lam = lam * (k / lam.sum())
        elif rule == "constant":
            lam = torch.full_like(lam, float(lam.mean()))
        return lam

    def penalty(self) -> torch.Tensor:
        """``mean_c lambda_c d_c``: d_c = ||w_c - t_c||^2 (l2) or 1 - cos(w_c, t_c) (cosine), on the unnormalised
        prototypes and class features (zero_shot_constraint, adapters.py:219-230)."""
        if self.multipliers is None:
            raise VLPromptError("clap: the penalty's multipliers are set by setup(train, val) from the training "
                                "views; call it before training")
        if self.config.constraint == "l2":
            d = (self.prototypes - self.base).pow(2).sum(-1)
        else:
            d = 1 - F.cosine_similarity(self.prototypes, self.base)
        return (self.multipliers * d).mean()

    def training_step(self, batch: Batch) -> StepOutput:
        """Cross-entropy of the batch plus the penalty (forward_backward, adapters.py:698-707)."""
        logits = self(batch.feats)
        ce = F.cross_entropy(logits.float(), batch.labels)
        if self.config.constraint == "none":
            return StepOutput(ce, logits, {"ce": ce.detach()})
        pen = self.penalty()
        return StepOutput(ce + pen, logits, {"ce": ce.detach(), "penalty": pen.detach()})

    @classmethod
    def import_original(cls, run):
        """A jusiro/CLAP run (trainer ``ADAPTER``): ``adapter/model.pth.tar-300`` with ``prototypes`` and
        ``base_text_features`` (both (K, E)); INIT and CONSTRAINT from log.txt (``ZS`` / ``RANDOM``; ``none``, ``l2``,
        ``cosine`` and the multiplier rules; without a log.txt, CLAP's ``ZS l2``). The runs of its other baselines
        (ClipA, TipA, TR, CrossModal) and of the ``adaptative`` outer step are refused."""
        check_trainer(run, "ADAPTER", "clap")
        init = config_get(run.config, "TRAINER.ADAPTER.INIT", "ZS")
        constraint = str(config_get(run.config, "TRAINER.ADAPTER.CONSTRAINT", "l2"))
        enhanced = config_get(run.config, "TRAINER.ADAPTER.ENHANCED_BASE")
        where = run.config_file or run.path
        if init != "RANDOM" and ("ZS" not in str(init) or any(b in str(init) for b in ("TR", "ClipA", "TipA",
                                                                                        "CrossModal"))):
            raise CheckpointError(f"{where}: INIT {init} is not a CLAP or ZS-LP run (ZS, RANDOM)")
        if "adaptative" in constraint:
            raise CheckpointError(f"{where}: CONSTRAINT {constraint}: vlprompt's clap has no adaptative outer step")
        if enhanced not in (None, "none"):
            raise CheckpointError(f"{where}: an enhanced-base run (ENHANCED_BASE {enhanced}); vlprompt's clap builds "
                                  f"the regular base only")
        distance = "none" if constraint == "none" else "l2" if "l2" in constraint else \
            "cosine" if "cosine" in constraint else None
        if distance is None:
            raise CheckpointError(f"{where}: CONSTRAINT {constraint} is neither none, l2 nor cosine")
        if "balanced" in constraint or ("constant" in constraint and "corrected" in constraint):
            rule = "balanced"  # constant after corrected: every lambda is the mean of the corrected ones, 1
        else:
            rule = "constant" if "constant" in constraint else "corrected" if "corrected" in constraint else "zeroshot"
        options = {"init": "random" if init == "RANDOM" else "zeroshot", "constraint": distance,
                   "multipliers": rule if distance != "none" else "zeroshot"}
        return class_features_import(cls, run, learned="prototypes", saved_name="prototypes", options=options)
