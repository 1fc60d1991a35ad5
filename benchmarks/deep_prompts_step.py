"""Training-step time and memory of IVLP, deep language prompting, VPT and PromptSRC against a plain
re-implementation of the original forward, side by side in one run.

The plain path is the originals' computation written out (tests/originals: ``ivlp.ivlp_loss``, ``vpt.vpt_loss``,
``promptsrc.promptsrc_forward`` + ``loss_terms``), as the original trainers run it: every class prompt through the
text tower at 77 tokens with the deep prompts replacing their positions block by block, the prompted image tower,
and for PromptSRC the frozen image tower on the same images at every step (its 60-template teacher text features
are computed once, as the original does, outside the timed step). vlprompt's step is the method's
``training_step``: the text tower runs the shared prefix (start token + context, with the deep prompts in every
layer) once and the class tokens attend to it, and PromptSRC's frozen image features come from the feature cache
(here: computed once before the timed steps, as the cache holds them). Both sides then run backward and an SGD
step on the same learned tensors.

Same model (random weights: the cost does not depend on the values), fp32, the original recipes' prompts (IVLP
2 + 2 at depth 12 / 12, deep language prompting 4 at depth 12, deep VPT 8 at depth 12, PromptSRC 4 + 4 at depth
9 / 9), batch 4 of 224 px images, K classes (the first K of ImageNet's names). Printed per method: the median step
time of each side, wall and CPU seconds, and their ratios (measured in the same run), the share of a core the
process got (``--threads 1``: 1.00 on an idle machine), and the memory of a
step: the bytes of the tensors saved for backward (distinct storages, the activations a step holds) and the peak
rise of the resident memory during a step over its level before the step (each side in a fresh process whose
large allocations are returned to the system when freed, sampled every millisecond).

    python benchmarks/deep_prompts_step.py [--size b16|tiny] [--classes 100] [--repeats 2] [--threads N]
                                     [--methods ivlp promptsrc ...] [--no-peak]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the written-out originals
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")

from originals import ivlp as orig_ivlp  # noqa: E402
from originals import promptsrc as orig_src  # noqa: E402
from originals import vpt as orig_vpt  # noqa: E402
from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.methods import build_method  # noqa: E402
from vlprompt.methods.base import Batch, Features  # noqa: E402

SIZES = {
    "b16": {"embed_dim": 512, "quick_gelu": True,
            "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "tiny": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 4, "width": 96, "patch_size": 8,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4}},
}
#: the original recipes' prompts (multimodal-prompt-learning / PromptSRC configs; depths capped at the tiny model's)
RECIPES = {
    "ivlp": {"n_ctx": 2, "n_ctx_vision": 2, "text_depth": 12, "vision_depth": 12},
    "deep-language": {"n_ctx": 4, "text_depth": 12},
    "vpt": {"n_ctx_vision": 8, "vision_depth": 12},
    "promptsrc": {"n_ctx": 4, "n_ctx_vision": 4, "text_depth": 9, "vision_depth": 9},
}


def backbone(size: str):
    import open_clip

    d = Path(tempfile.mkdtemp())
    cfg = SIZES[size]
    (d / "m.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**cfg).state_dict(), d / "m.pt")
    return load_backbone(str(d / "m.json"), str(d / "m.pt"), "cpu", precision="fp32")


def options(method: str, bb) -> dict:
    layers = len(bb.text._blocks)
    return {k: (min(v, layers) if k.endswith("depth") else v) for k, v in RECIPES[method].items()}


class Sides:
    """The two steps of one method on the same model, learned tensors, images and labels."""

    def __init__(self, name: str, bb, classes: int):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        self.name, self.bb = name, bb
        names = list(IMAGENET_CLASSNAMES[:classes])
        torch.manual_seed(0)
        self.method = build_method(name, options(name, bb), bb, names)
        self.method.train()
        g = torch.Generator().manual_seed(0)
        size = bb.image_size
        self.images = torch.randn(4, 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (4,), generator=g)
        self.frozen = bb.encode_image(self.images)  # what the feature cache holds for these views
        opts = options(name, bb)
        model = bb.model
        # the plain side: the original's tensors by their names (leaves with gradients), its fixed prompt parts
        learned = {}
        for k, v in self.method.learned_state().items():
            if k == "prompt.ctx":
                learned["prompt_learner.ctx"] = v[0, 0]
            elif k == "deep.vision_input":
                learned["image_encoder.VPT"] = v
            else:
                tower = "text_encoder" if k.startswith("deep.text.") else "image_encoder"
                learned[f"{tower}.transformer.resblocks.{k.split('.')[-1]}.VPT_shallow"] = v
        self.learned = {k: v.detach().clone().requires_grad_() for k, v in learned.items()}
        if name == "vpt":
            self.fixed = None
            self.text = orig_vpt.fixed_text_features(model, names)
        else:
            _, self.fixed = orig_ivlp.init_ivlp(model, names, n_ctx_text=opts["n_ctx"],
                                                n_ctx_vision=opts.get("n_ctx_vision", 0),
                                                depth_text=opts["text_depth"], depth_vision=opts.get("vision_depth", 0))
        if name == "promptsrc":  # once, as the original, one template at a time (its loop, l.120-126)
            with torch.no_grad():
                self.teacher = torch.stack([orig_src.teacher_text_features(model, names, [t])
                                            for t in orig_src.IMAGENET_TEMPLATES]).mean(dim=0)

    def ours_loss(self):
        feats = Features(images=self.images, global_=self.frozen)
        if self.name == "deep-language":
            feats = Features(global_=self.frozen)
        return self.method.training_step(Batch(feats, self.labels)).loss

    def plain_loss(self):
        model = self.bb.model
        if self.name == "vpt":
            return orig_vpt.vpt_loss(model, self.learned, self.images, self.text, self.labels)
        if self.name == "promptsrc":
            out = orig_src.promptsrc_forward(model, self.learned, self.fixed, self.images, self.teacher)
            return orig_src.loss_terms(out, self.labels)["loss"]
        return orig_ivlp.ivlp_loss(model, self.learned, self.fixed, self.images, self.labels)

    def step(self, side: str):
        params = (self.method.trainable_parameters() if side == "ours" else list(self.learned.values()))
        opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
        loss = self.ours_loss() if side == "ours" else self.plain_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def saved_bytes(self, side: str) -> int:
        """Bytes of the distinct storages saved for backward by one forward (the activations a step holds)."""
        storages = {}

        def pack(t):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.ours_loss() if side == "ours" else self.plain_loss()
        del loss
        return sum(storages.values())


def timed(sides: Sides, side: str, repeats: int) -> tuple[float, float, float]:
    """(median wall seconds per step, median CPU seconds per step, CPU share of the process) after one warm-up
    step. On a machine shared with other work the CPU seconds are the steadier measure of the work done."""
    walls, cpus = [], []
    for r in range(repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        sides.step(side)
        if r:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    share = sum(cpus) / sum(walls) / torch.get_num_threads()
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2], share


def peak_during(fn) -> float:
    """MB by which the resident memory of this process rises above its level before ``fn()`` while ``fn`` runs
    (sampled every millisecond by a thread; run with glibc's mmap threshold lowered so that freed tensors leave
    the resident set, see :func:`step_peak`)."""
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    import gc

    gc.collect()
    before = resident()
    top = [before]
    done = threading.Event()

    def watch():
        while not done.is_set():
            top[0] = max(top[0], resident())
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return (max(top[0], resident()) - before) / 2 ** 20


def step_peak(size: str, method: str, classes: int, side: str, threads) -> float:
    """:func:`peak_during` one step of ``side``, in a fresh process whose large allocations are mmapped (returned
    to the system when freed: the resident set follows the live tensors)."""
    cmd = [sys.executable, __file__, "--size", size, "--classes", str(classes), "--methods", method,
           "--peak-of", side]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(json.loads(out.strip().splitlines()[-1])["step_peak_mb"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="b16", choices=sorted(SIZES))
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=["ivlp", "promptsrc", "deep-language", "vpt"],
                   choices=sorted(RECIPES))
    p.add_argument("--no-peak", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--write-docs", default=str(Path(__file__).resolve().parents[1] / "docs/benchmarks/deep_prompts_step.md"),
                   help="the Markdown file the table is written to ('' to write none)")
    p.add_argument("--peak-of", choices=["ours", "plain"], help=argparse.SUPPRESS)  # one step in this process
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = backbone(args.size)
    if args.peak_of:
        sides = Sides(args.methods[0], bb, args.classes)
        sides.step(args.peak_of)  # warm-up: one-time allocations (the optimizer's state, kernels' workspaces)
        print(json.dumps({"step_peak_mb": peak_during(lambda: sides.step(args.peak_of))}))
        return
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} "
               f"threads, model {args.size}, K={args.classes} classes, batch 4, fp32")
    print("# " + machine)
    rows = []
    print(f"{'method':<14} {'wall s plain/ours':>18} {'speedup':>8} {'cpu s plain/ours':>17} {'speedup':>8} "
          f"{'cpu share':>10} {'saved MB plain/ours':>20} {'peak MB plain/ours':>19}")
    for name in args.methods:
        sides = Sides(name, bb, args.classes)
        w_plain, c_plain, s_plain = timed(sides, "plain", args.repeats)
        w_ours, c_ours, s_ours = timed(sides, "ours", args.repeats)
        m_plain, m_ours = sides.saved_bytes("plain") / 2 ** 20, sides.saved_bytes("ours") / 2 ** 20
        if args.no_peak:
            peak = "-"
        else:
            peak = "/".join(f"{step_peak(args.size, name, args.classes, side, args.threads):.0f}"
                            for side in ("plain", "ours"))
        print(f"{name:<14} {w_plain:>9.2f}/{w_ours:<8.2f} {w_plain / w_ours:>7.2f}x {c_plain:>8.2f}/{c_ours:<8.2f} "
              f"{c_plain / c_ours:>7.2f}x {s_plain:>5.2f}/{s_ours:<4.2f} {m_plain:>10.0f}/{m_ours:<9.0f} "
              f"{peak:>19}", flush=True)
        rows.append(f"| {name} | {w_plain:.3f} / {w_ours:.3f} | {w_plain / w_ours:.2f}x | {c_plain:.3f} / {c_ours:.3f} "
                    f"| {c_plain / c_ours:.2f}x | {m_plain:.0f} / {m_ours:.0f} | {peak.replace('/', ' / ')} |")
    if args.write_docs:
        cmd = " ".join(["python benchmarks/deep_prompts_step.py", *sys.argv[1:]])
        text = "\n".join([
            "# Deep prompts: training-step time and memory", "",
            f"Machine: {machine}. Produced by `{cmd}`: one training step (forward, backward, SGD) of vlprompt's "
            "method against the originals' computation written out (every class prompt through the text tower at 77 "
            "tokens, PromptSRC's frozen image tower at every step), measured side by side in one run; ratios are "
            "plain over vlprompt.", "",
            "| method | step wall s plain / vlprompt | speed-up | step CPU s plain / vlprompt | speed-up "
            "| saved-for-backward MB plain / vlprompt | peak MB plain / vlprompt |",
            "|---|---:|---:|---:|---:|---:|---:|", *rows, ""])
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from vlprompt._io import atomic_write_text

        atomic_write_text(args.write_docs, text)


if __name__ == "__main__":
    main()
