"""A damaged last checkpoint (truncated, altered) falls back to the newest intact one, saying so; never silently."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from vlprompt.engine.checkpoint import (latest_checkpoint, load_checkpoint, load_latest_checkpoint, rng_state,
                                        save_checkpoint)
from vlprompt.errors import CheckpointError

HASH = "cfg-abc"


def _save_epochs(run_dir, epochs=(1, 2, 3)):
    for e in epochs:
        learned = {"prompt.ctx": torch.full((4, 8), float(e))}
        state = {"epoch": e, "history": json.dumps([e]), "rng": rng_state(), "optimizer": {"lr": torch.tensor(0.1)}}
        save_checkpoint(run_dir, e, learned, state, HASH, keep=3)
    return run_dir / "checkpoints"


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip(file, at=-3):
    blob = bytearray(file.read_bytes())
    blob[at] ^= 0xFF
    file.write_bytes(bytes(blob))


def test_intact_run_resumes_from_the_newest(tmp_path):
    root = _save_epochs(tmp_path)
    path, epoch, learned, state = load_latest_checkpoint(tmp_path, HASH)
    assert path == root / "epoch-0003" == latest_checkpoint(tmp_path) and epoch == 3
    assert torch.equal(learned["prompt.ctx"], torch.full((4, 8), 3.0)) and state["epoch"] == 3
    assert load_latest_checkpoint(tmp_path / "fresh", HASH) is None


@pytest.mark.parametrize("damage", ["truncate learned", "flip state", "delete state", "truncate meta",
                                    "flip meta value"])
def test_damaged_newest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
    root = _save_epochs(tmp_path)
    newest = root / "epoch-0003"
    if damage == "truncate learned":
        _truncate(newest / "learned.safetensors")
    elif damage == "flip state":
        _flip(newest / "state.pt", at=len((newest / "state.pt").read_bytes()) // 2)
    elif damage == "delete state":
        (newest / "state.pt").unlink()
    elif damage == "truncate meta":
        _truncate(newest / "meta.json")
    else:  # still valid JSON, a wrong number: only meta.json's own digest can tell
        meta = (newest / "meta.json").read_text()
        (newest / "meta.json").write_text(meta.replace('"epoch": 3', '"epoch": 4'))
    with pytest.raises(CheckpointError):
        load_checkpoint(newest, HASH)
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        path, epoch, learned, state = load_latest_checkpoint(tmp_path, HASH)
    assert path == root / "epoch-0002" and epoch == 2 and state["epoch"] == 2
    assert torch.equal(learned["prompt.ctx"], torch.full((4, 8), 2.0))
    warned = [r for r in caplog.records if r.name == "vlprompt" and r.levelno == logging.WARNING]
    assert any("epoch-0003" in r.getMessage() and "skipping damaged" in r.getMessage() for r in warned)
    assert any("resuming from" in r.getMessage() and "epoch-0002" in r.getMessage() for r in warned)


def test_two_damaged_fall_back_two_epochs(tmp_path):
    root = _save_epochs(tmp_path)
    _flip(root / "epoch-0003" / "learned.safetensors")
    _truncate(root / "epoch-0002" / "state.pt")
    path, epoch, _, _ = load_latest_checkpoint(tmp_path, HASH)
    assert path == root / "epoch-0001" and epoch == 1


def test_all_damaged_is_a_clear_error_naming_each(tmp_path):
    root = _save_epochs(tmp_path)
    for e in (1, 2, 3):
        _flip(root / f"epoch-{e:04d}" / "learned.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_latest_checkpoint(tmp_path, HASH)
    msg = str(ei.value)
    assert "no intact checkpoint" in msg and "3 damaged" in msg and "--force" in msg
    assert all(f"epoch-{e:04d}" in msg for e in (1, 2, 3))


def test_damaged_pointer_falls_back_to_the_directories(tmp_path, caplog):
    root = _save_epochs(tmp_path)
    (root / "latest.json").write_text('{"epo')
    with caplog.at_level(logging.WARNING, logger="vlprompt"):
        path, epoch, _, _ = load_latest_checkpoint(tmp_path, HASH)
    assert path == root / "epoch-0003" and epoch == 3
    assert any("latest.json" in r.getMessage() for r in caplog.records)


def test_another_configuration_is_not_damage_and_does_not_fall_back(tmp_path):
    _save_epochs(tmp_path)
    with pytest.raises(CheckpointError, match="another configuration") as ei:
        load_latest_checkpoint(tmp_path, "other-config")
    assert "damaged" not in str(ei.value)


def test_a_checkpoint_newer_than_the_pointer_is_not_used(tmp_path):
    root = _save_epochs(tmp_path)
    (root / "latest.json").write_text(json.dumps({"epoch": 2, "path": "epoch-0002"}))  # killed before the move
    path, epoch, _, _ = load_latest_checkpoint(tmp_path, HASH)
    assert path == root / "epoch-0002" and epoch == 2
