"""bf16 against fp32 on this machine, side by side in one run: speed and agreement.

Printed and written to docs/benchmarks/precision.md:

1. the machine: CPU model, whether it has bf16 matrix units (AMX-BF16 / AVX512-BF16), threads;
2. the GEMM rate (2048 x 2048 matmul) in fp32 and in bf16, GFLOP/s;
3. the image tower of ViT-B/16 (random weights: the cost does not depend on the values), batch 32 at 224 px, in
   fp32 and under bf16 autocast (``--precision bf16``): images/s and the share of the GEMM rate of the precision in
   use (FLOPs counted by ``torch.utils.flop_counter``); and the same tower with PyTorch's own
   ``nn.MultiheadAttention.forward`` in place of the backbone's batch-first attention
   (``vlprompt.backbone.attention``), timed alternately with it: what that attention gains;
4. agreement of the towers under bf16 with fp32, on the same images (the shared DTD test images when present, else
   random pixels): the largest logit difference relative to the logit scale and the argmax agreement of zero-shot
   logits, for ViT-B/16 (random weights) and a tiny sharpened model (``vlprompt.testing.make_tiny_checkpoint``);
5. a 16-shot CoOp run on DTD (seed 1; the shared data, skipped without it) with the tiny model, trained and
   evaluated once with ``--precision fp32`` and once with ``--precision bf16`` through ``vlprompt.train``: the test
   accuracy of each.

    python benchmarks/precision.py [--epochs 20] [--skip-coop] [--threads N]

The default precision stays ``amp`` (fp32 on CPU, autocast on GPU): the CoOp figure comes from a tiny random model,
which says nothing about the accuracy of real weights under bf16.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.backbone.model import cpu_has_fast_bf16  # noqa: E402


def shared_dtd() -> Path | None:
    root = Path(os.environ.get("VLPROMPT_SHARED", ROOT.parent / "shared")) / "assets" / "data"
    return root if (root / "dtd").is_dir() else None


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU flags that decide the GEMM kernels (AVX2 / AVX-512 / AMX / AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
    return " ".join(f for f in keep if f in flags) or "none of " + ", ".join(keep)


def machine_line(note: str = "") -> str:
    """The machine a benchmark ran on, as the docs pages name it: CPU model, architecture, the flags that decide the
    GEMM kernels, whether bf16 is fast, threads, torch (``note``: what else the page should say of the machine)."""
    return (f"{cpu_model()} ({platform.machine()}; flags: {cpu_flags()}), bf16 matrix units: "
            f"{'yes' if cpu_has_fast_bf16() else 'no'}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
            f"{note}, torch {torch.__version__}")


def write_report(text: str, path: str) -> None:
    """Print a benchmark's report and write it to ``path`` (atomically; nothing when ``path`` is empty)."""
    print(text)
    if path:
        from vlprompt._io import atomic_write_text

        atomic_write_text(path, text)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """The rate of an n x n matmul, GFLOP/s: its best of ``repeats`` timings (the machine's matmul rate; on a
    shared machine the median moved by up to 18% between runs, the best much less)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def image_flops(bb, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bb.model.encode_image(x)
    return float(counter.get_total_flops())


def tower_rows(repeats: int) -> tuple[list[tuple], dict]:
    """Per precision: (precision, images/s, GFLOP/s, images/s with nn.MultiheadAttention's own forward)."""
    from vlprompt.backbone.attention import BatchFirstSelfAttention

    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows, backbones = [], {}
    flops = None
    for precision in ("fp32", "bf16"):
        bb = load_backbone("ViT-B-16", None, "cpu", precision=precision)
        backbones[precision] = bb
        if flops is None:
            flops = image_flops(bb, x)
        attns = [m for m in bb.model.modules() if type(m) is BatchFirstSelfAttention]

        def plain_attention():
            for m in attns:
                m.__class__ = torch.nn.MultiheadAttention
            try:
                return bb.encode_image(x)
            finally:
                for m in attns:
                    m.__class__ = BatchFirstSelfAttention

        times = {"ours": [], "plain": []}
        for _ in range(repeats):  # alternating, so that a load change hits both alike
            times["ours"].append(median_time(lambda: bb.encode_image(x), 1))
            times["plain"].append(median_time(plain_attention, 1))
        t, t_plain = statistics.median(times["ours"]), statistics.median(times["plain"])
        rows.append((precision, len(x) / t, flops / t / 1e9, len(x) / t_plain))
    return rows, backbones


def images_for(bb, n: int = 64) -> torch.Tensor:
    """n shared DTD test images through the backbone's test transform (random pixels without the shared data)."""
    from vlprompt.data import load_dataset, load_image
    from vlprompt.data.transforms import build_transforms

    root = shared_dtd()
    if root is None:
        size = bb.image_size
        return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    test = load_dataset("dtd", root).test
    _, tf = build_transforms(bb.preprocess_cfg, "coop")
    step = max(len(test) // n, 1)
    return torch.stack([tf(load_image(test[i * step].path)) for i in range(n)])


def agreement(fp32, bf16, classnames: list[str]) -> dict:
    x = images_for(fp32)
    prompts = [f"a photo of a {c}." for c in classnames]
    with torch.no_grad():
        logits = {}
        for name, bb in (("fp32", fp32), ("bf16", bf16)):
            img = F.normalize(bb.encode_image(x).float(), dim=-1)
            txt = F.normalize(bb.encode_text(prompts).float(), dim=-1)
            logits[name] = fp32.logit_scale * img @ txt.t()
    diff = float((logits["fp32"] - logits["bf16"]).abs().max())
    agree = float((logits["fp32"].argmax(1) == logits["bf16"].argmax(1)).float().mean())
    return {"images": len(x), "max_logit_diff_over_scale": diff / fp32.logit_scale, "argmax_agreement": agree,
            "logit_std": float(logits["fp32"].std())}


def coop_accuracy(files, precision: str, epochs: int, out: Path) -> tuple[float, float]:
    import vlprompt

    request = {"method": "coop", "backbone": str(files[0]), "pretrained": str(files[1]), "seed": 1,
               "precision": precision, "cache_dir": str(out / "cache"),
               "data": {"dataset": "dtd", "root": str(shared_dtd()), "shots": 16},
               "train": {"epochs": epochs}}
    t0 = time.perf_counter()
    results = vlprompt.train(request, output=str(out / f"coop-{precision}"), progress=False)
    return float(results["metrics"]["accuracy"]), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=20, help="CoOp epochs of each of the two runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-coop", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write-docs", default=str(ROOT / "docs/benchmarks/precision.md"),
                    help="the Markdown file the figures are written to ('' to write none)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fast = cpu_has_fast_bf16()
    machine = machine_line()
    print("#", machine, flush=True)
    if not fast:
        sys.exit("skipped: this CPU has no bf16 matrix units (AMX-BF16 / AVX512-BF16): --precision bf16 is refused "
                 "on it")
    gemm = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    print(f"GEMM 2048: fp32 {gemm['fp32']:.0f} GFLOP/s, bf16 {gemm['bf16']:.0f} GFLOP/s "
          f"({gemm['bf16'] / gemm['fp32']:.2f}x)", flush=True)
    rows, vit = tower_rows(args.repeats)
    for precision, ips, gflops, plain in rows:
        print(f"ViT-B/16 image tower {precision}: {ips:.1f} images/s, {gflops:.0f} GFLOP/s "
              f"({gflops / gemm[precision]:.0%} of the {precision} GEMM rate); with nn.MultiheadAttention's forward "
              f"{plain:.1f} images/s", flush=True)

    from vlprompt.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_tiny_checkpoint(tmp, "tiny-vit", seed=6, sharpen=True)
        tiny = {p: load_backbone(str(files[0]), str(files[1]), "cpu", precision=p) for p in ("fp32", "bf16")}
        dtd = shared_dtd()
        from vlprompt.data import load_dataset

        classnames = load_dataset("dtd", dtd).classnames if dtd else [f"class {i}" for i in range(47)]
        agree = {"ViT-B/16 (random weights)": agreement(vit["fp32"], vit["bf16"], classnames),
                 "tiny ViT (sharpened random weights)": agreement(tiny["fp32"], tiny["bf16"], classnames)}
        for name, a in agree.items():
            print(f"{name}: max |logit diff| / logit scale {a['max_logit_diff_over_scale']:.4f}, argmax agreement "
                  f"{a['argmax_agreement']:.1%} on {a['images']} images (fp32 logit std {a['logit_std']:.2f})",
                  flush=True)
        coop = {}
        if not args.skip_coop and dtd is not None:
            for precision in ("fp32", "bf16"):
                coop[precision] = coop_accuracy(files, precision, args.epochs, tmp)
                print(f"CoOp 16-shot DTD, tiny model, {args.epochs} epochs, {precision}: accuracy "
                      f"{coop[precision][0]:.2f}% ({coop[precision][1]:.0f} s)", flush=True)

    lines = ["# bf16 against fp32", "",
             f"Machine: {machine}. Produced by `{' '.join(['python benchmarks/precision.py', *sys.argv[1:]])}`; "
             "every figure below comes from that one run.", "",
             "| figure | fp32 | bf16 | ratio |", "|---|---:|---:|---:|",
             f"| GEMM 2048 x 2048, GFLOP/s | {gemm['fp32']:.0f} | {gemm['bf16']:.0f} | "
             f"{gemm['bf16'] / gemm['fp32']:.2f}x |"]
    by = {p: (ips, g, plain) for p, ips, g, plain in rows}
    lines += [f"| ViT-B/16 image tower, batch 32, images/s | {by['fp32'][0]:.1f} | {by['bf16'][0]:.1f} | "
              f"{by['bf16'][0] / by['fp32'][0]:.2f}x |",
              f"| ... share of the GEMM rate of its precision | {by['fp32'][1] / gemm['fp32']:.0%} | "
              f"{by['bf16'][1] / gemm['bf16']:.0%} | |",
              f"| ... the same tower with nn.MultiheadAttention's own forward, images/s | {by['fp32'][2]:.1f} | "
              f"{by['bf16'][2]:.1f} | {by['bf16'][2] / by['fp32'][2]:.2f}x |",
              f"| ... the backbone's batch-first attention over it | {by['fp32'][0] / by['fp32'][2]:.2f}x | "
              f"{by['bf16'][0] / by['bf16'][2]:.2f}x | |"]
    if coop:
        lines.append(f"| CoOp 16-shot DTD, tiny model, {args.epochs} epochs: test accuracy | {coop['fp32'][0]:.2f}% | "
                     f"{coop['bf16'][0]:.2f}% | {coop['bf16'][0] - coop['fp32'][0]:+.2f} points |")
        lines.append(f"| ... wall time of the run (features, training, evaluation) | {coop['fp32'][1]:.0f} s | "
                     f"{coop['bf16'][1]:.0f} s | {coop['fp32'][1] / coop['bf16'][1]:.2f}x |")
    lines += ["", "Agreement of bf16 with fp32 (zero-shot logits \"a photo of a {class}.\" over the 47 DTD classes, "
              + ("shared DTD test images" if dtd else "random pixels") + "):", "",
              "| model | images | max abs logit difference / logit scale | argmax agreement | fp32 logit std |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {a['images']} | {a['max_logit_diff_over_scale']:.4f} | {a['argmax_agreement']:.1%} | "
              f"{a['logit_std']:.2f} |" for name, a in agree.items()]
    lines += ["", "Random ViT-B/16 weights give nearly the same feature to every image (the small logit spread): bf16's "
              "rounding of the large activations of 12 random blocks then flips most argmaxes. The tiny sharpened model, "
              "whose logits spread, shows what bf16 rounding does to a model that separates its inputs; neither stands "
              "for trained weights."]
    lines += ["", "The default precision stays `amp` (fp32 on CPU, autocast on GPU): these agreements come from random "
              "weights, and a tiny model's accuracy says nothing of real weights under bf16. `--precision bf16` (or "
              "`auto`) is the user's choice where the speed matters more than the last digit.", ""]
    text = "\n".join(lines)
    write_report(text, args.write_docs)


if __name__ == "__main__":
    main()
