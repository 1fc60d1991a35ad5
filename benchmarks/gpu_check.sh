#!/usr/bin/env bash
# GPU readiness check, a few minutes on one GPU, nothing downloaded (random RN50 weights, generated images):
#   1. a 200-step CoOp RN50 run through `vlprompt.runs.run` (the CLI's path: feature cache, trainer, evaluation)
#      under fp16 autocast with gradient scaling: every logged loss must be finite; skipped (overflowed) steps
#      are counted;
#   2. step times on the GPU, side by side: reference-style step (image tower every step, 77-token prompts),
#      vlprompt online (image tower every step, shared-prefix text), vlprompt cached views; their ratios;
#   3. peak GPU memory of the run and of one K = 1000 CoOp step (the case that OOMs the original on 16 GB).
# Writes docs/benchmarks/gpu.md (from the template's fields). fp16 is forced (torch.cuda.is_bf16_supported ->
# False) so that the GradScaler path is what is checked, also on bf16-capable GPUs.
#
#   bash benchmarks/gpu_check.sh [--device cuda] [--steps 200] [--out docs/benchmarks/gpu.md]
#   bash benchmarks/gpu_check.sh --device cpu --steps 5 --out /tmp/gpu.md     # a smoke test of the script
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" - "$@" <<'PYEOF'
import argparse, json, math, os, platform, sys, tempfile, time, warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

warnings.simplefilter("ignore")
ap = argparse.ArgumentParser()
ap.add_argument("--device", default="cuda")
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--classes", type=int, default=None, help="default 100 on a GPU, 8 on the CPU (smoke test)")
ap.add_argument("--out", default="docs/benchmarks/gpu.md")
args = ap.parse_args()
cuda = args.device.startswith("cuda")
args.classes = args.classes or (100 if cuda else 8)
if cuda and not torch.cuda.is_available():
    sys.exit(f"gpu_check: --device {args.device} but torch.cuda.is_available() is False")
if cuda:
    torch.cuda.is_bf16_supported = lambda *a, **k: False  # check the fp16 + GradScaler path (see the header)

from vlprompt.backbone import load_backbone
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.runs import run

dev = torch.device(args.device)
sync = torch.cuda.synchronize if cuda else (lambda: None)
work = Path(tempfile.mkdtemp(prefix="vlprompt-gpu-check-"))
facts = {}

# -- 1. the run ------------------------------------------------------------------------------------
root = work / "data"
rng = np.random.default_rng(0)
for c in range(args.classes):  # 20 images per class: the folder reader splits 10 / 4 / 6
    d = root / f"class_{c:03d}"
    d.mkdir(parents=True)
    for i in range(20):
        arr = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        arr[..., c % 3] = (arr[..., c % 3] // 2 + 8 * (c % 16)).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:02d}.jpg", quality=85)
shots, batch = 4, 32
steps_per_epoch = (shots * args.classes) // batch
epochs = -(-args.steps // steps_per_epoch)
request = {"method": "coop", "backbone": "RN50", "pretrained": "none", "device": args.device, "precision": "amp",
           "seed": 1, "cache_dir": str(work / "cache"),
           "data": {"dataset": "folder", "root": str(root), "shots": shots},
           "train": {"epochs": epochs, "max_steps": args.steps, "batch_size": batch, "views": 2,
                     "checkpoint_every": 0}}
if cuda:
    torch.cuda.reset_peak_memory_stats(dev)
t0 = time.perf_counter()
res = run(request, work / "run", progress=False)
facts["run_s"] = time.perf_counter() - t0
history = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
losses = [h["loss"] for h in history]
facts["steps"] = res["train"]["steps"]
facts["skipped"] = res["train"]["skipped_steps"]
facts["finite"] = all(math.isfinite(x) for x in losses)
facts["first_loss"], facts["last_loss"] = losses[0], losses[-1]
facts["run_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else float("nan")
facts["timings"] = res["timings"]

# -- 2. step times ----------------------------------------------------------------------------------
bb = load_backbone("RN50", None, device=args.device, precision="amp")
names = [f"class number {i}" for i in range(args.classes)]


def timed(fn, n=3):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


def coop(mode):
    torch.manual_seed(0)
    m = build_method("coop", {"n_ctx": 16, "text_mode": mode}, bb, names).to(dev)
    return m, torch.optim.SGD(m.trainable_parameters(), lr=0.002, momentum=0.9)


y = torch.randint(0, args.classes, (batch,), device=dev)
images = torch.randn(batch, 3, bb.image_size, bb.image_size, device=dev)
cached = torch.randn(batch, bb.embed_dim, device=dev)
scaler = torch.amp.GradScaler(dev.type, enabled=cuda)


def step(m, opt, feats_fn):
    with bb.autocast():
        logits = m(Features(global_=feats_fn()))
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


ref, ref_opt = coop("plain")
ours, ours_opt = coop("auto")
encode = lambda: bb.encode_image(images)
n_time = 3 if args.steps >= 20 else 1
t_ref = timed(lambda: step(ref, ref_opt, encode), n_time)
t_online = timed(lambda: step(ours, ours_opt, encode), n_time)
t_cached = timed(lambda: step(ours, ours_opt, lambda: cached), n_time)

# -- 3. K = 1000 -------------------------------------------------------------------------------------
k1000 = None
if cuda:
    big, big_opt = None, None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.manual_seed(0)
    big = build_method("coop", {"n_ctx": 16}, bb, [f"class number {i}" for i in range(1000)]).to(dev)
    big_opt = torch.optim.SGD(big.trainable_parameters(), lr=0.002)
    y1000 = torch.randint(0, 1000, (batch,), device=dev)
    with bb.autocast():
        loss = torch.nn.functional.cross_entropy(big(Features(global_=cached)).float(), y1000)
    scaler.scale(loss).backward()
    sync()
    k1000 = (torch.cuda.max_memory_allocated(dev) - base) / 2**20

# -- the page -----------------------------------------------------------------------------------------
name = torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine()
ok = facts["finite"] and facts["steps"] > 0
lines = [
    "# GPU check", "",
    f"Produced by `bash benchmarks/gpu_check.sh --device {args.device} --steps {args.steps}` on {name}, "
    f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Random RN50 weights, generated 64x64 images "
    f"({args.classes} classes, {shots} shots, batch {batch}); "
    + ("autocast fp16 with gradient scaling (bf16 disabled on purpose)" if cuda else "fp32 (a CPU smoke test of "
       "the script: no autocast, no scaler)") + ". Nothing downloaded.", "",
    f"## {args.steps}-step CoOp RN50 run (`vlprompt.runs.run`, cached views)", "",
    f"- result: **{'PASS' if ok else 'FAIL'}**: {facts['steps']} optimisation steps, every epoch loss finite: "
    f"{facts['finite']}; steps skipped by the gradient scaler (fp16 overflow): {facts['skipped']}",
    f"- loss: first epoch {facts['first_loss']:.4f}, last epoch {facts['last_loss']:.4f}",
    f"- wall time {facts['run_s']:.1f} s (features {facts['timings'].get('features_s', float('nan')):.1f} s, "
    f"training {facts['timings'].get('train_s', float('nan')):.1f} s, evaluation "
    f"{facts['timings'].get('eval_s', float('nan')):.1f} s)",
    f"- peak GPU memory of the run: {facts['run_peak_mb']:.0f} MiB", "",
    f"## Step times (K = {args.classes}, batch {batch}, mean of {n_time} after a warm-up)", "",
    "| pipeline | step time | speed-up |", "|---|---:|---:|",
    f"| reference-style (image tower every step, 77-token prompts) | {t_ref * 1e3:.1f} ms | 1.0x |",
    f"| vlprompt online (image tower every step, shared-prefix text) | {t_online * 1e3:.1f} ms | "
    f"{t_ref / t_online:.1f}x |",
    f"| vlprompt cached views | {t_cached * 1e3:.1f} ms | {t_ref / t_cached:.1f}x |", "",
    "## K = 1000", "",
    f"- one CoOp step (forward + backward, RN50 text tower, fp16 autocast, chunked shared-prefix text): peak "
    f"{'n/a (no GPU)' if k1000 is None else f'{k1000:.0f} MiB'} above the loaded model",
]
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if ok else 1)
PYEOF
