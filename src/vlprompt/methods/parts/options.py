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
#: how the text tower encodes learned prompts (all exact; see vlprompt.backbone.text_encoder)
TEXT_MODES = ("auto", "plain", "cut", "prefix")
#: how a word init's length is counted (see :mod:`.context`)
INIT_LENGTHS = ("tokens", "words", "n_ctx")
#: where a word init's vectors go in the context (see :mod:`.context`)
INIT_PLACEMENTS = ("start", "end")


def clean_init_words(words: Optional[str]) -> Optional[str]:
    """The words of an ``init`` option ("_" as spaces), or None for a random context (none, random, empty)."""
    if words is None:
        return None
    words = words.replace("_", " ").strip()
    if not words or words.lower() in ("random", "none"):
        return None
    return words


@dataclass
class ContextOptions(MethodConfig):
    """A learned context of M token vectors placed around each class name (:class:`.context.PromptContext`)."""

    n_ctx: Optional[int] = opt(None, "context vectors M (default: 16 with a random init, else the length of "
                               "--init; another number with --init is an error)", min=1)
    init: Optional[str] = opt(None, "initialise the context from words, e.g. 'a photo of a' (one vector per token, "
                              "or per word: --init-length); default: random N(0, init_std)")
    init_length: str = opt("tokens", "how --init's length is counted: tokens (one learned vector per BPE token), "
                           "words (the original CoOp: one per space-separated word; the init's further tokens "
                           "stay fixed before the class name) or n_ctx (IVLP, MaPLe, PromptSRC: the first --n-ctx "
                           "tokens are learned, the init's further tokens stay fixed before the class name)",
                           choices=INIT_LENGTHS)
    init_placement: str = opt("start", "where --init's vectors go: start (the context is exactly the init's vectors) "
                              "or end (the last of --n-ctx vectors, zeros before them, as ProGrad)",
                              choices=INIT_PLACEMENTS, since="0.2")
    init_std: float = opt(0.02, "standard deviation of the random context init", gt=0)
    class_position: str = opt("end", "where the class name goes in the prompt", choices=POSITIONS)
    text_mode: str = opt("auto", "text path (all exact; auto picks the fastest)", choices=TEXT_MODES)

    def check(self) -> None:
        import dataclasses

        from ...errors import ConfigError

        super().check()
        if clean_init_words(self.init) is None:  # a random context: the word-init rules do not apply
            # accepted: the random context's own values (tokens, start) and the method's defaults (ProGrad's words,
            # end: its rule for its default init); anything else was asked for and would change nothing
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for name, what, neutral in (("init_length", "counts the words of", "tokens"),
                                        ("init_placement", "places the words of", "start")):
                if getattr(self, name) not in (defaults[name], neutral):
                    raise ConfigError(f"{name} (--{name.replace('_', '-')}) = {getattr(self, name)} {what} a word "
                                      f"init: give --init")

    def word_init_rule(self) -> dict:
        """The word-init options as :class:`.context.PromptContext` takes them: a random context (no ``init``) has
        no length or placement (a method whose defaults are ProGrad's words / end then builds CoOp's random
        context)."""
        if clean_init_words(self.init) is None:
            return {"init_length": "tokens", "init_placement": "start"}
        return {"init_length": self.init_length, "init_placement": self.init_placement}


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


__all__ = ["POSITIONS", "TEXT_MODES", "INIT_LENGTHS", "INIT_PLACEMENTS", "clean_init_words", "ContextOptions",
           "ClassContextOptions", "HandCraftedOptions", "ClassFeatureOptions"]
