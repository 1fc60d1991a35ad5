"""Checkpoints that survive a kill at any point.

A checkpoint is a directory ``checkpoints/epoch-XXXX/`` holding ``learned.safetensors`` (the learned tensors),
``state.pt`` (optimizer, scaler, RNG states and history: plain tensors and containers, read back with
``torch.load(weights_only=True)``) and ``meta.json`` (epoch, config hash, SHA-256 of both files). It is written
under a temporary name and renamed into place, then ``checkpoints/latest.json`` is replaced atomically: a kill
leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .._io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, sha256_file
from ..errors import CheckpointError

FORMAT = 1


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
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = json.loads(pointer.read_text())["path"]
    except (json.JSONDecodeError, KeyError, OSError) as e:
        raise CheckpointError(f"{pointer}: unreadable checkpoint pointer ({e}); delete it to start over") from None
    return pointer.parent / name


def load_checkpoint(path: Path, config_hash: Optional[str] = None) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(epoch, learned tensors, state); a missing, altered or foreign checkpoint is a CheckpointError."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json missing or corrupted ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: unknown format {meta.get('format')!r}")
    for name, digest in meta["sha256"].items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"checkpoint {file} is corrupted (checksum mismatch); refusing to resume from it. "
                                  f"Delete {path} (and fix checkpoints/latest.json) or retrain with --force")
    if config_hash is not None and meta.get("config_hash") != config_hash:
        raise CheckpointError(f"checkpoint {path} was written by a run with another configuration; "
                              f"use a new --output or --force")
    try:
        learned = load_file(str(path / "learned.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # checksums matched, so this is a foreign or incompatible file
        raise CheckpointError(f"checkpoint {path}: cannot be read ({e})") from None
    return int(meta["epoch"]), learned, state
