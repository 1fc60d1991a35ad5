"""Option groups shared by several methods, declared once: each is a config dataclass that a method's config
extends (``class CoOpConfig(ClassContextOptions)``), so a field, its help text, its valid values and its checks
exist in one place whatever method carries them.

* :class:`ContextOptions`: a learned context of token vectors (n_ctx, word init, class position, text path);
* :class:`ClassContextOptions`: plus class-specific contexts and text-tower chunks (CoOp, PLOT, KgCoOp, ProGrad);
* :class:`HandCraftedOptions`: the hand-crafted prompt templates of a zero-shot classifier;
* :class:`ClassFeatureOptions`: plus how the class features are built from them (TaskRes, CLAP).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import MethodConfig, opt

#: where the class name goes in a learned prompt
POSITIONS = ("end", "middle", "front")
#: how the text tower encodes learned prompts (all exact; see vlprompt.text)
TEXT_MODES = ("auto", "plain", "cut", "prefix")
#: how a word init's length is counted (see :mod:`.context`)
INIT_LENGTHS = ("tokens", "words")


@dataclass
class ContextOptions(MethodConfig):
    """A learned context of M token vectors placed around each class name (:class:`.context.PromptContext`)."""

    n_ctx: Optional[int] = opt(None, "context vectors M (default: 16 with a random init, else the length of "
                               "--init; another number with --init is an error)", min=1)
    init: Optional[str] = opt(None, "initialise the context from words, e.g. 'a photo of a' (one vector per token, "
                              "or per word: --init-length); default: random N(0, init_std)")
    init_length: str = opt("tokens", "how --init's length is counted: tokens (one learned vector per BPE token) or "
                           "words (the original CoOp: one per space-separated word; the init's further tokens "
                           "stay fixed before the class name)", choices=INIT_LENGTHS)
    init_std: float = opt(0.02, "standard deviation of the random context init", gt=0)
    class_position: str = opt("end", "where the class name goes in the prompt", choices=POSITIONS)
    text_mode: str = opt("auto", "text path (all exact; auto picks the fastest)", choices=TEXT_MODES)


@dataclass
class ClassContextOptions(ContextOptions):
    """A context that may be class-specific, encoded in chunks of prompts."""

    csc: bool = opt(False, "class-specific context (it then belongs to the training class list)")
    chunk_size: int = opt(256, "prompts per text-tower chunk (bounds memory for large class lists)", min=1)


@dataclass
class HandCraftedOptions(MethodConfig):
    """The hand-crafted prompts a zero-shot classifier is built from (:func:`.handcrafted.class_text_features`)."""

    templates: list[str] = opt(default_factory=lambda: ["dataset"],
                               help="prompt templates with '{}' for the class name and/or set names: dataset (the "
                                    "dataset's own prompt), imagenet80 (CLIP's 80), imagenet-select (CoOp's 7), "
                                    "ensemble (CoOp's 7 + the dataset's); several are ensembled")

    def check(self) -> None:
        from ...data.templates import TEMPLATE_SETS, check_template
        from ...errors import ConfigError, DataError

        if not self.templates:
            raise ConfigError("templates (--templates) must name at least one template")
        for t in self.templates:
            if t.strip().lower() in TEMPLATE_SETS:
                continue
            try:
                check_template(t)
            except DataError as e:
                raise ConfigError(f"templates (--templates): unknown prompt template set {t!r} (sets: "
                                  f"{', '.join(TEMPLATE_SETS)}), and not a template: {e}") from e


@dataclass
class ClassFeatureOptions(HandCraftedOptions):
    """Hand-crafted class features built as the adapters on CLIP's text features build theirs (TaskRes, CLAP):
    the class names as the dataset's files spell them and the unnormalised mean over templates by default, each
    with the other choice (:func:`.handcrafted.class_text_features`)."""

    clean_names: bool = opt(False, "prompt with the class names cleaned as CoOp does (underscores become spaces); "
                            "default: the names as the dataset's files spell them (american_pit_bull_terrier), as "
                            "the original code does")
    average: str = opt("raw", "the class feature of its templates: raw (the mean of the unnormalised text features, "
                       "not renormalised, as the original code) or normalised (CLIP's prompt ensembling)",
                       choices=("raw", "normalised"))


__all__ = ["POSITIONS", "TEXT_MODES", "INIT_LENGTHS", "ContextOptions", "ClassContextOptions", "HandCraftedOptions",
           "ClassFeatureOptions"]
