"""Running a grid's cells on an existing engine: a local process pool (``concurrent.futures`` with the
``spawn`` context; one GPU per worker on a machine with several), Ray tasks, or a Slurm job array through
submitit. Each cell is :func:`run_cell` -- an ordinary :func:`vlprompt.runs.run` into ``OUTPUT/<cell>`` with
``resume=True`` (a finished run returns its results, an interrupted one continues from its last checkpoint),
then the cell's evaluations -- under a per-cell lock, so two grids never run one cell at once.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from ..errors import ConfigError, VLPromptError
from .features import one_line, prefetch
from .status import CellLock, evaluation_done, lock_path, with_dataset

log = logging.getLogger("vlprompt")

EXECUTORS = ("local", "ray", "slurm")


# -- one cell ---------------------------------------------------------------------------------------------
def record_failure(run_dir: Path, request_hash: str, method: str, error: str) -> None:
    """Say in the run directory that the cell failed, where the run layer could not (it refuses bad data before
    writing anything). A folder holding another run is left alone."""
    from ..runs import directory

    run_dir = Path(run_dir)
    if directory.lock_holder(run_dir) is not None:
        return  # another process runs it: its record is its own
    if run_dir.is_dir() and directory.entries(run_dir):
        marker = directory.read_marker(run_dir)
        if not marker or marker.get("request_hash") != request_hash:
            return
        if directory.is_finished(run_dir):
            directory.write_marker(run_dir, grid_error=error)  # trained; an evaluation failed
        else:
            directory.write_marker(run_dir, status="failed", error=error)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    directory.write_marker(run_dir, status="failed", error=error, request_hash=request_hash, method=method)


def run_evaluations(run_dir: Path, cfg, evaluations: list) -> list[dict]:
    """The cell's evaluations that are not written yet (each writes ``RUN/eval/...json``)."""
    import json

    from ..runs import base_to_new, evaluate_run
    from ..runs.config import resolve_data

    identity = json.loads((Path(run_dir) / "results.json").read_text()).get("identity")
    out = []
    for e in with_dataset(evaluations, cfg):
        if evaluation_done(run_dir, e, identity):
            continue
        if e.get("base_to_new"):
            r = base_to_new(run_dir, cfg.data, device=cfg.device, cache_dir=cfg.cache_dir, progress=False)
            out.append({"base_to_new": cfg.data.dataset, "base": r["base"], "new": r["new"],
                        "harmonic_mean": r["harmonic_mean"]})
        else:
            data = resolve_data({k: v for k, v in e.items() if k in ("dataset", "root", "options", "classes")})
            r = evaluate_run(run_dir, data, split=e.get("split", "test"), device=cfg.device, cache_dir=cfg.cache_dir,
                             progress=False)
            out.append({"dataset": e["dataset"], "metrics": r["metrics"]})
    return out


def run_cell(task: dict) -> dict:
    """Run one cell (``task``: ``{"name", "output", "config", "evaluations", "threads"}``) in this process.
    Returns ``{"name", "status": done | failed | busy, "metrics", "evaluations", "error", "seconds"}``. A
    VLPromptError is the cell's failure (recorded in its run directory); any other exception is a bug and
    propagates to the grid, which records it as this cell's failure with its traceback."""
    name, output = task["name"], Path(task["output"])
    run_dir = output / name
    if task.get("threads"):
        import torch

        torch.set_num_threads(int(task["threads"]))
    t0 = time.perf_counter()
    logger = logging.getLogger("vlprompt")
    propagate = logger.propagate
    logger.propagate = False  # the run's log goes to its log.txt; the console shows the grid's line per cell
    try:
        return _run_locked(task, output, run_dir, t0)
    finally:
        logger.propagate = propagate


def _run_locked(task: dict, output: Path, run_dir: Path, t0: float) -> dict:
    from ..runs import directory, run
    from ..runs.config import RunConfig
    from ..runs.lock import BusyError

    name = task["name"]
    with CellLock(lock_path(output, name)) as lock:
        if not lock.acquired:
            return {"name": name, "status": "busy", "seconds": 0.0}
        cfg = RunConfig.from_dict(task["config"])
        try:
            results = run(cfg, run_dir, resume=True, progress=False)
            with directory.lock(run_dir):  # they write into the run directory: nobody else may run it meanwhile
                evals = run_evaluations(run_dir, cfg, task.get("evaluations", []))
        except BusyError:  # a process outside the grid runs this directory: not the cell's failure
            return {"name": name, "status": "busy", "seconds": time.perf_counter() - t0}
        except VLPromptError as e:
            record_failure(run_dir, cfg.identity_hash(), cfg.method, one_line(e))
            return {"name": name, "status": "failed", "error": one_line(e), "seconds": time.perf_counter() - t0}
        if (directory.read_marker(run_dir) or {}).get("grid_error"):
            directory.write_marker(run_dir, grid_error=None)
    return {"name": name, "status": "done", "metrics": results.get("metrics", {}), "evaluations": evals,
            "seconds": time.perf_counter() - t0}


OnResult = Callable[[dict, Optional[dict], Optional[BaseException]], None]


# -- executors ----------------------------------------------------------------------------------------------
class InProcess:
    """``--workers 1``: the cells one after the other in this process (tracebacks and debuggers work)."""

    name = "local"

    def prefetch(self, payload: dict) -> dict:
        return prefetch(payload)

    def map(self, tasks: list[dict], on_result: OnResult) -> None:
        for task in tasks:
            try:
                result, error = run_cell(task), None
            except Exception as e:  # a bug in a cell: recorded as its failure, with the traceback; the grid goes on
                result, error = None, e
            on_result(task, result, error)


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in given.split(",") if g.strip()] if given else []
    return ids[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def _init_worker(gpus, parent: int) -> None:
    """A pool worker: its GPU (``gpus``: a queue of one id per worker, or None), and an exit when the grid
    process is gone (killed with SIGKILL, it cannot tell its workers; a cell left running would hold its lock
    while the restarted grid waits for it)."""
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class LocalPool:
    """``--workers N`` (N > 1): a ``ProcessPoolExecutor`` with the ``spawn`` context (no CUDA state forked);
    features are precomputed in this process first."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = workers
        self.gpus = _visible_gpus() if _cuda_here() else []
        if len(self.gpus) > 1:
            log.info("local executor: %d workers over %d GPUs (one GPU per worker)", workers, len(self.gpus))

    def prefetch(self, payload: dict) -> dict:
        return prefetch(payload)

    def map(self, tasks: list[dict], on_result: OnResult) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        gpus = None
        if len(self.gpus) > 1:
            gpus = ctx.Queue()
            for i in range(self.workers):
                gpus.put(self.gpus[i % len(self.gpus)])
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(gpus, os.getpid()))
        try:
            futures = {pool.submit(run_cell, t): t for t in tasks}
            for f in as_completed(futures):
                try:
                    result = f.result()
                except Exception as e:  # a bug in the cell, or its worker died: recorded, the grid goes on
                    on_result(futures[f], None, e)
                else:
                    on_result(futures[f], result, None)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


class RayTasks:
    """Cells as Ray tasks with their resources (``ray.init()`` on this machine, or ``--ray-address``); at most
    ``workers`` in flight when given (else as many as the resources allow). The cache folder and the output must
    be visible to every node."""

    name = "ray"

    def __init__(self, workers: int, cpus: int, gpus: float, address: Optional[str]):
        try:
            import ray
        except ImportError as e:
            raise ConfigError("--executor ray needs Ray: pip install 'vlprompt[ray]'") from e
        self.ray = ray
        self.workers, self.cpus, self.gpus, self.address = workers, cpus, gpus, address
        self.started = False

    def _init(self):
        if not self.ray.is_initialized():
            if self.address:
                self.ray.init(address=self.address)
            else:
                self.ray.init(include_dashboard=False)
            self.started = True

    def _remote(self, fn):
        return self.ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(fn)

    def prefetch(self, payload: dict) -> dict:
        self._init()
        return self.ray.get(self._remote(prefetch).remote(payload))

    def map(self, tasks: list[dict], on_result: OnResult) -> None:
        self._init()
        remote = self._remote(run_cell)
        queue, pending = list(tasks), {}
        try:
            while queue or pending:
                while queue and (not self.workers or len(pending) < self.workers):
                    t = queue.pop(0)
                    pending[remote.remote(t)] = t
                done, _ = self.ray.wait(list(pending), num_returns=1)
                for ref in done:
                    t = pending.pop(ref)
                    try:
                        result = self.ray.get(ref)
                    except self.ray.exceptions.RayError as e:
                        on_result(t, None, e)
                    else:
                        on_result(t, result, None)
        finally:
            for ref in pending:
                self.ray.cancel(ref, force=True)
            if self.started:
                self.ray.shutdown()


class SubmititArray:
    """Cells as one Slurm job array through submitit (``--submitit-cluster local``: submitit's LocalExecutor,
    jobs as processes on this machine). The features are precomputed by one job before the array; the cache
    folder and the output must be on a shared filesystem."""

    name = "slurm"

    def __init__(self, folder: Path, workers: int, cpus: int, gpus: int, cluster: str, partition: Optional[str],
                 time_min: int, mem_gb: Optional[int], poll_s: float = 2.0):
        try:
            import submitit
        except ImportError as e:
            raise ConfigError("--executor slurm needs submitit: pip install 'vlprompt[slurm]'") from e
        import shutil

        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise ConfigError("--executor slurm: no sbatch on this machine (Slurm is not available here); "
                              "--submitit-cluster local runs the jobs as local processes")
        self.submitit = submitit
        self.poll_s = poll_s
        self.executor = submitit.AutoExecutor(folder=str(Path(folder) / "%j"), cluster=cluster)
        params = {"timeout_min": time_min, "cpus_per_task": cpus, "gpus_per_node": gpus, "name": "vlprompt-grid",
                  "slurm_array_parallelism": workers or 256}
        if partition:
            params["slurm_partition"] = partition
        if mem_gb:
            params["mem_gb"] = mem_gb
        self.executor.update_parameters(**params)

    def _failed(self):
        from submitit.core.utils import FailedJobError, UncompletedJobError

        return (FailedJobError, UncompletedJobError)

    def prefetch(self, payload: dict) -> dict:
        job = self.executor.submit(prefetch, payload)
        try:
            return job.result()
        except self._failed() as e:
            raise VLPromptError(f"the feature job {job.job_id} failed: {one_line(e)} (its logs: "
                                f"{job.paths.stderr})") from e

    def map(self, tasks: list[dict], on_result: OnResult) -> None:
        jobs = self.executor.map_array(run_cell, tasks)
        pending = dict(zip(jobs, tasks))
        try:
            while pending:
                for job in [j for j in pending if j.done()]:
                    t = pending.pop(job)
                    try:
                        result = job.result()
                    except self._failed() as e:
                        on_result(t, None, e)
                    else:
                        on_result(t, result, None)
                if pending:
                    time.sleep(self.poll_s)
        except KeyboardInterrupt:
            for job in pending:
                job.cancel(check=False)
            raise


def make_executor(kind: str, output: Path, *, workers: Optional[int] = None, cpus_per_cell: Optional[int] = None,
                  gpus_per_cell: Optional[float] = None, ray_address: Optional[str] = None,
                  submitit_cluster: Optional[str] = None, slurm_partition: Optional[str] = None,
                  slurm_time: Optional[int] = None, slurm_mem: Optional[int] = None):
    """The executor and the threads each cell uses. Options of another executor are refused, naming the flag."""
    if kind not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if cpus_per_cell is not None and cpus_per_cell < 1:
        raise ConfigError(f"--cpus-per-cell must be >= 1, got {cpus_per_cell}")
    if gpus_per_cell is not None and gpus_per_cell < 0:
        raise ConfigError(f"--gpus-per-cell must be >= 0, got {gpus_per_cell}")
    given = {"--ray-address": ray_address, "--submitit-cluster": submitit_cluster, "--slurm-partition":
             slurm_partition, "--slurm-time": slurm_time, "--slurm-mem": slurm_mem}
    own = {"local": (), "ray": ("--ray-address",),
           "slurm": ("--submitit-cluster", "--slurm-partition", "--slurm-time", "--slurm-mem")}[kind]
    for flag, value in given.items():
        if value is not None and flag not in own:
            raise ConfigError(f"{flag} does not apply to --executor {kind}")
    cpus_here = os.cpu_count() or 1
    if kind == "local":
        if gpus_per_cell is not None:
            raise ConfigError("--gpus-per-cell does not apply to --executor local (each worker gets one GPU of "
                              "this machine when it has several)")
        if workers is None:
            workers = max(1, len(_visible_gpus()))
        threads = cpus_per_cell or (max(1, cpus_here // workers) if workers > 1 else None)
        return (InProcess() if workers == 1 else LocalPool(workers)), threads
    gpus = gpus_per_cell if gpus_per_cell is not None else (1 if _cuda_here() else 0)
    if kind == "ray":
        cpus = cpus_per_cell or (max(1, cpus_here // workers) if workers else 1)
        return RayTasks(workers or 0, cpus, gpus, ray_address), cpus
    cluster = submitit_cluster or "slurm"
    if cluster not in ("slurm", "local"):
        raise ConfigError(f"--submitit-cluster must be slurm or local, got {cluster!r}")
    if gpus != int(gpus):
        raise ConfigError(f"--gpus-per-cell must be a whole number with --executor slurm, got {gpus}")
    cpus = cpus_per_cell or 4
    return SubmititArray(Path(output) / ".grid" / "submitit", workers or 0, cpus, int(gpus), cluster,
                         slurm_partition, slurm_time or 24 * 60, slurm_mem), cpus


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def print_traceback(name: str, e: BaseException) -> None:
    print(f"vlprompt grid: cell {name} raised (a bug, or its worker died):\n{format_exception(e)}", file=sys.stderr)
