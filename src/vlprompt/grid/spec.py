"""Grid specifications: a base request and axes, expanded into named cells, each an ordinary run request.

A grid spec (YAML, or the same mapping in Python) holds the keys of a run's ``config.yaml`` (the *base*
request) and grid keys:

* ``axes``: ``{key: [values]}``, ``key`` any request key, dotted for nested ones (``method``, ``data.dataset``,
  ``data.shots``, ``seed``, ``method_options.n_ctx``, ``train.epochs``, ``data.options.fold``). The cells are the
  product of the axes. Only ``axes`` makes cells: a list elsewhere is the option's own value (a list of templates
  stays one value), so a list never silently multiplies the runs.
* ``grids``: sub-grids, each a mapping of request keys and ``axes`` over the top-level ones (e.g. one per
  dataset when the folds depend on the dataset); the cells are the concatenation of theirs.
* ``evaluations``: what runs after a cell trains: ``{dataset, root?, options?, split?, classes?}`` evaluates the
  run on another dataset (:func:`vlprompt.runs.evaluate_run`), ``{base_to_new: true}`` runs the base-to-new
  protocol on the cell's own dataset (:func:`vlprompt.runs.base_to_new`).
* ``roots``: ``{dataset: folder}``: the data root of the cells (and evaluations) of that dataset; a relative
  folder is taken under the grid's ``data.root``.
* ``preset``: a protocol preset (:mod:`vlprompt.grid.presets`) the spec's keys override.

A cell's name is made of its axis values in a fixed order (method, backbone, weights, dataset, classes, shots,
the other axes in their declared order, seed), e.g. ``coop/dtd/shots4/seed1``: the same grid gives the same
names whether it is written as a file or as flags, and narrowing a grid keeps the names of the cells it keeps.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigError, VLPromptError
from .presets import missing_requirements, preset_names, read_preset

GRID_KEYS = ("preset", "description", "axes", "grids", "evaluations", "roots")
EVAL_KEYS = {"dataset", "root", "options", "split", "classes"}
#: axes whose values name themselves in a cell name (``coop``, ``dtd``); the others are ``<last key><value>``
BARE = ("method", "backbone", "pretrained", "data.dataset")
#: the order of the axes in a cell name (other axes follow in their declared order, the seed comes last)
NAME_ORDER = ("method", "backbone", "pretrained", "data.dataset", "data.classes", "data.shots")


def request_keys() -> set[str]:
    from ..runs.config import TOP_KEYS

    return set(TOP_KEYS) - {"version"}


@dataclass
class Cell:
    """One run of a grid: its ``name`` (a relative path under the grid's output), the ``request`` (keys of
    config.yaml), the ``evaluations`` to run after it, and its resolved ``config`` (after :func:`resolve_cells`)."""

    name: str
    request: dict
    evaluations: list = field(default_factory=list)
    config: Any = None  # RunConfig

    @property
    def identity_hash(self) -> str:
        return self.config.identity_hash()


@dataclass
class GridSpec:
    """A grid before expansion. ``base``: request keys; ``overrides``: request keys applied after the sub-grids'
    own (the user's settings over a preset's); ``axes``: top-level axes; ``grids``: sub-grids (``[]``: one)."""

    base: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    axes: dict = field(default_factory=dict)
    grids: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    roots: dict = field(default_factory=dict)
    preset: Optional[str] = None
    description: str = ""

    # -- flags ------------------------------------------------------------------------------------------
    def set_axis(self, key: str, values: Sequence, flag: str) -> None:
        """An axis from the command line. On an axis a sub-grid defines, the values *select* (each must be one
        of the grid's; sub-grids left empty are dropped); otherwise they replace the axis (or make one)."""
        check_key(key, flag)
        values = list(values)
        if not values:
            raise ConfigError(f"{flag}: give at least one value")
        in_grids = [g for g in self.grids if key in g.get("axes", {})]
        if in_grids:
            known = [v for g in in_grids for v in g["axes"][key]]
            unknown = [v for v in values if v not in known]
            if unknown:
                raise ConfigError(f"{flag} {', '.join(map(str, unknown))}: not in this grid (its values: "
                                  f"{', '.join(map(str, dict.fromkeys(map(str, known))))})")
            kept = []
            for g in self.grids:
                if key in g.get("axes", {}):
                    g = copy.deepcopy(g)
                    g["axes"][key] = [v for v in g["axes"][key] if v in values]
                    if not g["axes"][key]:
                        continue
                kept.append(g)
            self.grids = kept
        else:
            self.axes[key] = values
        _pop_dotted(self.base, key)
        _pop_dotted(self.overrides, key)

    def set_value(self, key: str, value: Any, flag: str) -> None:
        """One value: an axis of one value where ``key`` is an axis (the cell names keep it), else a setting
        over the base and the sub-grids."""
        check_key(key, flag)
        if key in self.axes or any(key in g.get("axes", {}) for g in self.grids):
            self.set_axis(key, [value], flag)
        else:
            _set_dotted(self.overrides, key, value)


def check_key(key: str, where: str) -> None:
    parts = key.split(".")
    top = request_keys()
    if parts[0] not in top:
        raise ConfigError(f"{where}: {parts[0]!r} is not a run option; known: {', '.join(sorted(top))}")
    if len(parts) > 1 and parts[0] not in ("data", "train", "method_options"):
        raise ConfigError(f"{where}: {parts[0]} has no nested options (got {key!r})")
    if len(parts) > 2 and parts[:2] != ["data", "options"]:
        raise ConfigError(f"{where}: {key!r} is nested too deeply (only data.options.<reader option> is)")
    if any(not p for p in parts):
        raise ConfigError(f"{where}: malformed key {key!r}")


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = d[p] = {}
        d = nxt
    d[parts[-1]] = copy.deepcopy(value)


def _pop_dotted(d: dict, key: str) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.get(p)
        if not isinstance(d, dict):
            return
    d.pop(parts[-1], None)


# -- loading --------------------------------------------------------------------------------------------
def _split_request(obj: dict, where: str, allow: Sequence[str]) -> tuple[dict, dict]:
    """(request keys, grid keys) of a mapping; anything else is refused, naming it."""
    top = request_keys()
    unknown = sorted(set(obj) - top - set(allow))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a grid holds run options ({', '.join(sorted(top))}) "
                          f"and {', '.join(allow)}")
    return ({k: v for k, v in obj.items() if k in top}, {k: v for k, v in obj.items() if k in allow})


def _check_axes(axes: Any, where: str) -> dict:
    if axes is None:
        return {}
    if not isinstance(axes, dict):
        raise ConfigError(f"{where}.axes must be a mapping of option -> list of values")
    out = {}
    for key, values in axes.items():
        check_key(str(key), f"{where}.axes")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.axes.{key} must be a non-empty list of values, got {values!r}")
        out[str(key)] = list(values)
    return out


def _check_evaluations(evals: Any, where: str) -> list:
    if evals is None:
        return []
    if not isinstance(evals, list):
        raise ConfigError(f"{where}.evaluations must be a list")
    out = []
    for i, e in enumerate(evals):
        if not isinstance(e, dict):
            raise ConfigError(f"{where}.evaluations[{i}] must be a mapping, got {e!r}")
        if "base_to_new" in e:
            if e != {"base_to_new": True}:
                raise ConfigError(f"{where}.evaluations[{i}]: base_to_new takes no other key (it evaluates the cell's "
                                  f"own dataset), got {e!r}")
        else:
            unknown = sorted(set(e) - EVAL_KEYS)
            if unknown or "dataset" not in e:
                raise ConfigError(f"{where}.evaluations[{i}]: needs 'dataset' and takes {sorted(EVAL_KEYS)}; got "
                                  f"{sorted(e)}")
        out.append(dict(e))
    return out


def spec_from_mapping(obj: dict, where: str = "grid") -> GridSpec:
    """A :class:`GridSpec` from a mapping (a YAML file's content), its ``preset`` applied under it."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    obj = copy.deepcopy(obj)
    obj.pop("version", None)
    request, grid = _split_request(obj, where, GRID_KEYS)
    if "user_set" in request:  # a run's config.yaml as the base: what its user set (the axes derive the rest again)
        from ..runs.config import request_of

        request = request_of(request)
    grids = grid.get("grids") or []
    if not isinstance(grids, list):
        raise ConfigError(f"{where}.grids must be a list of sub-grids")
    subs = []
    for i, g in enumerate(grids):
        if not isinstance(g, dict):
            raise ConfigError(f"{where}.grids[{i}] must be a mapping")
        sreq, sgrid = _split_request(g, f"{where}.grids[{i}]", ("axes", "evaluations"))
        sub = {**sreq, "axes": _check_axes(sgrid.get("axes"), f"{where}.grids[{i}]")}
        if "evaluations" in sgrid:
            sub["evaluations"] = _check_evaluations(sgrid["evaluations"], f"{where}.grids[{i}]")
        subs.append(sub)
    roots = grid.get("roots") or {}
    if not isinstance(roots, dict) or not all(isinstance(v, str) for v in roots.values()):
        raise ConfigError(f"{where}.roots must map dataset names to folders")
    spec = GridSpec(base=request, axes=_check_axes(grid.get("axes"), where), grids=subs,
                    evaluations=_check_evaluations(grid.get("evaluations"), where), roots=dict(roots),
                    description=str(grid.get("description") or ""))
    if grid.get("preset"):
        return merge_over_preset(load_preset(grid["preset"]), spec)
    return spec


def merge_over_preset(preset: GridSpec, user: GridSpec) -> GridSpec:
    """The user's spec over a preset: its run options override the preset's (sub-grids included), its axes
    replace the preset's axes of the same key, its evaluations (when given) replace the preset's."""
    from ..runs import merge_requests

    out = copy.deepcopy(preset)
    out.overrides = merge_requests(out.overrides, merge_requests(user.base, user.overrides))
    for key, values in user.axes.items():
        out.set_axis(key, values, f"axes.{key}")
    if user.grids:
        raise ConfigError(f"a spec over preset {preset.preset!r} cannot add sub-grids; write the whole grid instead")
    if user.evaluations:
        out.evaluations = user.evaluations
        out.grids = [{k: v for k, v in g.items() if k != "evaluations"} for g in out.grids]
    out.roots.update(user.roots)
    return out


def load_spec(path: str | os.PathLike) -> GridSpec:
    from ..runs.config import read_yaml_mapping

    return spec_from_mapping(read_yaml_mapping(path, "grid spec"), str(Path(path).expanduser()))


# -- expansion ------------------------------------------------------------------------------------------
def _get_dotted(d: dict, key: str, default=None):
    for p in key.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def _name_order(keys: Sequence[str]) -> list[str]:
    def rank(item):
        i, k = item
        if k == "seed":
            return (2, 0)
        if k in NAME_ORDER:
            return (0, NAME_ORDER.index(k))
        return (1, i)
    return [k for _, k in sorted(enumerate(keys), key=rank)]


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def _value_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float)):
        text = repr(value)
    elif isinstance(value, str):
        # a file given as a value (a model config, a weights file) is named by its file name
        text = os.path.basename(value.rstrip("/")) if ("/" in value and not value.startswith("hf-hub:")) else value
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    text = _UNSAFE.sub("_", text).strip("._") or "_"
    if len(text) > 40:  # a long value (a list of templates): its start and a digest
        text = f"{text[:24]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return text


def cell_name(axis_values: dict) -> str:
    parts = []
    for key in _name_order(list(axis_values)):
        text = _value_text(key, axis_values[key])
        parts.append(text if key in BARE else f"{key.split('.')[-1]}{text}")
    return "/".join(parts)


def expand(spec: GridSpec) -> list[Cell]:
    """The cells of a grid, in order (sub-grids in turn, the product of the axes in their declared order).
    Names are checked: two cells with one name, or a name that is a folder of another's, are refused."""
    from ..runs import merge_requests

    cells: list[Cell] = []
    grid_root = _get_dotted(merge_requests(spec.base, spec.overrides), "data.root")
    for sub in (spec.grids or [{}]):
        sub_req = {k: v for k, v in sub.items() if k not in ("axes", "evaluations")}
        axes = {**spec.axes, **sub.get("axes", {})}
        evaluations = sub.get("evaluations", spec.evaluations)
        base = merge_requests(merge_requests(spec.base, sub_req), spec.overrides)
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            values = dict(zip(keys, combo))
            req = copy.deepcopy(base)
            for k, v in values.items():
                _set_dotted(req, k, v)
            dataset = _get_dotted(req, "data.dataset")
            if isinstance(dataset, str) and dataset in spec.roots:
                _set_dotted(req, "data.root", _root_for(spec.roots[dataset], grid_root, dataset))
            evals = [_evaluation(e, spec.roots, grid_root) for e in evaluations]
            cells.append(Cell(cell_name(values) if values else "run", req, evals))
    _check_names(cells)
    return cells


def _root_for(folder: str, grid_root: Optional[str], dataset: str) -> str:
    folder = os.path.expanduser(folder)
    if os.path.isabs(folder):
        return folder
    if not grid_root:
        raise ConfigError(f"roots.{dataset} = {folder!r} is relative to the grid's data root: give --root")
    return os.path.join(os.path.expanduser(grid_root), folder)


def _evaluation(e: dict, roots: dict, grid_root: Optional[str]) -> dict:
    if e.get("base_to_new"):
        return dict(e)
    e = dict(e)
    if "root" not in e:
        if e["dataset"] in roots:
            e["root"] = _root_for(roots[e["dataset"]], grid_root, e["dataset"])
        elif grid_root:
            e["root"] = grid_root
        else:
            raise ConfigError(f"evaluation on {e['dataset']}: no root (give --root or evaluations[].root)")
    return e


def _check_names(cells: list[Cell]) -> None:
    seen: dict[str, int] = {}
    for i, c in enumerate(cells):
        if c.name in seen:
            raise ConfigError(f"two cells of the grid are named {c.name!r} (cells {seen[c.name] + 1} and {i + 1}): "
                              f"their axis values read the same in a folder name")
        seen[c.name] = i
    names = sorted(seen)
    for a, b in zip(names, names[1:]):
        if b.startswith(a + "/"):
            raise ConfigError(f"cell {a!r} would be a folder of cell {b!r}: give every sub-grid the same axes")


def resolve_cells(cells: list[Cell]) -> list[Cell]:
    """Resolve and validate every cell (:func:`vlprompt.runs.resolve`) and its evaluations before anything runs:
    the first bad cell stops the grid, named. Two cells that resolve to the same run (an axis that changes
    nothing the numbers depend on) are refused too."""
    from ..reporting.collect import base_to_new_problem
    from ..runs import resolve
    from ..runs.config import resolve_data

    by_hash: dict[str, str] = {}
    for c in cells:
        try:
            c.config = resolve(c.request)
            for e in c.evaluations:
                if e.get("base_to_new"):
                    problem = base_to_new_problem(c.config.identity())
                    if problem is not None:
                        raise ConfigError(f"evaluation base_to_new: {problem} (give the cell data.classes: base)")
                else:
                    resolve_data({k: v for k, v in e.items() if k in ("dataset", "root", "options", "classes")})
                    if e.get("split", "test") not in ("train", "val", "test"):
                        raise ConfigError(f"evaluation split must be train, val or test, got {e['split']!r}")
        except VLPromptError as err:
            raise ConfigError(f"grid cell {c.name}: {err}") from err
        h = c.config.identity_hash()
        if h in by_hash:
            raise ConfigError(f"grid cells {by_hash[h]} and {c.name} are the same run (same identity): an axis "
                              f"changes nothing the results depend on")
        by_hash[h] = c.name
    return cells


def parse_values(text: str) -> list:
    """``1,2,4`` -> [1, 2, 4]; each item JSON when it parses (numbers, true/false, null), else a string."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(json.loads(item))
        except json.JSONDecodeError:
            out.append(item)
    return out


def load_preset(name: str) -> GridSpec:
    """A protocol preset (:mod:`.presets`) as a grid spec; refused, saying why, when the data layer lacks what it
    requires."""
    obj = read_preset(name)
    missing = missing_requirements(name)
    if missing:
        raise ConfigError(f"--preset {name}: the {obj['requires']['dataset']} reader has no option(s) "
                          f"{', '.join(missing)} (vlprompt.data.ordinal): {obj['description'].strip()}")
    obj.pop("requires", None)
    spec = spec_from_mapping(obj, f"preset {name}")
    spec.preset = name
    return spec


def describe_presets() -> str:
    """One paragraph per protocol preset: its name, its number of cells, its description."""
    lines = []
    for name in preset_names():
        obj = read_preset(name)
        missing = missing_requirements(name)
        if missing:
            count = f"not available: the data layer lacks {', '.join(missing)}"
        else:
            spec = load_preset(name)
            spec.overrides.setdefault("data", {}).setdefault("root", "ROOT")
            count = f"{len(expand(spec))} cells"
        lines.append(f"{name} ({count})\n  " + " ".join(str(obj.get("description", "")).split()))
    return "\n".join(lines)
