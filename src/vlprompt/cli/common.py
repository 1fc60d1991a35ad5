"""Options shared by the commands; they only turn arguments into a request (the keys of config.yaml).

Every option defaults to "not given" (``argparse.SUPPRESS``): a request holds only what the user typed, so a
``--config`` file's values and the method's preset are never overridden by a parser default.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import ConfigError

S = argparse.SUPPRESS


def add_backbone_options(p: argparse.ArgumentParser, device_only: bool = False,
                         cache_default: str = "~/.cache/vlprompt/features or $VLPROMPT_CACHE") -> None:
    g = p.add_argument_group("model")
    if not device_only:
        g.add_argument("--backbone", default=S, help="open_clip model name, hf-hub:org/name, local-dir:/path, or a "
                       "model-config JSON (default RN50)")
        g.add_argument("--pretrained", default=S,
                       help="open_clip pretrained tag, a checkpoint file, or 'none' for random weights (default openai)")
        g.add_argument("--precision", default=S, choices=["amp", "fp32", "bf16", "auto"],
                       help="amp: autocast on GPU, bf16 where supported else fp16 (fp32 on CPU); fp32: no autocast; "
                            "bf16: autocast to bfloat16 (GPUs with bf16, CPUs with AMX / AVX512-BF16); auto: bf16 where "
                            "the device has fast bf16, fp16 on older GPUs, fp32 on other CPUs (default amp). Learned "
                            "tensors and optimiser state stay float32")
        g.add_argument("--preprocess", default=S, choices=["coop", "model"],
                       help="coop: CoOp's crop/flip policy with the weights' own pixel statistics (default); model: "
                            "open_clip's own pipeline for these weights, train and test")
        g.add_argument("--image-mean", type=float, nargs="+", default=S, metavar="X",
                       help="pixel mean (red green blue) instead of the weights' (default: a pretrained tag's; for a "
                            "checkpoint file, the one its architecture's open_clip tags all agree on, else OpenAI's)")
        g.add_argument("--image-std", type=float, nargs="+", default=S, metavar="X",
                       help="pixel std (red green blue) instead of the weights' (default: as --image-mean)")
        g.add_argument("--image-interpolation", default=S, choices=["bicubic", "bilinear"],
                       help="resize interpolation instead of the weights' (default: as --image-mean)")
        g.add_argument("--image-resize-mode", default=S, choices=["shortest", "longest", "squash"],
                       help="--preprocess model: open_clip's test resize instead of the weights' (default: as "
                            "--image-mean)")
    g.add_argument("--device", default=S, help="cpu | cuda | cuda:N | mps (default: cuda when available)")
    g.add_argument("--threads", type=int, default=S,
                   help="CPU threads of torch (default: torch's). On a machine other processes also load, 1 thread "
                        "per process avoids waiting on descheduled threads (measured: docs/benchmarks/cpu_contention.md)")
    g.add_argument("--cache-dir", default=S, help=f"feature cache directory (default {cache_default})")


def add_data_options(p: argparse.ArgumentParser, fewshot: bool = True, required: bool = False) -> None:
    """Data options; ``fewshot=False`` for commands that use whole splits (no --shots / --seed / --allow-fewer)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, required=required,
                   help="a standard name (see `vlprompt datasets`), folder, csv, or torchvision:<Name>")
    g.add_argument("--root", default=S, required=required, help="data root (folder / CSV file / download dir)")
    if fewshot:
        g.add_argument("--shots", type=int, default=S, help="training images per class (0: all; default 16)")
        g.add_argument("--seed", type=int, default=S, help="few-shot sampling and training seed (default 1)")
        g.add_argument("--allow-fewer", action="store_true", default=S,
                       help="take all images of classes with fewer than --shots")
        from ..data.protocol import SAMPLER_HELP, SAMPLERS

        g.add_argument("--sampler", default=S, choices=list(SAMPLERS), help=SAMPLER_HELP)
        g.add_argument("--fewshot-file", default=S, metavar="PKL",
                       help="the few-shot images of the original code: a Dassl split_fewshot/shot_K-seed_S.pkl "
                            "(read without running code; its images found under --root)")
        g.add_argument("--val-shots", type=int, default=S, metavar="N",
                       help="val images per class (default min(shots, 4), CoOp's protocol; 0: the whole val split, "
                            "as Tip-Adapter's code searches on)")
        g.add_argument("--crop-scale", type=float, nargs=2, default=S, metavar=("MIN", "MAX"),
                       help="area range of the train augmentation's random resized crop (default 0.08 1, CoOp's; "
                            "Tip-Adapter's and LP++'s recipes set 0.5 1); cached views are keyed by it")
    g.add_argument("--classes", default=S, choices=["all", "base", "new"],
                   help="base-to-new protocol: the first ceil(n/2) sorted labels are base (default all)")
    g.add_argument("--dataset-option", action="append", default=S, metavar="KEY=VALUE",
                   help="reader option, e.g. split_file=..., target_column=age (repeatable)")
    g.add_argument("--skip-bad-images", action="store_true", default=S,
                   help="skip unreadable images (counted in log.txt and results.json) instead of stopping")


def parse_kv(items, flag: str = "--dataset-option") -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def data_request(args) -> dict:
    """The ``data`` section of a request from the options given."""
    a = vars(args)
    out = {k: a[k] for k in ("dataset", "root", "shots", "classes", "allow_fewer", "sampler", "fewshot_file",
                             "val_shots", "crop_scale") if k in a}
    if "dataset_option" in a:
        out["options"] = parse_kv(a["dataset_option"])
    if a.get("skip_bad_images"):
        out["on_bad_image"] = "skip"
    return out


def top_request(args) -> dict:
    """Top-level keys of a request (backbone, weights, seed, device...) from the options given."""
    a = vars(args)
    out = {k: a[k] for k in ("backbone", "pretrained", "seed", "device", "precision", "preprocess", "image_mean",
                             "image_std", "image_interpolation", "image_resize_mode", "cache_dir", "tensorboard",
                             "threads") if k in a}
    return out


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
