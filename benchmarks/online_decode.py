"""Online training with image decoding overlapped with the step: side by side in one run.

An online epoch (``--online``: every step loads, augments and encodes its images) of CoOp on 16-shot Flowers102
from ../shared, through the trainer users run, three ways:

* ``--workers 0``: the files decoded in the training thread, then the step;
* ``--workers N`` without the overlap: the batch's files decoded in N threads, then the step (vlprompt before the
  prefetch, emulated by giving the source no ``prefetch``);
* ``--workers N``: the next batch's files decoded in N threads while the current step runs (what runs now).

The towers run on one thread (``torch.set_num_threads(1)``), so that on a 2-core machine the decoding has a core
of its own, as it has beside a GPU. Two image towers: a tiny ViT (the step costs little: decoding is most of an
epoch, as on a GPU) and RN50 (random weights: the cost does not depend on the values). The learned context of
the three runs is checked bitwise equal (the batches do not depend on the workers or the overlap). Writes
docs/benchmarks/online_decode.md.

    python benchmarks/online_decode.py [--workers 1] [--epochs 1] [--models tiny-vit RN50]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from precision import machine_line, write_report  # noqa: E402
from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.data import ImageDataset, build_train_transform, few_shot_split, load_dataset  # noqa: E402
from vlprompt.engine.sources import OnlineImages  # noqa: E402
from vlprompt.engine.trainer import Trainer, TrainConfig  # noqa: E402
from vlprompt.methods.prompts.coop import CoOp, CoOpConfig  # noqa: E402


def flowers():
    root = Path(os.environ.get("VLPROMPT_SHARED", ROOT.parent / "shared")) / "assets" / "data"
    if not (root / "oxford_flowers").exists():
        sys.exit(f"skipped: Flowers102 not found under {root} (set VLPROMPT_SHARED)")
    return few_shot_split(load_dataset("oxford_flowers", root), 16, 1)


def backbone(name: str, tmp: Path):
    if name == "tiny-vit":
        from vlprompt.testing import make_tiny_checkpoint

        files = make_tiny_checkpoint(tmp, "tiny-vit", seed=0)
        return load_backbone(str(files[0]), str(files[1]), "cpu")
    return load_backbone(name, None, "cpu")


def epoch(bb, splits, workers: int, overlap: bool, epochs: int, out: Path) -> tuple[float, dict]:
    torch.manual_seed(0)
    method = CoOp(CoOpConfig(n_ctx=16), bb, splits.classnames)
    source = OnlineImages(ImageDataset(splits.train, build_train_transform(bb.image_size)), bb, local=False,
                          encode=True, workers=workers)
    if not overlap:
        source.prefetch = None  # the trainer then decodes each batch when it reads it
    labels = torch.tensor([s.label for s in splits.train])
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=0.002, warmup_epochs=0, checkpoint_every=0)
    trainer = Trainer(method, cfg, out, seed=1, progress=False)
    t0 = time.perf_counter()
    trainer.fit(source, labels)
    seconds = time.perf_counter() - t0
    return seconds / epochs, {k: v.detach().clone() for k, v in method.learned_state().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["tiny-vit", "RN50"])
    ap.add_argument("--write-docs", default=str(ROOT / "docs/benchmarks/online_decode.md"),
                    help="the Markdown file the figures are written to ('' to write none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    splits = flowers()
    steps = len(splits.train) // 32
    machine = machine_line()
    print("#", machine, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            bb = backbone(name, tmp)
            runs = {}
            for label, workers, overlap in (("0 workers", 0, False),
                                            (f"{args.workers} decode threads, then the step", args.workers, False),
                                            (f"{args.workers} decode threads, overlapped with the step",
                                             args.workers, True)):
                runs[label] = epoch(bb, splits, workers, overlap, args.epochs, tmp / f"{name}-{workers}-{overlap}")
                print(f"{name}: {label}: {runs[label][0]:.2f} s/epoch", flush=True)
            states = [s for _, s in runs.values()]
            same = all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
            base = runs["0 workers"][0]
            rows += [(name, label, t, base / t, same) for label, (t, _) in runs.items()]
    lines = ["# Online training: decoding overlapped with the step", "",
             f"Machine: {machine}. Produced by `{' '.join(['python benchmarks/online_decode.py', *sys.argv[1:]])}`; "
             "every figure from that one run.", "",
             f"CoOp (16 context vectors) trained online on 16-shot Flowers102 (K = {splits.num_classes}, "
             f"{len(splits.train)} images, {steps} steps of 32 per epoch, CoOp's train augmentation), through the "
             f"trainer; mean of {args.epochs} epoch(s). The tiny ViT's step costs little, so decoding is most of its "
             "epoch, as beside a GPU; RN50's tower on one CPU thread costs far more than decoding.", "",
             "| image tower | decoding | s/epoch | speed-up over 0 workers | learned context equal |",
             "|---|---|---:|---:|---|"]
    lines += [f"| {n} | {label} | {t:.2f} | {r:.2f}x | {'bitwise' if same else 'NO'} |"
              for n, label, t, r, same in rows]
    text = "\n".join(lines) + "\n"
    write_report(text, args.write_docs)


if __name__ == "__main__":
    main()
