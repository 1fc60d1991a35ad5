"""Run and epoch times of the adapters on cached features, vlprompt against the original's loop, side by side.

After the features exist (they are random here: the cost does not depend on their values), an ImageNet-size
16-shot problem -- 1,000 classes, 16 images each, 10 augmented views, RN50's 1,024-wide features, a val split of 4
images per class (CoOp's min(16, 4)) -- is run by each method through vlprompt's own lifecycle (setup, the engine's
training loop with its per-epoch val evaluation, best-epoch callback and checkpoints in a temporary run directory,
the after-training search) and by the plain re-implementation of the original's loop written out in
``tests/originals`` (the same computation, the original's code structure), in the same process, one after the
other. Each section prints its rows; the ratio is the original's time over vlprompt's, measured in this run.

Sections (one per method; a common harness around them): ``tip-adapter``, ``tip-adapter-f``, ``lpp``. Others add
theirs as one function and one entry of :data:`SECTIONS`.

    python benchmarks/adapters_speed.py                  # the full ImageNet-size problem
    python benchmarks/adapters_speed.py --quick          # 100 classes (minutes -> seconds)
    python benchmarks/adapters_speed.py --methods lpp --epochs 30

Writes docs/benchmarks/adapters_speed.md (``--write-docs ''`` to skip). A row's "CPU share" is the process CPU time
over wall time x threads: well under 1 means other processes took the cores during that measurement.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the written-out originals (tests/originals)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from vlprompt.methods import build_method  # noqa: E402
from vlprompt.methods.base import Features  # noqa: E402


# -- the common harness ----------------------------------------------------------------------------------------
@dataclass
class Problem:
    """Random cached features of a few-shot problem: ``views`` (V, N, E) raw training views, ``labels`` (N,),
    ``val`` (M, E) / ``val_labels``, ``test`` (T, E) / ``test_labels``, class names; ``backbone`` a model whose
    text tower is tiny (the zero-shot classifier is computed once, its cost is not what is measured) and whose
    embedding width is the problem's."""

    classes: int
    shots: int
    views: torch.Tensor
    labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    names: list
    backbone: object


def make_problem(classes: int, shots: int, views: int, dim: int, val_per_class: int, test_images: int,
                 workdir: Path) -> Problem:
    from vlprompt.backbone import load_backbone
    from vlprompt.testing import TEXT_CFG

    import open_clip

    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)

    def around(labels, spread=1.2):
        return centers[labels] + spread * torch.randn(len(labels), dim, generator=g) / dim ** 0.5

    labels = torch.arange(classes).repeat_interleave(shots)
    base = around(labels)
    view_feats = torch.stack([base + 0.3 * torch.randn(base.shape, generator=g) / dim ** 0.5 for _ in range(views)])
    val_labels = torch.arange(classes).repeat_interleave(val_per_class)
    test_labels = torch.randint(0, classes, (test_images,), generator=g)
    cfg = {"embed_dim": dim, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
           "text_cfg": {**TEXT_CFG, "layers": 1}}
    cfg_path, weights = workdir / "bench-model.json", workdir / "bench-model.pt"
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(embed_dim=dim, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"]).state_dict(),
               weights)
    backbone = load_backbone(str(cfg_path), str(weights), device="cpu")
    names = [f"class {i}" for i in range(classes)]
    return Problem(classes, shots, view_feats, labels, around(val_labels), val_labels, around(test_labels),
                   test_labels, names, backbone)


class Split:
    """A split as a method's setup / after_training see it."""

    def __init__(self, labels, features=None, views=None):
        self.labels, self.targets = labels, None
        self._features, self._views = features, views

    def __len__(self):
        return len(self.labels)

    def features(self):
        return Features(global_=self._features)

    def views(self):
        return Features(global_=self._views)


@dataclass
class Row:
    label: str
    seconds: float
    epochs: int
    cpu_share: float
    note: str = ""


def measured(label: str, fn: Callable[[], int], note: str = "") -> Row:
    """Run ``fn`` (it returns the epochs it ran) once, timing wall and process CPU time."""
    threads = torch.get_num_threads()
    c0, t0 = time.process_time(), time.perf_counter()
    epochs = fn()
    wall = time.perf_counter() - t0
    share = (time.process_time() - c0) / max(wall * threads, 1e-9)
    print(f"  {label}: {wall:.2f} s ({epochs} epochs), CPU share {share:.2f}", flush=True)
    return Row(label, wall, epochs, share, note)


def train_config(name: str, problem: Problem, epochs: int | None):
    """The method's own recipe for ImageNet (its preset), as a run would resolve it."""
    from vlprompt.engine.trainer import TrainConfig
    from vlprompt.methods import method_class
    from vlprompt.runs.config import DataConfig

    preset = method_class(name).preset(DataConfig(dataset="imagenet", root="/", shots=problem.shots))
    train = dict(preset.get("train", {}))
    if epochs is not None:
        train["epochs"] = epochs
    return TrainConfig(**train).validate(), preset.get("method_options", {})


def vlprompt_fit(method, cfg, problem: Problem, run_dir: Path, views: torch.Tensor) -> int:
    """The engine's loop as a run drives it: cached views, the val split evaluated every ``eval_every`` epochs,
    the best epoch kept (BestEpoch), checkpoints as the recipe writes them."""
    from vlprompt.engine.callbacks import BestEpoch
    from vlprompt.engine.sources import CachedViews
    from vlprompt.engine.trainer import Trainer, predict_logits

    val_source = CachedViews(problem.val[None])

    def evaluate():
        logits = predict_logits(method, val_source, len(problem.val_labels))
        method.train()
        return method.metrics(logits, problem.val_labels)

    callbacks = [BestEpoch(method, run_dir)] if method.selection() and cfg.eval_every else []
    trainer = Trainer(method, cfg, run_dir, seed=1, progress=False, callbacks=callbacks)
    state = trainer.fit(CachedViews(views), problem.labels, evaluate=evaluate)
    return state.epoch


def test_accuracy(method, problem: Problem) -> float:
    from vlprompt.engine.sources import CachedViews
    from vlprompt.engine.trainer import predict_logits

    logits = predict_logits(method, CachedViews(problem.test[None]), len(problem.test_labels))
    return method.metrics(logits, problem.test_labels)["accuracy"]


# -- Tip-Adapter ------------------------------------------------------------------------------------------------
def bench_tip_adapter(problem: Problem, args, workdir: Path) -> list[Row]:
    from originals import tip_adapter as tip

    _, options = train_config("tip-adapter", problem, None)

    def ours():
        method = build_method("tip-adapter", options, problem.backbone, problem.names)
        method.setup(Split(problem.labels, views=problem.views), None)
        method.after_training(Split(problem.val_labels, features=problem.val))
        test_accuracy(method, problem)
        return 0

    method = build_method("tip-adapter", options, problem.backbone, problem.names)
    clip_weights = method.zeroshot.t().contiguous()

    def original():  # main.py:27-63: cache, search on the val split, test
        keys = tip.build_cache_keys(problem.views)
        values = tip.build_cache_values(problem.labels)
        tip.run_tip_adapter(keys, values, F.normalize(problem.val, dim=-1), problem.val_labels,
                            F.normalize(problem.test, dim=-1), problem.test_labels, clip_weights,
                            options["alpha"], options["beta"], options["search_scale"], options["search_steps"])
        return 0

    return [measured("Tip-Adapter, original's loop (cache, search, test)", original),
            measured("Tip-Adapter, vlprompt (setup, search, test)", ours)]


# -- Tip-Adapter-F ----------------------------------------------------------------------------------------------
def bench_tip_adapter_f(problem: Problem, args, workdir: Path) -> list[Row]:
    from originals import tip_adapter as tip

    cfg, options = train_config("tip-adapter-f", problem, args.epochs_of("tip-adapter-f"))

    def ours():
        method = build_method("tip-adapter-f", options, problem.backbone, problem.names)
        method.setup(Split(problem.labels, views=problem.views), None)
        epochs = vlprompt_fit(method, cfg, problem, Path(tempfile.mkdtemp(dir=workdir)), problem.views)
        method.after_training(Split(problem.val_labels, features=problem.val))
        test_accuracy(method, problem)
        return epochs

    method = build_method("tip-adapter-f", options, problem.backbone, problem.names)
    clip_weights = method.zeroshot.t().contiguous()

    def original():  # main.py:66-141: fine-tune the keys, select the epoch, search, test
        keys = tip.build_cache_keys(problem.views)
        values = tip.build_cache_values(problem.labels)
        tip.run_tip_adapter_f(keys, values, clip_weights, F.normalize(problem.views[0], dim=-1), problem.labels,
                              F.normalize(problem.val, dim=-1), problem.val_labels, F.normalize(problem.val, dim=-1),
                              problem.val_labels, F.normalize(problem.test, dim=-1), problem.test_labels,
                              options["alpha"], options["beta"], options["search_scale"], options["search_steps"],
                              lr=cfg.lr, epochs=cfg.epochs, generator=torch.Generator().manual_seed(0))
        return cfg.epochs

    note = (f"{cfg.epochs} epochs of {-(-len(problem.labels) // cfg.batch_size)} steps (batch {cfg.batch_size}, the "
            f"last kept), the val split evaluated after each, then the search")
    return [measured("Tip-Adapter-F, original's loop", original, note),
            measured("Tip-Adapter-F, vlprompt (cached views, checkpoints)", ours, note)]


# -- LP++ --------------------------------------------------------------------------------------------------------
def bench_lpp(problem: Problem, args, workdir: Path) -> list[Row]:
    from originals import lp_plus_plus as lpp

    cfg, options = train_config("lpp", problem, args.epochs_of("lpp"))
    one_view = problem.views[:1]

    def ours():
        torch.manual_seed(1)
        method = build_method("lpp", options, problem.backbone, problem.names)
        method.setup(Split(problem.labels, views=one_view), None)
        epochs = vlprompt_fit(method, cfg, problem, Path(tempfile.mkdtemp(dir=workdir)), one_view)
        test_accuracy(method, problem)
        return epochs

    method = build_method("lpp", options, problem.backbone, problem.names)
    clip_weights = method.zeroshot.t().contiguous()

    def original():  # linear_probe_p2.py:94-167: init, 300 full-batch steps, val (and test at the best) each step
        lpp.lpp_train(F.normalize(one_view[0], dim=-1), problem.labels, F.normalize(problem.val, dim=-1),
                      problem.val_labels, clip_weights, problem.shots, epochs=cfg.epochs,
                      test_features=F.normalize(problem.test, dim=-1), test_labels=problem.test_labels)
        return cfg.epochs

    note = f"{cfg.epochs} full-batch steps on {len(problem.labels)} support features, val after each"
    return [measured("LP++, original's loop", original, note),
            measured("LP++, vlprompt (engine loop, checkpoints every 10 steps)", ours, note)]


#: section name -> function(problem, args, workdir) -> rows (the original's first, then vlprompt's)
SECTIONS: dict[str, Callable] = {"tip-adapter": bench_tip_adapter, "tip-adapter-f": bench_tip_adapter_f,
                                 "lpp": bench_lpp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 classes instead of 1,000 (same shots and views)")
    ap.add_argument("--classes", type=int, default=None, help="classes (default 1000, --quick 100)")
    ap.add_argument("--methods", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--epochs", default=None,
                    help="epochs of the trained methods: N for all, or per section (tip-adapter-f=2,lpp=30); default "
                         "each recipe's")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's; 1 on a machine other processes load: docs/benchmarks/"
                         "cpu_contention.md)")
    ap.add_argument("--write-docs", default=str(ROOT / "docs/benchmarks/adapters_speed.md"))
    args = ap.parse_args()
    epochs_arg = args.epochs
    if epochs_arg is not None:
        per = dict(item.split("=") for item in epochs_arg.split(",")) if "=" in epochs_arg else None
        args.epochs_of = (lambda name: int(per[name]) if name in per else None) if per else \
            (lambda name, n=int(epochs_arg): n)
    else:
        args.epochs_of = lambda name: None
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = args.classes or (100 if args.quick else 1000)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{machine}; {classes} classes x 16 shots, 10 views, 1024-wide features", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        problem = make_problem(classes, 16, 10, 1024, 4, 10_000, workdir)
        sections = {}
        for name in names:
            print(f"[{name}]", flush=True)
            sections[name] = SECTIONS[name](problem, args, workdir)
    lines = ["# Adapters on cached features: run and epoch times", "",
             f"Machine: {machine}. Produced by `python benchmarks/adapters_speed.py"
             f"{' --quick' if args.quick else ''}{f' --classes {args.classes}' if args.classes else ''}"
             f"{f' --epochs {args.epochs}' if args.epochs else ''}"
             f"{f' --threads {args.threads}' if args.threads else ''}"
             f"{f' --methods {args.methods}' if args.methods != ','.join(SECTIONS) else ''}`: "
             f"{classes} classes x 16 shots = {classes * 16} training images, 10 cached views, 1024-wide random "
             f"features (RN50's width), a val split of 4 per class, 10,000 test features. Each method runs once "
             f"through vlprompt's lifecycle and once through the original's loop written out in tests/originals, "
             f"in this one process; ratio = original's time / vlprompt's. CPU share = process CPU time / (wall x "
             f"threads): well under 1 means other processes took the cores during that measurement.", "",
             "| run | total | per epoch | ratio | CPU share |", "|---|---:|---:|---:|---:|"]
    for name, rows in sections.items():
        ref = rows[0]
        for r in rows:
            per_epoch = f"{r.seconds / r.epochs:.3f} s" if r.epochs else "-"
            lines.append(f"| {r.label} | {r.seconds:.2f} s | {per_epoch} | {ref.seconds / r.seconds:.2f}x | "
                         f"{r.cpu_share:.2f} |")
    lines.append("")
    for name, rows in sections.items():
        if rows[0].note:
            lines.append(f"- {name}: {rows[0].note}")
    lines.append(f"- peak RSS of this benchmark: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        Path(args.write_docs).write_text(text)


if __name__ == "__main__":
    main()
