"""A grid's state, read from its run directories alone (so that any executor, on any machine that sees the
folder, can pick up a grid another one started).

A cell is ``done`` (its run finished and every evaluation of it is written), ``running`` (a process holds its lock,
``OUTPUT/.grid/locks/<cell>.lock``, or the run directory's own), ``failed`` (run.json says so, with the one-line
error), ``interrupted`` (started and not finished, nobody running it: the next grid resumes it from its last
checkpoint), ``stale`` (the folder holds a run of another configuration, with results or checkpoints: the cell
will refuse to replace it), ``blocked`` (a folder that is not a vlprompt run: no run.json) or ``pending``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

STATES = ("done", "running", "failed", "interrupted", "stale", "blocked", "pending")


def lock_path(output: Path, name: str) -> Path:
    return Path(output) / ".grid" / "locks" / (name.replace("/", "__") + ".lock")


class CellLock:
    """An exclusive, non-blocking lock on a cell: the run directories' own lock (:class:`vlprompt.runs.lock.DirLock`,
    ``fcntl.flock``: released when the process dies, however it dies) on the cell's lock file. ``acquired`` says
    whether this process got it; ``holder`` names the process that has it otherwise."""

    def __init__(self, path: Path):
        from ..runs.lock import DirLock

        self.path = Path(path)
        self.acquired = False
        self.holder = ""
        self._lock = DirLock(self.path, what=f"grid cell {self.path.stem}")

    def __enter__(self) -> "CellLock":
        from ..runs.lock import BusyError

        try:
            self._lock.acquire()
            self.acquired = True
        except BusyError as e:
            self.holder = str(e)
        return self

    def __exit__(self, *exc) -> None:
        if self.acquired:
            self._lock.release()


def is_locked(output: Path, name: str) -> bool:
    from ..runs.lock import holder

    return holder(lock_path(output, name)) is not None


def evaluation_file(run_dir: Path, evaluation: dict) -> Path:
    """Where :func:`vlprompt.runs.evaluate_run` / :func:`vlprompt.runs.base_to_new` write an evaluation."""
    if evaluation.get("base_to_new"):
        return Path(run_dir) / "eval" / f"base2new-{_safe(evaluation['_dataset'])}.json"
    return Path(run_dir) / "eval" / (f"{_safe(evaluation['dataset'])}-{evaluation.get('classes', 'all')}-"
                                     f"{evaluation.get('split', 'test')}.json")


def _safe(dataset: str) -> str:
    return dataset.replace(":", "_").replace("/", "_")


def _read_json(path: Path) -> Optional[dict]:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def evaluation_done(run_dir: Path, evaluation: dict, identity: Optional[dict]) -> bool:
    """The evaluation is written, of this very run, on this dataset and root."""
    import os

    obj = _read_json(evaluation_file(run_dir, evaluation))
    if obj is None or obj.get("identity") != identity:
        return False
    if evaluation.get("base_to_new"):
        return True
    data = obj.get("eval_data") or {}
    root = os.path.abspath(os.path.expanduser(str(evaluation["root"])))
    return (data.get("dataset") == evaluation["dataset"] and data.get("root") == root
            and (data.get("options") or {}) == (evaluation.get("options") or {}))


def with_dataset(evaluations: list, cfg) -> list:
    """The evaluations with what their file names need (the cell's dataset for base-to-new)."""
    return [{**e, "_dataset": cfg.data.dataset} if e.get("base_to_new") else e for e in evaluations]


def cell_state(cell, output: Path) -> dict:
    """``{"name", "state", "detail"}`` of a cell (see the module doc); ``metrics`` when done."""
    from ..runs import directory

    output = Path(output)
    run_dir = output / cell.name
    row = {"name": cell.name, "state": "pending", "detail": ""}
    if is_locked(output, cell.name):
        return {**row, "state": "running"}
    if run_dir.is_dir() and directory.lock_holder(run_dir) is not None:  # a `vlprompt train` outside the grid
        return {**row, "state": "running", "detail": "another process runs this directory"}
    if not run_dir.is_dir() or not directory.entries(run_dir):
        return row
    marker = directory.read_marker(run_dir)
    if marker is None:
        return {**row, "state": "blocked", "detail": f"{run_dir} is not a vlprompt run directory (no run.json)"}
    results = _read_json(run_dir / "results.json")
    ckpts = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    if marker.get("request_hash") != cell.config.identity_hash():
        if results is None and not ckpts:
            return {**row, "detail": "holds an unfinished run of another configuration (it will be replaced)"}
        return {**row, "state": "stale", "detail": "holds a run of another configuration"}
    status = marker.get("status")
    if status == "failed":
        error = str(marker.get("error") or "")
        if error.startswith("KeyboardInterrupt"):
            return {**row, "state": "interrupted", "detail": "stopped by Ctrl-C"}
        return {**row, "state": "failed", "detail": error}
    if status == "done" and results is not None:
        evals = with_dataset(cell.evaluations, cell.config)
        todo = [e for e in evals if not evaluation_done(run_dir, e, results.get("identity"))]
        if marker.get("grid_error") and todo:
            return {**row, "state": "failed", "detail": str(marker["grid_error"])}
        if todo:
            return {**row, "detail": f"trained; {len(todo)} evaluation(s) to run"}
        return {**row, "state": "done", "metrics": results.get("metrics", {})}
    return {**row, "state": "interrupted", "detail": "checkpointed" if ckpts else "no checkpoint yet"}


def grid_status(cells, output: Path) -> list[dict]:
    return [cell_state(c, output) for c in cells]


def main_metric(metrics: dict) -> str:
    """The number a progress line shows: accuracy, else MAE, else the first number."""
    for key in ("accuracy", "mae"):
        if isinstance(metrics.get(key), (int, float)):
            return f"{key} {metrics[key]:.2f}"
    for key, value in metrics.items():
        if isinstance(value, float):
            return f"{key} {value:.4g}"
    return ""
