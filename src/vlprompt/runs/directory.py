"""Run directories: what a directory holds, and what a new run may do with it.

A run directory is marked by ``run.json`` (``{"vlprompt_run": 1, "status": ..., "request_hash": ...,
"config_hash": ...}``), written with ``config.yaml`` when the run starts; nothing else makes a folder a run (a
hand-written ``config.yaml``, an earlier version's files without run.json: refused, never replaced). The rules:

* an absent or empty directory: a fresh run;
* this very run (same identity), finished -- results.json written and run.json saying done (results.json comes
  just before the mark: a run killed in between is unfinished) -- its results are returned (``force`` runs it
  again);
* this very run, unfinished: it continues from its checkpoint with ``resume``, and starts over when it has
  none (nothing of value is lost);
* another run that never wrote a checkpoint nor results (it failed or was killed early): replaced -- a failed
  run never blocks the corrected rerun;
* another run with checkpoints or results: refused unless ``force``;
* anything that is not a vlprompt run (any other non-empty directory, a file): refused, ``force`` included.

Replacing a run removes only what vlprompt writes in a run directory (:data:`OWN_FILES`, :data:`OWN_DIRS` and
their temporary files); anything else found there is left in place. One process at a time runs a directory: it
holds the directory's lock (:mod:`vlprompt.runs.lock`, the file ``.vlprompt.lock``) from the last refusal to the
end of the run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .._io import atomic_write_json
from ..errors import ConfigError
from .lock import LOCK_NAME, BusyError, DirLock, describe, holder

log = logging.getLogger("vlprompt")

MARKER = "run.json"
#: what vlprompt writes in a run directory: the run (run.json ... best.safetensors), the ordinal methods' plots,
#: and the commands that write into a run (eval, export, plot-transport); only these are ever removed
OWN_FILES = ("run.json", "config.yaml", "split.json", "log.txt", "prompt.safetensors", "method.json", "results.json",
             "metrics.jsonl", "training_curve.png", "best.safetensors", "prototype_similarity.png", "predictions.png")
OWN_DIRS = ("checkpoints", "eval", "export", "tensorboard", "transport")


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


def entries(run_dir: Path) -> list[Path]:
    """What a directory holds, its lock file aside (a run refused or killed right after locking left only it)."""
    return [p for p in Path(run_dir).iterdir() if p.name != LOCK_NAME]


def is_run_dir(run_dir: Path) -> bool:
    """Whether vlprompt's own mark (run.json) is there: nothing else makes a folder a run directory."""
    return read_marker(Path(run_dir)) is not None


def _own(name: str) -> bool:
    """A name vlprompt writes in a run directory, or the temporary file of one: ``.results.json.x1y2.tmp`` (an
    atomic write, :func:`vlprompt._io.atomic_path`) or ``.training_curve.tmp.png`` (a plot)."""
    if name in OWN_FILES or name in OWN_DIRS:
        return True
    for own in OWN_FILES:
        stem, suffix = os.path.splitext(own)
        if (name.startswith(f".{own}.") and name.endswith(".tmp")) or name == f".{stem}.tmp{suffix}":
            return True
    return False


def refuse_foreign(run_dir: Path) -> None:
    """Raise when ``run_dir`` is a file, or a non-empty directory without vlprompt's mark (nothing written)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output {run_dir} is a file, not a directory")
    if not run_dir.is_dir() or is_run_dir(run_dir) or not entries(run_dir):
        return
    looks_like_run = [n for n in ("config.yaml", "results.json", "split.json") if (run_dir / n).is_file()]
    if looks_like_run:
        raise ConfigError(f"--output {run_dir} is not a vlprompt run directory: it holds {', '.join(looks_like_run)} "
                          f"but no run.json (an earlier version's run, or your own files), and vlprompt never "
                          f"replaces what it did not mark, --force included; move it away or choose another --output")
    raise ConfigError(f"--output {run_dir} is not empty and is not a vlprompt run directory; choose another "
                      f"--output (--force only replaces vlprompt runs)")


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished: results.json is there and run.json says done."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        return False
    marker = read_marker(run_dir)
    return marker is not None and marker.get("status") == "done"


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
    refuse_foreign(run_dir)
    if not run_dir.exists() or not entries(run_dir):
        return DirState("fresh")
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
    """Remove a vlprompt run's files from its directory (refuses a directory without run.json). Only what vlprompt
    writes there goes (:data:`OWN_FILES`, :data:`OWN_DIRS`, their temporary files); the lock stays (it is held)
    and anything else is left in place, said in the log."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a vlprompt run directory: not clearing it")
    kept = []
    for child in sorted(run_dir.iterdir()):
        if child.name in (LOCK_NAME, MARKER):
            continue
        if not _own(child.name):
            kept.append(child.name)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    marker = run_dir / MARKER
    if marker.exists():  # cleared last: a clear interrupted half-way still marks a run
        marker.unlink()
    if kept:
        log.info("%s: kept %d file(s) vlprompt did not write: %s", run_dir, len(kept), ", ".join(kept[:5]))


def write_marker(run_dir: Path, **fields) -> None:
    old = read_marker(run_dir) or {}
    atomic_write_json(Path(run_dir) / MARKER, {**old, "vlprompt_run": 1, **fields})


# -- one process per run directory ---------------------------------------------------------------------------
def lock(run_dir: Path) -> DirLock:
    """The lock of a run directory (not taken yet: ``with directory.lock(d):``, or ``.acquire()``)."""
    return DirLock(Path(run_dir) / LOCK_NAME, what=f"run directory {run_dir}")


def lock_holder(run_dir: Path) -> Optional[dict]:
    """The record of the process that runs ``run_dir`` now (another than this one), or None (reads only)."""
    return holder(Path(run_dir) / LOCK_NAME)


def check_not_busy(run_dir: Path) -> None:
    """Raise :class:`BusyError` naming the process that runs ``run_dir`` now (reads only; this process's own
    lock does not count)."""
    found = lock_holder(run_dir)
    if found is not None:
        raise BusyError(f"run directory {run_dir} is in use by {describe(found)}: one process per run directory; "
                        f"wait for it to finish or stop it")


def check_writable(path: Path, flag: str = "--output") -> None:
    """Raise a ConfigError (one line naming ``flag``) when the directory ``path`` could not be created or written:
    a parent that is a file, or a folder without write permission (writes nothing)."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{flag} {path}: {probe} is a file, not a folder")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        what = "the run directory" if probe == path else f"its folder {probe}"
        raise ConfigError(f"{flag} {path}: {what} is not writable (permission denied); choose another {flag}")


def cannot_write(path: Path, e: OSError, flag: str = "--output") -> ConfigError:
    """The one-line error of an OSError met while creating or locking a run directory (``flag``: the option that
    named it, if any)."""
    return ConfigError(f"{flag + ' ' if flag else ''}{path}: cannot write there ({e.strerror or e})")
