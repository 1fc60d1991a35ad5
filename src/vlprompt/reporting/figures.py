"""Few-shot curves as in CoOp's figure: accuracy vs shots, one panel per dataset and one averaged, one line per
recipe (method and its options), error bars = the std over seeds. PNG and PDF, matplotlib's Agg backend."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from . import collect as table
from .._io import atomic_path
from .tables import COOP_DATASETS

__all__ = ["fewshot_curves", "curve_data"]


def _label(row: dict, varying: list[str]) -> str:
    opts = [f"{k.split('.', 1)[-1]}={table._fmt(row['recipe_columns'][k])}" for k in varying
            if k in row["recipe_columns"]]
    return str(row["method"]) + (f" ({', '.join(opts)})" if opts else "")


def curve_data(report: dict) -> dict:
    """``{"datasets": [...], "lines": {label: {dataset: [(shots, mean, std), ...]}}, "average": {label: [(shots,
    mean), ...]}, "average_title": str}`` of the report's few-shot rows (classes "all" only). The average of a
    line at a shot count is the mean over the datasets of the panel, and only where the line has all of them."""
    rows = [r for r in report["fewshot"] if r["classes"] == "all" and r["recipe"] is not None]
    idents = []
    for r in rows:
        ident = {k: v for k, v in r["identity"].items() if k not in ("data", "train", "seed")}
        r["recipe_columns"] = table.flatten(ident)
        idents.append(r["recipe_columns"])
    varying: dict[str, list[str]] = {}  # per method: the options that tell its lines apart
    for method in {r["method"] for r in rows}:
        fl = [f for r, f in zip(rows, idents) if r["method"] == method]
        keys = sorted({k for f in fl for k in f} - {"method"})
        varying[method] = [k for k in keys if len({table.canonical(f.get(k)) for f in fl}) > 1]
    # a panel per dataset; datasets of one reader on several folders (``folder``, ``csv``) are told apart by root
    roots: dict[str, set] = {}
    for r in rows:
        roots.setdefault(r["dataset"], set()).add((r["identity"].get("data") or {}).get("root"))

    def panel(r: dict) -> str:
        if len(roots[r["dataset"]]) == 1:
            return r["dataset"]
        return f"{r['dataset']} ({Path(str(r['identity']['data'].get('root'))).name})"

    lines: dict[str, dict[str, list]] = {}
    labels: dict[str, str] = {}
    for r in rows:
        label = labels.setdefault(r["recipe"], _label(r, varying[r["method"]]))
        lines.setdefault(label, {}).setdefault(panel(r), []).append((r["shots"], r["mean"], r["std"]))
    datasets = sorted({panel(r) for r in rows}, key=lambda d: (COOP_DATASETS.index(d) if d in COOP_DATASETS
                                                                else len(COOP_DATASETS), d))
    average = {}
    for label, per in lines.items():
        shots = sorted({s for pts in per.values() for s, _, _ in pts})
        pts = []
        for s in shots:
            vals = [[m for (k, m, _) in per.get(d, []) if k == s] for d in datasets]
            if all(len(v) == 1 for v in vals):  # every dataset, one configuration each
                pts.append((s, float(np.mean([v[0] for v in vals]))))
        average[label] = pts
    complete = sorted(datasets) == sorted(COOP_DATASETS)
    title = ("Average over 11 datasets" if complete else
             f"Mean of {len(datasets)} dataset(s) (not the 11-dataset average)")
    for per in lines.values():
        for pts in per.values():
            pts.sort()
    return {"datasets": datasets, "lines": lines, "average": average, "average_title": title}


def fewshot_curves(report: dict, directory: str | Path, *, title: Optional[str] = None,
                   name: str = "fewshot_curves") -> list[Path]:
    """Write ``directory/<name>.png`` and ``.pdf``; returns their paths (none when the report has no few-shot
    rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curve_data(report)
    if not data["datasets"]:
        return []
    panels = ["__average__", *data["datasets"]]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    labels = sorted(data["lines"])
    colors = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
    all_shots = sorted({s for per in data["lines"].values() for pts in per.values() for s, _, _ in pts})
    for ax, panel in zip(axes.flat, panels):
        for lab in labels:
            if panel == "__average__":
                pts = [(s, m, None) for s, m in data["average"][lab]]
            else:
                pts = data["lines"][lab].get(panel, [])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            errs = [p[2] if p[2] is not None else 0.0 for p in pts]
            style = dict(color=colors[lab], label=lab, marker="o", markersize=4, linewidth=1.5, capsize=2)
            if len(xs) == 1 and xs[0] == 0:  # zero-shot: one point, as CoOp draws zero-shot CLIP
                style.update(marker="*", markersize=10, linestyle="none")
            ax.errorbar(xs, ys, yerr=errs if panel != "__average__" else None, **style)
        ax.set_title(data["average_title"] if panel == "__average__" else panel, fontsize=9)
        ax.set_xticks(all_shots)
        ax.set_xlabel("shots per class", fontsize=8)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    if not handles:
        for ax in axes.flat:
            handles, names = ax.get_legend_handles_labels()
            if handles:
                break
    fig.legend(handles, names, loc="lower center", ncol=min(4, max(1, len(names))), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95 if title else 1))
    directory = Path(directory)
    out = []
    for ext in ("png", "pdf"):
        path = directory / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=120)
        out.append(path)
    plt.close(fig)
    return out
