"""Checkpoints that survive a kill at any point.

A checkpoint is a directory ``checkpoints/epoch-XXXX/`` holding ``learned.safetensors`` (the learned tensors),
``state.pt`` (optimizer, scaler, RNG states and history: plain tensors and containers, read back with
``torch.load(weights_only=True)``) and ``meta.json`` (epoch, config hash, SHA-256 of both files). It is written
under a temporary name and renamed into place, then ``checkpoints/latest.json`` is replaced atomically: a kill
leaves the previous checkpoint as the latest one. ``meta.json`` carries a digest of its own fields too, so every
byte of a checkpoint is checked before it is used; :func:`load_latest_checkpoint` skips damaged checkpoints
(a disk that truncated or altered a file) and resumes from the newest intact one, saying which it skipped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .._io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, sha256_file
from ..errors import CheckpointError

FORMAT = 1

log = logging.getLogger("vlprompt")

_EPOCH_DIR = re.compile(r"epoch-(\d+)")


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered: an older intact one may be used instead.
    (A checkpoint of another configuration or format is not damaged, and no older one would do.)"""


def _meta_digest(meta: dict) -> str:
    """SHA-256 of meta.json's fields other than this digest (JSON, sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(_to_lists(random.getstate())),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _to_lists(x):
    return [(_to_lists(v) if isinstance(v, tuple) else v) for v in x]


def _to_tuples(x):
    return tuple((_to_tuples(v) if isinstance(v, list) else v) for v in x)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, epoch: int, learned: dict[str, torch.Tensor], state: dict[str, Any],
                    config_hash: str, keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".epoch-{epoch:04d}.", dir=ckpt_root))
    try:
        atomic_save_safetensors(tmp / "learned.safetensors", learned, {"epoch": str(epoch)})
        atomic_torch_save(tmp / "state.pt", state)
        meta = {"format": FORMAT, "epoch": epoch, "config_hash": config_hash,
                "sha256": {name: sha256_file(tmp / name) for name in ("learned.safetensors", "state.pt")}}
        meta["meta_sha256"] = _meta_digest(meta)
        atomic_write_json(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(ckpt_root / "latest.json", {"epoch": epoch, "path": final.name})
    for old in sorted(ckpt_root.glob("epoch-*")):
        if old.name < final.name and len(sorted(ckpt_root.glob("epoch-*"))) > keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``checkpoints/latest.json`` points to (not checked), or None without a pointer."""
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["path"]
    except (json.JSONDecodeError, KeyError, TypeError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: unreadable checkpoint pointer ({e}); delete it to start over") from e
    return pointer.parent / name


def _epoch_of(path: Path) -> Optional[int]:
    m = _EPOCH_DIR.fullmatch(path.name)
    return int(m.group(1)) if m else None


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints of ``run_dir`` to try, newest first: the one ``latest.json`` points to, then every older
    ``epoch-*`` directory. Without a readable pointer (absent, or damaged: a WARNING), every ``epoch-*``
    directory. Not checked: see :func:`load_latest_checkpoint`."""
    root = Path(run_dir) / "checkpoints"
    dirs = sorted((p for p in root.glob("epoch-*") if p.is_dir() and _epoch_of(p) is not None),
                  key=lambda p: _epoch_of(p), reverse=True)  # type: ignore[arg-type, return-value]
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError as e:
        log.warning("ignoring the checkpoint pointer: %s", e)
        return dirs
    if latest is None:
        return dirs
    newest = _epoch_of(latest)
    # Directories newer than the pointer were renamed into place by a run killed before it moved the pointer:
    # the pointer is the commit record, so they are not used (the epoch is simply trained again).
    older = [p for p in dirs if newest is not None and _epoch_of(p) < newest]  # type: ignore[operator]
    return [latest, *older]


def load_latest_checkpoint(run_dir: Path, config_hash: Optional[str] = None
                           ) -> Optional[tuple[Path, int, dict[str, torch.Tensor], dict]]:
    """``(path, epoch, learned tensors, state)`` of the newest intact checkpoint of ``run_dir``; None when it has
    none. A damaged checkpoint (truncated, altered, missing a file) is skipped with a WARNING on the
    ``vlprompt`` logger naming it and why, and the next older one is tried; when all are damaged, a
    CheckpointError lists them. A checkpoint of another configuration or format raises at once (an older one
    of the same run would not match either)."""
    candidates = checkpoint_candidates(run_dir)
    skipped: list[str] = []
    for path in candidates:
        try:
            epoch, learned, state = load_checkpoint(path, config_hash)
        except DamagedCheckpointError as e:
            log.warning("skipping damaged checkpoint %s: %s", path, e)
            skipped.append(str(e))
            continue
        if skipped:
            log.warning("resuming from %s (epoch %d), the newest intact checkpoint", path, epoch)
        return path, epoch, learned, state
    if skipped:
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints'}: no intact checkpoint to resume from "
                              f"({len(skipped)} damaged: {'; '.join(skipped)}); retrain with --force")
    return None


def load_checkpoint(path: Path, config_hash: Optional[str] = None) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(epoch, learned tensors, state). A missing, truncated or altered checkpoint is a DamagedCheckpointError,
    one of another format or configuration (or that this torch cannot read) a CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        digests = dict(meta["sha256"])
        epoch = int(meta["epoch"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DamagedCheckpointError(f"checkpoint {path}: meta.json missing or corrupted ({e!r})") from e
    if set(digests) != {"learned.safetensors", "state.pt"}:
        raise DamagedCheckpointError(f"checkpoint {path}: meta.json lists the files {sorted(digests)}")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):  # absent in older checkpoints
        raise DamagedCheckpointError(f"checkpoint {path}: meta.json is corrupted (its digest does not match)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format')!r}")
    for name, digest in digests.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpointError(f"checkpoint {path}: {name} is missing")
        if sha256_file(file) != digest:
            raise DamagedCheckpointError(f"checkpoint {file} is corrupted (checksum mismatch)")
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise CheckpointError(f"checkpoint {path} was written by a run with another configuration; "
                              f"use a new --output or --force")
    try:
        learned = load_file(str(path / "learned.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        # the checksums matched, so these are the bytes we wrote: a foreign or incompatible file
        raise CheckpointError(f"checkpoint {path}: cannot be read ({e})") from e
    return epoch, learned, state
