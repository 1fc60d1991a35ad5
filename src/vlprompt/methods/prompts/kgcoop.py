"""KgCoOp (Yao, Zhang, Xu, CVPR 2023): CoOp's context trained with a knowledge-guided term that keeps the learned
class text features near those of the dataset's hand-crafted prompt.

Loss = ``CE(logits, y) + W * (1 - mean_c cos(t_c, t_c^clip))``: ``t_c`` the normalised text feature of class c's
learned prompt, ``t_c^clip`` that of its hand-crafted prompt (htyao89/KgCoOp @ c43ccc3, ``KgCoOp/trainers/kgcoop.py``,
cited ``kgcoop.py:N``; its loss at kgcoop.py:238-241, 309-310, ``torch.nn.CosineSimilarity(dim=1, eps=1e-07)``).
W = ``TRAINER.COOP.W``, 8.0 in every script (``scripts/run.sh``, ``xd_train.sh``; the code's default is 1.0,
``train.py:97``). For unit vectors ``1 - cos`` is half the squared distance: W = 8 here is 4 on ``||t - t^clip||^2``.
Evaluation is CoOp's (kgcoop.py:331-332 returns the logits only): the hand-crafted features are only encoded when
training needs them.

What the original does, and what this method does with it:

* any truthy ``CTX_INIT`` (``True`` in the configs) means the words "a photo of a" (4 vectors), whatever the string,
  ``N_CTX`` and ``CSC`` say (kgcoop.py:94-104): the default ``init`` is "a photo of a"; another ``--init`` is a
  variant the original cannot run, and ``--init none`` is its random N(0, 0.02) context (kgcoop.py:106-115, CSC
  possible there);
* ``CLASS_TOKEN_POSITION`` is read and never used: the class name is always at the end (kgcoop.py:173, 175-193).
  ``--class-position`` middle / front are CoOp's layouts, a variant;
* its hand-crafted prompts are CoOp's per-dataset templates except DTD's, "a photo of a {}, a type of texture."
  (kgcoop.py:37-54, DTD at l.41): ``--templates dataset`` (the default) is the dataset's prompt in KgCoOp's wording
  (:data:`KGCOOP_TEMPLATES`), so the recipe's option is the same on every dataset (a run's identity, the report's
  11-dataset averages); class names with "_" replaced (kgcoop.py:137-138);
* the anchors come from a second CLIP built fp16 on CUDA (kgcoop.py:132-146) and the whole model is fp16 by default
  (``PREC "fp16"``): here everything is float32 (autocast on GPU for the towers), an fp16 artefact not reproduced;
* dead parameters that consume RNG and are saved in every checkpoint but never used in the forward:
  ``bias_vectors`` (1, 512), ``meta_net.linear1`` Linear(512, 512), an ``Adapter(512, 4)`` (kgcoop.py:123-125,
  148-156, 221). They do not change any number: not built here, and ignored on import;
* the amp branch calls ``cross_entropy`` on the (logits, score) tuple and fails (kgcoop.py:300-307): no amp run
  exists; vlprompt's autocast computes the same loss;
* the scheduler is stepped by the trainer itself after the epoch's last batch (kgcoop.py:318-320), Dassl's cosine
  with one constant warm-up epoch: vlprompt's ``cosine``. The learning rates printed in the maintainer's log of
  htyao89/KgCoOp issue #2 (EuroSAT, seed 1: 1.197732e-06 at epoch 91 ... 1.217413e-10 at 100) are those of TWO
  cosine schedulers stepping the one optimizer -- the commented-out ``self.sched_ = build_lr_scheduler(self.optim,
  ...)`` / ``self.sched_.step()`` (kgcoop.py:285, 321) -- i.e. base * f(e)^2. Which schedule produced the README's
  numbers cannot be read anywhere: the released code's single cosine is the default; ``--scheduler
  cosine_squared`` runs the logged one (:func:`vlprompt.engine.schedule.lr_at_epoch`);
* no model selection: the last epoch is tested (Dassl's ``TEST.FINAL_MODEL "last_step"``), as here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.nn.functional as F

from ...data.templates import DATASET_TEMPLATES, DEFAULT_TEMPLATE, resolve_templates
from ...errors import CheckpointError
from ..base import Batch, StepOutput, cosine_logits, opt
from ..parts.context import ContextClassifier
from ..parts.handcrafted import HandCraftedText
from ..parts.options import ClassContextOptions, HandCraftedOptions
from ..parts.originals import check_known_tensors, check_trainer, config_get, dassl_context_import, shape
from ..parts.recipes import DASSL_SGD

#: The init every truthy CTX_INIT becomes (kgcoop.py:96).
INIT_WORDS = "a photo of a"

#: KgCoOp's hand-crafted prompts where they differ from CoOp's (kgcoop.py:37-54: only DescribableTextures, l.41),
#: by vlprompt's dataset names; ``dataset`` in ``--templates`` stands for these.
KGCOOP_TEMPLATES = {"dtd": "a photo of a {}, a type of texture."}
_WORDING = {DATASET_TEMPLATES[name]: template for name, template in KGCOOP_TEMPLATES.items()}

#: The saved tensors of its prompt learner (kgcoop.py:123-171): the context, the fixed token buffers and the dead
#: parameters (bias_vectors, meta_net.linear1) that every checkpoint holds.
SAVED_TENSORS = {"ctx", "token_prefix", "token_suffix", "bias_vectors", "meta_net.linear1.weight",
                 "meta_net.linear1.bias"}


@dataclass
class KgCoOpConfig(ClassContextOptions, HandCraftedOptions):
    templates: list[str] = opt(default_factory=lambda: ["dataset"],
                               help="the hand-crafted prompts the learned class features are kept near: dataset (the "
                                    "dataset's prompt in KgCoOp's wording: CoOp's, DTD 'a photo of a {}, a type of "
                                    "texture.'), a template with '{}', imagenet80, imagenet-select, ensemble; several "
                                    "are ensembled")
    init: Optional[str] = opt(INIT_WORDS, "initialise the context from words (the original: 'a photo of a' whatever "
                              "its CTX_INIT says); 'none': random N(0, init_std)")
    kg_weight: float = opt(8.0, "W, the weight of the knowledge-guided term 1 - mean_c cos(learned, hand-crafted "
                           "class text feature) (8 in the original's scripts; W = 0 is CoOp: --method coop)", gt=0)


class KgCoOp(ContextClassifier):
    name = "kgcoop"
    family = "prompts"
    config_class = KgCoOpConfig
    summary = "CoOp's context kept near the hand-crafted prompts' class features: CE + W (1 - mean cosine)"
    original_format = "dassl"
    uses_template = True
    template_field = "templates"

    @classmethod
    def preset(cls, data) -> dict:
        """KgCoOp's recipe, ``configs/trainers/KgCoOp/vit_b16_ep100_ctxv1.yaml`` with ``scripts/base2new_train.sh``
        (and, 4 shots on all classes, ``xd_train.sh``: the same values): batch 128 (l.3), SGD lr 0.002 (l.16-17),
        100 epochs (l.18), cosine with one constant warm-up epoch at 1e-5 (l.19-22); momentum 0.9 and weight decay
        5e-4 are the Dassl fork's defaults (``Dassl.ProGrad.pytorch/dassl/config/defaults.py:149-157``);
        ``CTX_INIT: True`` (l.33) = "a photo of a" (kgcoop.py:94-104), ``N_CTX 4``, end, CSC False
        (base2new_train.sh:12-15); W 8.0 (scripts/run.sh); the dataset's prompt in KgCoOp's wording (kgcoop.py:37-54,
        :meth:`expand_templates`). The same for every dataset and number of shots. Backbone ViT-B/16 (l.29): give
        ``--backbone ViT-B-16``."""
        return {"train": {**DASSL_SGD, "batch_size": 128, "epochs": 100},
                "method_options": {"init": INIT_WORDS, "kg_weight": 8.0, "templates": ["dataset"]}}

    @classmethod
    def expand_templates(cls, request, dataset_template):
        """``dataset`` is the dataset's prompt in KgCoOp's wording (CoOp's, except DTD's)."""
        own = dataset_template or DEFAULT_TEMPLATE
        return resolve_templates(request, _WORDING.get(own, own))

    @classmethod
    def import_original(cls, run):
        """A htyao89/KgCoOp run (``prompt_learner/model.pth.tar-<epoch>``): ``ctx`` -- (4, D) from "a photo of a",
        or random (M, D) / class-specific (K, M, D) -- and TRAINER.COOP of its log.txt (CTX_INIT, W). The dead
        ``bias_vectors`` / ``meta_net`` tensors it also saves are never used by the original's forward: ignored."""
        check_trainer(run, "KgCoOp", "kgcoop")
        check_known_tensors(run, SAVED_TENSORS, "KgCoOp prompt learner")
        ctx = run.state.get("ctx")
        if ctx is None or ctx.dim() not in (2, 3):
            raise CheckpointError(f"{run.path}: ctx has shape {shape(ctx) if ctx is not None else None}; KgCoOp saves "
                                  f"(n_ctx, dim) or, class-specific, (n_cls, n_ctx, dim)")
        csc = ctx.dim() == 3
        imported = dassl_context_import(cls, run, ctx=ctx, mapped=ctx[None] if csc else ctx[None, None],
                                        section="TRAINER.COOP", options={"csc": csc}, class_position=False,
                                        num_classes=int(ctx.shape[0]) if csc else None)
        opts = imported.request["method_options"]
        if run.config is not None:  # any truthy CTX_INIT is "a photo of a" (kgcoop.py:94-104)
            opts["init"] = INIT_WORDS if config_get(run.config, "TRAINER.COOP.CTX_INIT") else None
            w = config_get(run.config, "TRAINER.COOP.W")
            if isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0:
                opts["kg_weight"] = float(w)
        else:  # without its log: 4 shared vectors are "a photo of a" (the same prompt layout as 4 random ones)
            opts["init"] = INIT_WORDS if (not csc and ctx.shape[-2] == len(INIT_WORDS.split(" "))) else None
        return imported

    def __init__(self, config: KgCoOpConfig, backbone, classnames: Sequence[str], template: Optional[str] = None):
        super().__init__(config, backbone, classnames)
        self.template_request = list(config.templates)
        templates = self.expand_templates(config.templates, template)
        self.config = dataclasses.replace(self.config, templates=list(templates))
        self.handcrafted = HandCraftedText(backbone, templates, self.classnames)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        super().set_classnames(classnames)
        self.handcrafted.set_classnames(classnames)

    def describe(self) -> dict:
        return {"templates": list(self.handcrafted.templates)}

    def training_step(self, batch: Batch) -> StepOutput:
        """CE of CoOp's logits + W * (1 - mean over classes of the cosine between each class's learned and
        hand-crafted text features); the class prompts are encoded once for both terms."""
        text = self.prompt.encode()[0]  # (K, E)
        logits = cosine_logits(batch.feats.global_, text, self.logit_scale)
        ce = F.cross_entropy(logits.float(), batch.labels)
        learned = F.normalize(text.float(), dim=-1)
        kg = 1.0 - F.cosine_similarity(learned, self.handcrafted.features(), dim=1, eps=1e-7).mean()
        return StepOutput(ce + self.config.kg_weight * kg, logits, {"ce": ce.detach(), "kg": kg.detach()})


__all__ = ["KgCoOp", "KgCoOpConfig", "KGCOOP_TEMPLATES", "INIT_WORDS"]
