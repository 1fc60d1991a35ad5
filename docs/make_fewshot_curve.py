"""Draw docs/images/fewshot_curve_tiny.png: the few-shot curve of `vlprompt report` from a tiny grid.

The runs are real vlprompt runs (``vlprompt.runs.run``, the path a grid cell takes) of a TINY RANDOM model
(vlprompt.testing.make_tiny_checkpoint, no pre-trained weights) on two generated folder datasets, so the
picture shows what the report draws, not any real accuracy. CPU, about a minute:

    HF_HUB_OFFLINE=1 .venv/bin/python docs/make_fewshot_curve.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "images"
TITLE = "vlprompt report: few-shot curves of a TINY RANDOM MODEL (not real weights), generated images"


def _dataset(root: Path, kind: int, seed: int) -> Path:
    """6 classes x 20 noisy images: class c has a colour channel or a stripe period slightly raised."""
    rng = np.random.default_rng(seed)
    for c in range(6):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(20):
            arr = rng.integers(0, 160, (40, 40, 3), dtype=np.uint8)  # noisy: accuracy grows with the shots
            if kind == 0:
                arr[..., c % 3] += 12 + 12 * (c // 3)
            else:
                arr[:, :: c + 2, :] += 30
            Image.fromarray(arr).save(d / f"{i:02d}.png")
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", default=None, help="keep the grid in this folder (default: a temporary one)")
    args = ap.parse_args()

    from vlprompt.reporting import build_report, fewshot_curves
    from vlprompt.runs import resolve, run
    from vlprompt.testing import make_tiny_checkpoint

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vlprompt-curve-"))
    try:
        cfg, weights = make_tiny_checkpoint(work / "model", "tiny-vit", seed=0, sharpen=True)
        data = {"colours": _dataset(work / "data" / "colours", 0, 0),
                "stripes": _dataset(work / "data" / "stripes", 1, 1)}
        grid = work / "grid"
        common = {"backbone": str(cfg), "pretrained": str(weights), "cache_dir": str(work / "cache"), "device": "cpu"}
        for name, root in data.items():
            ds = {"dataset": "folder", "root": str(root)}
            run(resolve({**common, "method": "zeroshot", "data": ds}), grid / "zeroshot" / name, progress=False)
            for shots in (1, 2, 4, 8):
                for seed in (1, 2):
                    for method, train in (("coop", {"epochs": 20, "lr": 0.02}), ("linear-probe", None)):
                        req = {**common, "method": method, "seed": seed, "data": {**ds, "shots": shots}}
                        if train:
                            req["train"] = train
                        run(resolve(req), grid / method / name / f"shots{shots}" / f"seed{seed}", progress=False)
        files = fewshot_curves(build_report([grid]), OUT, title=TITLE, name="fewshot_curve_tiny")
        (OUT / "fewshot_curve_tiny.pdf").unlink(missing_ok=True)  # the README shows the PNG only
        print(files[0])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
