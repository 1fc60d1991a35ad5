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
