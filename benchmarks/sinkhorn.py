"""PLOT's Sinkhorn on a batch of (image, class) problems: reference loop vs POT vs ``vlprompt.methods.parts.ot.sinkhorn_plan``.

P problems of M x N = 49 x 4 (P = 32 images x 100 classes = 3200, x 1000 classes = 32000); cost
``1 - sim`` with ``sim`` the cosines of seeded random features: ``spread`` (feature dim 8, cosines over
[-1, 1], slow convergence) and ``clip-like`` (dim 512, cosines within about +-0.2, the spread of real CLIP
patch/prompt cosines, fast convergence). eps=0.1, max_iter=100, thresh=1e-2. Timed side by side in one
run (best of --repeats, methods interleaved; wall and CPU time: on a shared machine prefer --threads 1
and the CPU column):

* reference: PLOT's loop (non-log, stopping error pooled over the batch), ``vlprompt.methods.parts.ot.reference_sinkhorn``;
* ot.sinkhorn loop: POT's single-problem solver (numpy, float64, its own stopping rule with stopThr=1e-9,
  max 100 iterations) called once per problem, on --pot-loop problems, extrapolated to P (also per problem);
* solve_batch fixed: ``ot.batch.solve_batch(method="log_sinkhorn", tol=0)`` with ``max_iter`` = the iteration
  count of the slowest problem under per-problem stopping (POT has no per-problem stopping; tol=0 makes it
  run exactly that many iterations): the least POT work that covers per-problem stopping;
* solve_batch own rule: the same call with POT's own stopping rule (``max_b ||T_b 1 - a_b||_2 < 1e-5``,
  checked every 10 iterations, capped at max_iter=100);
* sinkhorn_plan: ours (log domain, per-problem stopping).

Accuracy column: max |sum(T * sim) - same for the per-problem reference| over the P problems (the
per-problem reference is the reference iteration with each problem stopping on its own, float64).

    python benchmarks/sinkhorn.py [--ps 3200 32000] [--dims 8 512] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import ot  # noqa: E402
from ot.batch import solve_batch  # noqa: E402

from vlprompt.methods.parts.ot import reference_sinkhorn, sinkhorn_plan, transport_logits  # noqa: E402

M, N, EPS, MAX_ITER, THRESH = 49, 4, 0.1, 100, 1e-2


def make_sim(P: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    local = torch.nn.functional.normalize(torch.randn(P, M, dim, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(P, N, dim, generator=g), dim=-1)
    return local @ text.transpose(1, 2)


def per_problem_reference(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference iteration with per-problem stopping (a problem is frozen once it stops); float64.

    Returns the plan (P, M, N) and each problem's iteration count (P,)."""
    C = cost.double()
    K = torch.exp(-C / EPS)
    u, v = torch.full(C.shape[:2], 1.0 / M, dtype=C.dtype), torch.full((C.shape[0], N), 1.0 / N, dtype=C.dtype)
    r, c = torch.ones_like(u), torch.ones_like(v)
    running = torch.ones(C.shape[0], dtype=torch.bool)
    iters = torch.zeros(C.shape[0], dtype=torch.long)
    for _ in range(MAX_ITER):
        r_new = u / (K @ c.unsqueeze(-1)).squeeze(-1)
        c_new = v / (K.transpose(1, 2) @ r_new.unsqueeze(-1)).squeeze(-1)
        err = (r_new - r).abs().mean(1)
        r = torch.where(running[:, None], r_new, r)
        c = torch.where(running[:, None], c_new, c)
        iters += running.long()
        running &= ~(err < THRESH)
        if not running.any():
            break
    return r[:, :, None] * K * c[:, None, :], iters


def pot_loop(cost: torch.Tensor) -> torch.Tensor:
    """POT's single-problem ``ot.sinkhorn`` once per problem (numpy, float64); its own stopping rule."""
    C = cost.double().numpy()
    a, b = np.full(M, 1.0 / M), np.full(N, 1.0 / N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = [ot.sinkhorn(a, b, C[p], reg=EPS, method="sinkhorn", numItermax=MAX_ITER, stopThr=1e-9)
                 for p in range(C.shape[0])]
    return torch.from_numpy(np.stack(plans))


def timed(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Best wall and CPU (process) time of each function; methods interleaved. A method whose first call
    takes over 2 s is timed on that call only. Returns (wall, cpu, first outputs)."""
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    out = {}

    def once(k):
        t, c = time.perf_counter(), time.process_time()
        res = fns[k]()
        wall[k], cpu[k] = min(wall[k], time.perf_counter() - t), min(cpu[k], time.process_time() - c)
        return res

    for k in fns:
        out[k] = once(k)
    for _ in range(repeats):
        for k in fns:
            if wall[k] < 2.0:
                once(k)
    return wall, cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ps", type=int, nargs="+", default=[3200, 32000])
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 512], help="feature dims (8: spread, 512: clip-like)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pot-loop", type=int, default=100, help="problems timed with the per-problem ot.sinkhorn loop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), POT {ot.__version__}; M x N = {M} x {N}, eps={EPS}, max_iter={MAX_ITER}, thresh={THRESH}")
    rows = []
    for dim in args.dims:
        regime = "spread" if dim <= 16 else "clip-like"
        for P in args.ps:
            sim = make_sim(P, dim)
            cost = 1 - sim
            ref_pp, iters = per_problem_reference(cost)
            logit_pp = transport_logits(sim.double(), ref_pp)
            worst = int(iters.max())
            n_loop = min(args.pot_loop, P)
            fns = {
                "reference (batch-pooled)": lambda: reference_sinkhorn(cost, EPS, MAX_ITER, THRESH),
                f"ot.sinkhorn loop ({n_loop} problems)": lambda: pot_loop(cost[:n_loop]),
                f"solve_batch fixed ({worst} it)": lambda: solve_batch(cost, EPS, max_iter=worst, tol=0.0,
                                                                         method="log_sinkhorn", grad="detach").plan,
                "solve_batch own rule": lambda: solve_batch(cost, EPS, max_iter=MAX_ITER, tol=1e-5,
                                                            method="log_sinkhorn", grad="detach").plan,
                "sinkhorn_plan (ours)": lambda: sinkhorn_plan(cost, eps=EPS, max_iter=MAX_ITER, thresh=THRESH),
            }
            wall, cpu, out = timed(fns, args.repeats)
            ref_key = "reference (batch-pooled)"
            print(f"\n## {regime} (dim {dim}), P={P}: per-problem iterations min {int(iters.min())} / median "
                  f"{int(iters.median())} / max {worst}; the reference (pooled) stops when the batch mean does")
            for k in fns:
                plan = out[k]
                if "loop" in k:
                    dl = (transport_logits(sim[:n_loop].double(), plan.double()) - logit_pp[:n_loop]).abs().max()
                    scale = P / n_loop
                    note = f"{wall[k] / n_loop * 1e6:.0f} us/problem, extrapolated to P"
                else:
                    dl = (transport_logits(sim.double(), plan.double()) - logit_pp).abs().max()
                    scale, note = 1.0, ""
                w, c = wall[k] * scale, cpu[k] * scale
                rw, rc = w / wall[ref_key], c / cpu[ref_key]
                print(f"  {k:34s} wall {w * 1e3:9.1f} ms (x{rw:6.2f})  cpu {c * 1e3:9.1f} ms (x{rc:6.2f})  "
                      f"max|dlogit| {float(dl):.1e}  {note}")
                rows.append((regime, P, k, w * 1e3, rw, c * 1e3, rc, float(dl), note))
    print(f"\n{torch.get_num_threads()} torch threads; times: best of the repeats; x: ratio to the reference loop; "
          "logit diff: max |sum(T * sim) - per-problem reference| (float64 reference, per-problem stopping)\n")
    print("| cosines | P | method | wall (ms) | wall vs ref | CPU (ms) | CPU vs ref | logit diff | note |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for regime, P, k, w, rw, c, rc, dl, note in rows:
        print(f"| {regime} | {P} | {k} | {w:.1f} | {rw:.2f}x | {c:.1f} | {rc:.2f}x | {dl:.1e} | {note} |")

if __name__ == "__main__":
    main()
