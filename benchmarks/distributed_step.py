"""CoOp training-step time on this CPU: idle vs with a competing busy process, 2 threads vs 1, and one process vs
two ranks (gloo) splitting the same global batch -- all through the engine's own Trainer, side by side in one run.

The step is vlprompt's cached-views CoOp step (the image features are given: random (N, E) features standing in
for cached views), i.e. the text tower's forward and backward over K class prompts plus the optimiser step;
random weights (the cost does not depend on the values). The busy process is a Python spin loop pinned to core
0. Two ranks run ``torch.distributed`` over gloo with one thread each (as torchrun sets OMP_NUM_THREADS=1),
each rank taking half of every global batch and half of the class prompts (class-sharded text encoding).

    python benchmarks/distributed_step.py [--backbone RN50] [--classes 50] [--batch 32] [--steps 3] [--out FILE]

Prints a markdown table (also written to ``--out`` when given). On a shared machine the numbers are noisy: only
ratios measured in the same run mean anything, and the lead re-runs it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.engine.trainer import CachedViews, TrainConfig, Trainer  # noqa: E402
from vlprompt.methods import build_method  # noqa: E402


class _Timed:
    """A source that stamps the time each step asks for its batch (a step starts there)."""

    def __init__(self, source):
        self.source = source
        self.stamps: list[float] = []

    def batch(self, idx, gen):
        self.stamps.append(time.perf_counter())
        return self.source.batch(idx, gen)


def step_times(backbone: str, classes: int, batch: int, steps: int) -> list[float]:
    """Seconds of each measured step (after one warm-up step) of a CoOp run through Trainer.fit."""
    torch.manual_seed(0)
    bb = load_backbone(backbone, None, device="cpu", precision="fp32")
    names = [f"class number {i}" for i in range(classes)]
    method = build_method("coop", {"n_ctx": 16}, bb, names)
    n = batch * (steps + 1)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, n, bb.embed_dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    cfg = TrainConfig(epochs=1, batch_size=batch, warmup_epochs=0, checkpoint_every=0, max_steps=steps + 1).validate()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(method, cfg, Path(tmp), seed=1, progress=False)
        source = _Timed(CachedViews(feats))
        trainer.fit(source, labels)
        end = time.perf_counter()
    stamps = source.stamps + [end]
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]  # the first step warms up


def _rank(rank: int, world: int, port: int, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        times = step_times(args.backbone, args.classes, args.batch, args.steps)
        if rank == 0:
            out.put(times)
    finally:
        dist.destroy_process_group()


def two_ranks(args) -> list[float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    times = q.get(timeout=900)
    for p in procs:
        p.join(timeout=120)
    return times


class Busy:
    """A competing process spinning on core 0 for the duration of a block."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            os.sched_setaffinity(self.proc.pid, {0})
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            pass
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="RN50")
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []

    def measure(label, fn):
        t0 = time.process_time()
        w0 = time.perf_counter()
        times = fn()
        share = (time.process_time() - t0) / max(time.perf_counter() - w0, 1e-9)
        rows.append((label, statistics.median(times), share))
        print(f"{label}: median {statistics.median(times):.3f} s over {len(times)} steps", flush=True)

    for threads in (2, 1):
        torch.set_num_threads(threads)
        measure(f"1 process, {threads} thread(s), idle",
                lambda: step_times(args.backbone, args.classes, args.batch, args.steps))
        with Busy():
            measure(f"1 process, {threads} thread(s), busy process on core 0",
                    lambda: step_times(args.backbone, args.classes, args.batch, args.steps))
    measure("2 ranks (gloo), 1 thread each, idle", lambda: two_ranks(args))
    base = rows[0][1]
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. CoOp step "
             f"({args.backbone} text tower, random weights, K = {args.classes}, batch {args.batch}, cached "
             f"features), median of {args.steps} steps after a warm-up, through `Trainer.fit`. Produced by "
             f"`python benchmarks/distributed_step.py`.", "",
             "| setting | step time | vs 1 process, 2 threads, idle | CPU share of this process |",
             "|---|---:|---:|---:|"]
    for label, t, share in rows:
        lines.append(f"| {label} | {t:.3f} s | {t / base:.2f}x | {share:.2f} |")
    busy2, busy1 = rows[1][1] / rows[0][1], rows[3][1] / rows[2][1]
    lines += ["", f"- slowdown from the busy process: {busy2:.2f}x with 2 threads, {busy1:.2f}x with 1 thread",
              "- the 2-rank row's CPU share is the parent's (it only waits): the ranks run in their own processes"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
