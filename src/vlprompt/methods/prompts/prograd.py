"""ProGrad (Zhu, Niu, Han, Wu, Zhang, ICCV 2023, "Prompt-aligned Gradient for Prompt Tuning"): CoOp's context, whose
cross-entropy gradient is projected off the gradient of a distillation loss toward zero-shot CLIP when the two
conflict.

Per step (BeierZhu/Prompt-align @ 1b76203: ``ProGrad.public/trainers/prograd.py``, cited ``prograd.py:N``, and its
Dassl fork's ``SimpleTrainer.prograd_backward_and_update``, ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py:311-349``,
cited ``trainer.py:N``): ``xe = CE(student, y)`` and ``kl = mean_b sum_c -softmax(teacher / T) log_softmax(student /
T) T^2`` (``ProGradLoss``, prograd.py:280-293; the teacher is zero-shot CLIP on the hand-crafted prompts,
prograd.py:220-249, under no_grad); per parameter tensor, with ``b = g_kl / ||g_kl||``: if ``cos(g_xe, g_kl) < 0``
the gradient handed to the optimizer is ``g_xe - lambda (g_xe . b) b``, else ``g_xe`` (trainer.py:336-345). The KL
never enters the update otherwise; SGD's weight decay and momentum act on the projected gradient. Here the KL is a
``gradient_only`` loss of :meth:`ProGrad.training_step` and the projection is :meth:`ProGrad.on_before_optimizer_step`,
which runs after the gradients of both losses are summed over torchrun's ranks and unscaled under fp16 autocast:
the projection sees the whole batch's gradients, as the original's single process does.

What the original does, and what this method does with it:

* any truthy ``CTX_INIT`` (every config: ``True``) means the dataset's template phrase, whatever the string: ProGrad's
  own wording of CoOp's templates ("a type of pet, a photo of a {}.", DTD "a texture of {}.", prograd.py:201-217)
  without " {}.", whose first p WORD embeddings fill the last p of ``N_CTX`` = 16 slots, zeros before
  (prograd.py:78-95). p counts words, so where the phrase has a comma ("pet,") its last token ("a") is not learned
  and stays a fixed token right after the context. ``--templates dataset`` (the default) is the dataset's prompt in
  ProGrad's wording (:data:`PROGRAD_TEMPLATES`): the recipe's option is the same on every dataset (a run's
  identity, the report's 11-dataset averages). Here: ``init "template"`` (the phrase of the first template),
  ``init_placement end``, ``init_length words``, ``n_ctx 16`` -- the shared word-init rule of
  :mod:`..parts.context`; the phrase is recorded in the run's configuration, so an evaluation on another dataset
  keeps the trained prompt layout (the original would rebuild the layout from the evaluated dataset's phrase);
* ``CSC`` is ignored with a word init (one shared context, prograd.py:78-95): here each class gets a copy of the
  words (CoOp's rule in vlprompt); with a random init (``--init none``: N(0, 0.02), no zeros, the word-init rules
  do not apply) CSC is the original's;
* ``CLASS_TOKEN_POSITION "middle"`` raises NameError in the original (``n_ctx`` undefined in forward,
  prograd.py:153): no run of it exists; here it is CoOp's middle layout, a variant. "front" is the original's;
* the projection is per parameter tensor with ``torch.dot`` of the flattened tensors; a zero gradient on either side
  makes the cosine NaN, ``NaN < 0`` is False and the CE gradient passes unchanged (trainer.py:336-345): the same
  here. A parameter without a KL gradient crashes the original (``p.grad.clone()`` of None, trainer.py:326): here
  its CE gradient passes unchanged (ProGrad's one parameter, the context, always has both);
* with the default ``PREC "fp16"`` the context is an fp16 parameter, both gradients, their norms and dot products
  and the SGD step are fp16 without loss scaling, while the teacher runs fp32 (prograd.py:308-315); the amp branch
  hands a tuple to the GradScaler and fails (prograd.py:364-373). Here everything is float32 (autocast for the
  towers on GPU): an fp16 artefact not reproduced;
* the teacher's image features come from its own fp32 CLIP: the same image tower's features as the student's;
* no model selection (Dassl's last epoch), as here. The scheduler steps after the epoch's last batch
  (prograd.py:391-392): Dassl's cosine with one constant warm-up epoch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...data.registry import ALIASES
from ...data.templates import DATASET_TEMPLATES, DEFAULT_TEMPLATE, resolve_templates, template_for
from ...errors import CheckpointError, ConfigError
from ..base import Batch, StepOutput, cosine_logits, opt
from ..parts.context import ContextClassifier
from ..parts.handcrafted import HandCraftedText
from ..parts.options import (INIT_LENGTHS, INIT_PLACEMENTS, ClassContextOptions, HandCraftedOptions,
                             clean_init_words)
from ..parts.originals import check_known_tensors, check_trainer, config_get, dassl_context_import, shape
from ..parts.recipes import coop_recipe

#: ProGrad's hand-crafted prompts where they differ from CoOp's (prograd.py:201-217), by vlprompt's dataset names:
#: "{}." ends every one, so that the phrase before it can initialise the context.
PROGRAD_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
}
_WORDING = {DATASET_TEMPLATES[name]: template for name, template in PROGRAD_TEMPLATES.items()}

#: ``LOSS.LAMBDA`` 0.8 for these datasets at 8 and 16 shots (ProGrad.public/README.md:52); 1.0 otherwise
#: (scripts/prograd.sh:15, base2new_train_prograd.sh:16).
LAMBDA_08 = ("oxford_flowers", "dtd", "eurosat")

#: ``init`` standing for the phrase of the hand-crafted template (ProGrad's CTX_INIT rule)
TEMPLATE_INIT = "template"


def template_phrase(template: str) -> str:
    """The words ProGrad initialises its context with: the template without its trailing " {}." and with "_" as
    spaces (prograd.py:79-81). A template that does not end in " {}." is refused (the original would keep the
    "{}" in its init text)."""
    if not template.endswith(" {}."):
        raise ConfigError(f"init (--init) {TEMPLATE_INIT!r} takes the words before ' {{}}.' of the hand-crafted "
                          f"template, but {template!r} does not end with ' {{}}.': give the words with --init, or a "
                          f"template ending with ' {{}}.' (--templates)")
    words = clean_init_words(template[: -len(" {}.")])
    if words is None:
        raise ConfigError(f"the hand-crafted template {template!r} has no words before ' {{}}.' to initialise the "
                          f"context with (--init)")
    return words


@dataclass
class ProGradConfig(ClassContextOptions, HandCraftedOptions):
    templates: list[str] = opt(default_factory=lambda: ["dataset"],
                               help="the hand-crafted prompts of the zero-shot teacher (and of --init template): "
                                    "dataset (the dataset's prompt in ProGrad's wording, e.g. 'a type of pet, a photo "
                                    "of a {}.'), a template with '{}', imagenet80, imagenet-select, ensemble; several "
                                    "are ensembled")
    n_ctx: Optional[int] = opt(16, "context vectors M (the original: 16; with --init-placement end the init's words "
                               "fill the last of them)", min=1)
    init: Optional[str] = opt(TEMPLATE_INIT, "initialise the context from words: 'template' (the original) = the "
                              "hand-crafted template's words before ' {}.', e.g. 'a type of pet, a photo of a'; "
                              "'none': random N(0, init_std)")
    init_length: str = opt("words", "how --init's length is counted: words (the original: one learned vector per "
                           "space-separated word, the phrase's further tokens stay fixed before the class name) or "
                           "tokens (one per BPE token)", choices=INIT_LENGTHS)
    init_placement: str = opt("end", "where --init's vectors go: end (the original: the last of --n-ctx vectors, "
                              "zeros before them) or start (the context is exactly the init's vectors)",
                              choices=INIT_PLACEMENTS)
    lambda_: float = opt(1.0, "lambda: how much of the cross-entropy gradient's component along the zero-shot KL "
                         "gradient is removed when the two conflict (1: all of it; the original's LOSS.LAMBDA: 1, 0.8 "
                         "for 8 and 16 shots of Flowers, DTD, EuroSAT)", gt=0, flag="lambda")
    temperature: float = opt(1.0, "T of the KL toward zero-shot CLIP (softmax of logits / T, times T^2; the "
                             "original's LOSS.T, 1)", gt=0)


class ProGrad(ContextClassifier):
    name = "prograd"
    family = "prompts"
    config_class = ProGradConfig
    summary = "CoOp's context; the CE gradient projected off the zero-shot KL's gradient where they conflict"
    original_format = "dassl"
    uses_template = True
    template_field = "templates"

    @classmethod
    def preset(cls, data) -> dict:
        """ProGrad's recipe (configs/trainers/ProGrad/rn50*.yaml; README.md:54-58; scripts/prograd.sh): batch 32
        (l.3), SGD lr 0.002 (l.15-16), cosine with one constant warm-up epoch at 1e-5 (l.19-22), momentum 0.9 and
        weight decay 5e-4 (the Dassl fork's defaults, dassl/config/defaults.py:149-157) -- CoOp's
        (:func:`..parts.recipes.coop_recipe`); epochs by shots: 1 shot rn50_ep50 (50), 2 / 4 shots rn50_ep100 (100),
        8 / 16 shots rn50 (200) (README.md:54-58), ImageNet 50 (README.md "--load-epoch 50 for ImageNet");
        base-to-new (``--classes base``): rn50_ep100, 100 epochs, ImageNet rn50_ep50 (base2new_train_prograd.sh:10,
        README.md "change the CFG ... to rn50_ep50"); 16 context vectors (README.md commands, base2new scripts
        NCTX=16) from the template phrase (``CTX_INIT: True``, rn50*.yaml l.37); lambda 1.0 (prograd.sh:15), 0.8 for
        8 and 16 shots of Flowers, DTD and EuroSAT (README.md:52); T 1.0 (rn50*.yaml l.25); the dataset's prompt in
        ProGrad's wording (prograd.py:201-217, :meth:`expand_templates`). Backbone RN50 (rn50*.yaml l.33)."""
        train = coop_recipe(data)
        base_to_new = data.classes != "all"
        if base_to_new:
            train["epochs"] = 50 if "imagenet" in data.dataset.lower() else 100
        lam = 0.8 if (not base_to_new and data.dataset in LAMBDA_08 and data.shots in (8, 16)) else 1.0
        options = {"n_ctx": 16, "init": TEMPLATE_INIT, "init_length": "words", "init_placement": "end",
                   "lambda_": lam, "temperature": 1.0, "templates": ["dataset"]}
        return {"train": train, "method_options": options}

    @classmethod
    def expand_templates(cls, request, dataset_template):
        """``dataset`` is the dataset's prompt in ProGrad's wording (CoOp's, reworded for 5 datasets)."""
        own = dataset_template or DEFAULT_TEMPLATE
        return resolve_templates(request, _WORDING.get(own, own))

    @classmethod
    def import_original(cls, run):
        """A BeierZhu/Prompt-align ProGrad run (``prompt_learner/model.pth.tar-<epoch>``): ``ctx`` (16, D) -- the
        phrase in its last slots -- or random (M, D) / class-specific (K, M, D), and its log.txt's configuration:
        TRAINER.COOP (CTX_INIT, class position), LOSS (LAMBDA, T) and DATASET.NAME, whose ProGrad template gives the
        init phrase and so the prompt layout (the saved class tokens are checked against it)."""
        check_trainer(run, "ProGrad", "prograd")
        check_known_tensors(run, {"ctx", "token_prefix", "token_suffix"}, "ProGrad prompt learner")
        ctx = run.state.get("ctx")
        if ctx is None or ctx.dim() not in (2, 3):
            raise CheckpointError(f"{run.path}: ctx has shape {shape(ctx) if ctx is not None else None}; ProGrad "
                                  f"saves (n_ctx, dim) or, class-specific, (n_cls, n_ctx, dim)")
        csc = ctx.dim() == 3
        imported = dassl_context_import(cls, run, ctx=ctx, mapped=ctx[None] if csc else ctx[None, None],
                                        section="TRAINER.COOP", options={"csc": csc},
                                        num_classes=int(ctx.shape[0]) if csc else None)
        opts = imported.request["method_options"]
        if run.config is not None:
            if config_get(run.config, "TRAINER.COOP.CTX_INIT"):  # any truthy value: the dataset's template phrase
                dataset = ALIASES.get(str(config_get(run.config, "DATASET.NAME")))
                opts["init"] = (template_phrase(PROGRAD_TEMPLATES.get(dataset, template_for(dataset)))
                                if dataset else TEMPLATE_INIT)
            else:
                opts["init"] = None
            for key, field in (("LOSS.LAMBDA", "lambda_"), ("LOSS.T", "temperature")):
                value = config_get(run.config, key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    opts[field] = float(value)
        # without its log: the preset's phrase of the dataset imported onto (the saved class tokens check it)
        return imported

    def __init__(self, config: ProGradConfig, backbone, classnames: Sequence[str], template: Optional[str] = None):
        templates = self.expand_templates(config.templates, template)
        if config.init is not None and config.init.strip().lower() == TEMPLATE_INIT:
            if len(templates) != 1:
                raise ConfigError(f"init (--init) {TEMPLATE_INIT!r} takes the words of one hand-crafted template, "
                                  f"got {len(templates)} ({templates}): give the words with --init")
            config = dataclasses.replace(config, init=template_phrase(templates[0]))
        super().__init__(config, backbone, classnames)  # records the phrase: the layout is the run's everywhere
        self.template_request = list(config.templates)
        self.config = dataclasses.replace(self.config, templates=list(templates))
        self.teacher = HandCraftedText(backbone, templates, self.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.teacher.set_classnames(classnames)

    def describe(self) -> dict:
        return {"templates": list(self.teacher.templates), "init": self.config.init}

    def training_step(self, batch: Batch) -> StepOutput:
        """The loss is the cross-entropy; the KL toward zero-shot CLIP is a ``gradient_only`` loss: its gradient
        reaches :meth:`on_before_optimizer_step`, never the update itself."""
        image = batch.feats.global_
        logits = cosine_logits(image, self.prompt.encode()[0], self.logit_scale)
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):  # the original's fp32 teacher
            teacher = cosine_logits(image.float(), self.teacher.features(), self.logit_scale)
        student = logits.float()
        ce = F.cross_entropy(student, batch.labels)
        t = self.config.temperature
        kl = -(F.softmax(teacher / t, dim=-1) * F.log_softmax(student / t, dim=-1)).sum(-1).mean() * (t * t)
        return StepOutput(ce, logits, {"ce": ce.detach(), "kl": kl.detach()}, {"kl": kl})

    def on_before_optimizer_step(self, params, gradients) -> None:
        """Each parameter's CE gradient ``g`` with the KL gradient ``k`` (both summed over ranks, unscaled): if
        ``cos(g, k) < 0``, ``g - lambda (g . k^) k^`` with ``k^ = k / ||k||`` (trainer.py:336-345); a NaN cosine
        (a zero gradient) leaves ``g`` as it is. No host synchronisation: the choice is a ``torch.where``."""
        lam = self.config.lambda_
        for p, k in zip(params, gradients.get("kl", ())):
            if p.grad is None or k is None:
                continue
            g = p.grad
            unit = k / torch.linalg.vector_norm(k)
            cos = torch.dot((g / torch.linalg.vector_norm(g)).flatten(), unit.flatten())
            projected = g - lam * torch.dot(g.flatten(), unit.flatten()) * unit
            p.grad = torch.where(cos < 0, projected, g)


__all__ = ["ProGrad", "ProGradConfig", "PROGRAD_TEMPLATES", "template_phrase"]
