"""Training-step time and memory of the methods inside both towers (MaPLe, CLIP-LoRA) against a plain
re-implementation of the original forward, side by side in one run.

* ``maple``: vlprompt's MaPLe step (the shared prefix -- <sot>, the context, the init's fixed words, the deep
  prompts at their positions -- encoded once per step, each class's tokens attending to it) against the original's
  computation written out (``tests/originals/maple.py``: every class's 77-token prompt through the prompted text
  tower, as ``trainers/maple.py`` runs it), both with the prompted image tower on the batch's images;
* ``clip-lora``: vlprompt's CLIP-LoRA step (LoRA wrappers around the backbone's own attention modules; the text path
  ``cut`` -- its default -- and ``plain``, the original's 77 tokens) against the original's LoRA attention written
  out (``tests/originals/clip_lora.py``: ``PlainMultiheadAttentionLoRA``'s forward on the same weights).

A step is the forward, cross-entropy, backward and the optimiser step (SGD for MaPLe, AdamW for CLIP-LoRA), fp32 on
the CPU, random weights of ViT-B/16's size (text 512 wide, 12 blocks, 8 heads; vision 768 wide, 12 blocks, 224 px,
patch 16; ``--size tiny`` for a 2-block model that runs in seconds), K class names of 2-4 tokens. Prints the median
step time of ``--repeats`` steps after a warm-up, the ratio to the original's, the CPU share of the process and the
memory a step holds for backward (the bytes of the tensors autograd saves, each storage counted once). On a
machine shared with other work absolute times move: read the ratios taken in the same run.

    python benchmarks/maple_lora_step.py --method maple|clip-lora [--size vit-b-16|tiny] [--classes 100] [--batch 4]
                                     [--repeats 2] [--threads N]
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
sys.path.insert(0, str(ROOT / "tests"))  # the originals written out
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.methods import build_method  # noqa: E402
from vlprompt.methods.base import Batch, Features  # noqa: E402

SIZES = {
    "vit-b-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "tiny": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 96, "patch_size": 8,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}},
}
ADJECTIVES = ["red", "small", "striped", "wooden", "golden", "spotted", "tall", "rusty", "woolly", "frozen"]
NOUNS = ["fox", "kettle", "lily", "tractor", "heron", "violin", "cactus", "lantern", "beetle", "harbour seal"]


def classnames(k: int) -> list[str]:
    names = [f"{a} {n}" for a in ADJECTIVES for n in NOUNS]
    return (names * (k // len(names) + 1))[:k] if k > len(names) else names[:k]


def backbone(size: str):
    import open_clip

    d = Path(tempfile.mkdtemp())
    cfg = SIZES[size]
    (d / "m.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**cfg).state_dict(), d / "m.pt")
    return load_backbone(str(d / "m.json"), str(d / "m.pt"), "cpu", precision="fp32")


class SavedBytes:
    """Bytes of the tensors autograd saves for backward during a forward, each storage once."""

    def __init__(self):
        self.seen: dict = {}

    def pack(self, t):
        try:
            s = t.untyped_storage()
            self.seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            pass
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def measure(step, repeats: int) -> tuple[float, float, int]:
    """(median seconds per step, CPU share of the process, bytes saved for backward by one step)."""
    times, shares, saved = [], [], 0
    for r in range(repeats + 1):  # the first is a warm-up
        hook = SavedBytes()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autograd.graph.saved_tensors_hooks(hook.pack, lambda t: t):
            loss, optimizer = step()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        wall = time.perf_counter() - t0
        saved = hook.total
        if r:
            times.append(wall)
            shares.append((time.process_time() - c0) / wall / torch.get_num_threads())
    times.sort()
    return times[len(times) // 2], sum(shares) / len(shares), saved


def maple_steps(bb, names, images, labels):
    from originals import maple as orig

    torch.manual_seed(1)
    method = build_method("maple", {"depth": 9 if len(bb.model.transformer.resblocks) >= 9 else 2}, bb, names)
    method.train()
    ours_opt = torch.optim.SGD(method.trainable_parameters(), lr=0.0035, momentum=0.9, weight_decay=5e-4)
    learned, fixed = orig.init_maple(bb.model, names, depth=method.config.depth)
    learned = {k: v.requires_grad_() for k, v in learned.items()}
    orig_opt = torch.optim.SGD(list(learned.values()), lr=0.0035, momentum=0.9, weight_decay=5e-4)

    def ours():
        return method.training_step(Batch(Features(images=images), labels)).loss, ours_opt

    def original():
        return orig.maple_loss(bb.model, learned, fixed, images, labels), orig_opt

    return [("original (written out)", original), ("vlprompt maple", ours)]


def clip_lora_steps(bb, names, images, labels):
    from originals import clip_lora as orig
    from originals import mpl_clip

    factors = orig.init_lora(bb.model)
    params = orig.lora_parameters(factors)
    for p in params:
        p.requires_grad_(True)
    orig_opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2)
    scale = orig.scaling(2, 1)
    tokens = mpl_clip.tokenize(orig.class_texts(names))

    def original():
        text = orig.text_features(bb.model, tokens, factors, scale, training=True, dropout_rate=0.25)
        image = orig.image_features(bb.model, images, factors, scale, training=True, dropout_rate=0.25)
        return F.cross_entropy(orig.logits(image, text / text.norm(dim=-1, keepdim=True)), labels), orig_opt

    steps = [("original (written out)", original)]
    for mode in ("plain", "auto"):
        method = build_method("clip-lora", {"text_mode": mode}, bb, names)
        method.train()
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=2e-4, weight_decay=1e-2)
        steps.append((f"vlprompt clip-lora ({'cut' if mode == 'auto' else mode})",
                      lambda m=method, o=opt: (m.training_step(Batch(Features(images=images), labels)).loss, o)))
        extra = sum(p.numel() for p in method.parameters()) - sum(p.numel() for p in params)
        assert extra == 0, "the method holds tensors besides the LoRA factors"  # no copy of a tower
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=("maple", "clip-lora"))
    p.add_argument("--size", default="vit-b-16", choices=sorted(SIZES))
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = backbone(args.size)
    names = classnames(args.classes)
    size = bb.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=g)
    labels = torch.randint(0, len(names), (args.batch,), generator=g)
    steps = (maple_steps if args.method == "maple" else clip_lora_steps)(bb, names, images, labels)
    print(f"{args.method}, {args.size}, K={len(names)} classes, batch {args.batch}, fp32, {torch.get_num_threads()} "
          f"threads, median of {args.repeats} steps after a warm-up")
    print(f"{'step':<30} {'s/step':>8} {'speedup':>8} {'saved MB':>9} {'memory':>7} {'cpu share':>9}")
    base = None
    for name, step in steps:
        t, share, saved = measure(step, args.repeats)
        if base is None:
            base = (t, saved)
        print(f"{name:<30} {t:>8.2f} {base[0] / t:>7.2f}x {saved / 2 ** 20:>9.0f} {saved / base[1]:>6.2f}x "
              f"{share:>9.2f}")


if __name__ == "__main__":
    main()
