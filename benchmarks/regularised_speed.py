"""Epoch cost of KgCoOp and ProGrad against a CoOp epoch of the same size, side by side in one run.

The three methods train the same context (16 vectors, a shared prefix) on the same cached image features, K classes,
batch size and steps, through vlprompt's own trainer (the epoch loop, the optimiser, the hooks):

* CoOp: text tower forward + backward over the K class prompts per step;
* KgCoOp: the same + the cosine to the hand-crafted class features, which are encoded once (their one-time cost is
  reported apart) -- goal: at most 1.2x CoOp's epoch;
* ProGrad: the same forward, the zero-shot teacher (a matmul with the hand-crafted features), and TWO backward
  passes (the KL's gradient, gradient_only, then the cross-entropy's) and the projection -- goal: at most 2.2x.

The methods are timed in turns (rounds of CoOp, KgCoOp, ProGrad, one epoch each), so a slow spell of the shared
machine falls on all three; the median over rounds is reported, in wall time and in CPU time (the process's own
time, robust to another process taking a core). Random weights: the cost does not depend on the values.
Writes docs/benchmarks/regularised_speed.md.

    python benchmarks/regularised_speed.py                 # RN50, K = 102 (Flowers), batch 32, 8 steps, 3 rounds
    python benchmarks/regularised_speed.py --quick         # a tiny tower: seconds, for checking the script
    python benchmarks/regularised_speed.py --threads 1     # steadier on a machine shared with other processes
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
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
from vlprompt.engine.sources import CachedViews  # noqa: E402
from vlprompt.engine.trainer import TrainConfig, Trainer  # noqa: E402
from vlprompt.methods import build_method  # noqa: E402

METHODS = {  # the same context size for all three: 16 vectors
    "coop": {"n_ctx": 16},
    "kgcoop": {"init": None, "n_ctx": 16},
    "prograd": {},  # its recipe: 16 vectors, the template phrase in the last ones
}
GOALS = {"kgcoop": 1.2, "prograd": 2.2}


def backbone(args):
    if args.quick:
        from vlprompt.testing import make_tiny_checkpoint

        cfg, weights = make_tiny_checkpoint(Path(tempfile.mkdtemp()), "tiny-vit")
        return load_backbone(str(cfg), str(weights), device="cpu")
    return load_backbone(args.backbone, None, device="cpu")


def command_flags() -> str:
    """The flags this run was given, but where it writes."""
    out, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--write-docs"):
            skip = a == "--write-docs"
            continue
        out.append(a)
    return "".join(" " + a for a in out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="RN50")
    ap.add_argument("--classes", type=int, default=102)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="a tiny random tower, K = 20: checks the script in seconds")
    ap.add_argument("--write-docs", default=str(ROOT / "docs/benchmarks/regularised_speed.md"))
    args = ap.parse_args()
    if args.quick:
        args.classes, args.steps, args.rounds = 20, 4, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = backbone(args)
    names = [f"class {i}" for i in range(args.classes)]
    n = args.batch_size * args.steps
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, n, bb.embed_dim, generator=gen)  # one cached view of n images
    labels = torch.arange(n) % args.classes
    methods = {}
    for name, options in METHODS.items():
        torch.manual_seed(0)
        methods[name] = build_method(name, options, bb, names, template="a photo of a {}.")
    one_time = {}
    for name in ("kgcoop", "prograd"):  # the hand-crafted class features, encoded once per run
        store = methods[name].handcrafted if name == "kgcoop" else methods[name].teacher
        t0 = time.perf_counter()
        store.features()
        one_time[name] = time.perf_counter() - t0
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.002, warmup_epochs=0, checkpoint_every=0)
    wall = {k: [] for k in methods}
    cpu = {k: [] for k in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels)
            for name, method in methods.items():
                trainer = Trainer(method, cfg, Path(tmp) / name, seed=r, progress=False)
                w0, c0 = time.perf_counter(), time.process_time()
                trainer.fit(CachedViews(feats), labels)
                w, c = time.perf_counter() - w0, time.process_time() - c0
                if r:
                    wall[name].append(w)
                    cpu[name].append(c)
                    print(f"round {r} {name:8s} {w:7.2f} s wall  {c:7.2f} s cpu", flush=True)
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in methods}
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    model = "tiny random ViT (--quick)" if args.quick else f"{args.backbone}, random weights"
    lines = ["# KgCoOp and ProGrad epoch cost against CoOp", "",
             f"Machine: {machine}, load average {os.getloadavg()[0]:.1f} at the end. Produced by `python "
             f"benchmarks/regularised_speed.py{command_flags()}`"
             f": {model}, K = {args.classes} classes, batch {args.batch_size}, "
             f"one epoch = {args.steps} steps on cached image features, 16 context vectors for all three, "
             f"vlprompt's trainer (SGD). Median of {args.rounds} rounds, the methods timed in turns within each "
             f"round (after a warm-up round); CPU time is the process's own.", "",
             "| method | epoch, wall | epoch, CPU | x CoOp (wall) | x CoOp (CPU) | goal |",
             "|---|---:|---:|---:|---:|---:|"]
    base_w, base_c = med["coop"]
    for name in methods:
        w, c = med[name]
        goal = f"<= {GOALS[name]}x" if name in GOALS else ""
        lines.append(f"| {name} | {w:.2f} s | {c:.2f} s | {w / base_w:.2f}x | {c / base_c:.2f}x | {goal} |")
    lines += ["", *[f"- one-time encoding of the {k} hand-crafted class features (K = {args.classes}): {v:.2f} s"
                    for k, v in one_time.items()],
              "- per round (wall, s): " + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in wall.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        from vlprompt._io import atomic_write_text

        atomic_write_text(args.write_docs, text)


if __name__ == "__main__":
    main()
