"""Running a grid: skip the finished cells, precompute the features of the others once, run them on the chosen
executor, report each finished cell (name, metric, seconds), a summary bar and an ETA. The grid's state is in the
run directories only: stop it at any moment and start the same command again to finish it."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

from .executors import make_executor, print_traceback, record_failure
from .features import cell_payload, one_line
from .status import cell_state, main_metric

log = logging.getLogger("vlprompt")


def _duration(s: float) -> str:
    s = int(round(s))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """One line per finished cell and a summary bar (on a terminal); the ETA is the wall time per cell of this
    invocation so far (parallel workers included) times the cells left."""

    def __init__(self, total: int, already: int, quiet: bool):
        from tqdm.auto import tqdm

        self.total, self.finished, self.quiet = total, already, quiet
        self.t0 = time.perf_counter()
        self.ran = 0
        self.failed = 0
        self.bar = tqdm(total=total, initial=already, desc="grid", unit="cell", file=sys.stderr,
                        disable=True if quiet else None, dynamic_ncols=True)

    def eta(self) -> Optional[float]:
        left = self.total - self.finished
        if not self.ran or not left:
            return None
        return (time.perf_counter() - self.t0) / self.ran * left

    def update(self, name: str, status: str, detail: str, seconds: float) -> None:
        self.finished += 1
        self.ran += 1
        self.failed += status == "failed"
        eta = self.eta()
        line = (f"[{self.finished}/{self.total}] {status} {name}" + (f": {detail}" if detail else "")
                + f" ({seconds:.1f} s)" + (f" | ETA {_duration(eta)}" if eta is not None else ""))
        self.bar.update(1)
        self.bar.set_postfix_str(f"{self.failed} failed" + (f", ETA {_duration(eta)}" if eta is not None else ""))
        if status == "failed":
            log.warning("%s", line)
        elif not self.quiet:
            if self.bar.disable:
                log.info("%s", line)
            else:
                self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def run_grid(cells, output: str | Path, *, executor: str = "local", workers: Optional[int] = None,
             cpus_per_cell: Optional[int] = None, gpus_per_cell: Optional[float] = None,
             ray_address: Optional[str] = None, submitit_cluster: Optional[str] = None,
             slurm_partition: Optional[str] = None, slurm_time: Optional[int] = None, slurm_mem: Optional[int] = None,
             quiet: bool = False) -> dict:
    """Run resolved cells (:func:`vlprompt.grid.spec.resolve_cells`) into ``output/<cell name>``. Returns the
    summary: ``{"output", "cells", "done", "failed": {name: error}, "busy": [names], "ran", "skipped"}``."""
    output = Path(output).expanduser().absolute()
    ex, threads = make_executor(executor, output, workers=workers, cpus_per_cell=cpus_per_cell,
                                gpus_per_cell=gpus_per_cell, ray_address=ray_address,
                                submitit_cluster=submitit_cluster, slurm_partition=slurm_partition,
                                slurm_time=slurm_time, slurm_mem=slurm_mem)
    from ..runs import directory

    directory.check_writable(output)
    try:
        (output / ".grid").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise directory.cannot_write(output, e) from e
    states = {c.name: cell_state(c, output) for c in cells}
    todo = [c for c in cells if states[c.name]["state"] != "done"]
    skipped = len(cells) - len(todo)
    log.info("grid %s: %d cells, %d finished, %d to run (%s executor)", output, len(cells), skipped, len(todo),
             ex.name)
    failed: dict[str, str] = {}
    busy: list[str] = []
    if todo:
        t0 = time.perf_counter()
        pre = ex.prefetch({"cells": [cell_payload(c) for c in todo], "progress": not quiet, "threads": threads})
        log.info("features ready for %d cells (%.1f s)", len(todo) - len(pre["errors"]), time.perf_counter() - t0)
        progress = Progress(len(cells), skipped, quiet)
        by_name = {c.name: c for c in todo}
        for name, error in pre["errors"].items():  # their data cannot be read: failed before they start
            cfg = by_name[name].config
            record_failure(output / name, cfg.identity_hash(), cfg.method, error)
            failed[name] = error
            progress.update(name, "failed", error, 0.0)
        tasks = [{"name": c.name, "output": str(output), "config": c.config.to_dict(),
                  "evaluations": list(c.evaluations), "threads": threads} for c in todo if c.name not in failed]

        def on_result(task: dict, result: Optional[dict], error: Optional[BaseException]) -> None:
            name = task["name"]
            if error is not None:
                cfg = by_name[name].config
                message = one_line(error)
                print_traceback(name, error)
                record_failure(output / name, cfg.identity_hash(), cfg.method, message)
                failed[name] = message
                progress.update(name, "failed", message, 0.0)
            elif result["status"] == "busy":
                busy.append(name)
                progress.update(name, "busy", "another process is running this cell", 0.0)
            elif result["status"] == "failed":
                failed[name] = result["error"]
                progress.update(name, "failed", result["error"], result["seconds"])
            else:
                detail = main_metric(result.get("metrics", {}))
                for e in result.get("evaluations", []):
                    if "harmonic_mean" in e:
                        detail += f"; base {e['base']:.2f} new {e['new']:.2f} H {e['harmonic_mean']:.2f}"
                    else:
                        detail += f"; {e['dataset']} {main_metric(e['metrics'])}"
                progress.update(name, "done", detail, result["seconds"])

        try:
            ex.map(tasks, on_result)
        finally:
            progress.close()
    done = sum(1 for c in cells if c.name not in failed and c.name not in busy)
    if failed:
        log.warning("%d of %d cells failed (rerun the same command to retry them):", len(failed), len(cells))
        for name, error in failed.items():
            log.warning("  %s: %s", name, error)
    if busy:
        log.warning("%d cells are being run by another process: %s", len(busy), ", ".join(busy))
    return {"output": str(output), "cells": len(cells), "done": done, "failed": failed, "busy": busy,
            "ran": len(todo), "skipped": skipped}
