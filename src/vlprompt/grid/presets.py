"""Protocol presets: the papers' grids as data (``vlprompt/grid/protocols/<name>.yaml``, grid specs with a
``description``), read here and expanded by :mod:`vlprompt.grid.spec` (which imports this module; this one imports
no other grid module). The runs' recipes (epochs by shots, batch sizes...) are
the methods' own presets (:meth:`vlprompt.methods.base.Method.preset`): a protocol only says which runs to make.

A protocol that needs what the data layer does not offer says so (``requires:``) and is refused with what is
missing rather than approximated.
"""
from __future__ import annotations

from importlib import resources

from ..errors import ConfigError


def preset_names() -> list[str]:
    folder = resources.files(__package__).joinpath("protocols")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict:
    """The protocol's YAML mapping (its grid spec, ``description`` and ``requires``)."""
    import yaml

    names = preset_names()
    if name not in names:
        raise ConfigError(f"--preset {name!r}: unknown protocol; known: {', '.join(names)}")
    text = resources.files(__package__).joinpath("protocols", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def missing_requirements(name: str) -> list[str]:
    """What the data layer lacks for a protocol (``[]`` when it can run)."""
    from ..data import get_dataset_info

    req = read_preset(name).get("requires") or {}
    if not req:
        return []
    have = set(get_dataset_info(req["dataset"]).options)
    return [o for o in req.get("options", []) if o not in have]
