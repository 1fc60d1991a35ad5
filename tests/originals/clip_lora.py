"""CLIP-LoRA (low-rank adapters in the attention of both towers), written out on open_clip.

Source: MaxZanella/CLIP-LoRA@358f0d7361f59e66c0b2d0b672a3dafb143a759b: ``loralib/layers.py`` (``LoRALayer``
l.29-110, ``LinearLoRA`` l.152-208, ``PlainMultiheadAttentionLoRA`` l.340-530), ``loralib/utils.py``
(``INDEX_POSITIONS_*`` l.10-44, ``apply_lora`` l.107-134, ``save_lora`` l.137-184, ``load_lora`` l.187-236),
``lora.py`` (``evaluate_lora`` l.9-32, ``run_lora`` l.35-148), ``run_utils.py`` (arguments l.17-45), ``main.py``
(l.12-50), ``utils.py`` (l.5-43), ``datasets/*.py`` (templates). Checked once against the original modules on the
same weights (init draws, features in training with dropout from the same RNG state, merged evaluation, the saved
file read by ``load_lora``): see RECIPES_towers.md section 9.

``apply_lora`` replaces the ``nn.MultiheadAttention`` of the chosen blocks of the text and/or vision transformer by
``PlainMultiheadAttentionLoRA``: four ``nn.Linear`` q / k / v / out built from the MHA's ``in_proj_weight`` split
in thirds (rows [0, d), [d, 2d), [2d, 3d)), ``in_proj_bias`` likewise, and ``out_proj``; each projection named in
``--params`` (default q k v) becomes a ``LinearLoRA``: y = x W^T + b + (drop(x) @ (B A)^T) * scaling, with A (r, d),
B (d, r). The attention itself is written out with ``F.scaled_dot_product_attention`` (scale 1/sqrt(head_dim),
the float mask added, no attention dropout). :func:`lora_attention` restates it on open_clip's MHA weights.

Quirks (read from code):
- scaling = alpha / sqrt(r) (``layers.py`` l.41-42; the alpha / r line is commented out): with the defaults r=2,
  alpha=1 that is 0.7071, not LoRA's alpha / r = 0.5.
- Init (``init_lora_param`` l.63-68): A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d), 1/sqrt(d)), B = 0; so at
  init the model is CLIP and only B gets a gradient in the first step. The draws: per replaced MHA, four
  ``nn.Linear(d, d)`` (l.361-364) and, per enabled projection in ``--params`` order, one more ``nn.Linear(d, d)``
  (``LinearLoRA``'s ``super().__init__``, l.163-165) before its A; all overwritten but all consume the global RNG
  (after OpenAI CLIP's construction by ``clip.load``). :func:`init_lora` draws the same sequence.
- Dropout (default 0.25) is on the INPUT of the low-rank branch only, one independent mask per projection (q, k, v
  each draw their own, l.200-204), in training mode only. With ``dropout_rate == 0`` the layer instead adds
  scaling * B A to the weight, runs the linear, then subtracts it back from ``weight.data`` (l.188-193): the frozen
  weight is replaced by a plain tensor and drifts by rounding at every forward (read from code, not run).
- ``.eval()`` merges: ``weight.data += B A * scaling`` (``lora_train`` l.100-110, via ``LinearLoRA.train``);
  ``.train()`` subtracts it back (rounding drift per toggle, read from code). Evaluation uses the merged weights.
- Logit scale: a hard-coded 100 (``main.py`` l.22), not the model's ``logit_scale``.
- Templates: "a photo of a {}." for EVERY dataset (``datasets/*.py``: the per-dataset templates sit inside string
  literals, e.g. ``datasets/eurosat.py`` l.6-9; ImageNet's 7-template list too, ``datasets/imagenet.py``
  l.178-188); only ``dataset.template[0]`` is used to train and evaluate (``lora.py`` l.12, l.94).
- Blocks are chosen by fixed tables written for 12-layer towers (``INDEX_POSITIONS_TEXT`` for the text tower of
  every backbone, ``INDEX_POSITIONS_VISION[backbone]`` for the image tower); a (backbone, position) pair missing
  from the table (ViT-B/32 'top3', ViT-L/14 'bottom' / 'mid' / 'up' / 'top3', any ResNet) raises KeyError;
  ResNet image towers are therefore refused with the default ``--encoder both`` and only 'text' runs on them.
- Training (``run_lora`` l.72-127): AdamW(lr 2e-4, betas (0.9, 0.999), weight_decay 1e-2 decoupled, eps 1e-8)
  over the A/B factors, ``CosineAnnealingLR(T_max = n_iters * shots, eta_min 1e-6)`` stepped EVERY iteration,
  500 * shots iterations of batch 32 (epochs over the loader until the count is reached, the last one cut), fp16
  autocast + GradScaler (skipped steps still step the scheduler). The text features of all classes are recomputed
  at every iteration through the LoRA'd text tower, with gradients. No validation (``VALIDATION = False``, l.37):
  the test accuracy of the last iterate is reported. The 1e2 weight decay of the first release was a typo
  (issue #1, maintainer: corrected to 1e-2).
- Few-shot data: Python ``random.sample`` per class (``datasets/utils.py`` l.210-252, with replacement when a class
  is short: ``repeat=True``), the val shots drawn before the train shots (e.g. ``datasets/dtd.py`` l.24-26), not
  CoOp's seed pickles: the same seed gives other images than the Dassl-based repos.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import mpl_clip as C

REPO = "MaxZanella/CLIP-LoRA@358f0d7361f59e66c0b2d0b672a3dafb143a759b"
TEMPLATE = "a photo of a {}."  # datasets/*.py: the template of every dataset (template[0])
LOGIT_SCALE = 100  # main.py l.22

# run_utils.py l.20-42 (argparse defaults)
DEFAULTS = dict(seed=1, shots=16, backbone="ViT-B/16", lr=2e-4, n_iters=500, batch_size=32, position="all",
                encoder="both", params=("q", "k", "v"), r=2, alpha=1, dropout_rate=0.25, filename="lora_weights")
POSITIONS = ("bottom", "mid", "up", "half-up", "half-bottom", "all", "top3")  # run_utils.py l.32 choices

# loralib/utils.py l.10-44 (transcribed)
INDEX_POSITIONS_TEXT = {
    "top1": [11], "top2": [10, 11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7],
    "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5],
    "all": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}
INDEX_POSITIONS_VISION = {
    "ViT-B/16": {"top": [11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11],
                 "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5],
                 "all": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]},
    "ViT-B/32": {"bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11],
                 "half-bottom": [0, 1, 2, 3, 4, 5], "all": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]},
    "ViT-L/14": {"half-up": [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
                 "half-bottom": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "all": list(range(24))},
}
_SAVED_NAME = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}  # save_lora l.141-160


def scaling(r: int, alpha: float) -> float:
    """``LoRALayer.__init__`` l.40-42: alpha / sqrt(r)."""
    return alpha / math.sqrt(r)


def lora_blocks(model, *, encoder: str = "both", position: str = "all",
                backbone: str = "ViT-B/16") -> list[tuple[str, int]]:
    """``apply_lora`` (``loralib/utils.py`` l.107-134): the (tower, block) pairs that get a LoRA'd attention, in the
    original's order (text blocks, then vision blocks; the order of ``list_lora_layers`` and of the saved
    ``layer_<i>``). Table entries past the model's depth never match (a 2-layer tower with 'up' gets none)."""
    pairs = []
    if encoder in ("text", "both"):
        indices = INDEX_POSITIONS_TEXT[position]
        pairs += [("text", i) for i in range(len(model.transformer.resblocks)) if i in indices]
    if encoder in ("vision", "both"):
        indices = INDEX_POSITIONS_VISION[backbone][position]
        pairs += [("vision", i) for i in range(len(C.check_vit(model).transformer.resblocks)) if i in indices]
    return pairs


def _block(model, tower: str, index: int) -> nn.Module:
    return (model.transformer if tower == "text" else model.visual.transformer).resblocks[index]


def init_lora(model, *, encoder: str = "both", position: str = "all", params: Sequence[str] = ("q", "k", "v"),
              r: int = 2, backbone: str = "ViT-B/16", generator: Optional[torch.Generator] = None
              ) -> "OrderedDict[tuple[str, int], dict[str, dict[str, torch.Tensor]]]":
    """The LoRA factors at init, {(tower, block): {"q"|"k"|"v"|"o": {"A": (r, d), "B": (d, r)}}} in the original's
    layer order. Draws the original's sequence (see the module docstring) from ``generator`` (the global RNG when
    None, like the original): from the RNG state the original has after ``clip.load``, the same A values."""
    factors: "OrderedDict[tuple[str, int], dict]" = OrderedDict()
    for tower, index in lora_blocks(model, encoder=encoder, position=position, backbone=backbone):
        d = _block(model, tower, index).attn.embed_dim
        for _ in range(4):  # the plain q / k / v / out nn.Linear of PlainMultiheadAttentionLoRA (l.361-364)
            C.linear_init(d, d, generator)
        layer = {}
        for item in params:
            if item not in _SAVED_NAME:  # the elif chain of l.399-423 ignores anything else
                continue
            C.linear_init(d, d, generator)  # LinearLoRA's own nn.Linear.__init__ (l.163-165)
            a = nn.init.kaiming_uniform_(torch.empty(r, d), a=math.sqrt(5), generator=generator)
            layer[item] = {"A": a, "B": torch.zeros(d, r)}
        factors[(tower, index)] = layer
    return factors


def _lora_linear(x, weight, bias, factor, scale, training, dropout_rate):
    """``LinearLoRA.forward`` (l.186-208) on a frozen (weight, bias); x (N, L, d_in) batch-first."""
    if factor is None:
        return F.linear(x, weight, bias)
    delta = factor["B"] @ factor["A"]  # merge_BA (l.73-75): (out, in)
    if not training or dropout_rate == 0:
        # eval: the weight merged by .eval() (l.100-110); dropout 0: merge_lora_param's W.detach() + BA * s (l.80-87)
        return F.linear(x, weight + delta * scale, bias)
    out = F.linear(x, weight, bias)
    # its own nn.Dropout on the global RNG (l.176-177, l.200-201); the mask is drawn on the original's
    # sequence-first (L, N, d) layout, so that the same RNG state drops the same entries
    x = F.dropout(x.transpose(0, 1).contiguous(), dropout_rate, training=True).transpose(0, 1)
    return out + torch.matmul(x, delta.transpose(0, 1)) * scale


def lora_attention(attn: nn.MultiheadAttention, x: torch.Tensor, attn_mask: Optional[torch.Tensor], layer: dict,
                   scale: float, *, training: bool = False, dropout_rate: float = 0.25) -> torch.Tensor:
    """``PlainMultiheadAttentionLoRA.forward_module`` (l.425-517) on open_clip's MHA weights, batch-first:
    x (N, L, d) -> (N, L, d). ``layer``: the block's factors {"q"|"k"|"v"|"o": {"A", "B"}} (missing = plain)."""
    d, heads = attn.embed_dim, attn.num_heads
    head_dim = d // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    proj = {"q": (w[:d], b[:d]), "k": (w[d:2 * d], b[d:2 * d]), "v": (w[2 * d:], b[2 * d:])}
    q, k, v = (_lora_linear(x, *proj[name], layer.get(name), scale, training, dropout_rate) for name in "qkv")
    n, length, _ = x.shape
    q, k, v = (t.view(n, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (N, H, L, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    if attn_mask is not None:
        scores = scores + attn_mask
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, length, d)
    return _lora_linear(out, attn.out_proj.weight, attn.out_proj.bias, layer.get("o"), scale, training, dropout_rate)


def _run_block(block, x, mask, layer, scale, training, dropout_rate):
    if layer is None:
        return block(x, attn_mask=mask)
    x = x + block.ls_1(lora_attention(block.attn, block.ln_1(x), mask, layer, scale, training=training,
                                      dropout_rate=dropout_rate))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def text_features(model, tokens: torch.Tensor, factors: dict, scale: float, *, training: bool = False,
                  dropout_rate: float = 0.25) -> torch.Tensor:
    """``clip_model.encode_text`` with the LoRA'd text blocks: tokens (K, 77) -> (K, E), unnormalised."""
    x = model.token_embedding(tokens) + model.positional_embedding
    mask = model.attn_mask[:x.shape[1], :x.shape[1]]
    for i, block in enumerate(model.transformer.resblocks):
        x = _run_block(block, x, mask, factors.get(("text", i)), scale, training, dropout_rate)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def image_features(model, images: torch.Tensor, factors: dict, scale: float, *, training: bool = False,
                   dropout_rate: float = 0.25) -> torch.Tensor:
    """``clip_model.encode_image`` with the LoRA'd vision blocks: (B, 3, H, W) -> (B, E), unnormalised."""
    visual = C.check_vit(model)
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype))
    for i, block in enumerate(visual.transformer.resblocks):
        x = _run_block(block, x, None, factors.get(("vision", i)), scale, training, dropout_rate)
    return visual.ln_post(x[:, 0]) @ visual.proj


def class_texts(classnames: Sequence[str], template: str = TEMPLATE) -> list[str]:
    """``run_lora`` l.94-95 / ``evaluate_lora`` l.12-13: template[0] filled with each name ("_" -> " ")."""
    return [template.format(name.replace("_", " ")) for name in classnames]


def clip_classifier(model, classnames: Sequence[str], templates: Sequence[str] = (TEMPLATE,)) -> torch.Tensor:
    """``utils.py`` l.14-29: per class, normalised text features of every template, averaged, normalised again;
    (E, K) (stacked on dim 1). Used for the zero-shot accuracy and as the fixed text of ``--encoder vision``."""
    columns = []
    with torch.no_grad():
        for name in classnames:
            feats = model.encode_text(C.tokenize([t.format(name.replace("_", " ")) for t in templates]))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            mean = feats.mean(dim=0)
            columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


def logits(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``run_lora`` l.110-112: 100 * norm(img) @ norm(text).T (the text is normalised where it is made,
    l.101), (B, K)."""
    image_feats = image_feats / image_feats.norm(dim=-1, keepdim=True)
    text_feats = text_feats / text_feats.norm(dim=-1, keepdim=True)
    return LOGIT_SCALE * image_feats @ text_feats.t()


def lora_parameters(factors: dict) -> list[torch.Tensor]:
    """``get_lora_parameters`` order (``model.named_parameters()``: OpenAI's CLIP registers ``visual`` before
    ``transformer``, so vision blocks first; per attention q_proj, k_proj, v_proj, proj; A before B)."""
    out = []
    for tower in ("vision", "text"):
        for (t, _), layer in factors.items():
            if t == tower:
                out += [layer[p][m] for p in ("q", "k", "v", "o") if p in layer for m in ("A", "B")]
    return out


def iteration_lr(iteration: int, total_iters: int, lr: float = 2e-4, eta_min: float = 1e-6) -> float:
    """The lr of 0-based ``iteration`` (``CosineAnnealingLR(T_max=total_iters, eta_min=1e-6)`` stepped after each
    optimizer step, ``lora.py`` l.76, l.122), closed form; torch's recursive form agrees to rounding."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * iteration / total_iters)) / 2


def train(model, factors: dict, epoch_batches: Callable[[], Iterable], classnames: Sequence[str], *, shots: int,
          n_iters: int = 500, lr: float = 2e-4, r: int = 2, alpha: float = 1, dropout_rate: float = 0.25,
          encoder: str = "both", template: str = TEMPLATE) -> dict:
    """``run_lora``'s training loop (l.72-127) in fp32 (no autocast / GradScaler). ``epoch_batches()`` returns one
    epoch's (images, labels) batches (the shuffled DataLoader, batch 32, drop_last False); the factors' tensors are
    trained in place. Dropout masks come from the global RNG in the original's call order (text tower before the
    image tower; per block q, k, v, o). Returns {"losses": [...], "lrs": [...]} per iteration."""
    params = lora_parameters(factors)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, weight_decay=1e-2, betas=(0.9, 0.999), lr=lr)
    total_iters = n_iters * shots
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_iters, eta_min=1e-6)
    scale, tokens = scaling(r, alpha), C.tokenize(class_texts(classnames, template))
    fixed_text = clip_classifier(model, classnames, (template,)).t() if encoder == "vision" else None
    losses, lrs, count = [], [], 0
    while count < total_iters:
        for images, labels in epoch_batches():
            if encoder in ("text", "both"):
                text = text_features(model, tokens, factors, scale, training=True, dropout_rate=dropout_rate)
                text = text / text.norm(dim=-1, keepdim=True)
            else:
                text = fixed_text
            if encoder in ("vision", "both"):
                image = image_features(model, images, factors, scale, training=True, dropout_rate=dropout_rate)
            else:
                with torch.no_grad():
                    image = model.encode_image(images)
            loss = F.cross_entropy(logits(image, text), labels)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            count += 1
            if count == total_iters:
                break
    return {"losses": losses, "lrs": lrs}


def evaluate(model, factors: dict, images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], *,
             r: int = 2, alpha: float = 1, template: str = TEMPLATE) -> float:
    """``evaluate_lora`` (l.9-32): eval mode (merged weights), template[0] text, top-1 of the cosine; accuracy in %."""
    scale = scaling(r, alpha)
    with torch.no_grad():
        text = text_features(model, C.tokenize(class_texts(classnames, template)), factors, scale)
        image = image_features(model, images, factors, scale) if C.is_vit(model) else model.encode_image(images)
        cosine = logits(image, text) / LOGIT_SCALE
    return 100.0 * float((cosine.argmax(dim=1) == labels).float().sum()) / labels.shape[0]


def write_original_checkpoint(save_path, factors: dict, *, backbone: str = "ViT-B/16", dataset: str = "dtd",
                              shots: int = 16, seed: int = 1, r: int = 2, alpha: float = 1, encoder: str = "both",
                              params: Sequence[str] = ("q", "k", "v"), position: str = "all",
                              filename: str = "lora_weights") -> Path:
    """``save_lora`` (``loralib/utils.py`` l.137-184): ``torch.save({"weights": {"layer_<i>": {"q_proj" | "k_proj" |
    "v_proj" | "proj": {"w_lora_A": (r, d), "w_lora_B": (d, r)}}}, "metadata": {"r", "alpha", "encoder", "params",
    "position"}})`` to ``<save_path>/<backbone without "/" and "-", lower case>/<dataset>/<shots>shots/seed<seed>/
    <filename>.pt`` (e.g. ``vitb16/dtd/16shots/seed1/lora_weights.pt``). Layer i is the i-th LoRA'd attention in
    ``list_lora_layers`` order (text blocks first). The original saves the tensors on the GPU (fp32).

    ``load_lora`` (l.187-236) refuses a file whose metadata r / alpha / encoder / params (list, order-sensitive) /
    position differ from the command line (ValueError), then copies layer i's factors into the i-th LoRA'd
    attention; nothing else (no backbone weight) is saved."""
    weights = {}
    for i, layer in enumerate(factors.values()):
        weights[f"layer_{i}"] = {_SAVED_NAME[p]: {"w_lora_A": layer[p]["A"].detach().clone(),
                                                  "w_lora_B": layer[p]["B"].detach().clone()}
                                 for p in ("q", "k", "v", "o") if p in params}
    metadata = {"r": r, "alpha": alpha, "encoder": encoder, "params": list(params), "position": position}
    tag = backbone.replace("/", "").replace("-", "").lower()
    folder = Path(save_path) / tag / dataset / f"{shots}shots" / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{filename}.pt"
    torch.save({"weights": weights, "metadata": metadata}, path)
    return path
