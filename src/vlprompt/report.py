"""Tables over many runs: mean +- std over seeds, and the base-to-new summary (H on the averages, as CoCoOp)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from .errors import VLPromptError

GROUP_KEYS = ("method", "dataset", "classes", "backbone", "shots")


def _find(paths: Iterable[str | Path], pattern: str) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise VLPromptError(f"no such run directory: {p}")
        found += [p] if (p.is_file() and p.match(pattern)) else sorted(p.rglob(pattern))
    return list(dict.fromkeys(found))


def collect_results(paths: Iterable[str | Path]) -> list[dict]:
    """Every ``results.json`` under ``paths`` (run directories or folders of runs)."""
    rows = []
    for f in _find(paths, "results.json"):
        try:
            row = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VLPromptError(f"{f}: unreadable results ({e})") from None
        row["_path"] = str(f.parent)
        rows.append(row)
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarize(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """Group runs by method, dataset, classes, backbone and shots; mean and sample std of ``metric`` over them."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if metric in r.get("metrics", {}):
            groups[tuple(r.get(k) for k in GROUP_KEYS)].append(r)
    if rows and not groups:
        raise VLPromptError(f"no run reports the metric {metric!r}")
    out = []
    for key, runs in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        mean, std = _mean_std([r["metrics"][metric] for r in runs])
        out.append({**dict(zip(GROUP_KEYS, key)), "metric": metric, "mean": mean, "std": std, "runs": len(runs),
                    "seeds": sorted({r.get("seed") for r in runs}, key=str)})
    return out


def summarize_base_to_new(paths: Iterable[str | Path]) -> list[dict]:
    """Average base and new accuracies over runs (seeds) per method and dataset; H is computed on the averages."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for f in _find(paths, "base2new-*.json"):
        r = json.loads(f.read_text())
        groups[(r["method"], r["dataset"])].append(r)
    out = []
    for (method, dataset), runs in sorted(groups.items()):
        base = sum(r["base"] for r in runs) / len(runs)
        new = sum(r["new"] for r in runs) / len(runs)
        h = 2 * base * new / (base + new) if base + new > 0 else 0.0
        out.append({"method": method, "dataset": dataset, "base": base, "new": new, "harmonic_mean": h,
                    "runs": len(runs)})
    return out


def markdown(summary: list[dict], b2n: list[dict]) -> str:
    lines = []
    if summary:
        lines += ["| method | dataset | classes | backbone | shots | " + summary[0]["metric"] + " | runs |",
                  "|---|---|---|---|---:|---:|---:|"]
        for s in summary:
            lines.append(f"| {s['method']} | {s['dataset']} | {s['classes']} | {s['backbone']} | {s['shots']} | "
                         f"{s['mean']:.2f} ± {s['std']:.2f} | {s['runs']} |")
    if b2n:
        lines += ["", "| method | dataset | base | new | H | runs |", "|---|---|---:|---:|---:|---:|"]
        for s in b2n:
            lines.append(f"| {s['method']} | {s['dataset']} | {s['base']:.2f} | {s['new']:.2f} | "
                         f"{s['harmonic_mean']:.2f} | {s['runs']} |")
    return "\n".join(lines) + "\n"
