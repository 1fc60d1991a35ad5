"""Tiny open_clip models with random weights, saved to files and loaded back through ``pretrained=<file>``.

Used by the tests and the benchmarks (no pretrained weights can be downloaded on CI machines). The optional
``sharpen`` makes a freshly initialised model less degenerate: random towers map every image to nearly the same
feature and a ResNet's local features are almost identical, which lets a test of a loss or of a transport plan
pass for the wrong reason.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_CONFIGS = {
    "tiny-vit": {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                                  "head_width": 32}, "text_cfg": TEXT_CFG},
    "tiny-rn": {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
                "text_cfg": TEXT_CFG},
}


def sharpen_(model: torch.nn.Module, seed: int = 0, scale: float = 16.0) -> torch.nn.Module:
    """Make a random model's features differ between inputs (in place): scale the ResNet attention pool's
    query/key projections, widen the token embedding, re-draw BatchNorm statistics, and set the logit scale
    to trained CLIP's 100."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        visual = model.visual
        if hasattr(visual, "attnpool"):
            visual.attnpool.q_proj.weight.mul_(scale)
            visual.attnpool.k_proj.weight.mul_(scale)
            for m in visual.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_var.fill_(0.1)
                    m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
        if hasattr(visual, "conv1"):
            visual.conv1.weight.mul_(4.0)
        model.token_embedding.weight.mul_(8.0)
        model.logit_scale.fill_(math.log(100.0))  # trained CLIP's temperature
    return model


def make_tiny_checkpoint(directory: str | Path, kind: str = "tiny-vit", seed: int = 0,
                         sharpen: bool = False, quick_gelu: bool = False, layers: Optional[int] = None,
                         vision_width: Optional[int] = None) -> tuple[Path, Path]:
    """Write ``<kind>.json`` (an open_clip model config) and ``<kind>.pt`` (random weights) into ``directory``.

    Returns (config path, weights path): ``load_backbone(str(config), str(weights))`` loads it back through
    the same path users take with real checkpoints.
    """
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(TINY_CONFIGS[kind]))
    if quick_gelu:
        cfg["quick_gelu"] = True
    if layers is not None:  # more blocks per tower (deep prompts, LoRA): both towers
        cfg["text_cfg"]["layers"] = layers
        if kind == "tiny-vit":
            cfg["vision_cfg"]["layers"] = layers
    if vision_width is not None:  # a ViT width other than the text width (a swapped width then fails)
        cfg["vision_cfg"]["width"] = vision_width
    name = (f"{kind}{'-qg' if quick_gelu else ''}{'-sharp' if sharpen else ''}{f'-l{layers}' if layers else ''}"
            f"{f'-w{vision_width}' if vision_width else ''}-s{seed}")
    cfg_path = directory / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                           quick_gelu=quick_gelu)
    if sharpen:
        sharpen_(model, seed)
    weights = directory / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return cfg_path, weights
