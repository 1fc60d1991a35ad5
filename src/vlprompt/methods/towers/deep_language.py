"""Deep language prompting (Khattak et al., MaPLe, CVPR 2023, its "language prompting" baseline): a learned text
context with deep text prompts; the image tower is CLIP's, untouched.

The original is IVLP with no vision prompts (muzairkhattak/multimodal-prompt-learning@69bce21
``trainers/independentVL.py`` with ``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml``:
N_CTX_VISION 0, PROMPT_DEPTH_VISION 0); the text side, its word init and its deep prompts are IVLP's
(:mod:`..parts.deep`). It has its own name because the papers' tables list it as a method of its own with its own
recipe (MaPLe's README, "Deep language prompting": 4 learned words, lr 0.0025), and because without vision prompts
the image features do not change: they come from the feature cache (the frozen tower's, the same numbers) instead
of running the tower at every step as the original does. fp16 artefacts of the original (an fp16 context updated
without loss scaling, prompts cast ``.half()`` in every block) are not reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..parts.deep import DeepPromptMethod, DeepTextOptions, dassl_tower_import
from ..parts.recipes import DASSL_SGD


@dataclass
class DeepLanguageConfig(DeepTextOptions):
    """Defaults: the original's ``train.py`` IVLP text side (l.112-121: 2 prompts, depth 9, "a photo of a"); the
    published recipe is the preset."""


class DeepLanguage(DeepPromptMethod):
    name = "deep-language"
    config_class = DeepLanguageConfig
    inputs = frozenset({"global"})  # no vision prompts: the frozen tower's features, from the cache
    summary = ("deep language prompting: a learned text context with deep text prompts, the image tower CLIP's "
               "(MaPLe paper's baseline)")

    @classmethod
    def preset(cls, data) -> dict:
        """The published recipe, muzairkhattak/multimodal-prompt-learning
        ``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml``: N_CTX_TEXT 4, PROMPT_DEPTH_TEXT 12,
        CTX_INIT "a photo of a" (all four words learned), no vision prompts (l.34-39), SGD lr 0.0025, 5 epochs, cosine,
        one constant warm-up epoch at 1e-5 (l.16-24), batch 4 (l.4); momentum 0.9 and weight decay 5e-4 are Dassl's
        defaults. Published for base-to-new; ``scripts/language-prompting/xd_train_lp.sh`` trains the same config on
        ImageNet for cross-dataset transfer (its test script loads epoch 2 of this 5-epoch run and fails as shipped);
        no few-shot config was published. The same recipe for every data."""
        return {"train": {**DASSL_SGD, "lr": 0.0025, "epochs": 5, "batch_size": 4},
                "method_options": {"n_ctx": 4, "text_depth": 12, "init": "a photo of a", "init_length": "n_ctx"}}

    @classmethod
    def import_original(cls, run):
        """A language-only IVLP run (trainer IVLP, TRAINER.IVLP, ``<output>/VLPromptLearner/``): its context and
        deep text prompts; a run with vision prompts is refused (``--from ivlp``)."""
        return dassl_tower_import(cls, run, trainer="IVLP", section="TRAINER.IVLP", vision=False)
