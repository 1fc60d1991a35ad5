"""The records every dataset reader produces; the rest of vlprompt depends only on these."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence


@dataclass(frozen=True)
class Sample:
    """One image: an absolute ``path``, an integer ``label`` into the class list, its ``classname``,
    and an optional numeric ``target`` (ordinal tasks: age, score, year)."""

    path: str
    label: int
    classname: str
    target: Optional[float] = None


@dataclass
class DatasetSplits:
    """A dataset with its class list and train / val / test samples.

    ``classnames[i]`` is the name of label ``i``. ``template`` is the dataset's hand-crafted prompt
    (``{}`` stands for the class name). ``name`` is the reader's name (e.g. ``oxford_flowers``).
    """

    name: str
    classnames: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    template: str = "a photo of a {}."
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def with_splits(self, **splits: Sequence[Sample]) -> "DatasetSplits":
        return replace(self, **{k: list(v) for k, v in splits.items()})


#: ``DatasetSplits.extra`` key of the class names as the dataset's own files spell them, label by label, where a
#: reader cleans them (``_`` -> space): CoOp's split files ("american_pit_bull_terrier"), class folders. Methods
#: whose original code prompts with the names as Dassl reads them (TaskRes, CLAP) ask for them
SOURCE_NAMES = "source_classnames"


def with_source_names(extra: dict, source: Sequence[str], classnames: Sequence[str]) -> dict:
    """``extra`` recording the names as the files spell them when they differ from the cleaned ``classnames``."""
    if list(source) != list(classnames):
        extra[SOURCE_NAMES] = [str(c) for c in source]
    return extra


def source_classnames(splits: DatasetSplits) -> list[str]:
    """The class names as the dataset's files spell them (underscores kept), label by label: the names the reader
    recorded (:data:`SOURCE_NAMES`), else the class names themselves."""
    names = splits.extra.get(SOURCE_NAMES)
    if isinstance(names, list) and len(names) == len(splits.classnames):
        return [str(c) for c in names]
    return list(splits.classnames)
