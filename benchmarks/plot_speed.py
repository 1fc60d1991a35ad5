"""PLOT epoch time: vlprompt against a plain reference pipeline, side by side in one run; K=1000 peak memory.

The reference pipeline is written here as PLOT's reference implementation (CHENGY12/PLOT, plot-coop) works:
every step loads and augments its 32 images and runs the frozen RN50 image tower with the attention pool at all
50 positions; all N x K prompts are built at the full 77 tokens and run through the text tower in one batch
(CLIP's plain text forward); cost 1 - cosine; the batch-pooled Sinkhorn loop without gradient
(``vlprompt.methods.parts.ot.reference_sinkhorn``); logits 100 * sum(T * sim); cross-entropy; backward; SGD step.

vlprompt: ``PLOT`` with cached views (the image tower's global and local features computed once per augmented
view through the feature cache; a step runs only the text side: the N x K prompts through the grouped
shared-prefix path, and the batched per-problem Sinkhorn), and the online mode (image tower at every step).

Same RN50 with random weights (costs do not depend on the values), 16-shot Flowers102 from ../shared
(K = 102, 1632 training images, 51 steps of batch 32 per epoch), N = 4 prompts of 16 context vectors, eps 0.1,
100 iterations, threshold 1e-2, SGD lr 0.002. To keep the run short, each pipeline runs a fixed number of
steps (vlprompt after a warm-up step, half before and half after the reference's, so that both see the same machine
load) and the epoch time is the mean step time x 51, extrapolated; the
one-time feature extraction of the cached mode is measured on 64 images and extrapolated to 1632 images x views.

Memory: the reference's one-batch text pass over 408 prompts at 77 tokens keeps about 11 GB of activations for
the backward pass. With ``--reference-text auto`` (default) it runs so when the machine has that much memory
available, otherwise each of the N prompt sets (K prompts at 77 tokens) runs forward + backward on its own and
the step's text time is the sum of the N passes (the same work: rows are independent; the output says which).

The K = 1000, N = 4 forward + backward step (cached features) runs in a fresh process; its peak RSS is reported.

    python benchmarks/plot_speed.py [--steps 3] [--ref-steps 1] [--views 10] [--epochs 50] [--skip-memory]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
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

from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.data import build_train_transform, few_shot_split, load_dataset, load_image  # noqa: E402
from vlprompt.methods.base import Features  # noqa: E402
from vlprompt.methods.prompts.plot import PLOT, PLOTConfig  # noqa: E402
from vlprompt.methods.parts.ot import reference_sinkhorn  # noqa: E402

N_PROMPTS, N_CTX, BATCH, EPS, ITERS, THRESH, LR = 4, 16, 32, 0.1, 100, 1e-2, 0.002
REFERENCE_ONE_BATCH_GB = 14.0  # memory the reference's one-batch text pass needs, with margin


def shared_data() -> Path:
    return Path(os.environ.get("VLPROMPT_SHARED", ROOT.parent / "shared")) / "assets" / "data"


def flowers(shots=16):
    root = shared_data()
    if not (root / "oxford_flowers").exists():
        sys.exit(f"skipped: 16-shot Flowers102 not found under {root} (set VLPROMPT_SHARED)")
    return few_shot_split(load_dataset("oxford_flowers", root), shots, 1)


def available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return 0.0


class Clock:
    """Wall time and this process's CPU time (the CPU time is less sensitive to other processes on a shared
    machine; with T threads and nothing else running, CPU time ~ T x wall time)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def mean2(pairs):
    return tuple(sum(p[i] for p in pairs) / len(pairs) for i in range(2))


def load_batch(samples, tf, offset, n=BATCH):
    return torch.stack([tf(load_image(samples[(offset + i) % len(samples)].path)) for i in range(n)])


def sgd(method):
    return torch.optim.SGD(method.trainable_parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)


# -- the reference pipeline -------------------------------------------------------------------------------
class ReferencePLOT:
    """PLOT's forward as the reference computes it, on the same backbone and the same learned context."""

    def __init__(self, bb, method: PLOT, one_batch: bool):
        self.bb, self.method, self.one_batch = bb, method, one_batch

    def prompts(self):
        """(N*K, 77, D) token embeddings: [SOT, ctx_n, class name, ".", EOT, padding] for every n and class."""
        return self.method.prompt.full_embeddings().flatten(0, 1)

    def text(self, full, eot):
        # CLIP's text forward at 77 tokens: positional embedding, transformer (causal mask), ln_final, EOT row,
        # projection -- all rows in one batch, as the reference's TextEncoder
        return self.bb.text(full, eot, mode="plain", chunk_size=None)

    def loss(self, global_, local, text, labels):
        n, k = N_PROMPTS, text.shape[0] // N_PROMPTS
        b, m, _ = local.shape
        text = F.normalize(text.reshape(n, k, -1), dim=2)
        local = F.normalize(local, dim=2)
        sim = torch.einsum("bmd,ncd->mnbc", local, text).contiguous().view(m, n, b * k).permute(2, 0, 1)
        plan = reference_sinkhorn(1.0 - sim, EPS, ITERS, THRESH)  # no gradient, pooled stopping
        if torch.isnan(plan).any():
            raise RuntimeError("NaN plan")
        logits = self.bb.logit_scale * (plan * sim).sum(dim=(1, 2)).view(b, k)
        return F.cross_entropy(logits, labels)

    def step(self, x, labels, opt) -> dict:
        """One training step; returns the time of its parts."""
        t = {}
        c = Clock()
        with torch.no_grad():
            global_, local = self.bb.encode_image(x, local=True)  # all 50 attention-pool positions
        t["image"] = c.stop()
        full = self.prompts()
        k = self.method.num_classes
        eot = self.method.prompt.eot.repeat(N_PROMPTS)
        c = Clock()
        if self.one_batch:
            text = self.text(full, eot)
            loss = self.loss(global_, local, text, labels)
            opt.zero_grad()
            loss.backward()
            t["text+ot+backward"] = c.stop()
        else:
            # each prompt set forward + backward on its own (same rows, same work as one batch; bounded memory):
            # first the text features without graph for the loss, then each set again with its gradient
            with torch.no_grad():  # an extra pass the one-batch reference does not make: not counted
                text0 = self.text(full, eot)
            c = Clock()
            feats = text0.clone().requires_grad_(True)
            loss = self.loss(global_, local, feats, labels)
            opt.zero_grad()
            loss.backward()
            upstream = feats.grad
            t["ot+loss"] = c.stop()
            c = Clock()
            for i in range(N_PROMPTS):
                rows = slice(i * k, (i + 1) * k)
                out = self.text(self.prompts()[rows], eot[rows])  # the prompts graph is rebuilt per set
                out.backward(upstream[rows])
            t["text forward+backward (N passes of K prompts)"] = c.stop()
        c = Clock()
        opt.step()
        t["optimizer"] = c.stop()
        return t


# -- memory of a K=1000 step ------------------------------------------------------------------------------------
MEMORY_CODE = r"""
import sys, time, warnings
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F
from vlprompt.backbone import load_backbone
from vlprompt.methods.base import Features
from vlprompt.methods.prompts.plot import PLOT, PLOTConfig

def status(key):  # this process's memory in MB (VmHWM: peak resident set since exec; ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

names = sys.argv[1].split("|")
bb = load_backbone("RN50", None, "cpu")
m = PLOT(PLOTConfig(n_prompts=4), bb, names)
g = torch.Generator().manual_seed(0)
glob = torch.randn(32, bb.embed_dim, generator=g)
local = glob[:, None] + 0.5 * torch.randn(32, 49, bb.embed_dim, generator=g)
base = status("VmRSS")
t0 = time.perf_counter()
loss = F.cross_entropy(m(Features(global_=glob, local=local)), torch.arange(32) % len(names))
loss.backward()
print(len(names), base, status("VmHWM"), time.perf_counter() - t0)
"""


def k1000_memory():
    path = shared_data() / "imagenet" / "classnames.txt"
    if path.exists():
        names = [line.split(" ", 1)[1].strip() for line in path.read_text().splitlines() if line.strip()][:1000]
    else:
        names = [f"class {i}" for i in range(1000)]
    out = subprocess.run([sys.executable, "-c", MEMORY_CODE, "|".join(names)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    if out.returncode:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    k, base, peak, seconds = out.stdout.split()[-4:]
    return int(k), float(base), float(peak), float(seconds)


# -- main ---------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed vlprompt steps (cached views), after a warm-up")
    ap.add_argument("--ref-steps", type=int, default=1, help="timed reference steps")
    ap.add_argument("--views", type=int, default=10, help="cached views, for the one-time feature cost")
    ap.add_argument("--epochs", type=int, default=50, help="epochs the feature cost is spread over (PLOT: 50)")
    ap.add_argument("--reference-text", default="auto", choices=["auto", "one-batch", "per-set"])
    ap.add_argument("--skip-memory", action="store_true", help="skip the K=1000 peak-memory step")
    ap.add_argument("--write-docs", default=None, help="also write the report to this Markdown file")
    args = ap.parse_args()

    splits = flowers()
    classes, train = splits.classnames, splits.train
    n_train = len(train)
    steps_per_epoch = n_train // BATCH
    tf = build_train_transform(224)
    labels = torch.tensor([s.label for s in train])
    bb = load_backbone("RN50", None, device="cpu")
    torch.manual_seed(0)
    method = PLOT(PLOTConfig(n_prompts=N_PROMPTS, n_ctx=N_CTX, ot_eps=EPS, ot_iters=ITERS, ot_thresh=THRESH),
                  bb, classes)
    method.train()
    opt = sgd(method)
    avail_gb = available_gb()
    load_avg = os.getloadavg()[0]
    one_batch = {"one-batch": True, "per-set": False}.get(args.reference_text, avail_gb >= REFERENCE_ONE_BATCH_GB)
    print(f"16-shot Flowers102: K={len(classes)}, {n_train} training images, {steps_per_epoch} steps of {BATCH}; "
          f"N={N_PROMPTS}; {torch.get_num_threads()} threads; load average {load_avg:.1f}; "
          f"{avail_gb:.1f} GB available -> reference text {'in one batch' if one_batch else 'per prompt set'}",
          flush=True)

    # one-time feature extraction (cached mode): 64 images, train transform, global + local features
    c = Clock()
    xs = [load_batch(train, tf, 0), load_batch(train, tf, BATCH)]
    feats = [bb.encode_image(x, local=True) for x in xs]
    t_feat = tuple(v / (2 * BATCH) for v in c.stop())  # per image
    glob = torch.cat([f[0] for f in feats])
    local = torch.cat([f[1] for f in feats])
    print(f"feature extraction (load + augment + image tower, global + local): {t_feat[0]:.3f} s/image "
          f"(cpu {t_feat[1]:.3f} s)", flush=True)

    def cached_step(i):
        idx = torch.arange(i * BATCH, (i + 1) * BATCH) % glob.shape[0]
        loss = F.cross_entropy(method(Features(global_=glob[idx], local=local[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def timed_cached(first, count):
        out = []
        for i in range(first, first + count):
            c = Clock()
            cached_step(i)
            out.append(c.stop())
        return out

    def online_step():
        c = Clock()
        x = load_batch(train, tf, 2 * BATCH)
        g_on, l_on = bb.encode_image(x, local=True)
        loss = F.cross_entropy(method(Features(global_=g_on, local=l_on)), labels[:BATCH])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return c.stop()

    ref = ReferencePLOT(bb, method, one_batch)

    def reference_step(i):
        c = Clock()
        x = load_batch(train, tf, (3 + i) * BATCH)
        p = {"load+augment": c.stop(), **ref.step(x, labels[:BATCH], opt)}
        total = tuple(sum(v[j] for v in p.values()) for j in range(2))
        print(f"reference step: {total[0]:.2f} s, cpu {total[1]:.2f} s "
              f"({', '.join(f'{k} {v[0]:.2f}' for k, v in p.items())})", flush=True)
        return total, p

    # interleaved (the vlprompt steps before and after the reference's), so both see the same machine load
    cached_step(0)  # warm-up
    half = (args.steps + 1) // 2
    times = timed_cached(1, half)
    t_online = online_step()
    print(f"vlprompt online: {t_online[0]:.2f} s/step, cpu {t_online[1]:.2f} s", flush=True)
    ref_times, parts = [], []
    for i in range(args.ref_steps):
        total, p = reference_step(i)
        ref_times.append(total)
        parts.append(p)
    times += timed_cached(1 + half, args.steps - half)
    t_cached = mean2(times)
    t_ref = mean2(ref_times)
    print(f"vlprompt cached views: {t_cached[0]:.2f} s/step, cpu {t_cached[1]:.2f} s "
          f"(wall: {', '.join(f'{t[0]:.2f}' for t in times)})", flush=True)

    def epoch(step, extra=(0.0, 0.0)):
        return tuple(step[j] * steps_per_epoch + extra[j] for j in range(2))

    feat_once = tuple(v * n_train * args.views for v in t_feat)
    amortised = tuple(v / args.epochs for v in feat_once)
    ref_epoch = epoch(t_ref)
    rows = [
        ("reference pipeline (image tower every step, N x K prompts at 77 tokens, pooled Sinkhorn)", ref_epoch),
        ("vlprompt online (image tower every step, shared-prefix text, per-problem Sinkhorn)", epoch(t_online)),
        ("vlprompt cached views (features once per view)", epoch(t_cached)),
        (f"vlprompt cached views + one-time features of {args.views} views spread over {args.epochs} epochs",
         epoch(t_cached, amortised)),
    ]
    mem = None if args.skip_memory else k1000_memory()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = [
        "# PLOT training speed", "",
        f"Machine: {machine}; load average at the start {load_avg:.1f}, at the end {os.getloadavg()[0]:.1f} "
        "(a shared machine: wall times are noisy; CPU time is this process's, less sensitive to other processes). "
        f"Produced by `python benchmarks/plot_speed.py --steps {args.steps} --ref-steps {args.ref_steps}`.", "",
        f"RN50 with random weights, 16-shot Flowers102 (K = {len(classes)}, {n_train} training images), batch "
        f"{BATCH}, N = {N_PROMPTS} prompts x {N_CTX} context vectors, eps {EPS}, {ITERS} iterations, threshold "
        f"{THRESH}, SGD. EXTRAPOLATED: epoch time = mean time of the measured steps x {steps_per_epoch} steps "
        f"(vlprompt cached: {args.steps} steps after a warm-up; online: 1 step; reference: {args.ref_steps} "
        f"step(s)). Reference text pass: "
        + ("all N x K prompts in one batch, as the reference." if one_batch else
           "each of the N prompt sets forward + backward on its own (the one-batch pass needs ~11 GB; same work)."),
        "", "| pipeline | epoch (wall) | speed-up (wall) | epoch (CPU) | speed-up (CPU) |",
        "|---|---:|---:|---:|---:|"]
    for name, t in rows:
        lines.append(f"| {name} | {t[0]:.0f} s | {ref_epoch[0] / t[0]:.1f}x | {t[1]:.0f} s | "
                     f"{ref_epoch[1] / t[1]:.1f}x |")
    lines += ["", f"- one-time feature extraction: {t_feat[0]:.3f} s (CPU {t_feat[1]:.3f} s) per image per view, "
              f"measured on 64 images -> {feat_once[0]:.0f} s for {n_train} images x {args.views} views",
              "- reference step parts, wall s: " + "; ".join(
                  f"{k} {sum(p[k][0] for p in parts) / len(parts):.2f}" for k in parts[0])]
    if mem:
        k, base, peak, seconds = mem
        lines.append(f"- K = {k}, N = 4 PLOT step (RN50, cached features, batch 32, forward + backward, "
                     f"{k * 4} prompts through the chunked shared-prefix text path), in a fresh process: peak RSS "
                     f"{peak:.0f} MB, of which {base:.0f} MB before the step (Python, torch, the loaded model): "
                     f"{peak - base:.0f} MB for the step; {seconds:.0f} s")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines.append(f"- peak RSS of this benchmark process: {rss:.0f} MB")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.write_docs:
        from vlprompt._io import atomic_write_text
        atomic_write_text(args.write_docs, text)


if __name__ == "__main__":
    main()
