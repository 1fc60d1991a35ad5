"""What ``vlprompt report`` computes from a folder of runs (a grid or any runs): every table as plain data.

* few-shot: mean ± std over seeds per configuration (``vlprompt table``'s grouping: identity minus the seed), the
  average over CoOp's 11 datasets per recipe and shot count (only when all 11 are there; else the missing ones
  are named);
* base-to-new (``RUN/eval/base2new-*.json``): base, new and H on the averages, per dataset and over the 11; only
  of runs trained on the base half (:func:`vlprompt.reporting.collect.base_to_new_problem`; the others are listed as left
  out, never shown beside the papers' base-to-new numbers);
* transfer (``RUN/eval/<dataset>-all-test.json`` of another dataset): domain generalisation (ImageNet to its four
  variants) and cross-dataset transfer, with their averages when every target is there;
* ordinal: MAE and accuracy (argmax and expectation) over the folds (``data.options.fold``) or the seeds.

A *recipe* is a run's identity without its data, its training loop and its seed: the same method with the same
options on every dataset, whatever the per-dataset preset (epochs, batch size) made of it. Averages and curves
are over one recipe; a recipe with two configurations of one dataset and shot count is not averaged (named).

Published numbers (:mod:`vlprompt.papers`) are joined to a row on (method, dataset, protocol, backbone, weights,
shots, metric) and their conditions on the run's options, never on fewer; the difference is measured - paper.

Collapsed seeds: see :func:`collapsed` and :data:`COLLAPSE_RULE`. A flagged seed stays in the mean (the mean is
what the runs say); the flag tells the reader to look at it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from . import collect as table
from ..errors import VLPromptError
from ..papers import PublishedNumber, load_papers, matches, paper_notes
from ..stats import STD_CONVENTION, mean_std

__all__ = ["COOP_DATASETS", "DG_TARGETS", "COLLAPSE_POINTS", "COLLAPSE_K", "COLLAPSE_RULE", "collapsed",
           "build_report", "recipe_key"]

#: CoOp's 11 datasets (vlprompt reader names), the ones its "average over 11 datasets" is over.
COOP_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
#: ImageNet's variants of the domain-generalisation protocol.
DG_TARGETS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
#: the published 11-dataset average's name in the paper files
AVERAGE = "average11"

COLLAPSE_POINTS = 10.0
COLLAPSE_K = 3.0
COLLAPSE_RULE = (f"a run is flagged as collapsed when its accuracy is more than max({COLLAPSE_POINTS:g} points, "
                 f"{COLLAPSE_K:g} robust SDs) below the median of its siblings (the other runs of its row; robust "
                 f"SD = 1.4826 x their median absolute deviation); rows of one run are never flagged")

ORDINAL_METRICS = ("mae_expectation", "mae_argmax", "acc_expectation", "acc_argmax")


def collapsed(values: list[float]) -> list[int]:
    """Indices of the values flagged as collapsed by :data:`COLLAPSE_RULE` (higher is better)."""
    v = np.asarray(values, dtype=np.float64)
    out = []
    for i in range(len(v)):
        sib = np.delete(v, i)
        if sib.size == 0:
            continue
        med = float(np.median(sib))
        robust_sd = 1.4826 * float(np.median(np.abs(sib - med)))
        if v[i] < med - max(COLLAPSE_POINTS, COLLAPSE_K * robust_sd):
            out.append(i)
    return out


def recipe_key(identity: Optional[dict], *drop: str) -> Optional[str]:
    """Canonical identity without ``data``, ``train``, the seed and the sections in ``drop`` (None: no identity)."""
    if identity is None:
        return None
    ident = {k: v for k, v in identity.items() if k not in ("data", "train", "seed", *drop)}
    return table.canonical(ident)


def _flat(identity: Optional[dict]) -> Optional[dict]:
    return table.flatten(identity) if identity is not None else None


def _shots(identity: Optional[dict], fallback: Any = None) -> Any:
    if identity is None:
        return fallback
    return (identity.get("data") or {}).get("shots", fallback)


# -- published numbers --------------------------------------------------------------------------------
class _Papers:
    def __init__(self, numbers: list[PublishedNumber]):
        self.numbers = numbers
        self.cited: dict[str, int] = {}  # source -> footnote number

    def cite(self, n: PublishedNumber) -> int:
        return self.cited.setdefault(n.source, len(self.cited) + 1)

    def join(self, *, method, dataset, protocol, backbone, pretrained, shots, metric,
             identity: Optional[dict]) -> Optional[dict]:
        """``{"value", "std", "runs", "seeds", "refs"}`` of the matching published number(s), or None. Several
        matches are the per-seed runs of one source (mean ± std with :func:`mean_std`); matches that are not all
        per-seed runs are an error (the files would say two things of one setting)."""
        if protocol is None:
            return None
        flat = _flat(identity)
        found = [n for n in self.numbers if matches(n, method=method, dataset=dataset, protocol=protocol,
                                                    backbone=backbone, pretrained=pretrained, shots=shots,
                                                    metric=metric, flat_identity=flat)]
        if not found:
            return None
        if len(found) > 1 and any(n.seed is None for n in found):
            raise VLPromptError(f"paper files: {len(found)} numbers for {method} / {dataset} / {protocol} / "
                                f"{metric}: {', '.join(n.file for n in found)}")
        value, std = mean_std(n.value for n in found)
        return {"value": value, "std": std if len(found) > 1 else None, "runs": len(found),
                "seeds": [n.seed for n in found if n.seed is not None],
                "refs": sorted({self.cite(n) for n in found}), "papers": sorted({n.paper for n in found})}


def _with_paper(row: dict, measured: float, paper: Optional[dict], key: str = "paper") -> None:
    row[key] = paper
    row[f"{key}_diff" if key != "paper" else "diff"] = None if paper is None else measured - paper["value"]


# -- reading ------------------------------------------------------------------------------------------
def _values(paths: list[str], by_path: dict[str, dict], metric: str) -> list[float]:
    return [float(by_path[p]["metrics"][metric]) for p in paths]


def _fewshot(rows: list[dict], papers: _Papers) -> list[dict]:
    if not rows:
        return []
    by_path = {r["_path"]: r for r in rows}
    out = table.summarize(rows, "accuracy")
    for s in out:
        s["values"] = _values(s["paths"], by_path, "accuracy")
        s["collapsed"] = [s["seeds"][i] for i in collapsed(s["values"])]
        ident = s["identity"]
        s["pretrained"] = ident.get("pretrained") if ident else None
        s["recipe"] = recipe_key(ident)
        protocol = "fewshot" if s["classes"] == "all" else None
        _with_paper(s, s["mean"], papers.join(method=s["method"], dataset=s["dataset"], protocol=protocol,
                                              backbone=s["backbone"], pretrained=s["pretrained"], shots=s["shots"],
                                              metric="accuracy", identity=ident))
    # shots in numeric order (2 before 16); the sort is stable, so the table's order of options is kept
    return sorted(out, key=lambda s: (str(s["method"]), str(s["dataset"]), str(s["classes"]), str(s["backbone"]),
                                      _num(s["shots"])))


def _num(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def _average_groups(rows: list[dict], dataset_of, names: tuple[str, ...]) -> list[dict]:
    """Rows of one recipe (``row["recipe"]``, ``row["avg_shots"]``) gathered for an average over ``names``."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r["recipe"] is None:
            continue
        g = groups.setdefault((r["recipe"], r["avg_shots"]), {"rows": [], "by_dataset": {}})
        g["rows"].append(r)
        g["by_dataset"].setdefault(dataset_of(r), []).append(r)
    out = []
    for (recipe, shots), g in groups.items():
        first = g["rows"][0]
        dup = sorted(d for d, rs in g["by_dataset"].items() if len(rs) > 1 and d in names)
        missing = [d for d in names if d not in g["by_dataset"]]
        out.append({"recipe": recipe, "shots": shots, "method": first["method"], "backbone": first["backbone"],
                    "pretrained": first["pretrained"], "identity": first["identity"],
                    "datasets": [d for d in names if d in g["by_dataset"]], "missing": missing,
                    "ambiguous": dup, "complete": not missing and not dup,
                    "members": {d: g["by_dataset"][d][0] for d in names if d in g["by_dataset"] and d not in dup}})
    return out


def _recipe_columns(groups: list[dict]) -> None:
    """``columns``: the recipe options that vary between average rows (method options, precision, ...)."""
    idents = [None if g["identity"] is None else {k: v for k, v in g["identity"].items()
                                                  if k not in ("data", "train", "seed", "eval_data")}
              for g in groups]
    for g in groups:
        g["group"] = table._group_id(g["recipe"])
    table._add_columns(groups, idents, ("method", "backbone", "shots"), {"method", "backbone"})


def _fewshot_average(fewshot: list[dict], papers: _Papers) -> list[dict]:
    rows = [r for r in fewshot if r["classes"] == "all"]
    for r in rows:
        r["avg_shots"] = r["shots"]
    groups = _average_groups(rows, lambda r: r["dataset"], COOP_DATASETS)
    groups = [g for g in groups if g["datasets"]]
    for g in groups:
        g["mean"] = float(np.mean([g["members"][d]["mean"] for d in COOP_DATASETS])) if g["complete"] else None
        paper = papers.join(method=g["method"], dataset=AVERAGE, protocol="fewshot", backbone=g["backbone"],
                            pretrained=g["pretrained"], shots=g["shots"], metric="accuracy",
                            identity=g["identity"]) if g["complete"] else None
        _with_paper(g, g["mean"], paper)
    _recipe_columns(groups)
    return sorted(groups, key=lambda g: (str(g["method"]), _num(g["shots"]), g["group"]))


def _base_to_new(paths, papers: _Papers, excluded: list) -> list[dict]:
    out = table.summarize_base_to_new(paths, excluded)  # runs not trained on the base half are left out
    cache: dict[str, dict] = {}
    for s in out:
        for p in s["paths"]:
            cache[p] = table._read_json(Path(p), "base-to-new results")
        ident = s["identity"]
        s["backbone"] = ident.get("backbone") if ident else None
        s["pretrained"] = ident.get("pretrained") if ident else None
        s["shots"] = _shots(ident)
        s["recipe"] = recipe_key(ident, "eval_data")
        s["values"] = {k: [float(cache[p][k]) for p in s["paths"]] for k in ("base", "new")}
        s["collapsed"] = sorted({s["seeds"][i] for k in ("base", "new") for i in collapsed(s["values"][k])},
                                key=table._seed_order)
        for metric, measured in (("base", s["base"]), ("new", s["new"]), ("harmonic_mean", s["harmonic_mean"])):
            _with_paper(s, measured, papers.join(method=s["method"], dataset=s["dataset"], protocol="base2new",
                                                 backbone=s["backbone"], pretrained=s["pretrained"],
                                                 shots=s["shots"], metric=metric, identity=ident),
                        key=f"paper_{metric}")
    return out


def _base_to_new_average(b2n: list[dict], papers: _Papers) -> list[dict]:
    for r in b2n:
        r["avg_shots"] = r["shots"]
    groups = [g for g in _average_groups(b2n, lambda r: r["dataset"], COOP_DATASETS) if g["datasets"]]
    for g in groups:
        g["base"] = g["new"] = g["harmonic_mean"] = None
        if g["complete"]:
            g["base"] = float(np.mean([g["members"][d]["base"] for d in COOP_DATASETS]))
            g["new"] = float(np.mean([g["members"][d]["new"] for d in COOP_DATASETS]))
            g["harmonic_mean"] = (2 * g["base"] * g["new"] / (g["base"] + g["new"])
                                  if g["base"] + g["new"] > 0 else 0.0)  # CoCoOp: H of the averages
        for metric in ("base", "new", "harmonic_mean"):
            paper = papers.join(method=g["method"], dataset=AVERAGE, protocol="base2new", backbone=g["backbone"],
                                pretrained=g["pretrained"], shots=g["shots"], metric=metric,
                                identity=g["identity"]) if g["complete"] else None
            _with_paper(g, g[metric], paper, key=f"paper_{metric}")
    _recipe_columns(groups)
    return sorted(groups, key=lambda g: (str(g["method"]), _num(g["shots"]), g["group"]))


def _transfer(paths, papers: _Papers) -> list[dict]:
    items = []
    for f in table._find(paths, "*.json"):
        if f.parent.name != "eval" or f.name.startswith("base2new-"):
            continue
        r = table._read_json(f, "evaluation results")
        if r.get("classes") != "all" or r.get("split") != "test" or r.get("dataset") == r.get("trained_on"):
            continue  # the halves of base-to-new, other splits, a run re-evaluated on its own data
        if "accuracy" not in (r.get("metrics") or {}):
            continue
        ident = copy.deepcopy(r["identity"]) if isinstance(r.get("identity"), dict) else None
        seed = ident.pop("seed", None) if ident is not None else None
        eval_data = r.get("eval_data")
        if ident is None or not isinstance(eval_data, dict):
            key, full = f"unidentified:{f}", None
        else:
            full = {**ident, "eval_data": eval_data}
            key = table.canonical(full)
        items.append({"key": key, "seed": seed, "path": str(f), "row": r, "identity": full, "train_identity": ident})
    out, identities = [], []
    for g in table._group(items, "evaluations"):
        first = g[0]
        values = [table._number(it["row"]["metrics"]["accuracy"], it["path"], "accuracy") for it in g]
        mean, std = mean_std(values)
        r = first["row"]
        kind = ("domain-generalization" if r.get("trained_on") == "imagenet" and r.get("dataset") in DG_TARGETS
                else "cross-dataset")
        ident = first["train_identity"]
        row = {"kind": kind, "method": r.get("method"), "trained_on": r.get("trained_on"), "dataset": r.get("dataset"),
               "backbone": ident.get("backbone") if ident else None,
               "pretrained": ident.get("pretrained") if ident else None, "shots": _shots(ident),
               "mean": mean, "std": std, "runs": len(g), "seeds": [it["seed"] for it in g], "values": values,
               "paths": [it["path"] for it in g], "identity": first["identity"],
               "train_key": table.canonical(ident) if ident is not None else first["key"],
               "group": table._group_id(first["key"]) if ident is not None else first["path"]}
        row["collapsed"] = [row["seeds"][i] for i in collapsed(values)]
        _with_paper(row, mean, papers.join(method=row["method"], dataset=row["dataset"], protocol=kind,
                                           backbone=row["backbone"], pretrained=row["pretrained"], shots=row["shots"],
                                           metric="accuracy", identity=ident))
        out.append(row)
        identities.append(first["identity"])
    return table._add_columns(out, identities, ("method", "trained_on", "dataset"),
                              {"method", "eval_data.dataset", "data.dataset"}) if out else []


def _transfer_average(transfer: list[dict]) -> list[dict]:
    """Per trained configuration and kind: the mean over every target of the protocol (DG: the 4 ImageNet
    variants; cross-dataset: the other 10 of the 11 datasets), when all are there."""
    groups: dict[tuple, list[dict]] = {}
    for r in transfer:
        groups.setdefault((r["train_key"], r["kind"]), []).append(r)
    out = []
    for (_, kind), rows in groups.items():
        first = rows[0]
        targets = DG_TARGETS if kind == "domain-generalization" else tuple(
            d for d in COOP_DATASETS if d != first["trained_on"])
        by = {}
        for r in rows:
            by.setdefault(r["dataset"], []).append(r)
        missing = [d for d in targets if d not in by]
        dup = sorted(d for d, rs in by.items() if len(rs) > 1 and d in targets)  # evaluated on two copies
        complete = not missing and not dup and first["trained_on"] in COOP_DATASETS
        if not any(d in by for d in targets):
            continue
        out.append({"kind": kind, "method": first["method"], "trained_on": first["trained_on"],
                    "columns": {k: v for k, v in first["columns"].items() if not k.startswith("eval_data.")},
                    "targets": list(targets), "missing": missing, "ambiguous": dup, "complete": complete,
                    "mean": float(np.mean([by[d][0]["mean"] for d in targets])) if complete else None})
    return out


def _ordinal(rows: list[dict], papers: _Papers) -> list[dict]:
    items = []
    for r in rows:
        ident, seed = r["_identity"], r["_seed"]
        fold = None
        if ident is not None:
            ident = copy.deepcopy(ident)
            fold = ((ident.get("data") or {}).get("options") or {}).pop("fold", None)
        unit = "fold" if fold is not None else "seed"
        key = (table.canonical({"identity": ident, "seed": seed if fold is not None else None})
               if ident is not None else f"unidentified:{r['_path']}")
        items.append({"key": key, "seed": fold if fold is not None else seed, "unit": unit, "path": r["_path"],
                      "row": r, "identity": ident, "run_seed": seed})
    out, identities = [], []
    for g in table._group(items, "ordinal runs"):
        first = g[0]
        if len({it["unit"] for it in g}) > 1:
            raise VLPromptError(f"{first['path']}: some runs of one configuration have folds and others not")
        r = first["row"]
        metrics = {}
        for m in ORDINAL_METRICS:
            missing = [it["path"] for it in g if m not in it["row"].get("metrics", {})]
            if missing:  # a mean over a subset of the folds would be a plausible wrong number
                raise VLPromptError(f"{missing[0]}: no {m} in results.json, unlike its sibling runs")
            vals = [table._number(it["row"]["metrics"][m], it["path"], m) for it in g]
            mean, std = mean_std(vals)
            metrics[m] = {"mean": mean, "std": std, "values": vals}
        ident = first["identity"]
        row = {"method": r.get("method"), "dataset": r.get("dataset"), "backbone": r.get("backbone"),
               "pretrained": ident.get("pretrained") if ident else None, "shots": r.get("shots"),
               "unit": first["unit"] + "s", "units": [it["seed"] for it in g], "runs": len(g),
               "seed": first["run_seed"] if first["unit"] == "fold" else None,
               "paths": [it["path"] for it in g], "metrics": metrics, "identity": ident,
               "group": table._group_id(first["key"]) if ident is not None else first["path"]}
        row["collapsed"] = [row["units"][i] for i in collapsed(metrics["acc_expectation"]["values"])]
        row["paper"], row["published_unjoined"] = {}, []
        for pm, ours in (("mae", ("mae_expectation", "mae_argmax")), ("accuracy", ("acc_expectation", "acc_argmax"))):
            p = papers.join(method=row["method"], dataset=row["dataset"], protocol="ordinal",
                            backbone=row["backbone"], pretrained=row["pretrained"], shots=row["shots"], metric=pm,
                            identity=ident)
            if p is not None:
                p["diff"] = {m: metrics[m]["mean"] - p["value"] for m in ours}
                row["paper"][pm] = p
        # numbers of this method and dataset whose source states no backbone: listed, never compared
        for n in papers.numbers:
            if (n.protocol, n.method, n.dataset, n.backbone) == ("ordinal", row["method"], row["dataset"], None):
                row["published_unjoined"].append({"metric": n.metric, "value": n.value, "ref": papers.cite(n)})
        out.append(row)
        identities.append(ident)
    return table._add_columns(out, identities, ("method", "dataset", "backbone", "shots"),
                              {"method", "backbone", "data.dataset", "data.shots"}) if out else []


def build_report(paths: Iterable[str | Path], papers: Optional[list[PublishedNumber]] = None) -> dict:
    """Every table of the runs under ``paths`` as data (see the module's docstring); ``papers``: the published
    numbers to compare with (default: the bundled ones, :func:`vlprompt.papers.load_papers`)."""
    paths = list(paths)
    rows = table.collect_results(paths)
    cited = _Papers(load_papers() if papers is None else list(papers))
    ordinal = [r for r in rows if "mae_expectation" in r.get("metrics", {})]
    classification = [r for r in rows if "accuracy" in r.get("metrics", {}) and "mae_expectation" not in r["metrics"]]
    ignored = [r["_path"] for r in rows if not {"accuracy", "mae_expectation"} & set(r.get("metrics", {}))]
    fewshot = _fewshot(classification, cited)
    b2n_excluded: list = []
    b2n = _base_to_new(paths, cited, b2n_excluded)
    transfer = _transfer(paths, cited)
    report = {
        "std": STD_CONVENTION, "collapse_rule": COLLAPSE_RULE,
        "fewshot": fewshot, "fewshot_average": _fewshot_average(fewshot, cited),
        "base2new": b2n, "base2new_average": _base_to_new_average(b2n, cited),
        "transfer": transfer, "transfer_average": _transfer_average(transfer),
        "ordinal": _ordinal(ordinal, cited), "ignored": ignored, "base2new_excluded": b2n_excluded,
    }
    if not (fewshot or b2n or transfer or report["ordinal"]):
        raise VLPromptError(f"no run results under {', '.join(map(str, paths))} (results.json or eval/*.json)"
                            + (f"; {table.excluded_line(b2n_excluded[0])}" if b2n_excluded else ""))
    by_source = {n.source: n for n in cited.numbers}
    notes = paper_notes() if papers is None else {}
    report["sources"] = [{"ref": i, "source": s, "paper": by_source[s].paper, "file": by_source[s].file,
                          "citation": notes.get(by_source[s].paper, {}).get("citation")}
                         for s, i in sorted(cited.cited.items(), key=lambda kv: kv[1])]
    return report
