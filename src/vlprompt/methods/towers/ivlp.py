"""IVLP, independent vision-language prompting (Khattak et al., MaPLe, CVPR 2023, its baseline): a learned text
context with deep text prompts, and independent prompts inside the ViT image tower, no coupling between the towers.

The original: muzairkhattak/multimodal-prompt-learning@69bce21 ``trainers/independentVL.py`` (``VLPromptLearner``
l.65-151, ``CustomCLIP`` l.154-179) on the IVLP blocks of ``clip/model.py`` (l.191-256, ``VisionTransformer``
l.362-422); the layout, the depths and the prompts' init are :mod:`..parts.deep`'s. What it does that produced its
numbers, reproduced:

* the word init (l.82-95): with ``n_ctx <= 4`` the first ``n_ctx`` tokens of ``CTX_INIT`` are learned and the
  prompt is still ``"<CTX_INIT> {class}."``: the recipe's 2 vectors from "a photo of a" learn "a photo", and "of a"
  stays a fixed part of every prompt (``--init-length n_ctx``, :mod:`..parts.context`);
* the deep text prompts have the context's length and replace positions 1..n_ctx before blocks 1..depth-1
  (``clip/model.py`` l.243-252); the vision prompts are appended after the positional embedding, before ``ln_pre``
  (l.402-406) and the last ``n_ctx_vision`` tokens replaced before blocks 1..depth-1 (l.234-241); replaced tokens
  carry no positional embedding; depth counts the input layer (issue #72);
* logits = exp(logit_scale) * cosine, cross-entropy over the batch (l.164-179); every prompt not word-initialised
  N(0, 0.02) (``clip/model.py`` l.210-221, l.369-378).

fp16 artefacts of the original, documented and not reproduced: the context is an fp16 parameter updated by plain
SGD without loss scaling (``convert_weights`` + ``token_embedding(...).type(dtype)``), the prompts are cast
``.half()`` in every block (l.238, l.249, l.405). Refused instead of silently different: a ResNet image tower
(the original builds no vision prompt there and trains the text prompts only), a depth above a tower's layers
(the original stops at its last block), ``--init`` with more context vectors than its tokens (the original would
learn the end-of-text and padding embeddings). The original drops ``CTX_INIT`` beyond 4 context vectors; here the
init given is used. The original's checkpoint holds the whole CLIP (fp16); here the prompts only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ..parts.deep import DeepPromptMethod, DeepTextOptions, VisionPromptOptions, dassl_tower_import
from ..parts.recipes import DASSL_SGD


@dataclass
class IVLPConfig(DeepTextOptions, VisionPromptOptions):
    """Defaults: the original's ``train.py`` (l.112-121: 2 + 2 prompts, depth 9 / 9, "a photo of a"); the
    published recipe is the preset."""

    def check(self) -> None:
        if self.vision_depth == 0 and self.n_ctx_vision == 0:
            raise ConfigError("vision_depth (--vision-depth) 0: without vision prompts IVLP is deep language "
                              "prompting: --method deep-language")
        super().check()


class IVLP(DeepPromptMethod):
    name = "ivlp"
    config_class = IVLPConfig
    summary = ("independent vision-language prompting: a learned text context with deep text prompts, and deep "
               "prompts inside the ViT image tower (MaPLe paper's IVLP baseline)")

    @classmethod
    def preset(cls, data) -> dict:
        """The published recipe, muzairkhattak/multimodal-prompt-learning
        ``configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``: N_CTX_TEXT 2, N_CTX_VISION 2, PROMPT_DEPTH_TEXT
        12, PROMPT_DEPTH_VISION 12, CTX_INIT "a photo of a" (l.34-39), SGD lr 0.0035, 5 epochs, cosine, one constant
        warm-up epoch at 1e-5 (l.16-24), batch 4 (l.4); momentum 0.9 and weight decay 5e-4 are Dassl's defaults
        (``dassl/config/defaults.py``). Published for base-to-new (16 shots of the base classes); the repository's
        cross-dataset scripts train this same config on ImageNet's 1000 classes (``scripts/independent-vlp/
        xd_train_ivlp.sh``; their test script loads epoch 2 of this 5-epoch run and fails as shipped); no few-shot
        config was published. The same recipe for every data. (muzairkhattak/PromptSRC's IVLP baseline is another
        one: 4 + 4 prompts, depth 9 / 9, lr 0.0025, 20 epochs: ``--n-ctx 4 --n-ctx-vision 4 --text-depth 9
        --vision-depth 9 --lr 0.0025 --epochs 20``.)"""
        return {"train": {**DASSL_SGD, "lr": 0.0035, "epochs": 5, "batch_size": 4},
                "method_options": {"n_ctx": 2, "n_ctx_vision": 2, "text_depth": 12, "vision_depth": 12,
                                   "init": "a photo of a", "init_length": "n_ctx"}}

    @classmethod
    def import_original(cls, run):
        """An IVLP run (``<output>/VLPromptLearner/model.pth.tar-<epoch>``, trainer IVLP, TRAINER.IVLP): its
        context, deep text prompts and vision prompts (:func:`..parts.deep.dassl_tower_import`). A run without
        vision prompts (the language-only config, or a ResNet tower) imports with ``--from deep-language``."""
        return dassl_tower_import(cls, run, trainer="IVLP", section="TRAINER.IVLP", vision=True)
