"""Options shared by the commands (backbone, data, output, device)."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import VLPromptError


def add_backbone_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="RN50", help="open_clip model name or a model-config JSON (default RN50)")
    g.add_argument("--pretrained", default="openai",
                   help="open_clip pretrained tag, a checkpoint file, or 'none' for random weights (default openai)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--precision", default="amp", choices=["amp", "fp32"],
                   help="amp: autocast on GPU (fp32 on CPU); fp32: no autocast")
    g.add_argument("--cache-dir", default=None, help="feature cache directory (default ~/.cache/vlprompt/features "
                   "or $VLPROMPT_CACHE)")
    g.add_argument("--preprocess", default="coop", choices=["coop", "model"],
                   help="coop: CoOp's transforms (default); model: the backbone's own eval preprocessing")


def add_data_options(p: argparse.ArgumentParser, shots_default=16, fewshot: bool = True) -> None:
    """Data options; ``fewshot=False`` for commands that use whole splits (no --shots / --seed / --allow-fewer)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True,
                   help="a standard name (see `vlprompt datasets`), folder, csv, or torchvision:<Name>")
    g.add_argument("--root", required=True, help="data root (folder / CSV file / download dir)")
    if fewshot:
        g.add_argument("--shots", type=int, default=shots_default, help="images per class for training (0: all)")
        g.add_argument("--seed", type=int, default=1, help="few-shot sampling and training seed")
    g.add_argument("--classes", default="all", choices=["all", "base", "new"],
                   help="base-to-new protocol: the first ceil(n/2) sorted labels are base")
    g.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="reader option, e.g. split_file=..., target_column=age (repeatable)")
    if fewshot:
        g.add_argument("--allow-fewer", action="store_true",
                       help="take all images of classes with fewer than --shots")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted in the log) instead of stopping with an error")


def parse_kv(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise VLPromptError(f"--dataset-option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def data_config(args):
    from ..runner import DataConfig

    return DataConfig(dataset=args.dataset, root=args.root, options=parse_kv(args.dataset_option),
                      shots=getattr(args, "shots", 0), seed=getattr(args, "seed", 1) or 1, classes=args.classes,
                      allow_fewer=getattr(args, "allow_fewer", False),
                      on_bad_image="skip" if args.skip_bad_images else "error")


def pretrained_arg(value):
    return None if value in (None, "none", "None", "random", "") else value


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
