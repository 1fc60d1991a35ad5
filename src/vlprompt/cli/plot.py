"""``vlprompt plot-transport RUN IMAGE``: where each of a class's N prompts puts its transport mass on an image.

The image goes through the run's test transform; for the predicted class (or ``--class``) the M x N transport
plan between the image's local features and the class's N prompts is drawn as N heatmaps (prompt n's mass over
the sqrt(M) x sqrt(M) grid, upsampled over the image) beside the image itself.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..errors import VLPromptError


def register(sub) -> None:
    p = sub.add_parser("plot-transport", help="draw a PLOT run's transport plan (prompts over image regions)")
    p.add_argument("run", help="run directory of a PLOT training run")
    p.add_argument("image", help="image file")
    p.add_argument("--class", dest="class_name", default=None,
                   help="class to draw (default: the predicted class)")
    p.add_argument("--output", default=None, help="PNG file (default RUN/transport/<image>-<class>.png)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_plot_transport)


def _find_class(name: str, classnames: list[str]) -> int:
    norm = [c.replace("_", " ").strip().lower() for c in classnames]
    key = name.replace("_", " ").strip().lower()
    if key in norm:
        return norm.index(key)
    shown = ", ".join(classnames[:8]) + (", ..." if len(classnames) > 8 else "")
    raise VLPromptError(f"class {name!r} is not one of the run's {len(classnames)} classes ({shown})")


def _normalize_stats(transform):
    """(mean, std) of the transform's Normalize step, to show the image the model saw."""
    for step in getattr(transform, "transforms", []):
        if type(step).__name__ == "Normalize":
            return list(step.mean), list(step.std)
    return None


def transport_maps(run_dir: str | Path, image: str | Path, class_name: Optional[str] = None,
                   device: Optional[str] = None) -> dict:
    """The data of the picture: ``image`` (H, W, 3) in [0, 1] as the model saw it, ``plan`` (M, N) for the
    chosen class, ``grid`` (h, w), the class index/name, the predicted class and the probabilities."""
    import torch

    from ..data import load_image
    from ..methods.base import Features
    from ..methods.prompts.plot import PLOT
    from ..runs import load_method, transforms_for

    method, meta, backbone = load_method(Path(run_dir), device=device)
    if not isinstance(method, PLOT):
        raise VLPromptError(f"{run_dir}: a {meta['method']} run; plot-transport needs a PLOT run "
                            f"(`vlprompt train --method plot`)")
    _, tf = transforms_for(meta.get("preprocess", "coop"), backbone)
    x = tf(load_image(image))[None]
    method.eval()
    with torch.no_grad():
        g, loc = backbone.encode_image(x, local=True)
        logits, plans = method.transport(Features(global_=g, local=loc), return_plans=True)
    probs = logits.float().softmax(-1)[0].cpu()
    pred = int(probs.argmax())
    k = pred if class_name is None else _find_class(class_name, method.classnames)
    plan = plans[0, k].float().cpu()  # (M, N)
    m = plan.shape[0]
    side = math.isqrt(m)
    if side * side != m:
        raise VLPromptError(f"the {m} local features do not form a square grid; cannot draw them over the image")
    shown = x[0].float().cpu()
    stats = _normalize_stats(tf)
    if stats is not None:
        mean, std = (torch.tensor(s)[:, None, None] for s in stats)
        shown = shown * std + mean
    return {"image": shown.clamp(0, 1).permute(1, 2, 0).numpy(), "plan": plan, "grid": (side, side),
            "class_index": k, "class_name": method.classnames[k], "predicted": method.classnames[pred],
            "probability": float(probs[k]), "predicted_probability": float(probs[pred]),
            "eps": method.config.ot_eps}


def draw_transport(maps: dict, output: str | Path, image_name: str = "") -> Path:
    """Draw the image and one heatmap per prompt; written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F
    from matplotlib.colors import TwoSlopeNorm

    from .._io import atomic_path

    plan, (h, w), img = maps["plan"], maps["grid"], maps["image"]
    n = plan.shape[1]
    size = img.shape[:2]
    fig, axes = plt.subplots(1, n + 1, figsize=(2.6 * (n + 1) + 0.6, 3.0), layout="constrained")
    axes[0].imshow(img)
    title = f"{maps['class_name']} ({100 * maps['probability']:.1f}%)"
    if maps["predicted"] != maps["class_name"]:
        title += f"\npredicted: {maps['predicted']}"
    axes[0].set_title(title, fontsize=9)
    # each prompt's mass over the grid relative to a uniform spread (1 = uniform; white), one scale for all
    # prompts, stretched to the extremes of this plan (the colour bar gives the values)
    rel = plan / plan.sum(dim=0, keepdim=True) * plan.shape[0]  # (M, N)
    norm = TwoSlopeNorm(vmin=min(float(rel.min()), 0.999), vcenter=1.0, vmax=max(float(rel.max()), 1.001))
    for j in range(n):
        heat = F.interpolate(rel[:, j].reshape(1, 1, h, w), size=size, mode="bilinear", align_corners=False)[0, 0]
        ax = axes[j + 1]
        ax.imshow(img)
        im = ax.imshow(heat.numpy(), cmap="coolwarm", norm=norm, alpha=0.6)
        ax.set_title(f"prompt {j + 1}: peak {float(rel[:, j].max()):.2f}x uniform", fontsize=9)
    cbar = fig.colorbar(im, ax=list(axes[1:]), fraction=0.02, pad=0.01)
    cbar.set_label("mass / uniform share", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"PLOT transport plan{': ' + image_name if image_name else ''}  (grid {h}x{w}, eps {maps['eps']:g})",
                 fontsize=10)
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return output


def cmd_plot_transport(args) -> int:
    maps = transport_maps(args.run, args.image, args.class_name, device=args.device)
    if args.output:
        out = Path(args.output)
    else:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in maps["class_name"])
        out = Path(args.run) / "transport" / f"{Path(args.image).stem}-{safe}.png"
    draw_transport(maps, out, Path(args.image).name)
    print(f"wrote {out} (class {maps['class_name']}; predicted {maps['predicted']} "
          f"{100 * maps['predicted_probability']:.1f}%)")
    return 0
