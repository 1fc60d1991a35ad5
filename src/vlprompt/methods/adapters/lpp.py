"""LP++ (Huang et al., CVPR 2024), as FereshteShakeri/FewShot-CLIP-Strong-Baseline@f81054f computes it
(``methods/linear_probe_p2.py``, ``methods/utils.py``, ``main.py``, ``configs/base.yaml``).

A linear probe blended, class by class, with the zero-shot classifier. For a normalised image feature f (B, E):

    logits = f W^T + b + alpha * (f T^T)          (linear_probe_p2.py:127-129; no logit scale)

T (K, E): the zero-shot classifier (Tip-Adapter's: each template's text feature normalised, averaged,
renormalised; ``utils.py:35-52``); W (K, E), b (K,), alpha (1, K) learned.

What the original does that produced its numbers, each reproduced (file:line at f81054f):

* the support features are AUGMENTED: one pass of the train loader, RandomResizedCrop(224, scale (0.5, 1)) +
  flip, encoded once and L2-normalised (``main.py:69-74,96-101``, ``linear_probe_p2.py:70-79``): the method's
  data default ``crop_scale`` and the recipe's one cached view (``views 1``), read by :meth:`LPP.setup` and by
  every step alike;
* W starts as the class SUMS of the support features (``methods/utils.py:111-124``: the division by the counts is
  commented out); b KEEPS nn.Linear's random default init, U(-1/sqrt(E), 1/sqrt(E)) (``linear_probe_p2.py:94-97``):
  the head is built as ``nn.Linear(E, K)`` so that it draws the bias from the run's seeded RNG as there;
* every alpha_c starts at 250 x the mean over classes of the mean own-class zero-shot cosine f_i . t_c of the
  class's support images (``linear_probe_p2.py:24-30``, ``methods/utils.py:96-108``);
* full-batch steps (``train_epoch`` 300 steps on all the support features: ``configs/base.yaml:17``,
  ``linear_probe_p2.py:123-135``; ``batch_size 0``) of SGD with momentum 0.9, no weight decay, constant step
  size lr_w = 4N / lambda_max(F^T F) (``linear_probe_p2.py:32-39,116``), N the support images;
* alpha is not in the optimizer: every 10th step ``alpha -= lr_alpha * alpha.grad`` with lr_alpha =
  N / (4 max_c ||F t_c||^2) (``linear_probe_p2.py:16-22``) and a gradient that is NEVER ZEROED
  (``linear_probe_p2.py:107,137-139``): the running sum of every step's gradient so far. Here alpha sits in the
  optimizer at step size 0 (so that the trainer sums, unscales and zeroes its gradient as every other), and
  :meth:`LPP.on_before_optimizer_step` adds each step's gradient to that running sum (``alpha_grad_sum``,
  checkpointed: a resumed run goes on exactly) and moves alpha every 10th step;
* the step kept is the one with the best val accuracy, ties to the LATER step (``>=``, ``linear_probe_p2.py:148``):
  ``selection() = ("accuracy", "max", "last")`` with the val split evaluated after every step. The original's val
  is K-shot (``main.py:94``); vlprompt's is CoOp's min(K, 4) per class (``--val-shots K`` gives the original's);
  ImageNet, without a val split here (the original takes K further TRAIN images, with the train augmentation:
  ``datasets/imagenet.py:226-254``), keeps the last step;
* ``train.lr`` multiplies both data-derived step sizes (1, the recipe: the original's); the head's follows the
  schedule (the recipe's is constant).

Not reproduced: the original's fp16 (features, head, alpha, the step sizes, F^T F formed in fp16 before
``scipy.linalg.eigh``: precision artefacts of its CUDA CLIP); lambda_max here comes from F^T F in float64.
Its ten "tasks" are ten seeds (``main.py:89-94``): vlprompt's seeds. LP++ saves no weights
(``linear_probe_p2.py:156`` is commented out): there is nothing of it to import.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.templates import DEFAULT_TEMPLATE, resolve_templates
from ...errors import ConfigError, VLPromptError
from ..base import Features, Method, opt
from ..parts.handcrafted import class_text_features
from ..parts.options import HandCraftedOptions
from ..parts.recipes import tip_adapter_templates

#: linear_probe_p2.py:28: alpha_init = 250 / shots * (shots * mean own-class cosine)
ALPHA_INIT_SCALE = 250.0
#: linear_probe_p2.py:138: alpha moves on every 10th step
ALPHA_EVERY = 10


@dataclass
class LPPConfig(HandCraftedOptions):
    alpha_every: int = opt(ALPHA_EVERY, "move the blending weights alpha every N steps (by the running sum of all "
                           "their gradients so far, as the original)", min=1)


class LPP(Method):
    name = "lpp"
    family = "adapters"
    config_class = LPPConfig
    summary = ("LP++: a linear probe blended per class with the zero-shot classifier, initialised from the class "
               "sums, full-batch steps with data-derived step sizes, the step kept on the val split")
    setup_reads = frozenset({"train_views"})
    uses_template = True
    template_field = "templates"
    head_kind = "prompt"

    @classmethod
    def data_defaults(cls) -> dict:
        return {"crop_scale": [0.5, 1.0]}  # main.py:69-74: RandomResizedCrop(224, scale=(0.5, 1))

    @classmethod
    def preset(cls, data) -> dict:
        """configs/base.yaml: 300 full-batch steps (train_epoch, l.17); linear_probe_p2.py:116: SGD, momentum 0.9,
        no weight decay, constant step size (lr 1: the data-derived lr_w as it is, no warm-up); the step kept on
        val after every step (l.141-155); one augmented view of each support image (main.py:96-101); Tip-Adapter's
        prompts (utils.py:35-52, datasets/*.py). Checkpoints every 10 steps (a full-batch step costs little)."""
        return {"method_options": {"templates": tip_adapter_templates(data.dataset)},
                "train": {"epochs": 300, "batch_size": 0, "optimizer": "sgd", "lr": 1.0, "momentum": 0.9,
                          "weight_decay": 0.0, "scheduler": "constant", "warmup_epochs": 0, "eval_every": 1,
                          "views": 1, "checkpoint_every": 10}}

    @classmethod
    def check_recipe(cls, config, train) -> None:
        if train is not None and train.online:
            raise ConfigError("--online does not apply to lpp: its support features are encoded once (the step "
                              "sizes and the init come from them), as the original does")
        if train is not None and train.augment and train.views != 1:
            raise ConfigError(f"--views {train.views} does not apply to lpp: its support set is one augmented view "
                              f"of each image, encoded once (--views 1)")

    @classmethod
    def expand_templates(cls, request, dataset_template):
        return resolve_templates(request, dataset_template or DEFAULT_TEMPLATE)

    def __init__(self, config: LPPConfig, backbone, classnames: Sequence[str], template: Optional[str] = None):
        super().__init__(config, backbone, classnames)
        self.template_request = list(config.templates)
        self.templates = self.expand_templates(config.templates, template)
        self.config = dataclasses.replace(config, templates=list(self.templates))
        dev, e, k = backbone.device, backbone.embed_dim, len(self.classnames)
        self.register_buffer("zeroshot", class_text_features(backbone, self.classnames, self.templates).float(),
                             persistent=False)  # (K, E): the original's clip_weights, transposed
        # built as the original builds it (linear_probe_p2.py:96): its weight is replaced in setup, its bias stays
        # nn.Linear's random init, drawn from the run's seeded RNG
        self.linear = nn.Linear(e, k, device=dev)
        self.alpha = nn.Parameter(torch.ones(1, k, device=dev))
        self.register_buffer("alpha_grad_sum", torch.zeros(1, k, device=dev), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=dev), persistent=False)
        self.lr_w: Optional[float] = None
        self.lr_alpha: Optional[float] = None
        self._lr = 1.0

    def setup(self, train, val) -> dict:
        """The head, alpha and both step sizes from the support features (one augmented view per image)."""
        views = train.views().global_  # (V, N, E)
        feats = F.normalize(views[0].float().to(self.zeroshot.device), dim=-1)
        labels = train.labels.to(feats.device)
        k = self.num_classes
        counts = torch.bincount(labels, minlength=k)
        if bool((counts == 0).any()):
            missing = [self.classnames[i] for i in (counts == 0).nonzero().flatten().tolist()]
            raise VLPromptError(f"lpp: no training image of class(es) {missing[:5]}: its head starts from each "
                                f"class's support features")
        n = feats.shape[0]
        with torch.no_grad():
            self.linear.weight.copy_(feats.new_zeros(k, feats.shape[1]).index_add_(0, labels, feats))  # class sums
            zs = feats @ self.zeroshot.t()  # (N, K): each image's cosine to each class text
            own = feats.new_zeros(k).index_add_(0, labels, zs.gather(1, labels[:, None]).squeeze(1)) / counts
            self.alpha.fill_(ALPHA_INIT_SCALE * float(own.mean()))
            gram = feats.double().t() @ feats.double()
            self.lr_w = 4.0 * n / float(torch.linalg.eigvalsh(gram).max())
            self.lr_alpha = n / (4.0 * float(zs.pow(2).sum(0).max()))
        self.alpha_grad_sum.zero_()
        self.steps.zero_()
        return {"support_images": n, "alpha_init": float(self.alpha.detach()[0, 0]), "lr_w": self.lr_w,
                "lr_alpha": self.lr_alpha}

    def param_groups(self, lr: float) -> list[dict]:
        if self.lr_w is None:
            raise VLPromptError("lpp: its step sizes come from the support features: call setup() before training")
        self._lr = lr
        # alpha at step size 0: the trainer sums, unscales and zeroes its gradient; the hook moves it
        return [{"params": [self.linear.weight, self.linear.bias], "lr": lr * self.lr_w},
                {"params": [self.alpha], "lr": 0.0}]

    @torch.no_grad()
    def on_before_optimizer_step(self, params, gradients) -> None:
        if self.alpha.grad is not None:
            self.alpha_grad_sum.add_(self.alpha.grad)  # the original's alpha.grad, never zeroed
        self.steps.add_(1)
        if int(self.steps) % self.config.alpha_every == 0:
            self.alpha.sub_(self._lr * self.lr_alpha * self.alpha_grad_sum)

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"alpha_grad_sum": self.alpha_grad_sum, "steps": self.steps}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"alpha_grad_sum", "steps"}:
            raise VLPromptError(f"lpp: the checkpoint's training state holds {sorted(state)}, not alpha_grad_sum "
                                f"and steps")
        self.alpha_grad_sum.copy_(state["alpha_grad_sum"])
        self.steps.copy_(state["steps"])

    def selection(self):
        return ("accuracy", "max", "last")  # linear_probe_p2.py:148: acc_val >= best_acc

    def forward(self, feats: Features) -> torch.Tensor:
        with torch.autocast(feats.global_.device.type, enabled=False):  # the learned head stays fp32
            f = F.normalize(feats.global_.float(), dim=-1)
            return self.linear(f) + self.alpha * (f @ self.zeroshot.t())

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Its own classes, or a subset of them (ImageNet-A / -R): the head's rows, blending weights and zero-shot
        rows of those classes (CoOp's protocol there; the original's code predicts over all 1000 classes)."""
        rows = self.trained_class_rows(classnames, "lpp's head (one row and one blending weight per class)",
                                       hint="it evaluates on its classes or a subset of them")
        if rows is not None:
            with torch.no_grad():
                self.linear.weight = nn.Parameter(self.linear.weight.detach()[rows].clone())
                self.linear.bias = nn.Parameter(self.linear.bias.detach()[rows].clone())
                self.linear.out_features = len(rows)
                self.alpha = nn.Parameter(self.alpha.detach()[:, rows].clone())
                self.alpha_grad_sum = self.alpha_grad_sum[:, rows].clone()
                self.zeroshot = self.zeroshot[rows].clone()
        super().set_classnames(classnames)

    def describe(self) -> dict:
        return {"templates": list(self.templates)}


__all__ = ["LPPConfig", "LPP", "ALPHA_INIT_SCALE", "ALPHA_EVERY"]
