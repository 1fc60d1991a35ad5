"""One OrdinalCLIP training step, R = 101 ranks: vlprompt's against a plain reference pipeline, side by side.

Both pipelines learn the same parameters (a shared context of ``--n-ctx`` vectors and ``--bases`` base rank
embeddings, linearly interpolated into R ranks of 1 token) on RN50's text tower (random weights: the cost does
not depend on the values), with the same loss (:func:`vlprompt.ordinal.ordinal_loss`) and optimiser (RAdam):

* reference, as OrdinalCLIP's code does it: every step clones an ``(R, 77, D)`` sentence template and writes
  each rank's ``context + rank`` embeddings into it with R in-place slice writes (a Python loop; its backward
  copies the whole tensor once per rank), then runs the text tower on all 77 tokens of every prompt;
* vlprompt: :class:`vlprompt.methods.ordinal.ordinalclip.OrdinalCLIP`, prompts built by concatenation and encoded
  through the shared-prefix path (``<sot> + context`` computed once, each rank's few remaining tokens attend to it).

The image side is deliberately small and identical in both (fixed random image features of a batch through a
trainable linear layer), so the text side dominates. Before timing, the script checks that both pipelines give
the same prototypes and gradients (relative error < 1e-4). Timings: best of ``--repeats`` steps after one
warm-up step each, pipelines alternated.

    python benchmarks/ordinal_step.py [--ranks 101] [--repeats 3] [--device cpu] [--write-docs FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.methods.ordinal.ordinalclip import OrdinalCLIP, OrdinalCLIPConfig  # noqa: E402
from vlprompt.ordinal import interpolation_weights, ordinal_loss  # noqa: E402


class ReferencePrompts(torch.nn.Module):
    """OrdinalCLIP's reference prompt learner and text path, written out plainly (tail rank position, T = 1)."""

    def __init__(self, backbone, ctx: torch.Tensor, base: torch.Tensor, num_ranks: int):
        super().__init__()
        te = backbone.text
        self.te = te
        self.ctx = torch.nn.Parameter(ctx.detach().clone())  # (M, D)
        self.base = torch.nn.Parameter(base.detach().clone())  # (B, 1, D)
        n, r = ctx.shape[0], num_ranks
        self.register_buffer("weights", interpolation_weights(r, base.shape[0], "linear").to(ctx.device))
        emb = te._parts["token_embedding"].weight.detach()
        length = te.context_length
        template = emb[0][None, None].repeat(r, length, 1)  # the padding token's embedding everywhere
        self.eot_pos = 1 + n + 1 + 1
        template[:, 0] = emb[49406]  # <sot>
        template[:, self.eot_pos - 1] = emb[269]  # "."
        template[:, self.eot_pos] = emb[49407]  # <eot>
        self.register_buffer("template", template)
        self.register_buffer("eot", torch.full((r,), self.eot_pos, dtype=torch.long, device=ctx.device))
        self.n, self.r = n, r

    def forward(self) -> torch.Tensor:
        ranks = torch.sum(self.weights[..., None, None] * self.base[None], dim=1)  # (R, 1, D)
        sentences = self.template.clone()
        for i in range(self.r):  # the reference's loop of in-place writes
            sentences[i, 1:1 + self.n + 1] = torch.cat([self.ctx, ranks[i]], dim=0)
        return F.normalize(self.te(sentences, self.eot, mode="plain", chunk_size=None).float(), dim=-1)


def step(pipeline, head, feats, labels, opt, scale) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    image = F.normalize(head(feats), dim=-1)
    protos = pipeline()
    logits = scale * image @ protos.t()
    loss, _ = ordinal_loss(logits, labels)
    loss.backward()
    opt.step()
    if feats.is_cuda:
        torch.cuda.synchronize()
    return protos.detach(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=101)
    ap.add_argument("--n-ctx", type=int, default=10, help="context length (the reference's default)")
    ap.add_argument("--bases", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backbone", default="RN50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write-docs", default=None, help="also write the result table (markdown) to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(args.backbone, None, device=args.device, precision="fp32")
    dev = bb.device
    names = [str(i) for i in range(args.ranks)]
    cfg = OrdinalCLIPConfig(n_ctx=args.n_ctx, num_base=args.bases, image_encoder="clip", lr_image_encoder=0.0)
    ours = OrdinalCLIP(cfg, bb, names)  # frozen CLIP tower: the method takes features; the head below is shared
    with torch.no_grad():
        ours.prompts.ctx.normal_(std=0.5)
        ours.prompts.rank_embeddings.base.normal_(std=0.5)
    ref = ReferencePrompts(bb, ours.prompts.ctx, ours.prompts.rank_embeddings.base, args.ranks)
    e = bb.embed_dim
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(args.batch, e, generator=g).to(dev)
    labels = torch.randint(0, args.ranks, (args.batch,), generator=g).to(dev)
    init = torch.randn(e, e, generator=g) / e ** 0.5
    heads = {}
    for name in ("reference", "vlprompt"):
        heads[name] = torch.nn.Linear(e, e, bias=False).to(dev)
        with torch.no_grad():
            heads[name].weight.copy_(init)

    def ours_prompts():
        return ours.text_features()

    pipes = {"reference": (ref, [ref.ctx, ref.base]),
             "vlprompt": (ours_prompts, [ours.prompts.ctx, ours.prompts.rank_embeddings.base])}
    opts = {k: torch.optim.RAdam([*p, *heads[k].parameters()], lr=1e-4) for k, (_, p) in pipes.items()}
    scale = bb.logit_scale

    # equality: prototypes and gradients of the first step (before any update changes the parameters)
    grads, protos = {}, {}
    for name, (fn, params) in pipes.items():
        for p in params:
            p.grad = None
        image = F.normalize(heads[name](feats), dim=-1)
        pr = fn()
        loss, _ = ordinal_loss(scale * image @ pr.t(), labels)
        loss.backward()
        protos[name] = pr.detach()
        grads[name] = [p.grad.detach().clone() for p in params]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    err_p = rel(protos["vlprompt"], protos["reference"])
    err_g = max(rel(a, b) for a, b in zip(grads["vlprompt"], grads["reference"]))
    print(f"equality: prototypes rel. error {err_p:.2e}, gradients (context, bases) rel. error {err_g:.2e}", flush=True)
    assert err_p < 1e-4 and err_g < 1e-4, (err_p, err_g)

    times = {k: [] for k in pipes}
    for name, (fn, _) in pipes.items():  # warm-up
        step(fn, heads[name], feats, labels, opts[name], scale)
    for _ in range(args.repeats):
        for name, (fn, _) in pipes.items():
            times[name].append(step(fn, heads[name], feats, labels, opts[name], scale)[1])
    best = {k: min(v) for k, v in times.items()}
    ratio = best["reference"] / best["vlprompt"]
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
               f"{torch.__version__}, device {dev}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"R={args.ranks}  reference {best['reference']:.2f} s/step  vlprompt {best['vlprompt']:.3f} s/step  "
          f"speed-up {ratio:.1f}x   (all steps: reference {[round(t, 2) for t in times['reference']]}, "
          f"vlprompt {[round(t, 3) for t in times['vlprompt']]})", flush=True)
    text = "\n".join([
        "# OrdinalCLIP step benchmark", "",
        f"{args.backbone} text tower (random weights, fp32), R = {args.ranks} ranks, {args.n_ctx} context vectors, "
        f"{args.bases} base ranks (linear interpolation), 1 token per rank, batch {args.batch}; one step = prompts, "
        "text tower, logits, OrdinalCLIP loss, backward, RAdam update. Reference: (R, 77, D) prompts built by R "
        "in-place slice writes and encoded at full length every step; vlprompt: concatenated prompts through the "
        "shared-prefix path. Best of "
        f"{args.repeats} steps. Produced by `python benchmarks/ordinal_step.py`.", "",
        f"Machine: {machine}; peak RSS {peak:.0f} MB. Equality before timing: prototypes {err_p:.1e}, "
        f"gradients {err_g:.1e} (relative).", "",
        "| R | reference | vlprompt | speed-up |", "|---:|---:|---:|---:|",
        f"| {args.ranks} | {best['reference']:.2f} s | {best['vlprompt']:.3f} s | {ratio:.1f}x |", ""])
    print(text)
    if args.write_docs:
        from vlprompt._io import atomic_write_text
        atomic_write_text(args.write_docs, text)


if __name__ == "__main__":
    main()
