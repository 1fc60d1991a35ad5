"""The papers' published numbers, bundled as data (one JSON file per paper) with the source of every number.

Each file holds ``paper``, ``citation``, ``notes`` (what was and was not bundled, and why) and ``rows``; a row is
one number: ``method`` (vlprompt's method name), ``dataset`` (vlprompt's reader name, or ``average11`` for the
average over CoOp's 11 datasets), ``protocol`` (:data:`PROTOCOLS`), ``backbone`` (open_clip's architecture name,
or null when the source does not say), ``pretrained``, ``shots`` (0: zero-shot, or the full training set of the
ordinal benchmarks), ``metric``, ``value``, ``seed`` (only for a maintainer's per-seed run), ``source`` (where
exactly the number is written) and ``conditions`` (identity keys of a measured run, dotted, each with the values
it may have for the number to apply, e.g. ``{"method_options.csc": [false]}``).

Only numbers that can be cited are bundled: a number read off a figure, or remembered, is not a number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..errors import VLPromptError

__all__ = ["PROTOCOLS", "PublishedNumber", "load_papers", "paper_files", "paper_notes", "normalize_backbone",
           "matches"]

#: fewshot: trained on K shots of every class, tested on the full test set (shots 0: zero-shot);
#: base2new: trained on the base half, tested on base and new halves; cross-dataset / domain-generalization:
#: a run evaluated on another dataset / an ImageNet variant; ordinal: an ordinal benchmark (mean over folds).
PROTOCOLS = ("fewshot", "base2new", "cross-dataset", "domain-generalization", "ordinal")
_ROW_KEYS = {"method", "dataset", "protocol", "backbone", "pretrained", "shots", "metric", "value", "source", "seed",
             "conditions"}
_REQUIRED = ("method", "dataset", "protocol", "backbone", "pretrained", "shots", "metric", "value", "source")


@dataclass(frozen=True)
class PublishedNumber:
    paper: str
    method: str
    dataset: str
    protocol: str
    backbone: Optional[str]
    pretrained: Optional[str]
    shots: int
    metric: str
    value: float
    source: str
    seed: Optional[int] = None
    conditions: dict = field(default_factory=dict)
    file: str = ""


def normalize_backbone(name: Any) -> Optional[str]:
    """open_clip's architecture name without the QuickGELU suffix (``RN50-quickgelu`` and OpenAI's ``ViT-B/16``
    are the papers' ``RN50`` / ``ViT-B-16``: the same weights); None stays None."""
    if not isinstance(name, str):
        return None
    name = name.replace("/", "-")
    return name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name


def _data_dir() -> Path:
    return Path(str(resources.files(__package__)))


def paper_files(directory: Optional[str | Path] = None) -> list[Path]:
    d = Path(directory) if directory is not None else _data_dir()
    files = sorted(d.glob("*.json"))
    if not files:
        raise VLPromptError(f"no paper files (*.json) in {d}")
    return files


def _load_file(f: Path) -> dict:
    try:
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VLPromptError(f"{f}: unreadable paper file ({e})") from e
    for key in ("paper", "citation", "notes", "rows"):
        if key not in doc:
            raise VLPromptError(f"{f}: missing {key!r}")
    if not isinstance(doc["rows"], list) or not isinstance(doc["notes"], list):
        raise VLPromptError(f"{f}: 'rows' and 'notes' must be lists")
    return doc


def _row(doc: dict, f: Path, i: int, r: Any) -> PublishedNumber:
    where = f"{f.name} row {i}"
    if not isinstance(r, dict):
        raise VLPromptError(f"{where}: not a mapping")
    unknown = sorted(set(r) - _ROW_KEYS)
    missing = [k for k in _REQUIRED if k not in r]
    if unknown or missing:
        raise VLPromptError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    if not isinstance(r["source"], str) or not r["source"].strip():
        raise VLPromptError(f"{where}: every number needs its source")
    if r["protocol"] not in PROTOCOLS:
        raise VLPromptError(f"{where}: protocol {r['protocol']!r} is not one of {PROTOCOLS}")
    value = r["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VLPromptError(f"{where}: value {value!r} is not a number")
    if isinstance(r["shots"], bool) or not isinstance(r["shots"], int) or r["shots"] < 0:
        raise VLPromptError(f"{where}: shots {r['shots']!r} is not a count")
    cond = r.get("conditions", {})
    if not isinstance(cond, dict) or not all(isinstance(v, list) and v for v in cond.values()):
        raise VLPromptError(f"{where}: conditions must map identity keys to non-empty lists of accepted values")
    return PublishedNumber(paper=doc["paper"], method=r["method"], dataset=r["dataset"], protocol=r["protocol"],
                           backbone=r["backbone"], pretrained=r["pretrained"], shots=r["shots"], metric=r["metric"],
                           value=float(value), source=r["source"], seed=r.get("seed"), conditions=cond, file=f.name)


def load_papers(directory: Optional[str | Path] = None) -> list[PublishedNumber]:
    """Every bundled number (or those of ``directory``), checked: each row has a source, a known protocol and a
    numeric value; two rows for one (method, dataset, protocol, backbone, pretrained, shots, metric, seed) are an
    error (a comparison would have to pick one)."""
    out, seen = [], {}
    for f in paper_files(directory):
        doc = _load_file(f)
        for i, r in enumerate(doc["rows"]):
            n = _row(doc, f, i, r)
            key = (n.method, n.dataset, n.protocol, n.backbone, n.pretrained, n.shots, n.metric, n.seed,
                   json.dumps(n.conditions, sort_keys=True))
            if key in seen:
                raise VLPromptError(f"{f.name} row {i}: the same number as {seen[key]}")
            seen[key] = f"{f.name} row {i}"
            out.append(n)
    return out


def paper_notes(directory: Optional[str | Path] = None) -> dict[str, dict]:
    """``{paper: {"citation", "notes", "file"}}`` of every bundled file."""
    out = {}
    for f in paper_files(directory):
        doc = _load_file(f)
        out[doc["paper"]] = {"citation": doc["citation"], "notes": list(doc["notes"]), "file": f.name}
    return out


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


def matches(n: PublishedNumber, *, method: str, dataset: str, protocol: str, backbone: Any, pretrained: Any,
            shots: Any, metric: str, flat_identity: Optional[dict]) -> bool:
    """Whether the published number ``n`` is of the same (method, dataset, protocol, backbone, weights, shots,
    metric) as a measured group, and the group's identity (flattened, dotted keys) meets ``n.conditions``.
    A number whose backbone the source does not state (None) never matches; neither does a group without an
    identity when the number has conditions."""
    if n.backbone is None or normalize_backbone(backbone) != normalize_backbone(n.backbone):
        return False
    if (n.method, n.dataset, n.protocol, n.metric) != (method, dataset, protocol, metric):
        return False
    if pretrained != n.pretrained or shots != n.shots:
        return False
    if n.conditions:
        if flat_identity is None:
            return False
        for key, accepted in n.conditions.items():
            if key not in flat_identity or _canon(flat_identity[key]) not in {_canon(a) for a in accepted}:
                return False
    return True
