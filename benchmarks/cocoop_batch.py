"""Does batching pay for CoCoOp? Per-image training-step time at batch 1 against batch 8 and 32.

One CoCoOp step = meta-network, the B x K image-conditioned prompts through the text tower (shared-prefix path),
cross-entropy, backward, SGD step, on cached image features (the image tower is not part of a CoCoOp step in
vlprompt). Three text-chunking rules on the same model and prompts:

* ``budget``: the default (``text_memory_mb`` unset: half the available memory): a batch whose prompts'
  saved activations fit is encoded at once, nothing recomputed;
* ``chunk256``: what a fixed chunk of 256 prompts did before (emulated with a budget of exactly 256 prompts): as
  soon as B x K > 256 every chunk is checkpointed and recomputed in backward.

Random weights (the cost does not depend on the values), fp32, the text tower of RN50 (width 512, 12 layers,
8 heads; ``--size tiny`` for a 2-layer width-64 tower). Prints the per-image step time and its ratio to batch 1.
On a machine shared with other work the absolute times move; ratios taken in the same run are what to read.

    python benchmarks/cocoop_batch.py [--size rn50|tiny] [--classes 10] [--repeats 3] [--batches 1 8 32]
                                      [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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
from vlprompt.methods import build_method  # noqa: E402
from vlprompt.methods.base import Features  # noqa: E402

TEXT = {"rn50": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
        "tiny": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
EMBED = {"rn50": 1024, "tiny": 64}
NAMES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
         "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
         "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
         "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
         "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
         "wrinkled", "zigzagged"]  # DTD's 47 classes


def backbone(size: str):
    d = Path(tempfile.mkdtemp())
    cfg = {"embed_dim": EMBED[size], "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16,
                                                    "head_width": 32}, "text_cfg": TEXT[size]}
    (d / "m.json").write_text(json.dumps(cfg))
    import open_clip

    torch.save(open_clip.CLIP(**cfg).state_dict(), d / "m.pt")
    return load_backbone(str(d / "m.json"), str(d / "m.pt"), "cpu", precision="fp32")


def step_time(method, batch: int, repeats: int) -> tuple[float, float]:
    """(median seconds per step, CPU share of the process during the steps)."""
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.002, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    feats = Features(global_=torch.randn(batch, method.backbone.embed_dim, generator=g))
    labels = torch.randint(0, method.num_classes, (batch,), generator=g)
    times, cpu = [], []
    for r in range(repeats + 1):  # the first is a warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(method(feats), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        wall = time.perf_counter() - t0
        if r:
            times.append(wall)
            cpu.append((time.process_time() - c0) / wall / torch.get_num_threads())
    times.sort()
    return times[len(times) // 2], sum(cpu) / len(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="rn50", choices=sorted(TEXT))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); on a shared "
                   "machine 1 thread is far less disturbed by other processes")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = backbone(args.size)
    # DTD's 47 names, then two-word combinations of them (K = 102, the Flowers size, needs more)
    names = (NAMES + [f"{a} {b}" for a in NAMES for b in NAMES if a != b])[:args.classes]
    torch.manual_seed(0)
    method = build_method("cocoop", {}, bb, names)
    row = method.prompt_bytes(grad=True)
    print(f"CoCoOp, {args.size} text tower, K={len(names)} classes, {torch.get_num_threads()} threads, "
          f"estimated {row / 2 ** 20:.2f} MB saved per prompt, budget {method.text_memory_bytes / 2 ** 20:.0f} MB")
    print(f"{'rule':<9} {'batch':>5} {'prompts':>7} {'chunk':>6} {'s/step':>8} {'s/image':>8} {'speedup':>10} "
          f"{'cpu share':>9}")
    base = None
    for rule in ("budget", "chunk256"):
        for b in args.batches:
            if rule == "chunk256":
                method.text_memory_bytes = 256 * row  # exactly 256 prompts fit: the old fixed chunk
            chunk = method.text_chunk(b, grad=True)
            t, share = step_time(method, b, args.repeats)
            per_image = t / b
            if base is None:
                base = per_image
            print(f"{rule:<9} {b:>5} {b * len(names):>7} {str(chunk or 'all'):>6} {t:>8.3f} {per_image:>8.4f} "
                  f"{base / per_image:>9.2f}x {share:>9.2f}")


if __name__ == "__main__":
    main()
