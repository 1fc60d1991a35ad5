"""Tables over many runs: mean +- std over seeds, and the base-to-new summary (H on the averages, as CoCoOp).

Runs are grouped by their *identity* (the part of the configuration that decides the numbers) minus the seed,
so a row never averages two different configurations: five CoOp variants are five rows, zero-shot on two
folder datasets two rows. The identity is ``results.json["identity"]``; runs written before it existed are
identified by their ``config.yaml`` without the keys that do not decide results (``cache_dir``, ``device``,
``tensorboard``, ``train.checkpoint_every``, the baselines' ``batch_size`` and ``resolved``) and without the
seeds; a run with neither is a group of its own. The options that vary between the groups of a table are
printed as columns (flattened dotted keys such as ``method_options.csc`` or ``data.root``).

Mean and std follow :func:`vlprompt.stats.mean_std` (population std, as CoOp's ``parse_test_res.py``).
"""
from __future__ import annotations

import copy
import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from ..errors import VLPromptError
from ..stats import STD_CONVENTION, mean_std

GROUP_KEYS = ("method", "dataset", "classes", "backbone", "shots")
# Identity keys already shown by the fixed columns (results.json's method, dataset, classes, backbone, shots).
_SHOWN = {"method", "backbone", "data.dataset", "data.classes", "data.shots"}
# Keys of an old config.yaml that do not decide the numbers (where the cache lives, the device, logging, how
# often to checkpoint, the feature batch size of the baselines, and what the baselines resolved from the rest).
_LEGACY_DROP = ("cache_dir", "device", "tensorboard", "batch_size", "resolved")
_MISSING = "—"  # cell of a varying option the group does not have


# -- finding runs -----------------------------------------------------------------------------------
def _find(paths: Iterable[str | Path], pattern: str) -> list[Path]:
    found = {}
    for p in map(Path, paths):
        if not p.exists():
            raise VLPromptError(f"no such run directory: {p}")
        for f in ([p] if (p.is_file() and p.match(pattern)) else sorted(p.rglob(pattern))):
            found.setdefault(f.resolve(), f)  # overlapping arguments (runs/ and runs/a) find a file once
    return list(found.values())


def _read_json(f: Path, what: str) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VLPromptError(f"{f}: unreadable {what} ({e})") from e


def legacy_identity(config: dict) -> tuple[dict, Any]:
    """``(identity without the seed, seed)`` of a run written before results.json held its identity, from its
    ``config.yaml`` (a training or a baseline configuration). Data and training seeds that differ (never
    written by the CLI, possible from the Python API) make the seed ``"data=A,train=B"``."""
    ident = copy.deepcopy(config)
    for key in _LEGACY_DROP:
        ident.pop(key, None)
    seeds = []
    for section in ("data", "train"):
        if isinstance(ident.get(section), dict):
            if section == "train":
                ident[section].pop("checkpoint_every", None)
            if "seed" in ident[section]:
                seeds.append((section, ident[section].pop("seed")))
    values = {v for _, v in seeds}
    seed = None if not seeds else seeds[0][1] if len(values) == 1 else ",".join(f"{k}={v}" for k, v in seeds)
    return ident, seed


def run_identity(run_dir: Path, results: Optional[dict] = None) -> tuple[Optional[dict], Any]:
    """``(identity without the seed, seed)`` of the run in ``run_dir``; the identity is None when the run says
    nothing about its configuration (no ``identity`` in results.json, no config.yaml)."""
    if results is None:
        f = run_dir / "results.json"
        results = _read_json(f, "results") if f.exists() else {}
    if isinstance(results.get("identity"), dict):
        ident = copy.deepcopy(results["identity"])
        return ident, ident.pop("seed", results.get("seed"))
    cfg_file = run_dir / "config.yaml"
    if cfg_file.exists():
        try:
            config = yaml.safe_load(cfg_file.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise VLPromptError(f"{cfg_file}: unreadable configuration ({e})") from e
        if not isinstance(config, dict):
            raise VLPromptError(f"{cfg_file}: not a run configuration (a mapping expected)")
        return legacy_identity(config)
    return None, results.get("seed")


def collect_results(paths: Iterable[str | Path]) -> list[dict]:
    """Every ``results.json`` under ``paths`` (run directories or folders of runs), each with ``_path`` (the run
    directory), ``_identity`` (identity without the seed, or None) and ``_seed``."""
    rows = []
    for f in _find(paths, "results.json"):
        row = _read_json(f, "results")
        row["_path"] = str(f.parent)
        row["_identity"], row["_seed"] = run_identity(f.parent, row)
        rows.append(row)
    return rows


# -- grouping ---------------------------------------------------------------------------------------
def canonical(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): equal configurations give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"data": {"root": r}}`` -> ``{"data.root": r}``); lists stay values."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _group(items: list[dict], what: str) -> list[list[dict]]:
    """Items (with ``key``, ``seed``, ``path``) grouped by ``key``; two of one group with one seed are an error."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        for other in groups[it["key"]]:
            if other["seed"] == it["seed"]:
                raise VLPromptError(f"duplicate {what} of one configuration with seed {it['seed']}: {other['path']} "
                                    f"and {it['path']} (remove one: a table would count it twice)")
        groups[it["key"]].append(it)
    return [sorted(g, key=lambda it: _seed_order(it["seed"])) for g in groups.values()]


def _seed_order(seed: Any) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) and not isinstance(seed, bool) else (1, 0, str(seed))


def _fmt(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=repr)
    return text.replace("|", "\\|").replace("\n", " ")


def _add_columns(rows: list[dict], identities: list[Optional[dict]], fixed: tuple[str, ...],
                 shown: set[str]) -> list[dict]:
    """Give every row ``columns``: the flattened options that vary between the identified groups (not those the
    ``fixed`` columns already show); when two rows would still print alike, also ``group`` (its id). Returns the
    rows sorted as printed."""
    flat = [flatten(i) if i is not None else None for i in identities]
    known = [f for f in flat if f is not None]
    keys = sorted({k for f in known for k in f} - shown)
    varying = [k for k in keys if len({canonical(f.get(k, _MISSING)) for f in known}) > 1
               and not _follows_dataset(k, known)]
    for row, f in zip(rows, flat):
        row["columns"] = {k: f[k] for k in varying if f is not None and k in f}
    printed = [tuple(_fmt(r.get(k)) for k in fixed) + tuple(_cell(r, k) for k in varying) for r in rows]
    if len(set(printed)) < len(printed):
        for row in rows:
            row["columns"]["group"] = row["group"]
    order = sorted(range(len(rows)), key=lambda i: (printed[i], rows[i]["group"]))
    return [rows[i] for i in order]


def _follows_dataset(key: str, known: list[dict]) -> bool:
    """A data root (``data.root``, ``eval_data.root``) that only changes with its section's dataset (one folder
    per dataset, e.g. a grid's ``roots:``) tells nothing the dataset column does not: no column of its own. One
    dataset read from two roots keeps it."""
    section, _, leaf = key.rpartition(".")
    if leaf != "root" or not section:
        return False
    seen: dict[str, str] = {}
    for f in known:
        ds, root = canonical(f.get(f"{section}.dataset", _MISSING)), canonical(f.get(key, _MISSING))
        if seen.setdefault(ds, root) != root:
            return False
    return True


def _cell(row: dict, key: str) -> str:
    if key in row["columns"]:
        return _fmt(row["columns"][key])
    return "?" if row["identity"] is None else _MISSING


def _number(value: Any, path: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VLPromptError(f"{path}: {name} is {value!r}, not a number")
    return float(value)


def _group_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def summarize(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """One row per configuration (identity without the seed): mean and std of ``metric`` over its seeds.

    Each row: the fixed fields (method, dataset, classes, backbone, shots), ``metric``, ``mean``, ``std``, ``runs``
    (how many), ``seeds``, ``paths``, ``identity`` (the group's, without the seed; None for an unidentified run),
    ``group`` (an id) and ``columns`` (the options that vary between the rows, dotted keys)."""
    items = []
    for r in rows:
        if metric not in r.get("metrics", {}):
            continue
        path = r.get("_path", "?")
        if "_identity" in r:
            ident, seed = r["_identity"], r.get("_seed")
        else:
            ident, seed = run_identity(Path(path), r) if path != "?" else (None, r.get("seed"))
        key = canonical(ident) if ident is not None else f"unidentified:{path}"
        items.append({"key": key, "seed": seed, "path": path, "row": r, "identity": ident})
    if rows and not items:
        raise VLPromptError(f"no run reports the metric {metric!r}")
    out, identities = [], []
    for g in _group(items, "runs"):
        first = g[0]["row"]
        for it in g[1:]:
            diff = [k for k in GROUP_KEYS if it["row"].get(k) != first.get(k)]
            if diff:  # one identity, different results headers: a broken run, not something to average
                raise VLPromptError(f"{g[0]['path']} and {it['path']} have one configuration but different "
                                    f"{', '.join(diff)} in results.json")
        mean, std = mean_std([_number(it["row"]["metrics"][metric], it["path"], metric) for it in g])
        out.append({**{k: first.get(k) for k in GROUP_KEYS}, "metric": metric, "mean": mean, "std": std,
                    "runs": len(g), "seeds": [it["seed"] for it in g], "paths": [it["path"] for it in g],
                    "identity": g[0]["identity"], "group": _group_id(g[0]["key"]) if g[0]["identity"] is not None
                    else g[0]["path"]})
        identities.append(g[0]["identity"])
    return _add_columns(out, identities, GROUP_KEYS, _SHOWN)


def base_to_new_problem(identity: Optional[dict]) -> Optional[str]:
    """Why the base-to-new protocol does not apply to the run of ``identity`` (its identity, with or without the
    seed), or None when it does. The protocol (CoCoOp) trains on the base half of the classes only, so that the
    new half is unseen: base / new / H of a run trained on every class (or on the new half) would measure nothing
    of the kind. A method that learns nothing (zero-shot) applies whatever its classes."""
    if not isinstance(identity, dict):
        return "the run records no configuration, so its training classes are unknown"
    method = identity.get("method")
    try:
        from ..methods import build_config, method_class

        cls = method_class(str(method))
        try:
            config = build_config(str(method), identity.get("method_options") or {})
        except VLPromptError:  # options of another version: the method's defaults tell whether it learns
            config = cls.config_class()
        learns = cls.needs_training_data(config)
    except VLPromptError:  # a method not registered here: take it as one that learns
        learns = True
    if not learns:
        return None
    classes = (identity.get("data") or {}).get("classes")
    if classes == "base":
        return None
    return (f"the run ({method}) was trained on {'every class' if classes == 'all' else repr(classes) + ' classes'}, "
            f"not on the base half alone, so its 'new' classes are not unseen")


def summarize_base_to_new(paths: Iterable[str | Path], excluded: Optional[list] = None) -> list[dict]:
    """Base-to-new results (``RUN/eval/base2new-*.json``) averaged over seeds per configuration: one row per
    (run identity without the seed, evaluated data, metric). H is computed on the averages, as CoCoOp does.
    Results without the evaluated data (older versions) or whose run has no identity are never merged. Results
    of runs the protocol does not apply to (:func:`base_to_new_problem`: trained on every class, e.g. files an
    earlier version wrote) are left out, and listed in ``excluded`` (``{"path", "reason"}``) when given."""
    items = []
    for f in _find(paths, "base2new-*.json"):
        r = _read_json(f, "base-to-new results")
        run_dir = f.parent.parent  # RUN/eval/base2new-<dataset>.json
        if isinstance(r.get("identity"), dict):
            ident = copy.deepcopy(r["identity"])
            seed = ident.pop("seed", None)
        else:
            ident, seed = run_identity(run_dir)
        problem = base_to_new_problem(ident)
        if problem is not None:
            if excluded is not None:
                excluded.append({"path": str(f), "reason": problem})
            continue
        eval_data = r.get("eval_data")
        if ident is None or not isinstance(eval_data, dict):
            ident, key = None, f"unidentified:{f}"
        else:
            ident = {**ident, "eval_data": eval_data}
            key = canonical({"identity": ident, "metric": r.get("metric")})
        items.append({"key": key, "seed": seed, "path": str(f), "row": r, "identity": ident})
    out, identities = [], []
    for g in _group(items, "base-to-new results"):
        first = g[0]["row"]
        base, base_std = mean_std([_number(it["row"].get("base"), it["path"], "base") for it in g])
        new, new_std = mean_std([_number(it["row"].get("new"), it["path"], "new") for it in g])
        h = 2 * base * new / (base + new) if base + new > 0 else 0.0  # CoCoOp's H, of the averages
        out.append({"method": first.get("method"), "dataset": first.get("dataset"), "metric": first.get("metric"),
                    "base": base, "base_std": base_std, "new": new, "new_std": new_std, "harmonic_mean": h,
                    "runs": len(g), "seeds": [it["seed"] for it in g], "paths": [it["path"] for it in g],
                    "identity": g[0]["identity"], "group": _group_id(g[0]["key"]) if g[0]["identity"] is not None
                    else g[0]["path"]})
        identities.append(g[0]["identity"])
    # the dataset column is the evaluated one; the trained one is the same in the protocol (then no column)
    same = all(i is None or (i.get("data") or {}).get("dataset") == i["eval_data"].get("dataset") for i in identities)
    return _add_columns(out, identities, ("method", "dataset", "metric"),
                        {"method", "eval_data.dataset", *(("data.dataset",) if same else ())})


# -- output -----------------------------------------------------------------------------------------
def _column_keys(rows: list[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r["columns"]} - {"group"})
    return keys + (["group"] if any("group" in r["columns"] for r in rows) else [])


def _seeds(row: dict) -> str:
    return ", ".join(_MISSING if s is None else _fmt(s) for s in row["seeds"])


def markdown(summary: list[dict], b2n: list[dict], excluded: Optional[list] = None) -> str:
    """Both tables in Markdown; the options that vary between rows are columns (— : the row lacks the option,
    ? : the run records no configuration). Std: :data:`vlprompt.stats.STD_CONVENTION`. ``excluded``: base-to-new
    results left out (:func:`summarize_base_to_new`), named under the tables."""
    lines = []
    if summary:
        cols = _column_keys(summary)
        lines += ["| method | dataset | classes | backbone | shots | " + "".join(f"{c} | " for c in cols)
                  + f"{summary[0]['metric']} (mean ± std) | runs | seeds |",
                  "|---|---|---|---|---:|" + "---|" * len(cols) + "---:|---:|---|"]
        for s in summary:
            lines.append("| " + " | ".join(_fmt(s[k]) for k in GROUP_KEYS) + " | "
                         + "".join(f"{_cell(s, c)} | " for c in cols)
                         + f"{s['mean']:.2f} ± {s['std']:.2f} | {s['runs']} | {_seeds(s)} |")
        lines += ["", f"std: {STD_CONVENTION}"]
    if b2n:
        cols = _column_keys(b2n)
        lines += ["", "| method | dataset | metric | " + "".join(f"{c} | " for c in cols)
                  + "base | new | H | runs | seeds |",
                  "|---|---|---|" + "---|" * len(cols) + "---:|---:|---:|---:|---|"]
        for s in b2n:
            lines.append(f"| {_fmt(s['method'])} | {_fmt(s['dataset'])} | {_fmt(s['metric'])} | "
                         + "".join(f"{_cell(s, c)} | " for c in cols)
                         + f"{s['base']:.2f} | {s['new']:.2f} | {s['harmonic_mean']:.2f} | {s['runs']} | "
                         f"{_seeds(s)} |")
        lines += ["", "H: harmonic mean of the average base and new accuracies (CoCoOp)"]
    if excluded:
        lines += [""] + [excluded_line(e) for e in excluded]
    return "\n".join(lines) + "\n"


def excluded_line(entry: dict) -> str:
    """One line naming a base-to-new result left out of the tables, and why."""
    return f"not a base-to-new result (left out): {entry['path']}: {entry['reason']}; train with --classes base"
