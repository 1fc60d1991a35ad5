"""The README's main job: zero-shot CLIP, then CoOp with a few shots per class, on one dataset, side by side.

    python -m vlprompt.demo --backbone RN50 --pretrained openai --dataset torchvision:EuroSAT --root ~/data

It needs the pretrained weights (downloaded by open_clip on first use) and the dataset (torchvision downloads
EuroSAT). Both are checked before any long work (:func:`check_weights`, :func:`check_dataset`); when one cannot be
had it stops, in seconds, with one line saying which ``make demo`` variables to set (``BACKBONE=RN50-quickgelu
PRETRAINED=/path/to/RN50.pt``: OpenAI's weights need the QuickGELU model; ``DATA=/path/to/data DATASET=...``).
Nothing is left behind by a failed check (a failed dataset download removes the empty folders it made).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from .errors import DataError, VLPromptError

log = logging.getLogger("vlprompt")

_RANDOM = ("none", "None", "")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.removesuffix(" Expected layout:").rstrip(".")  # the layout follows on the next lines


def _weights_hint(backbone: str, quick_gelu: bool) -> str:
    """The make variables that run the demo on a weights file; OpenAI's weights (``quick_gelu``) need the
    architecture's QuickGELU model, which a bare file does not tell."""
    import open_clip

    name = Path(backbone).stem if backbone.endswith(".json") or os.path.isfile(backbone) else backbone
    variant = f"{name}-quickgelu"
    if quick_gelu and not name.endswith("-quickgelu") and open_clip.get_model_config(variant) is not None:
        return f"make demo BACKBONE={variant} PRETRAINED=/path/to/{name}.pt (OpenAI's weights need QuickGELU)"
    return f"make demo PRETRAINED=/path/to/{name}.pt (or --pretrained FILE)"


def check_weights(backbone: str, pretrained: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """None when the ``pretrained`` weights of ``backbone`` can be had (a local file, open_clip's cache, or a
    download done now, which the run would need anyway), else one line saying what failed and which make
    variables to set. Without network it answers in seconds (one probe of the hub, no retries). A backbone given
    as a model-config file is left to the loader."""
    import open_clip

    from .backbone.loading import _hub_unreachable, _tag_files, openai_format
    from .errors import BackboneError

    if pretrained in _RANDOM:
        return None  # random weights: the loader warns that accuracy is meaningless
    is_config = backbone.endswith(".json") or os.path.isfile(backbone)
    # the weights a user downloads for the demo's default are OpenAI's: QuickGELU
    openai_cfg = {} if is_config else open_clip.get_pretrained_cfg(backbone, "openai")
    path = os.path.expanduser(pretrained)
    if os.path.isfile(path):
        model_cfg = {} if is_config else (open_clip.get_model_config(backbone) or {})
        try:
            openai = None if is_config or model_cfg.get("quick_gelu") else openai_format(path)
        except BackboneError:
            return None  # not a checkpoint: the loader says what is wrong with it
        if openai:
            return f"{path} holds OpenAI-format weights ({openai}): {_weights_hint(backbone, True)}"
        return None
    if os.sep in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        return f"weights file {path} not found: {_weights_hint(backbone, bool(openai_cfg.get('quick_gelu')))}"
    if is_config:
        return None
    cfg = open_clip.get_pretrained_cfg(backbone, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(backbone)
        return (f"{pretrained!r} is not a pretrained tag of {backbone} (tags: {', '.join(tags) or 'none'}): "
                f"make demo PRETRAINED=<tag> or {_weights_hint(backbone, bool(openai_cfg.get('quick_gelu')))}")
    hint = _weights_hint(backbone, bool(cfg.get("quick_gelu")))
    model_id, filenames = _tag_files(cfg)
    why = _hub_unreachable(model_id, filenames, cache_dir)  # None when cached or the hub answers
    if why:
        return f"cannot get the {pretrained!r} weights of {backbone} (not cached; {why}): {hint}"
    log.info("getting the %s weights of %s (downloaded once, then cached)...", pretrained, backbone)
    try:
        open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except (OSError, RuntimeError) as e:  # the hub answered but the download failed
        return (f"cannot get the {pretrained!r} weights of {backbone} (not cached, download failed: "
                f"{_first_line(e)}): {hint}")
    return None


def check_dataset(dataset: str, root: str) -> Optional[str]:
    """None when ``dataset`` can be read from ``root`` (a torchvision dataset is downloaded now if it is not
    there), else one line saying what failed and which make variables to set."""
    from .data import load_dataset

    try:
        load_dataset(dataset, root)
    except DataError as e:
        how = " and could not be downloaded" if dataset.startswith("torchvision:") else ""
        return (f"dataset {dataset} cannot be read from {root}{how} ({_first_line(e)}): "
                f"make demo DATA=/path/to/data DATASET={dataset} (or another dataset name)")
    return None


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
    from .runs import resolve, run

    out = Path(args.output)
    common = {"backbone": args.backbone, "pretrained": args.pretrained, "device": args.device}
    data = {"dataset": args.dataset, "root": args.root}
    try:  # resolving reads nothing: a bad option fails before any download
        zs_cfg = resolve({"method": "zeroshot", **common, "data": data})
        coop_cfg = resolve({"method": "coop", **common, "seed": args.seed, "data": {**data, "shots": args.shots},
                            **({"train": {"epochs": args.epochs}} if args.epochs is not None else {})})
    except VLPromptError as e:
        print(f"vlprompt demo: error: {e}", file=sys.stderr)
        return 2
    # before any long work: the two things an offline machine lacks, each with the variable that fixes it
    for check in (lambda: check_weights(args.backbone, args.pretrained), lambda: check_dataset(args.dataset, args.root)):
        problem = check()  # in turn: no dataset download when the weights cannot be had
        if problem is not None:
            print(f"vlprompt demo: error: {problem}", file=sys.stderr)
            return 2
    try:
        zs = run(zs_cfg, out / "zeroshot")
        coop = run(coop_cfg, out / f"coop-{args.shots}shots-seed{args.seed}")
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
