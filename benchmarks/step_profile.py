"""The CoOp and PLOT training steps against this machine's matmul rate, in fp32 and bf16, with their profiles.

One run prints and writes to docs/benchmarks/step_profile.md:

* the GEMM rate of this machine (2048 x 2048 matmul) in fp32 and bf16, GFLOP/s;
* each method's training step on cached features (forward, loss, backward, SGD; RN50 size, random weights,
  K = 102 classes, batch 32, 16 context vectors; PLOT: 4 prompts on 7 x 7 local features) in fp32 and under
  ``--precision bf16`` (where the CPU has bf16 matrix units): seconds per step, the FLOPs of a step (counted by
  ``torch.utils.flop_counter``: matmuls and attention, forward and backward) and the share of the GEMM rate of the
  precision in use that this makes;
* the fp32 step's profile (``torch.profiler``), the operators with the most self CPU time: where the time that is
  not matmul goes.

    python benchmarks/step_profile.py [--steps 3] [--threads N] [--top 12]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from framework_overhead import K, make_step  # noqa: E402  (the steps framework_overhead.py times)
from precision import gemm_rate, machine_line, median_time, write_report  # noqa: E402
from vlprompt.backbone.model import cpu_has_fast_bf16  # noqa: E402

BATCH = 32


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def profile_rows(step, top: int) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [(e.key, e.self_cpu_time_total / total, e.count) for e in events[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--methods", nargs="+", default=["coop", "plot"], choices=["coop", "plot"])
    ap.add_argument("--write-docs", default=str(ROOT / "docs/benchmarks/step_profile.md"),
                    help="the Markdown file the figures are written to ('' to write none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = cpu_has_fast_bf16()
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    machine = machine_line()
    print("#", machine, flush=True)
    gemm = {p: gemm_rate(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    print("GEMM 2048:", ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in gemm.items()), flush=True)
    rows, profiles = [], {}
    for name in args.methods:
        for precision in precisions:
            step = make_step(name, precision)
            flops = step_flops(step)
            t = median_time(step, args.steps)
            share = flops / t / 1e9 / gemm[precision]
            rows.append((name, precision, t, flops / 1e9, share))
            print(f"{name} {precision}: {t:.3f} s/step, {flops / 1e9:.1f} GFLOP/step, {flops / t / 1e9:.0f} GFLOP/s "
                  f"= {share:.0%} of the {precision} GEMM rate", flush=True)
            if precision == "fp32":
                profiles[name] = profile_rows(step, args.top)
    cmd = " ".join(["python benchmarks/step_profile.py", *sys.argv[1:]])
    lines = ["# CoOp and PLOT steps against the matmul rate", "",
             f"Machine: {machine}. Produced by `{cmd}`; every figure from that one run. RN50 size, random weights, "
             f"K = {K} classes, batch {BATCH}, 16 context vectors (PLOT: 4 prompts, 7 x 7 local features), a step on "
             f"cached features (forward, loss, backward, SGD), median of {args.steps} steps after a warm-up; FLOPs "
             "counted by torch.utils.flop_counter (matmuls and attention, forward and backward).", "",
             "| GEMM 2048 x 2048 (best of 10) | " + " | ".join(f"{p}: {r:.0f} GFLOP/s" for p, r in gemm.items()) + " |",
             "|---|" + "---|" * len(gemm), "",
             "| method | precision | s/step | GFLOP/step | share of the GEMM rate |", "|---|---|---:|---:|---:|"]
    lines += [f"| {n} | {p} | {t:.3f} | {f:.1f} | {s:.0%} |" for n, p, t, f, s in rows]
    for name, prof in profiles.items():
        lines += ["", f"{name}, fp32 step: operators with the most self CPU time", "",
                  "| operator | share of the step's CPU time | calls |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {s:.1%} | {c} |" for k, s, c in prof]
    text = "\n".join(lines) + "\n"
    write_report(text, args.write_docs)


if __name__ == "__main__":
    main()
