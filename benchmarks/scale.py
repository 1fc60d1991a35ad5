"""Memory and cache costs at scale, side by side in one run.

* peak RSS (VmHWM, one child process per configuration) of CoOp and PLOT training steps from cached views of
  RN50 size (E = 1024, PLOT's M = 49 local tokens; RN50 text tower with random weights) against V views and K
  classes: lazily read views (``FeatureCache.open`` -> ``CachedViews.from_rows``, what runs do now) next to the
  views stacked in memory (what ``train_source`` did before);
* the feature cache with 100k+ entries: write time (the journal appends one line per shard; the former index
  was rewritten whole after every shard -- emulated here for the ratio), look-up time, batch and full reads;
* ``cache_dtype float16``: max |difference| of CoOp logits from float16-stored features against float32, on
  real DTD images, with a tiny model and with an RN50-sized random model.

Writes docs/benchmarks/scale.md.

    python benchmarks/scale.py [--quick]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from extract_speed import dtd_paths, machine  # noqa: E402

E, M = 1024, 49

# one configuration: fill (or hit) a cache of synthetic RN50-sized features, build the method on the RN50 text
# tower, run `steps` training steps; print the peak RSS
CHILD = textwrap.dedent("""
    import json, resource, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from types import SimpleNamespace
    from vlprompt.backbone import load_backbone
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.engine.sources import CachedViews
    from vlprompt.methods import build_method

    method_name, views, k, n, mode, root, steps = sys.argv[1:8]
    views, k, n, steps = int(views), int(k), int(n), int(steps)
    local = method_name == "plot"
    bb = load_backbone("RN50", None, "cpu", precision="fp32")
    keys = [f"/img/{i}.jpg|1|1" for i in range(n)]
    fc = FeatureCache(root, progress=False)
    meta = lambda v: {"format": "vlprompt-feature-cache", "version": 2, "fingerprint": "synthetic",
                      "transform_id": "train", "view": v, "seed": 0, "local": local, "dtype": "float32"}
    fake = SimpleNamespace(fingerprint="synthetic", name="RN50", embed_dim=1024)
    rows = []
    from vlprompt.backbone.cache import CachedRows
    for v in range(views):
        d = fc.root / f"v{v}"
        with fc._locked(d):
            where, shards = fc._lookup(d, meta(v), fake, set(keys), local, "float32")
        rows.append(CachedRows(fc, d, keys, where, shards, local=local, dtype_name="float32", embed_dim=1024,
                               hits=n, misses=0))
    if mode == "memory":  # as train_source did before: every view stacked in RAM
        g = torch.stack([r.read_all()[0] for r in rows])
        loc = torch.stack([r.read_all()[1] for r in rows]) if local else None
        source = CachedViews(g, loc)
    else:
        source = CachedViews.from_rows(rows)
    classes = [f"class {i}" for i in range(k)]
    method = build_method(method_name, {"n_ctx": 16, **({"n_prompts": 4} if local else {})}, bb, classes)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    bs = 128 if local else 32
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:bs]
        feats = source.batch(idx, gen)
        loss, _ = method.loss(method(feats), torch.randint(0, k, (len(idx),), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def fill_synthetic(root: Path, views: int, n: int, local: bool, shard_size: int = 1024):
    """Write V views of n synthetic RN50-sized rows through the cache's own writer."""
    from types import SimpleNamespace

    from vlprompt.backbone.cache import FeatureCache, _Store

    fc = FeatureCache(root, shard_size=shard_size, progress=False)
    fake = SimpleNamespace(fingerprint="synthetic", name="RN50", embed_dim=E)
    g = torch.Generator().manual_seed(0)
    for v in range(views):
        d = root / f"v{v}"
        if (d / "shards.jsonl").exists():
            continue
        meta = {"format": "vlprompt-feature-cache", "version": 2, "fingerprint": "synthetic",
                "transform_id": "train", "view": v, "seed": 0, "local": local, "dtype": "float32"}
        store = _Store(fc, d, meta, fake, local, torch.float32)
        for start in range(0, n, shard_size):
            for i in range(start, min(n, start + shard_size)):
                store.buffer.append((f"/img/{i}.jpg|1|1", torch.randn(E, generator=g),
                                     torch.randn(M, E, generator=g) if local else None))
            store.flush()


def peak_rss(args, lines):
    n = 512 if args.quick else 2048
    grid_v = (1, 10)
    grid_k = (10, 50) if args.quick else (10, 100)
    lines += [f"## Peak RSS of training steps from cached views (N = {n} images, RN50 sizes, random weights)", "",
              "| method | V | K | lazy views (now) MB | stacked in RAM (before) MB | before - now MB |",
              "|---|---|---|---|---|---|"]
    tmp = Path(tempfile.mkdtemp())
    for method in ("coop", "plot"):
        root = tmp / method
        fill_synthetic(root, max(grid_v), n, method == "plot")
        for v in grid_v:
            for k in grid_k:
                got = {}
                for mode in ("lazy", "memory"):
                    out = subprocess.run([sys.executable, "-c", CHILD, method, str(v), str(k), str(n), mode,
                                          str(root), "1"], capture_output=True, text=True,
                                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
                    if out.returncode:
                        sys.exit(out.stderr[-3000:])
                    got[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
                lines.append(f"| {method} | {v} | {k} | {got['lazy']:.0f} | {got['memory']:.0f} | "
                             f"{got['memory'] - got['lazy']:.0f} |")
                print(lines[-1], flush=True)
    per_view = n * E * 4 / 2 ** 20, n * (M + 1) * E * 4 / 2 ** 20
    lines += ["", f"Features per view: CoOp {per_view[0]:.0f} MB, PLOT {per_view[1]:.0f} MB for N = {n}; ImageNet "
              f"16-shot (N = 16,000) x 10 views of PLOT: {16000 * 10 * (M + 1) * E * 4 / 2 ** 30:.0f} GB stacked, "
              f"one batch of 128 now: {128 * (M + 1) * E * 4 / 2 ** 20:.0f} MB.", ""]


def cache_scale(args, lines):
    from types import SimpleNamespace

    from vlprompt.backbone.cache import CachedRows, FeatureCache, _Store

    n = 102_400 if args.quick else 1_281_167
    e, shard = 64, 1024
    root = Path(tempfile.mkdtemp())
    fc = FeatureCache(root, shard_size=shard, progress=False)
    fake = SimpleNamespace(fingerprint="synthetic", name="x", embed_dim=e)
    meta = {"format": "vlprompt-feature-cache", "version": 2, "fingerprint": "synthetic", "transform_id": "t",
            "view": 0, "seed": 0, "local": False, "dtype": "float32"}
    d = root / "d"
    store = _Store(fc, d, meta, fake, False, torch.float32)
    keys = [f"/data/imagenet/train/n{i // 1300:08d}/n{i // 1300:08d}_{i}.JPEG|110000|1700000000000000000"
            for i in range(n)]
    rows = torch.randn(n, e)
    t0 = time.perf_counter()
    per_shard = []
    for start in range(0, n, shard):
        for i in range(start, min(n, start + shard)):
            store.buffer.append((keys[i], rows[i], None))
        t1 = time.perf_counter()
        store.flush()
        per_shard.append(time.perf_counter() - t1)
    t_write = time.perf_counter() - t0
    # the former index: every entry as JSON, rewritten after every shard (emulated: the dump and the write)
    entries, t_old = {}, 0.0
    old_index = root / "old-index.json"
    for s, start in enumerate(range(0, n, shard)):
        for i in range(start, min(n, start + shard)):
            entries[keys[i]] = [f"shard-{s:05d}.safetensors", i - start]
        t1 = time.perf_counter()
        old_index.write_text(json.dumps({"entries": entries}, separators=(",", ":")))
        t_old += time.perf_counter() - t1
    t0 = time.perf_counter()
    with fc._locked(d):
        where, shards = fc._lookup(d, meta, fake, set(keys), False, "float32")
    lazy = CachedRows(fc, d, keys, where, shards, local=False, dtype_name="float32", embed_dim=e, hits=n, misses=0)
    t_open = time.perf_counter() - t0
    idx = torch.randint(0, n, (128,), generator=torch.Generator().manual_seed(0))
    t_batch = min(_timed(lambda: lazy.read(idx)) for _ in range(5))
    got = lazy.read(idx)[0]
    assert torch.equal(got, rows[idx])
    t0 = time.perf_counter()
    allr = lazy.read_all()[0]
    t_all = time.perf_counter() - t0
    assert torch.equal(allr, rows)
    q = max(1, len(per_shard) // 10)
    lines += [f"## The cache with {n:,} entries ({len(per_shard)} shards of {shard}, E = {e}, ImageNet-like keys)",
              "",
              "| what | time |", "|---|---|",
              f"| write all shards (journal: one appended line each) | {t_write:.2f} s |",
              f"| mean per-shard flush, first / last tenth of the shards | {1e3 * sum(per_shard[:q]) / q:.1f} / "
              f"{1e3 * sum(per_shard[-q:]) / q:.1f} ms |",
              f"| the former index rewritten after every shard (JSON dump + write only) | {t_old:.2f} s "
              f"({t_old / max(t_write, 1e-9):.1f}x the whole new write) |",
              f"| look-up of all {n:,} keys (journal replay + header checks of every shard) | {t_open:.2f} s |",
              f"| read a random batch of 128 rows (crc32 checked) | {1e3 * t_batch:.2f} ms |",
              f"| read all rows (crc32 checked) | {t_all:.2f} s |",
              f"| journal size | {(d / 'shards.jsonl').stat().st_size / 2 ** 20:.1f} MB |", ""]
    print("\n".join(lines[-10:]), flush=True)


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fp16_logits(args, lines):
    from vlprompt.backbone import load_backbone
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.data.transforms import build_transforms
    from vlprompt.methods import build_method
    from vlprompt.methods.base import Features
    from vlprompt.testing import make_tiny_checkpoint

    paths = dtd_paths(24 if args.quick else 96)
    classes = sorted({Path(p).parent.name for p in dtd_paths(10_000)})
    tmp = Path(tempfile.mkdtemp())
    cfg, weights = make_tiny_checkpoint(tmp, "tiny-rn", seed=0, sharpen=True)
    models = {"tiny RN (sharpened, random)": load_backbone(str(cfg), str(weights), "cpu", precision="fp32"),
              "RN50 (random weights)": load_backbone("RN50", None, "cpu", precision="fp32")}
    lines += [f"## cache_dtype float16: CoOp logits against float32 ({len(paths)} DTD images, K = {len(classes)}, "
              f"CoOp's train augmentation, view 0)", "",
              "| model | max abs diff of logits | max logit | relative | argmax agreement | local max abs diff "
              "(PLOT's input) |", "|---|---|---|---|---|---|"]
    for name, bb in models.items():
        train_tf, _ = build_transforms(bb.preprocess_cfg, "coop")
        fc = FeatureCache(tmp / "cache", progress=False)
        f32 = fc.get(bb, paths, train_tf, transform_id="train", local=True)
        f16 = fc.get(bb, paths, train_tf, transform_id="train", local=True, dtype=torch.float16)
        method = build_method("coop", {"n_ctx": 16}, bb, classes)
        with torch.no_grad():
            torch.manual_seed(0)
            a = method(Features(global_=f32.global_))
            b = method(Features(global_=f16.global_))
        diff = float((a - b).abs().max())
        agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        ldiff = float((f32.local - f16.local).abs().max() / f32.local.abs().max())
        lines.append(f"| {name} | {diff:.2e} | {float(a.abs().max()):.1f} | {diff / float(a.abs().max()):.1e} | "
                     f"{100 * agree:.0f}% | {ldiff:.1e} (relative) |")
        print(lines[-1], flush=True)
    lines += ["", "Disk and memory of cached features halve (2 bytes per value instead of 4). The logits move by "
              "float16's rounding of the features (relative 2^-11 per value) times the model's logit scale; "
              "fp32 stays the default.", ""]


def processes(args, lines: list[str]) -> None:
    """A CoOp step (RN50 text tower, K = 50, batch 32, cached features) in one process against 2 torchrun-style
    gloo ranks splitting the same global batch (benchmarks/distributed_step.py's code, in this run)."""
    import statistics
    import types

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import distributed_step as ds

    opts = types.SimpleNamespace(backbone="RN50", classes=50, batch=32, steps=2 if args.quick else 3)
    torch.set_num_threads(2)
    one = statistics.median(ds.step_times(opts.backbone, opts.classes, opts.batch, opts.steps))
    two = statistics.median(ds.two_ranks(opts))
    lines += ["", "## 2 processes (gloo ranks, 1 thread each) against 1 process (2 threads)", "",
              f"CoOp step, RN50 text tower, K = {opts.classes}, batch {opts.batch} (each rank half of it and half of "
              f"the class prompts), median of {opts.steps} steps after a warm-up.", "",
              "| setting | step time | ratio |", "|---|---:|---:|",
              f"| 1 process, 2 threads | {one:.3f} s | 1.00x |",
              f"| 2 ranks, 1 thread each | {two:.3f} s | {two / one:.2f}x |", "",
              "On 2 cores the ranks' gradient all-reduce and the duplicated per-step work outweigh the split: torchrun "
              "pays on machines with a GPU or many cores per rank (see docs/benchmarks/cpu_contention.md for the "
              "effect of a competing process)."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CI-sized: fewer images, classes and entries")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "scale.md"))
    ap.add_argument("--skip", nargs="*", default=(), choices=("rss", "cache", "fp16", "procs"))
    args = ap.parse_args()
    lines: list[str] = []
    if "rss" not in args.skip:
        peak_rss(args, lines)
    if "cache" not in args.skip:
        cache_scale(args, lines)
    if "fp16" not in args.skip:
        fp16_logits(args, lines)
    if "procs" not in args.skip:
        processes(args, lines)
    Path(args.out).write_text(HEADER.format(machine=machine(), quick=" --quick" if args.quick else "",
                                            date=time.strftime("%Y-%m-%d")) + "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


HEADER = """# Scale: memory, the cache at 100k+ entries, float16 cached views, 2 processes vs 1

Written by `python benchmarks/scale.py{quick}` on {date}: {machine}, with no other work running. Only
same-run ratios mean anything; `python benchmarks/scale.py` (without --quick) sizes the cache like ImageNet-train
(1.28 M entries).

"""

if __name__ == "__main__":
    main()
