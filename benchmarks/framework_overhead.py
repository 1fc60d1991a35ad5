"""The step times of CoOp, PLOT and CoCoOp in this tree against another revision, side by side in one run.

What the method framework costs (or saves): the same training step -- the method's forward on a batch of cached
features, its loss, backward and an SGD step -- timed with this checkout's ``src`` and with the ``src`` of another
git revision (``--against``, default ``0d64427``: the last commit before the framework), each in its own process,
alternating (A B A B ...) so that a load change on a shared machine hits both sides alike. Printed per method: the
median step time of each side over its processes and the ratio; written to docs/benchmarks/framework_overhead.md.

Sizes: RN50 (CoOp, PLOT: 16 context vectors, K = 102 classes, batch 32; PLOT 4 prompts on a 7 x 7 map) and
ViT-B/16 (CoCoOp: K = 102, batch 8), random weights (the cost does not depend on the values), fp32.

    python benchmarks/framework_overhead.py [--against REV] [--rounds 3] [--steps 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K, METHODS = 102, ("coop", "plot", "cocoop")


def make_step(method: str, precision: str = "fp32"):
    """One training step of ``method`` on cached features (forward, loss, backward, SGD) with the vlprompt on
    ``sys.path``: RN50 size for CoOp and PLOT (K = 102, batch 32, 16 context vectors; PLOT 4 prompts on 7 x 7 local
    features), ViT-B/16 for CoCoOp (batch 8, 4 context vectors); random weights. (benchmarks/step_profile.py times
    the same steps.)"""
    import torch
    import torch.nn.functional as F

    warnings.simplefilter("ignore")
    from vlprompt.backbone import load_backbone
    from vlprompt.methods import build_method
    from vlprompt.methods.base import Features

    torch.manual_seed(0)
    classes = [f"class number {i}" for i in range(K)]
    if method == "cocoop":
        bb, bs, options = load_backbone("ViT-B-16", None, "cpu", precision=precision), 8, {"n_ctx": 4}
    else:
        bb, bs, options = load_backbone("RN50", None, "cpu", precision=precision), 32, {"n_ctx": 16}
    if method == "plot":
        options["n_prompts"] = 4
    m = build_method(method, options, bb, classes)
    m.train()
    g = torch.Generator().manual_seed(1)
    feats = Features(global_=torch.randn(bs, bb.embed_dim, generator=g),
                     local=torch.randn(bs, 49, bb.embed_dim, generator=g) if method == "plot" else None)
    labels = torch.randint(0, K, (bs,), generator=g)
    opt = torch.optim.SGD(m.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)

    def step():
        loss = m.loss(m(feats), labels)[0] if hasattr(m, "loss") else F.cross_entropy(m(feats), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step.method, step.backbone, step.batch = m, bb, bs  # for the reference steps of benchmarks/train_speed.py
    return step


def worker(method: str, steps: int) -> float:
    """Median time of ``steps`` training steps (after two warm-up steps)."""
    step = make_step(method)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def export_src(rev: str, dest: Path) -> Path:
    """The ``src`` folder of git revision ``rev`` under ``dest``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def run_side(src: Path, method: str, steps: int, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--worker", method, "--steps", str(steps)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["step_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default="0d64427", help="the git revision to compare with")
    ap.add_argument("--rounds", type=int, default=3, help="processes per side and method (alternating)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--write-docs", default=str(ROOT / "docs/benchmarks/framework_overhead.md"))
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps({"step_s": worker(args.worker, args.steps)}))
        return
    here = ROOT / "src"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "this checkout"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        other = export_src(args.against, Path(tmp))
        for method in args.methods:
            times = {"before": [], "after": []}
            for _ in range(args.rounds):
                times["before"].append(run_side(other, method, args.steps, args.threads))
                times["after"].append(run_side(here, method, args.steps, args.threads))
            before, after = statistics.median(times["before"]), statistics.median(times["after"])
            rows.append((method, before, after, times))
            print(f"{method:<7} {args.against}: {before:.3f} s/step  {head}: {after:.3f} s/step  "
                  f"after/before {after / before:.3f}  (each side: {', '.join(f'{t:.3f}' for t in times['before'])}"
                  f" | {', '.join(f'{t:.3f}' for t in times['after'])})", flush=True)
    cmd = " ".join(["python benchmarks/framework_overhead.py", *sys.argv[1:]])
    lines = ["# The method framework's cost: step times before and after", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) per process. Produced "
             f"by `{cmd}`: the training step (forward on cached features, loss, backward, SGD) of each method with "
             f"the code of `{args.against}` (before the framework) and of `{head}`, each side in {args.rounds} "
             f"processes alternating with the other's, {args.steps} timed steps each; the medians. RN50 (CoOp, "
             f"PLOT 4 prompts on 7 x 7 local features: K = {K}, batch 32, 16 context vectors) and ViT-B/16 "
             f"(CoCoOp: K = {K}, batch 8), random weights, fp32.", "",
             f"| method | {args.against} s/step | {head} s/step | after / before |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {b:.3f} | {a:.3f} | {a / b:.3f} |" for m, b, a, _ in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        sys.path.insert(0, str(here))
        from vlprompt._io import atomic_write_text

        atomic_write_text(args.write_docs, text)


if __name__ == "__main__":
    main()
