"""Text tower with learned context: plain (77 tokens) vs cut vs shared prefix, forward + backward.

RN50's text tower with random weights (the cost does not depend on the values), a CoOp prompt
``SOT + 16 context vectors + class name + "." + EOT`` per class, K classes. Every path is timed side by side
in one run; ratios are over the plain path. Writes ``docs/benchmarks/text_encoder.md``.

    python benchmarks/text_encoder.py [--ks 10 100 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlprompt.backbone import load_backbone  # noqa: E402

WORDS = ["rose", "red", "giant", "white", "sword", "lily", "orange", "dahlia", "pink", "primrose", "bird", "of",
         "paradise", "wild", "desert", "globe", "thistle", "yellow", "iris", "bearded", "sweet", "pea"]


def classnames(k: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(k):
        n = 1 + int(torch.randint(0, 3, (1,), generator=g))
        names.append(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (n,), generator=g)))
    return names


def build(bb, k: int, n_ctx: int = 16):
    te = bb.text
    tokens = te.tokenize([" ".join(["X"] * n_ctx) + " " + c + "." for c in classnames(k)])
    emb = te.embed(tokens)
    eot = te.eot_positions(tokens)
    ctx = torch.nn.Parameter(torch.randn(n_ctx, te.width) * 0.02)
    return emb, eot, ctx


def run(te, emb, eot, ctx, mode, chunk):
    n_ctx = ctx.shape[0]
    prefix = torch.cat([emb[0, :1], ctx])
    suffix = emb[:, 1 + n_ctx:]
    ctx.grad = None
    out = te.encode_prompts(prefix, suffix, eot, mode=mode, chunk_size=chunk)
    out.square().sum().backward()
    return out.detach(), ctx.grad.detach().clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--write-docs", default=str(Path(__file__).resolve().parents[1] / "docs/benchmarks/text_encoder.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone("RN50", None, device="cpu")
    te = bb.text
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = []
    for k in args.ks:
        emb, eot, ctx = build(bb, k)
        times, ref = {}, None
        for mode in ("plain", "cut", "prefix"):
            out, grad = run(te, emb, eot, ctx, mode, args.chunk)  # warm-up and equality check
            if ref is None:
                ref = (out, grad)
            else:
                err_f = ((out - ref[0]).norm() / ref[0].norm()).item()
                err_g = ((grad - ref[1]).norm() / ref[1].norm()).item()
                assert err_f < 1e-4 and err_g < 1e-4, (mode, err_f, err_g)
            reps = 1 if (mode == "plain" and k >= 1000) else args.repeats
            t = []
            for _ in range(reps):
                t0 = time.perf_counter()
                run(te, emb, eot, ctx, mode, args.chunk)
                t.append(time.perf_counter() - t0)
            times[mode] = min(t)
        rows.append((k, times))
        print(f"K={k:5d}  plain {times['plain']:7.2f}s  cut {times['cut']:6.2f}s ({times['plain'] / times['cut']:4.1f}x)"
              f"  prefix {times['prefix']:6.2f}s ({times['plain'] / times['prefix']:4.1f}x)", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = ["| K | plain (77 tokens) | cut | shared prefix | cut / plain speed-up | prefix / plain speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for k, t in rows:
        table.append(f"| {k} | {t['plain']:.2f} s | {t['cut']:.2f} s | {t['prefix']:.2f} s | "
                     f"{t['plain'] / t['cut']:.1f}x | {t['plain'] / t['prefix']:.1f}x |")
    text = "\n".join([
        "# Text encoder benchmark", "",
        "RN50 text tower, random weights, fp32, 16 learned context vectors + class name, forward + backward "
        f"(gradient to the context), best of {args.repeats} (1 for plain at K >= 1000), chunks of {args.chunk} prompts "
        "(checkpointed) where K exceeds it. Produced by `python benchmarks/text_encoder.py`.", "",
        f"Machine: {machine}; peak RSS {peak:.0f} MB.", "", *table, ""])
    print(text)
    if args.write_docs:
        from vlprompt._io import atomic_write_text
        atomic_write_text(args.write_docs, text)


if __name__ == "__main__":
    main()
