"""Time per run and per epoch of the adapters on cached features against plain re-implementations of their original
loops (tests/originals), side by side in one run.

A 16-shot ImageNet-size problem: K = 1000 classes, N = 16,000 training images, E = 1024 (RN50's embedding), random
features (the cost does not depend on the values): V = 10 cached views (TaskRes, CLIP-Adapter), 20 (CLAP's recipe).
Each method runs its preset (batch size, optimizer, schedule) on vlprompt's trainer (``Trainer.fit`` over
``CachedViews``), and the original's loop written out (``tests/originals``) runs the same number of epochs on the same
features:

* TaskRes: ``originals.taskres.logits`` + Dassl's Adam (L2 weight decay) + its per-epoch schedule, one view per image
  and step (the original re-augments and re-encodes the images at every step: the image tower is not timed here);
* CLIP-Adapter: ``originals.clip_adapter.logits`` + Dassl's SGD, CoOp's batch 32 (the original also re-encodes the
  1,000 class prompts through the text tower at EVERY step: not timed here, the text features are given);
* CLAP: ``originals.clap.clap_train``'s loop on its functions (the multipliers from the whole 20 N pool, then
  its epochs), the two phases timed apart.

"run" = setup (CLAP's multipliers) + the epochs run; "epoch" = the epochs' time / their number, and the fastest
epoch (the least disturbed by other processes on a shared machine). The text side (class
features of 1,000 prompts) comes from a small text tower of width 1024 and is not timed. Writes
docs/benchmarks/residual_adapters_speed.md.

    python benchmarks/residual_adapters_speed.py [--epochs N | --quick] [--methods taskres,clip-adapter,clap]

``--epochs N`` runs N epochs of every method (default: the whole recipe: TaskRes 200, CLIP-Adapter 50, CLAP 300);
``--quick`` is ``--epochs 3``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from originals import clap as clap_original, coop_base  # noqa: E402
from originals import clip_adapter as ca_original, taskres as tr_original  # noqa: E402
from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.engine.sources import CachedViews, SplitFeatures  # noqa: E402
from vlprompt.engine.trainer import Trainer, TrainConfig  # noqa: E402
from vlprompt.methods import build_method, method_class  # noqa: E402
from vlprompt.methods.base import Features  # noqa: E402
from vlprompt.runs.config import resolve_data  # noqa: E402

K, SHOTS, E = 1000, 16, 1024


def wide_backbone(directory: Path):
    """A small open_clip model whose joint space is RN50's (1024): tiny towers, random weights."""
    import open_clip

    cfg = {"embed_dim": E, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16,
                                          "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wide.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=E, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    torch.save(model.state_dict(), directory / "wide.pt")
    return load_backbone(str(directory / "wide.json"), str(directory / "wide.pt"), device="cpu")


class Clock:
    """Wall time and the CPU share of the process over it (process CPU time / (wall x threads)): a share well under
    1 means other processes took the cores, and the sample is slower than the code."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.share = (time.process_time() - self.cpu) / max(self.wall * torch.get_num_threads(), 1e-9)


def recipe(name: str, epochs):
    data = resolve_data({"dataset": "imagenet", "root": "/nonexistent", "shots": SHOTS})
    preset = method_class(name).preset(data)
    train = dict(preset["train"])
    train["epochs"] = epochs or train["epochs"]
    return preset["method_options"], train


def ours(name, backbone, names, views, labels, epochs):
    """vlprompt's run: the method's setup (if any) and Trainer.fit over the cached views."""
    options, train = recipe(name, epochs)
    train.update(views=views.shape[0], checkpoint_every=0)
    torch.manual_seed(1)
    method = build_method(name, options, backbone, names, template="a photo of a {}.", source_names=names)
    setup = 0.0
    if method.setup_reads:
        split = SplitFeatures(labels, None, lambda: Features(global_=views[0]), lambda: Features(global_=views))
        with Clock() as c:
            method.setup(split, None)
        setup = c.wall
    with tempfile.TemporaryDirectory() as tmp, Clock() as c:
        state = Trainer(method, TrainConfig(**train).validate(), tmp, seed=1, progress=False).fit(CachedViews(views),
                                                                                                 labels)
    return {"setup_s": setup, "epochs_s": c.wall, "epoch_min_s": min(h["seconds"] for h in state.history),
            "share": c.share, "method": method, "train": train}


def original_taskres(model, base, views, labels, train):
    residual = torch.nn.Parameter(torch.zeros_like(base))
    optim = coop_base.dassl_optimizer([residual], "adam", train["lr"], weight_decay=train["weight_decay"])
    sched = coop_base.dassl_scheduler(optim, train["epochs"])
    n, bs = labels.numel(), train["batch_size"]
    g = torch.Generator().manual_seed(0)
    epoch_s = []
    with Clock() as c:
        for _ in range(train["epochs"]):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=g)
            for i in range(0, (n // bs) * bs, bs):
                idx = order[i:i + bs]
                f = views[torch.randint(0, views.shape[0], (len(idx),), generator=g), idx]
                loss = F.cross_entropy(tr_original.logits(model, f, base, residual, 0.5), labels[idx])
                optim.zero_grad()
                loss.backward()
                optim.step()
            sched.step()
            epoch_s.append(time.perf_counter() - t0)
    return {"setup_s": 0.0, "epochs_s": c.wall, "epoch_min_s": min(epoch_s), "share": c.share}


def original_clip_adapter(model, text, views, labels, train):
    params = {k: torch.nn.Parameter(v) for k, v in ca_original.init_adapter(E).items()}
    optim = coop_base.dassl_optimizer(params.values(), "sgd", train["lr"], weight_decay=train["weight_decay"],
                                      momentum=train["momentum"])
    sched = coop_base.dassl_scheduler(optim, train["epochs"])
    n, bs = labels.numel(), train["batch_size"]
    g = torch.Generator().manual_seed(0)
    epoch_s = []
    with Clock() as c:
        for _ in range(train["epochs"]):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=g)
            for i in range(0, (n // bs) * bs, bs):
                idx = order[i:i + bs]
                f = views[torch.randint(0, views.shape[0], (len(idx),), generator=g), idx]
                loss = F.cross_entropy(ca_original.logits(model, f, params, text), labels[idx])
                optim.zero_grad()
                loss.backward()
                optim.step()
            sched.step()
            epoch_s.append(time.perf_counter() - t0)
    return {"setup_s": 0.0, "epochs_s": c.wall, "epoch_min_s": min(epoch_s), "share": c.share}


def original_clap(model, base, views, labels, train):
    """``clap_train``'s loop (tests/originals/clap.py) with its two phases timed apart: the multipliers from the
    whole 20 N pool, then the epochs (a fresh shuffle of the pool, ``num_batches(N)`` steps of CE + penalty)."""
    v, n, e = views.shape
    pool, pool_labels = views.reshape(v * n, e), labels.repeat(v)
    scale = model.logit_scale.detach()
    with Clock() as setup, torch.no_grad():
        lam = clap_original.init_lagrangian_multipliers(pool_labels, clap_original.zs_lp_logits(pool, base, scale))
    prototypes = torch.nn.Parameter(base.clone())
    optim = torch.optim.SGD([prototypes], lr=train["lr"], momentum=train["momentum"], weight_decay=0.0)
    bs, g = train["batch_size"], torch.Generator().manual_seed(0)
    epoch_s = []
    with Clock() as c:
        for epoch in range(train["epochs"]):
            t0 = time.perf_counter()
            for group in optim.param_groups:
                group["lr"] = clap_original.dassl_lr(epoch, train["lr"], train["epochs"])
            order = torch.randperm(v * n, generator=g)
            for b in range(clap_original.num_batches(n, bs)):
                idx = order[b * bs:(b + 1) * bs]
                loss = clap_original.clap_loss(pool[idx], pool_labels[idx], prototypes, base, lam, scale)
                optim.zero_grad()
                loss.backward()
                optim.step()
            epoch_s.append(time.perf_counter() - t0)
    return {"setup_s": setup.wall, "epochs_s": c.wall, "epoch_min_s": min(epoch_s), "share": c.share}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs of every method (default: each recipe's)")
    p.add_argument("--quick", action="store_true", help="3 epochs of every method")
    p.add_argument("--methods", default="taskres,clip-adapter,clap")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks" / "residual_adapters_speed.md"))
    args = p.parse_args()
    epochs = 3 if args.quick else args.epochs
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        backbone = wide_backbone(Path(tmp))
    model = backbone.model
    names = [f"class_{i}" for i in range(K)]
    labels = torch.arange(K).repeat_interleave(SHOTS)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in methods:
        n_views = 20 if name == "clap" else 10
        views = torch.randn(n_views, labels.numel(), E, generator=g)
        print(f"{name}: {n_views} views x {labels.numel()} images x {E}", flush=True)
        mine = ours(name, backbone, names, views, labels, epochs)
        method, train = mine.pop("method"), mine.pop("train")
        if name == "taskres":
            theirs = original_taskres(model, method.base.detach().clone(), views, labels, train)
        elif name == "clip-adapter":
            theirs = original_clip_adapter(model, method.class_text.detach().clone(), views, labels, train)
        else:
            theirs = original_clap(model, method.base.detach().clone(), views, labels, train)
        for who, r in (("vlprompt", mine), ("original loop", theirs)):
            r.update(method=name, who=who, epochs=train["epochs"], views=n_views, batch=train["batch_size"],
                     run_s=r["setup_s"] + r["epochs_s"], epoch_s=r["epochs_s"] / train["epochs"])
            rows.append(r)
            print(f"  {who:14s} run {r['run_s']:8.2f} s  epoch {r['epoch_s']:7.3f} s "
                  f"(fastest {r['epoch_min_s']:7.3f} s)  setup {r['setup_s']:6.2f} s  (cpu share {r['share']:.2f})", flush=True)
        del views
    write(args, rows, epochs)


def write(args, rows, epochs) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flags = " --quick" if args.quick else f" --epochs {epochs}" if epochs else ""
    lines = ["# Adapters on cached features: vlprompt against the original loops", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. Produced "
             f"by `python benchmarks/residual_adapters_speed.py{flags}"
             f"`: 16-shot ImageNet size (K = {K}, N = {K * SHOTS} images, E = {E}), random features, each method's "
             f"preset ({'every recipe epoch' if not epochs else f'{epochs} epochs each'}); the original's loop "
             "(tests/originals) on the same features in the same run. cpu share = process CPU time / (wall x "
             "threads): under 1, other processes took the cores during the sample.", "",
             "| method | pipeline | views | batch | epochs | setup | per epoch (mean / fastest) | run | "
             "run vs original | fastest epoch vs original | cpu share |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["method"], r["who"]): r for r in rows}
    for r in rows:
        ref = by[(r["method"], "original loop")]
        lines.append(f"| {r['method']} | {r['who']} | {r['views']} | {r['batch']} | {r['epochs']} | "
                     f"{r['setup_s']:.2f} s | {r['epoch_s']:.3f} / {r['epoch_min_s']:.3f} s | {r['run_s']:.1f} s | "
                     f"{ref['run_s'] / r['run_s']:.2f}x | {ref['epoch_min_s'] / r['epoch_min_s']:.2f}x | "
                     f"{r['share']:.2f} |")
    lines += ["", f"- peak RSS of this benchmark: {peak:.0f} MB",
              "- not timed: the originals' image tower at every step (TaskRes, CLIP-Adapter train on images "
              "augmented and encoded at every step; vlprompt encodes each cached view once), and CLIP-Adapter's "
              "re-encoding of every class prompt at every step (clip_adapter.py:107).", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
