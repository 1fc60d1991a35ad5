"""Deployable heads of finished runs: ``vlprompt export`` (:func:`export_run`: ``head.safetensors`` + ``head.json``),
``vlprompt predict`` (:func:`predict_images`), and ``vlprompt interpret`` (:func:`interpret_run`: the nearest
words to each learned vector)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._io import atomic_save_safetensors, atomic_write_json
from ..backbone import Backbone, load_backbone
from ..engine.sources import features_of_images
from ..errors import CheckpointError, ConfigError, VLPromptError
from ..methods import Method, build_method, method_class
from ..methods.base import cosine_logits
from .assembly import load_method, recorded_pixels, transforms_for


def export_run(run_dir: str | Path, output: Optional[str | Path] = None, device: Optional[str] = "cpu") -> Path:
    """Write a deployable head: ``head.safetensors`` + ``head.json`` (``kind`` from the method: ``linear``
    class text features, ``affine`` weight and bias, ``prompt`` the learned tensors, or the method's own)."""
    run_dir = Path(run_dir)
    out = Path(output) if output else run_dir / "export"
    method, meta, backbone = load_method(run_dir, device=device)
    head = method.export_head()
    if head is None:
        tensors, info = method.learned_state(), {"kind": "prompt"}
    else:
        tensors, info = head
    info = {**info, "method": meta["method"], "config": meta["config"], "classnames": list(method.classnames),
            "template": meta.get("template"), "backbone": meta["backbone"], "pretrained": meta["pretrained"],
            "preprocess": meta.get("preprocess", "coop"), "image_size": backbone.image_size,
            "pixels": meta.get("pixels") or backbone.pixel_statistics, "source_run": str(run_dir), "vlprompt_head": 1}
    atomic_save_safetensors(out / "head.safetensors", {k: v.detach().cpu() for k, v in tensors.items()})
    atomic_write_json(out / "head.json", info)
    return out


def read_head(head_dir: str | Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    head_dir = Path(head_dir)
    try:
        info = json.loads((head_dir / "head.json").read_text())
        tensors = load_file(str(head_dir / "head.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{head_dir}: not an exported head ({e}); create one with `vlprompt export RUN`") from e
    return info, tensors


def head_logits(info: dict, tensors: dict, backbone: Backbone, x: torch.Tensor, method: Optional[Method] = None):
    """Logits (B, K) of an exported head on preprocessed images (B, 3, H, W)."""
    kind = info["kind"]
    if kind == "linear":
        return cosine_logits(backbone.encode_image(x), tensors["text_features"].to(backbone.device),
                             float(info["logit_scale"])).cpu()
    if kind == "affine":
        feats = backbone.encode_image(x).float()
        return (feats @ tensors["weight"].to(feats.device).t() + tensors["bias"].to(feats.device)).cpu()
    if kind == "prompt":
        return method(features_of_images(method, backbone, x.to(backbone.device))).float().cpu()
    return method_class(info["method"]).head_logits(tensors, info, backbone, x).cpu()


def predict_images(head_dir: str | Path, images: Sequence[str], topk: int = 5, device: Optional[str] = None,
                   batch_size: int = 32) -> list[dict]:
    """Top-k classes of image files with an exported head (and a value, for heads that predict one)."""
    from ..data import load_image

    if topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {topk}")
    info, tensors = read_head(head_dir)
    backbone = load_backbone(info["backbone"], info["pretrained"], device, pixels=recorded_pixels(info))
    _, tf = transforms_for(info.get("preprocess", "coop"), backbone)
    method = None
    if info["kind"] == "prompt":
        cls = method_class(info["method"])
        method = build_method(info["method"], cls.config_for_loading(dict(info["config"])), backbone,
                              info["classnames"], template=info.get("template"))
        method.load_learned_state({k: v.to(backbone.device) for k, v in tensors.items()})
        method.eval()
    cls = method_class(info["method"])
    classnames = info["classnames"]
    out = []
    for i in range(0, len(images), batch_size):
        paths = list(images[i:i + batch_size])
        x = torch.stack([tf(load_image(p)) for p in paths])
        with torch.no_grad():
            logits = head_logits(info, tensors, backbone, x, method)
        probs = logits.softmax(-1)
        k = min(topk, probs.shape[1])
        p, idx = probs.topk(k, dim=-1)
        values = cls.head_values(logits, tensors, info)
        for n, (path, pi, ii) in enumerate(zip(paths, p.tolist(), idx.tolist())):
            out.append({"image": path, "top": [{"class": classnames[j], "probability": q} for j, q in zip(ii, pi)]})
            if values is not None:
                out[-1]["value"] = float(values[n])
    return out


def interpret_run(run_dir: str | Path, topk: int = 5, device: Optional[str] = "cpu") -> list[dict]:
    """Nearest vocabulary words (Euclidean distance in the token-embedding space) to each learned vector the
    method declares (:meth:`Method.interpretable_vectors`), as in CoOp's paper."""
    method, meta, backbone = load_method(Path(run_dir), device=device)
    vectors = method.interpretable_vectors()
    if not vectors:
        raise VLPromptError(f"{meta['method']} has no learned vectors in the token-embedding space to interpret")
    table = backbone.text._parts["token_embedding"].weight.detach().float()
    decode = backbone.tokenizer.decode
    rows = []
    for label, vecs in vectors:
        vals, ids = torch.cdist(vecs.detach().float().reshape(-1, vecs.shape[-1]), table).topk(topk, largest=False)
        for pos, (dv, iv) in enumerate(zip(vals.tolist(), ids.tolist())):
            rows.append({**label, "position": pos, "words": [decode([t]).strip() for t in iv], "distances": dv})
    return rows
