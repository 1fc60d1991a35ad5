"""Run directories: what a directory holds, and what a new run may do with it.

A run directory is marked by ``run.json`` (``{"vlprompt_run": 1, "status": ..., "request_hash": ...,
"config_hash": ...}``), written with ``config.yaml`` when the run starts. Directories of earlier versions
(a ``config.yaml`` naming a ``method``) count as runs too. The rules:

* an absent or empty directory: a fresh run;
* this very run (same identity), finished -- results.json written and run.json saying done (results.json comes
  just before the mark: a run killed in between is unfinished) -- its results are returned (``force`` runs it
  again);
* this very run, unfinished: it continues from its checkpoint with ``resume``, and starts over when it has
  none (nothing of value is lost);
* another run that never wrote a checkpoint nor results (it failed or was killed early): replaced -- a failed
  run never blocks the corrected rerun;
* another run with checkpoints or results: refused unless ``force``;
* anything that is not a vlprompt run (any other non-empty directory, a file): refused, ``force`` included --
  ``--force`` only ever clears a vlprompt run directory.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .._io import atomic_write_json
from ..errors import ConfigError

log = logging.getLogger("vlprompt")

MARKER = "run.json"


@dataclass
class DirState:
    """``action``: fresh | done | resume | restart | replace; ``identity_hash`` of the run it holds (or None)."""

    action: str
    held_hash: Optional[str] = None
    has_checkpoints: bool = False


def read_marker(run_dir: Path) -> Optional[dict]:
    p = Path(run_dir) / MARKER
    if not p.is_file():
        return None
    try:
        obj = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {"vlprompt_run": 1, "status": "unknown"}  # a torn marker of ours
    return obj if isinstance(obj, dict) and obj.get("vlprompt_run") else None


def is_run_dir(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    if read_marker(run_dir) is not None:
        return True
    cfg = run_dir / "config.yaml"
    if cfg.is_file():  # a run of an earlier version
        try:
            obj = yaml.safe_load(cfg.read_text())
        except (OSError, yaml.YAMLError):
            return False
        return isinstance(obj, dict) and "method" in obj and "data" in obj
    return False


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished: results.json is there and run.json says done (a directory of an
    earlier version, without run.json, is finished when it has results.json)."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        return False
    marker = read_marker(run_dir)
    return marker is None or marker.get("status") == "done"


def held_identity_hash(run_dir: Path) -> Optional[str]:
    """The identity hash of the run a directory holds (from run.json, else from an older config.yaml)."""
    marker = read_marker(run_dir)
    if marker and marker.get("config_hash"):
        return marker["config_hash"]
    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        from .config import RunConfig

        return RunConfig.from_dict(yaml.safe_load(cfg.read_text())).identity_hash()
    except (TypeError, KeyError, ValueError, AttributeError, yaml.YAMLError):
        return None  # a config of an older layout: another run


def held_config(run_dir: Path) -> Optional[dict]:
    """The config.yaml a run directory holds (as written, any version), or None."""
    cfg = Path(run_dir) / "config.yaml"
    try:
        obj = yaml.safe_load(cfg.read_text()) if cfg.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    return obj if isinstance(obj, dict) else None


def adopt_earlier(run_dir: Path, cfg):
    """The configuration of the run an earlier version of vlprompt wrote in ``run_dir``, upgraded to today's
    keys, when it is ``cfg`` but for what that version did not have (``data.sampler``: it sampled the shots
    with the rule now called ``sorted``): the run then continues as what it is, on its own split.json, instead
    of being refused as another run. None otherwise."""
    import dataclasses

    from .config import resolve, upgrade_request

    held = held_config(run_dir)
    if held is None or not (Path(run_dir) / "split.json").is_file():
        return None
    try:
        old = resolve(upgrade_request(held))
    except ConfigError:
        return None
    if old.identity() == cfg.identity():
        return None  # the very same run: nothing to adopt
    mine = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sampler=old.data.sampler))
    if old.data.sampler != cfg.data.sampler and mine.identity() == old.identity():
        return dataclasses.replace(old, device=cfg.device, cache_dir=cfg.cache_dir, tensorboard=cfg.tensorboard)
    return None


def inspect(run_dir: Path, identity_hash: str, *, resume: bool, force: bool, adopted: bool = False) -> DirState:
    """What a run of ``identity_hash`` may do with ``run_dir`` (see the module doc); ``adopted``: the run is
    the one the directory holds, written by an earlier version (:func:`adopt_earlier`). Writes nothing."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output {run_dir} is a file, not a directory")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return DirState("fresh")
    if not is_run_dir(run_dir):
        raise ConfigError(f"--output {run_dir} is not empty and is not a vlprompt run directory; choose another "
                          f"--output (--force only replaces vlprompt runs)")
    held = held_identity_hash(run_dir)
    ckpts = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    has_results = (run_dir / "results.json").is_file()
    finished = is_finished(run_dir)
    if force:
        return DirState("replace", held, ckpts)
    if held == identity_hash or adopted:
        if finished:
            return DirState("done", held, ckpts)
        if ckpts and not resume:
            raise ConfigError(f"{run_dir} holds this run, unfinished: pass --resume to continue it from its last "
                              f"checkpoint, or --force to start over")
        return DirState("resume" if ckpts else "restart", held, ckpts)
    if not ckpts and not has_results:
        return DirState("replace", held, False)  # a failed or early-killed run: nothing of value
    raise ConfigError(f"{run_dir} holds another run (a different configuration{', finished' if finished else ''}); "
                      f"choose another --output or pass --force to replace it")


def clear(run_dir: Path) -> None:
    """Empty a vlprompt run directory (refuses anything else)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a vlprompt run directory: not clearing it")
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def write_marker(run_dir: Path, **fields) -> None:
    old = read_marker(run_dir) or {}
    atomic_write_json(Path(run_dir) / MARKER, {**old, "vlprompt_run": 1, **fields})
