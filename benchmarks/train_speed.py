"""Steps and epochs of vlprompt's CoOp / PLOT / CoCoOp against reference-style pipelines, side by side in one run.

First table (no data needed): this machine's GEMM rate (2048 x 2048) in fp32 and bf16 (where the CPU has bf16
matrix units); each method's training step on cached features in fp32 and under ``--precision bf16`` with its
share of the GEMM rate of that precision (FLOPs counted by ``torch.utils.flop_counter``), and its ratio to a plain
re-implementation of the original step run in the same process on the same method (its weights and context):
the image tower every step, the prompts at the full 77 tokens (PLOT: its Sinkhorn as the reference runs it;
CoCoOp: one image at a time), fp32. The steps are those of benchmarks/framework_overhead.py (RN50, K = 102,
batch 32; CoCoOp ViT-B/16, batch 8, per image).

Then the epoch times:

The reference pipelines are written here as the reference implementations work (KaiyangZhou/CoOp):

* CoOp: the frozen image tower runs at every step on augmented images, every class prompt runs at the full
  77 tokens, and evaluation re-encodes the class prompts for every test batch.
* CoCoOp: batch size 1; per image the image tower runs and all K prompts (conditioned on that image) run at
  77 tokens.

vlprompt: cached views (features computed once per view through the feature cache, then only the text side
runs), online (image tower every step, fast text path), and batched CoCoOp.

Same model (RN50 for CoOp, ViT-B/16 for CoCoOp, random weights: the cost does not depend on the values), data
(16-shot Flowers102 from ../shared when present: K = 102, 1632 training images), batch 32, SGD. Each pipeline
runs a few steps (after a warm-up step) and the epoch time is the mean step time times the steps per epoch;
the one-time feature extraction of the cached mode is reported separately. Writes docs/benchmarks/train_speed.md.

    python benchmarks/train_speed.py [--steps 2] [--skip-cocoop] [--skip-epochs]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from framework_overhead import make_step  # noqa: E402  (the steps of framework_overhead.py / step_profile.py)
from precision import gemm_rate, machine_line, median_time, write_report  # noqa: E402
from step_profile import step_flops  # noqa: E402
from vlprompt.backbone import cpu_has_fast_bf16, load_backbone  # noqa: E402
from vlprompt.data import build_test_transform, build_train_transform, few_shot_split, load_dataset, load_image  # noqa: E402
from vlprompt.methods.base import Features  # noqa: E402
from vlprompt.methods.prompts.cocoop import CoCoOp, CoCoOpConfig  # noqa: E402
from vlprompt.methods.prompts.coop import CoOp, CoOpConfig  # noqa: E402


def flowers(shots=16):
    root = Path(os.environ.get("VLPROMPT_SHARED", ROOT.parent / "shared")) / "assets" / "data"
    if not (root / "oxford_flowers").exists():
        print(f"epoch tables skipped: 16-shot Flowers102 not found under {root} (set VLPROMPT_SHARED)")
        return None
    return few_shot_split(load_dataset("oxford_flowers", root), shots, 1)


def reference_step(name: str, step):
    """The original's step on the method and backbone of ``step`` (a make_step closure, fp32): the image tower on
    a batch of images every step, every prompt at 77 tokens through the plain text path, fp32. Returns
    (a function running one step, images it covers)."""
    method, bb, bs = step.method, step.backbone, step.batch
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, method.num_classes, (bs,), generator=g)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    if name == "plot":
        from plot_speed import REFERENCE_ONE_BATCH_GB, ReferencePLOT, available_gb

        ref = ReferencePLOT(bb, method, one_batch=available_gb() >= REFERENCE_ONE_BATCH_GB)
        x = torch.randn(bs, 3, 224, 224, generator=g)
        return (lambda: ref.step(x, labels, opt)), bs
    if name == "cocoop":  # batch 1, the tower and all K prompts (conditioned on the image) per image
        x = torch.randn(1, 3, 224, 224, generator=g)

        def one_image():
            with torch.no_grad():
                img = bb.model.encode_image(x)
            loss = F.cross_entropy(method.forward_per_image(Features(global_=img)), labels[:1])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return one_image, 1
    x = torch.randn(bs, 3, 224, 224, generator=g)

    def coop():
        with torch.no_grad():
            img = bb.model.encode_image(x)
        prefix, suffix, eot = method.prompt.prompt_embeddings()
        text = bb.text.encode_prompts(prefix, suffix, eot, mode="plain", chunk_size=None)[0]
        loss = F.cross_entropy(bb.logit_scale * F.normalize(img, dim=-1) @ F.normalize(text, dim=-1).t(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return coop, bs


def step_rows(args) -> tuple[dict, list[tuple]]:
    """The GEMM rates and, per method, the reference step and vlprompt's step in each precision (per image)."""
    precisions = ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]
    gemm = {p: gemm_rate(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    print("GEMM 2048 x 2048: " + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in gemm.items()), flush=True)
    rows = []
    for name in args.methods:
        ours = {}
        for precision in precisions:
            step = make_step(name, precision)
            flops = step_flops(step)
            t = median_time(step, args.steps)
            ours[precision] = (t / step.batch, flops / t / 1e9 / gemm[precision])
            if precision == "fp32":
                ref_fn, ref_images = reference_step(name, step)
        t_ref = median_time(ref_fn, 1) / ref_images
        rows.append((name, step.batch, t_ref, ours))
        print(f"{name}: reference {t_ref:.3f} s/image; " + "; ".join(
            f"vlprompt {p} {t:.4f} s/image ({share:.0%} of the {p} GEMM rate, {t_ref / t:.1f}x the reference)"
            for p, (t, share) in ours.items()), flush=True)
    return gemm, rows


def timed(fn, steps):
    fn()  # warm-up
    t = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return sum(t) / len(t)


def images(samples, tf, n, offset=0):
    return torch.stack([tf(load_image(samples[(offset + i) % len(samples)].path)) for i in range(n)])


def coop_rows(args, splits):
    bb = load_backbone("RN50", None, device="cpu")
    classes = splits.classnames
    n_train, bs = len(splits.train), 32
    steps_per_epoch = n_train // bs
    train_tf, test_tf = build_train_transform(224), build_test_transform(224)
    labels = torch.tensor([s.label for s in splits.train])
    torch.manual_seed(0)
    method = CoOp(CoOpConfig(n_ctx=16), bb, classes)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    state = {"i": 0}

    def batch_labels():
        idx = torch.arange(state["i"] * bs, state["i"] * bs + bs) % n_train
        state["i"] += 1
        return idx

    def ref_step():  # image tower every step, prompts at 77 tokens
        idx = batch_labels()
        x = images(splits.train, train_tf, bs, int(idx[0]))
        with torch.no_grad():
            img = bb.model.encode_image(x)
        prefix, suffix, eot = method.prompt.prompt_embeddings()
        text = bb.text.encode_prompts(prefix, suffix, eot, mode="plain")[0]
        loss = F.cross_entropy(bb.logit_scale * F.normalize(img, dim=-1) @ F.normalize(text, dim=-1).t(), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def online_step():
        idx = batch_labels()
        x = images(splits.train, train_tf, bs, int(idx[0]))
        loss = F.cross_entropy(method(Features(global_=bb.encode_image(x))), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    feats = torch.randn(n_train, bb.embed_dim)  # what the cache returns: a (N, E) tensor per view

    def cached_step():
        idx = batch_labels()
        loss = F.cross_entropy(method(Features(global_=feats[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_ref = timed(ref_step, args.steps)
    t_online = timed(online_step, args.steps)
    t_cached = timed(cached_step, max(args.steps, 5))
    t_encode = timed(lambda: bb.encode_image(images(splits.train, test_tf, bs)), 1) / bs  # per image, one view
    # evaluation of 100 test images: reference re-encodes the prompts per batch (batch 100 -> once per batch)
    x_test = images(splits.test, test_tf, 100)

    def ref_eval():
        with torch.no_grad():
            img = bb.model.encode_image(x_test)
            prefix, suffix, eot = method.prompt.prompt_embeddings()
            text = bb.text.encode_prompts(prefix, suffix, eot, mode="plain")[0]
            (F.normalize(img, dim=-1) @ F.normalize(text, dim=-1).t()).argmax(1)

    def our_eval():  # text once per evaluation; image features from the cache (test view)
        method.eval()
        method.begin_eval()
        with torch.no_grad():
            method(Features(global_=torch.randn(100, bb.embed_dim))).argmax(1)
        method.end_eval()
        method.train()

    t_ref_eval, t_our_eval = timed(ref_eval, 1), timed(our_eval, 1)

    def first_eval(backbone):  # the first evaluation: nothing cached, the image tower on every test image
        def run():
            feats = Features(global_=backbone.encode_image(x_test))
            method.eval()
            method.begin_eval()
            with torch.no_grad():
                method(feats).argmax(1)
            method.end_eval()
            method.train()
        return run

    first = {"fp32": timed(first_eval(bb), 1)}
    if cpu_has_fast_bf16():
        bb_bf16 = load_backbone("RN50", None, device="cpu", precision="bf16")
        bb_bf16.model.load_state_dict(bb.model.state_dict())  # the same weights
        method.backbone = bb_bf16
        first["bf16"] = timed(first_eval(bb_bf16), 1)
        method.backbone = bb
    rows = [
        ("CoOp, reference pipeline (image tower every step, 77-token prompts)", t_ref * steps_per_epoch, 1.0),
        ("CoOp, vlprompt online (image tower every step, shared-prefix text)", t_online * steps_per_epoch,
         t_ref / t_online),
        ("CoOp, vlprompt cached views", t_cached * steps_per_epoch, t_ref / t_cached),
    ]
    extra = {"one-time feature extraction per view (s)": t_encode * n_train,
             "eval of 100 test images, reference (s)": t_ref_eval,
             "eval of 100 test images, vlprompt (text once, cached image features) (s)": t_our_eval,
             **{f"first evaluation of 100 test images (image tower included), vlprompt {p} (s)": t
                for p, t in first.items()},
             **{f"... the reference's over vlprompt {p}'s": t_ref_eval / t for p, t in first.items()},
             "steps per epoch": steps_per_epoch}
    return rows, extra


def k1000_peak(bb_name="RN50"):
    """Peak memory of a K=1000 CoOp forward+backward step (cached features), in a fresh process."""
    import subprocess
    # VmHWM of the child itself (ru_maxrss can carry the parent's peak across fork + exec)
    code = ("import warnings,torch,torch.nn.functional as F;warnings.simplefilter('ignore');"
            "from vlprompt.backbone import load_backbone;from vlprompt.methods.prompts.coop import CoOp,CoOpConfig;"
            "from vlprompt.methods.base import Features;"
            "hwm=lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]);"
            f"bb=load_backbone('{bb_name}',None,'cpu');m=CoOp(CoOpConfig(),bb,[f'class {{i}}' for i in range(1000)]);"
            "base=hwm();"
            "l=F.cross_entropy(m(Features(global_=torch.randn(32,bb.embed_dim))),torch.arange(32));l.backward();"
            "print(base/1024, hwm()/1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    if out.returncode:
        return None
    base, peak = map(float, out.stdout.split()[-2:])
    return base, peak


def cocoop_rows(args, splits):
    bb = load_backbone("ViT-B-16", None, device="cpu")
    classes = splits.classnames
    n_train = len(splits.train)
    train_tf = build_train_transform(224)
    labels = torch.tensor([s.label for s in splits.train])
    torch.manual_seed(0)
    method = CoCoOp(CoCoOpConfig(), bb, classes)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)

    def ref_image():  # batch size 1, image tower every step, prompts at 77 tokens
        x = images(splits.train, train_tf, 1)
        with torch.no_grad():
            img = bb.model.encode_image(x)
        logits = method.forward_per_image(Features(global_=img))
        loss = F.cross_entropy(logits, labels[:1])
        opt.zero_grad()
        loss.backward()
        opt.step()

    feats = torch.randn(n_train, bb.embed_dim)
    bs = args.cocoop_batch

    def our_step():  # cached views, a batch of images at once through the grouped shared-prefix path
        loss = F.cross_entropy(method(Features(global_=feats[:bs])), labels[:bs])
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_ref = timed(ref_image, 1)  # per image
    t_our = timed(our_step, 1) / bs  # per image
    return [("CoCoOp, reference pipeline (batch 1, image tower every step, 77 tokens)", t_ref * n_train, 1.0),
            (f"CoCoOp, vlprompt batched (batch {bs}, cached views, shared prefix)", t_our * n_train, t_ref / t_our)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["coop", "plot", "cocoop"], choices=["coop", "plot", "cocoop"],
                    help="the methods of the step table")
    ap.add_argument("--cocoop-batch", type=int, default=8)
    ap.add_argument("--skip-cocoop", action="store_true", help="no CoCoOp epoch rows")
    ap.add_argument("--skip-epochs", action="store_true", help="the step table only")
    ap.add_argument("--write-docs", default=str(ROOT / "docs/benchmarks/train_speed.md"))
    args = ap.parse_args()
    machine = machine_line()
    print("#", machine, flush=True)
    gemm, srows = step_rows(args)
    cmd = " ".join(["python benchmarks/train_speed.py", *sys.argv[1:]])
    precisions = list(gemm)
    lines = ["# Training speed benchmark", "", f"Machine: {machine}. Produced by `{cmd}`; every figure from that one run.",
             "", "## Steps against the matmul rate and the original's step", "",
             "| GEMM 2048 x 2048 | " + " | ".join(f"{p}: {r:.0f} GFLOP/s" for p, r in gemm.items()) + " |",
             "|---|" + "---|" * len(gemm), "",
             "A step on cached features (forward, loss, backward, SGD), random weights, K = 102 classes: CoOp and PLOT "
             "RN50 size, batch 32, 16 context vectors (PLOT 4 prompts, 7 x 7 local features); CoCoOp ViT-B/16 size, "
             f"batch 8, 4 context vectors. Median of {args.steps} steps after a warm-up, per image. Share: FLOPs of "
             "the step (torch.utils.flop_counter: matmuls and attention, forward and backward) per second over the "
             "GEMM rate of the precision in use (the best of 10 timings of a 2048 x 2048 matmul). Reference: the "
             "original's step re-implemented here on the same "
             "method and weights (image tower every step on a batch of images, every prompt at 77 tokens, fp32; "
             "CoCoOp one image per step), one step after a warm-up.", "",
             "| method | reference fp32 s/image | " + " | ".join(
                 f"vlprompt {p} s/image | share of {p} GEMM | vs reference" for p in precisions) + " |",
             "|---|---:|" + "---:|---:|---:|" * len(precisions)]
    for name, bs, t_ref, ours in srows:
        lines.append(f"| {name} (batch {bs}) | {t_ref:.3f} | " + " | ".join(
            f"{t:.4f} | {share:.0%} | {t_ref / t:.1f}x" for t, share in ours.values()) + " |")
    splits = None if args.skip_epochs else flowers()
    if splits is not None:
        rows, extra = coop_rows(args, splits)
        for r in rows:
            print(f"{r[0]:75s} {r[1]:9.1f} s/epoch  {r[2]:6.1f}x", flush=True)
        if not args.skip_cocoop:
            more = cocoop_rows(args, splits)
            for r in more:
                print(f"{r[0]:75s} {r[1]:9.1f} s/epoch  {r[2]:6.1f}x", flush=True)
            rows += more
        mem = k1000_peak()
        lines += ["", "## Epochs (fp32)", "",
                  f"16-shot Flowers102 (K = {splits.num_classes}, {len(splits.train)} training images), batch 32 "
                  f"(CoCoOp reference: 1), SGD, random weights. Epoch time = mean time of {args.steps} measured steps "
                  "(after one warm-up step) x steps per epoch; ratios are over the reference pipeline of the same "
                  "method, measured in the same run.",
                  "", "| pipeline | epoch time | speed-up |", "|---|---:|---:|"]
        lines += [f"| {name} | {t:.1f} s | {ratio:.1f}x |" for name, t, ratio in rows]
        lines += ["", *[f"- {k}: {v:.2f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in extra.items()]]
        if mem:
            lines.append(f"- K = 1000 CoOp step (RN50, forward + backward, chunked shared-prefix text): peak RSS "
                         f"{mem[1]:.0f} MB (of which {mem[0]:.0f} MB is the loaded model)")
    lines.append(f"- peak RSS of this benchmark: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    text = "\n".join(lines) + "\n"
    write_report(text, args.write_docs)


if __name__ == "__main__":
    main()
