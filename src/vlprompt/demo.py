"""The README's main job: zero-shot CLIP, then CoOp with a few shots per class, on one dataset, side by side.

    python -m vlprompt.demo --backbone RN50 --pretrained openai --dataset torchvision:EuroSAT --root ~/data

It needs the pretrained weights (downloaded by open_clip on first use) and the dataset (torchvision downloads
EuroSAT); offline without them it stops with one clear error saying what could not be fetched.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import VLPromptError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlprompt.demo")
    ap.add_argument("--backbone", default="RN50")
    ap.add_argument("--pretrained", default="openai")
    ap.add_argument("--dataset", default="torchvision:EuroSAT")
    ap.add_argument("--root", default=str(Path.home() / "vlprompt-data"))
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="default: CoOp's preset for the shots")
    ap.add_argument("--output", default="runs/demo")
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import dataclasses

    from .baselines import BaselineConfig, run_zeroshot
    from .engine.trainer import TrainConfig
    from .runner import DataConfig, RunConfig, run_training

    out = Path(args.output)
    try:
        data = DataConfig(dataset=args.dataset, root=args.root, shots=args.shots, seed=args.seed)
        zs = run_zeroshot(BaselineConfig(method="zeroshot", backbone=args.backbone, pretrained=args.pretrained,
                                         data=dataclasses.replace(data, shots=0), device=args.device),
                          out / "zeroshot")
        coop = run_training(RunConfig(method="coop", backbone=args.backbone, pretrained=args.pretrained, data=data,
                                      train=TrainConfig(epochs=args.epochs, seed=args.seed), device=args.device),
                            out / f"coop-{args.shots}shots-seed{args.seed}")
    except VLPromptError as e:
        print(f"vlprompt demo: error: {e}", file=sys.stderr)
        return 2
    summary = {"dataset": args.dataset, "backbone": f"{args.backbone} ({args.pretrained})",
               "zero-shot accuracy": zs["metrics"]["accuracy"],
               f"CoOp {args.shots}-shot accuracy": coop["metrics"]["accuracy"]}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
