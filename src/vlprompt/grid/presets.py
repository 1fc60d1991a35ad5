"""Protocol presets: the papers' grids as data (``vlprompt/grid/protocols/<name>.yaml``, grid specs with a
``description``), expanded by :mod:`vlprompt.grid.spec`. The runs' recipes (epochs by shots, batch sizes...) are
the methods' own presets (:meth:`vlprompt.methods.base.Method.preset`): a protocol only says which runs to make.

A protocol that needs what the data layer does not offer says so (``requires:``) and is refused with what is
missing rather than approximated.
"""
from __future__ import annotations

from importlib import resources

from ..errors import ConfigError
from .spec import GridSpec, spec_from_mapping


def preset_names() -> list[str]:
    folder = resources.files(__package__).joinpath("protocols")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read(name: str) -> dict:
    import yaml

    names = preset_names()
    if name not in names:
        raise ConfigError(f"--preset {name!r}: unknown protocol; known: {', '.join(names)}")
    text = resources.files(__package__).joinpath("protocols", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def missing_requirements(name: str) -> list[str]:
    """What the data layer lacks for a protocol (``[]`` when it can run)."""
    from ..data import get_dataset_info

    req = _read(name).get("requires") or {}
    if not req:
        return []
    have = set(get_dataset_info(req["dataset"]).options)
    return [o for o in req.get("options", []) if o not in have]


def load_preset(name: str) -> GridSpec:
    obj = _read(name)
    missing = missing_requirements(name)
    if missing:
        raise ConfigError(f"--preset {name}: the {obj['requires']['dataset']} reader has no option(s) "
                          f"{', '.join(missing)} (vlprompt.data.ordinal): {obj['description'].strip()}")
    obj.pop("requires", None)
    spec = spec_from_mapping(obj, f"preset {name}")
    spec.preset = name
    return spec


def describe_presets() -> str:
    from .spec import expand

    lines = []
    for name in preset_names():
        obj = _read(name)
        missing = missing_requirements(name)
        if missing:
            count = f"not available: the data layer lacks {', '.join(missing)}"
        else:
            spec = load_preset(name)
            spec.overrides.setdefault("data", {}).setdefault("root", "ROOT")
            count = f"{len(expand(spec))} cells"
        lines.append(f"{name} ({count})\n  " + " ".join(str(obj.get("description", "")).split()))
    return "\n".join(lines)
