"""Tip-Adapter and Tip-Adapter-F, written out from gaopengcuhk/Tip-Adapter@d0e2d6f8c5feb8b6ce937b757810761f7155d4d5
(2023-05-10; no licence file: read, never copied). Files cited: ``main.py`` (the 10 CoOp datasets),
``main_imagenet.py``, ``utils.py``, ``datasets/*.py``, ``configs/*.yaml``, ``clip/model.py``.

Everything is restated in torch on open_clip modules (fp32; open_clip's text transformer is batch-first, so
the original's permutes disappear). The original runs CLIP in fp16 on CUDA (``clip.load`` keeps the fp16
weights on a GPU): its features, cache keys, values, the adapter weight and AdamW's state are fp16. Those are
precision artefacts of the original, not part of the method; they are documented where they act, and
nothing here reproduces them.

Shapes: D the embedding width, C classes, N = C x shots training images (the cache size NK), B a batch.
The original's layout is kept: ``clip_weights`` (D, C) and ``cache_keys`` (D, N) are column-major in the
class / cache index; ``cache_values`` (N, C); the adapter weight of Tip-Adapter-F (N, D) = ``cache_keys.t()``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

REPO = "gaopengcuhk/Tip-Adapter"
COMMIT = "d0e2d6f8c5feb8b6ce937b757810761f7155d4d5"

# -- data: transcribed ------------------------------------------------------------------------------------
#: Each dataset file's single template (``datasets/<file>.py:<line>``), keyed by the config's ``dataset``.
TEMPLATES: dict[str, list[str]] = {
    "caltech101": ["a photo of a {}."],                          # datasets/caltech101.py:7
    "dtd": ["{} texture."],                                      # datasets/dtd.py:8
    "eurosat": ["a centered satellite photo of {}."],            # datasets/eurosat.py:7
    "fgvc": ["a photo of a {}, a type of aircraft."],            # datasets/fgvc.py:6
    "food101": ["a photo of {}, a type of food."],               # datasets/food101.py:7
    "oxford_flowers": ["a photo of a {}, a type of flower."],    # datasets/oxford_flowers.py:10
    "oxford_pets": ["a photo of a {}, a type of pet."],          # datasets/oxford_pets.py:11
    "stanford_cars": ["a photo of a {}."],                       # datasets/stanford_cars.py:8
    "sun397": ["a photo of a {}."],                              # datasets/sun397.py:8
    "ucf101": ["a photo of a person doing {}."],                 # datasets/ucf101.py:8
    # datasets/imagenet.py:177-183 (CoOp's 7-template ensemble, IMAGENET_TEMPLATES_SELECT)
    "imagenet": ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                 "a {} in a video game.", "art of the {}.", "a photo of the small {}."],
}


def _config(scale, alpha, epochs=20):
    # configs/<dataset>.yaml: search_scale l.17, search_step l.18, init_beta l.20, init_alpha l.21, shots l.26,
    # backbone l.27, lr l.29, augment_epoch l.30, train_epoch l.31 (load_cache / load_pre_feat False, search_hp True)
    return {"search_scale": scale, "search_step": [200, 20], "init_beta": 1, "init_alpha": alpha, "shots": 16,
            "backbone": "RN50", "lr": 0.001, "augment_epoch": 10, "train_epoch": epochs}


#: ``configs/<dataset>.yaml`` (search_scale = [beta scale, alpha scale], search_step = [beta steps, alpha steps]).
CONFIGS: dict[str, dict] = {
    "caltech101": _config([12, 5], 3),
    "dtd": _config([13, 13], 2),
    "eurosat": _config([12, 10], 2, epochs=100),
    "fgvc": _config([30, 30], 5),
    "food101": _config([10, 10], 1.17),
    "imagenet": _config([7, 3], 1.17),
    "oxford_flowers": _config([50, 50], 10),
    "oxford_pets": _config([7, 3], 1.17),
    "stanford_cars": _config([20, 10], 3),
    "sun397": _config([12, 10], 1.17),
    "ucf101": _config([7, 3], 3),
}

#: main.py:173-178 (and datasets/imagenet.py:195-200): the augmentation of the cache and of Tip-Adapter-F.
TRAIN_CROP_SCALE = (0.5, 1.0)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CACHE_BATCH = 256      # main.py:180 (shuffle=False)
TRAIN_BATCH = 256      # main.py:181 (shuffle=True, drop_last=False: datasets/utils.py:373)
EVAL_BATCH = 64        # main.py:170-171 (val / test with CLIP's own preprocess)
SEED = 1               # main.py:164-165: random.seed(1); torch.manual_seed(1) -- one seed for everything
CLIP_LOGIT_SCALE = 100.0  # main.py:32 etc.: a literal 100, not the model's logit_scale


# -- CLIP, restated ---------------------------------------------------------------------------------------
_tokenizer = open_clip.get_tokenizer("RN50")  # the same BPE and 77-token context as clip.tokenize


def tokenize(texts: list[str]) -> torch.Tensor:
    """``clip.tokenize(texts)`` (clip/clip.py): (T, 77) int64. clip.tokenize raises on a text longer than the
    context (truncate=False) where open_clip's tokenizer silently truncates: refused here as there."""
    for text in texts:
        if len(_tokenizer.encode(text)) + 2 > _tokenizer.context_length:
            raise RuntimeError(f"Input {text} is too long for context length {_tokenizer.context_length}")
    return _tokenizer(texts)


def encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text (clip/model.py:339-352): token embeddings + positions, causal transformer, ln_final, the
    EOT (largest token id) position through the text projection. (T, 77) -> (T, D), not normalised."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


def encode_image(model, images: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_image (clip/model.py:336-337): (B, 3, H, W) -> (B, D), not normalised."""
    return model.visual(images)


# -- Tip-Adapter ------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_classifier(model, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """utils.py:18-35: per class, ``_`` -> space in the name, every template encoded, each embedding
    L2-normalised, the mean over templates, renormalised. Returns ``clip_weights`` (D, C) (classes in columns)."""
    weights = []
    for classname in classnames:
        classname = classname.replace("_", " ")
        emb = encode_text(model, tokenize([t.format(classname) for t in templates]))
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights, dim=1)


@torch.no_grad()
def pre_load_features(model, images: torch.Tensor) -> torch.Tensor:
    """utils.py:74-96 (val / test features): encode_image, L2-normalised. (B, 3, H, W) -> (B, D)."""
    features = encode_image(model, images)
    return features / features.norm(dim=-1, keepdim=True)


def build_cache_keys(view_features: torch.Tensor) -> torch.Tensor:
    """utils.py:44-61: ``view_features`` (E, N, D) are the UNnormalised image features of the E = augment_epoch
    (10) augmented passes over the K-shot training set, in the loader's order (shuffle=False: the few-shot list
    order). The keys are the mean over passes, THEN L2-normalised per image, transposed: (D, N).
    (The original averages fp16 features; a pass is not normalised before the mean.)"""
    keys = view_features.mean(dim=0)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    return keys.permute(1, 0)


def build_cache_values(labels: torch.Tensor) -> torch.Tensor:
    """utils.py:62: ``F.one_hot(labels)`` (N,) -> (N, C) with C = max label + 1 (no num_classes given: a
    missing last class would shrink C), as fp32 (the original: ``.half()``)."""
    return F.one_hot(labels).float()


@torch.no_grad()
def build_cache_model(model, views: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """utils.py:38-71 from images: ``views`` (E, N, 3, H, W), the E augmented passes (RandomResizedCrop(224,
    scale=(0.5, 1), bicubic) + flip, main.py:173-178; a pass draws new augmentations) over the N training
    images in their list order; ``labels`` (N,). Returns (cache_keys (D, N), cache_values (N, C))."""
    feats = torch.stack([encode_image(model, v) for v in views])
    return build_cache_keys(feats), build_cache_values(labels)


def affinity(features: torch.Tensor, cache_keys: torch.Tensor | None = None,
             adapter_weight: torch.Tensor | None = None) -> torch.Tensor:
    """main.py:39 (``f K``) or main.py:91 (``adapter(f)`` = f adapter^T, the learned keys (N, D) of Tip-Adapter-F):
    (B, D) -> (B, N), the cosine of each image to each cached training image. Give exactly one of the two."""
    if (cache_keys is None) == (adapter_weight is None):
        raise ValueError("give exactly one of cache_keys and adapter_weight")
    return features @ cache_keys if adapter_weight is None else features @ adapter_weight.t()


def tip_logits(features: torch.Tensor, clip_weights: torch.Tensor, cache_values: torch.Tensor, alpha: float,
               beta: float, cache_keys: torch.Tensor | None = None,
               adapter_weight: torch.Tensor | None = None) -> torch.Tensor:
    """main.py:32-42 (Tip-Adapter) and main.py:91-94 (Tip-Adapter-F, ``adapter_weight`` (N, D) the learned keys):
    ``100 f W + alpha * exp(-(beta - beta * A)) L`` with A = f K (or f adapter^T); the cache term is computed as
    the original writes it, ``(-1) * (beta - beta * A)``. (B, D) -> (B, C)."""
    aff = affinity(features, cache_keys, adapter_weight)
    cache_logits = ((-1) * (beta - beta * aff)).exp() @ cache_values
    clip_logits = CLIP_LOGIT_SCALE * features @ clip_weights
    return clip_logits + cache_logits * alpha


def cls_acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """utils.py:10-15: top-1 accuracy in percent, ``100 * correct / N`` as a Python float. The original takes
    ``topk(1)``; its tie-break is implementation-defined (CUDA), argmax here takes the first maximum."""
    correct = float((logits.argmax(dim=1) == labels).sum())
    return 100 * correct / labels.shape[0]


def search_grid(search_scale, search_step) -> tuple[list[float], list[float]]:
    """utils.py:103-104: beta_i = i (scale_b - 0.1) / steps_b + 0.1 for i in range(steps_b), the same for alpha.
    The index stops at steps - 1: the scale itself is never tried (beta < 7 for ImageNet's [7, 3])."""
    betas = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])]
    alphas = [i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])]
    return betas, alphas


def search_hp(cache_keys: torch.Tensor | None, cache_values: torch.Tensor, features: torch.Tensor,
              labels: torch.Tensor, clip_weights: torch.Tensor, search_scale, search_step,
              adapter_weight: torch.Tensor | None = None) -> tuple[float, float, float]:
    """utils.py:99-129: beta in the outer loop, alpha inner; the first (beta, alpha) STRICTLY better than the
    best so far wins, starting from (0, 0) at 0 % (so when no setting reaches above 0 % it returns (0, 0):
    beta 0 and alpha 0, i.e. the zero-shot classifier). With ``adapter_weight`` the affinity is the adapter's
    (Tip-Adapter-F; ``cache_keys`` is then unused). ``features`` are the split searched: the full val split in
    main.py (main.py:47, 132), the TEST set in main_imagenet.py (l.43, 110). Returns (beta, alpha, best_acc)."""
    betas, alphas = search_grid(search_scale, search_step)
    # the original recomputes these (and the cache term) for every pair; computing them once changes no value
    aff = affinity(features, cache_keys, adapter_weight)
    clip_logits = CLIP_LOGIT_SCALE * features @ clip_weights
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in betas:
        cache_logits = ((-1) * (beta - beta * aff)).exp() @ cache_values
        for alpha in alphas:
            acc = cls_acc(clip_logits + cache_logits * alpha, labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha, best_acc


def run_tip_adapter(cache_keys, cache_values, search_features, search_labels, test_features, test_labels,
                    clip_weights, init_alpha, init_beta, search_scale, search_step) -> dict:
    """main.py:27-63 (training-free Tip-Adapter): zero-shot and init-(alpha, beta) accuracies on the searched
    split, the grid search on it, then the test accuracy with the searched pair (the reported number). For
    ImageNet (main_imagenet.py:25-43) pass the test set as the searched split: the reported number there is
    the search's best TEST accuracy."""
    out = {"zero_shot_search_acc": cls_acc(CLIP_LOGIT_SCALE * search_features @ clip_weights, search_labels),
           "init_search_acc": cls_acc(tip_logits(search_features, clip_weights, cache_values, init_alpha, init_beta,
                                                 cache_keys=cache_keys), search_labels)}
    beta, alpha, acc = search_hp(cache_keys, cache_values, search_features, search_labels, clip_weights,
                                 search_scale, search_step)
    out.update(beta=beta, alpha=alpha, search_acc=acc,
               zero_shot_test_acc=cls_acc(CLIP_LOGIT_SCALE * test_features @ clip_weights, test_labels),
               test_acc=cls_acc(tip_logits(test_features, clip_weights, cache_values, alpha, beta,
                                           cache_keys=cache_keys), test_labels))
    return out


# -- Tip-Adapter-F ----------------------------------------------------------------------------------------
def tip_adapter_f_loss(features: torch.Tensor, labels: torch.Tensor, adapter_weight: torch.Tensor,
                       clip_weights: torch.Tensor, cache_values: torch.Tensor, alpha: float,
                       beta: float) -> torch.Tensor:
    """main.py:91-96: the training loss of one batch, CE (mean) of :func:`tip_logits` with the learned keys
    ``adapter_weight`` (N, D) and the INITIAL alpha / beta; features (B, D) L2-normalised, labels (B,)."""
    logits = tip_logits(features, clip_weights, cache_values, alpha, beta, adapter_weight=adapter_weight)
    return F.cross_entropy(logits, labels)


def epoch_batches(n: int, batch_size: int = TRAIN_BATCH, order: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The index batches of one epoch of ``DataLoader(shuffle=True, batch_size=256, drop_last=False)``
    (datasets/utils.py:368-375): a permutation (``order``, or drawn from ``generator``) cut into
    ceil(n / 256) batches, the last one smaller."""
    if order is None:
        order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def tip_adapter_f_train(cache_keys: torch.Tensor, cache_values: torch.Tensor, clip_weights: torch.Tensor,
                        train_features: torch.Tensor, train_labels: torch.Tensor, select_features: torch.Tensor,
                        select_labels: torch.Tensor, init_alpha: float, init_beta: float, lr: float = 0.001,
                        epochs: int = 20, batch_size: int = TRAIN_BATCH, orders: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict:
    """main.py:66-127, the fine-tuning of the cache keys.

    - The adapter is ``Linear(D, N, bias=False)`` whose weight is replaced by ``Parameter(cache_keys.t())`` (l.69-70):
      the keys are learned, the values stay one-hot. (Quirk: that Parameter is a VIEW of ``cache_keys``, so the
      optimizer's in-place updates also rewrite the caller's keys; main.py never reads the keys again after
      that, so it changes no number. Here the weight is a copy and ``cache_keys`` is left alone.)
    - AdamW(lr, eps=1e-4, betas (0.9, 0.999), weight_decay 0.01 = torch's default, decoupled) (l.72); the eps
      1e-4 is there because the original's parameter and state are fp16.
    - CosineAnnealingLR(T_max = epochs * len(loader), eta_min 0) stepped after EVERY iteration (l.73, 106).
    - Each iteration: CE(tip_logits with the INITIAL alpha / beta, mean over the batch) (l.91-96).
    - ``train_features``: (epochs, N, D) the L2-normalised features of each epoch's augmented view of the N
      training images (list order; the original re-augments every epoch: l.85-89) or (N, D) for the same
      features every epoch; ``orders`` (epochs, N) the shuffles (DataLoader shuffle=True), else drawn from
      ``generator``; batches of 256, the last one smaller (drop_last=False).
    - After each epoch the adapter is evaluated on ``select_features`` with the initial alpha / beta and kept
      if STRICTLY better (``acc > best_acc``, best_acc starting at 0.0; l.112-124). The ORIGINAL PASSES THE
      TEST SET here (issue #11); pass the val split for a rectified selection. If no epoch beats 0 % nothing
      is saved and the original's ``torch.load`` reads a stale file or fails (l.126).

    Returns {"weight": last (N, D), "best_weight", "best_epoch", "best_acc", "epoch_accs", "losses" (per
    iteration), "lrs" (per iteration)}."""
    weight = torch.nn.Parameter(cache_keys.t().detach().clone())
    optimizer = torch.optim.AdamW([weight], lr=lr, eps=1e-4)
    n = train_labels.shape[0]
    n_batches = math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * n_batches)
    best_acc, best_epoch, best_weight = 0.0, 0, None
    losses, lrs, epoch_accs = [], [], []
    for epoch in range(epochs):
        feats = train_features[epoch] if train_features.dim() == 3 else train_features
        order = None if orders is None else orders[epoch]
        for idx in epoch_batches(n, batch_size, order, generator):
            loss = tip_adapter_f_loss(feats[idx], train_labels[idx], weight, clip_weights, cache_values, init_alpha,
                                      init_beta)
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        with torch.no_grad():
            acc = cls_acc(tip_logits(select_features, clip_weights, cache_values, init_alpha, init_beta,
                                     adapter_weight=weight), select_labels)
        epoch_accs.append(acc)
        if acc > best_acc:
            best_acc, best_epoch, best_weight = acc, epoch, weight.detach().clone()
    return {"weight": weight.detach().clone(), "best_weight": best_weight, "best_epoch": best_epoch,
            "best_acc": best_acc, "epoch_accs": epoch_accs, "losses": losses, "lrs": lrs}


def run_tip_adapter_f(cache_keys, cache_values, clip_weights, train_features, train_labels, select_features,
                      select_labels, search_features, search_labels, test_features, test_labels, init_alpha,
                      init_beta, search_scale, search_step, lr=0.001, epochs=20, orders=None, generator=None) -> dict:
    """main.py:66-141: train (epoch kept by ``select_*``: the test set in the original), reload the kept
    adapter, search (beta, alpha) on ``search_*`` (the full val split; the test set in main_imagenet.py:110)
    with it, evaluate on test with the searched pair. The original PRINTS ``max(best_acc, acc)`` (l.141): the
    larger of the best per-epoch accuracy on the selection split and the final test accuracy -- a test number
    only because its selection split is the test set; ``printed_acc`` reproduces it."""
    trained = tip_adapter_f_train(cache_keys, cache_values, clip_weights, train_features, train_labels,
                                  select_features, select_labels, init_alpha, init_beta, lr=lr, epochs=epochs,
                                  orders=orders, generator=generator)
    best = trained["best_weight"]
    if best is None:
        raise RuntimeError("no epoch scored above 0 %: the original would torch.load a missing or stale best_F file")
    beta, alpha, search_acc = search_hp(None, cache_values, search_features, search_labels, clip_weights,
                                        search_scale, search_step, adapter_weight=best)
    test_acc = cls_acc(tip_logits(test_features, clip_weights, cache_values, alpha, beta, adapter_weight=best),
                       test_labels)
    return {**trained, "beta": beta, "alpha": alpha, "search_acc": search_acc, "test_acc": test_acc,
            "printed_acc": max(trained["best_acc"], test_acc)}


# -- the files the original writes ------------------------------------------------------------------------
def write_original_checkpoint(directory: str | os.PathLike, dataset: str, shots: int, cache_keys: torch.Tensor,
                              cache_values: torch.Tensor, best_adapter_weight: torch.Tensor | None = None,
                              split_features: dict | None = None, dtype: torch.dtype = torch.float16) -> dict:
    """What a run writes under ``<cwd>/caches/<dataset>/`` (main.py:152-154), each file one ``torch.save``:

    - ``keys_<shots>shots.pt``: cache_keys (D, N), and ``values_<shots>shots.pt``: cache_values (N, C), both fp16
      (utils.py:64-65; read back when ``load_cache: True``, l.68-69);
    - ``best_F_<shots>shots.pt``: ``torch.save(adapter.weight)`` (main.py:124): a Parameter (N, D),
      requires_grad True, that is the TRANSPOSED VIEW of a (D, N) storage (it was ``Parameter(cache_keys.t())``),
      rewritten each time the selection accuracy improves -- the best-on-test epoch's keys;
    - ``<split>_f.pt`` (B, D) L2-normalised features and ``<split>_l.pt`` (B,) int64 labels for ``val`` and
      ``test`` (utils.py:89-90; ImageNet: test only), given as ``split_features = {split: (features, labels)}``.

    Nothing else is saved: not the init / searched (alpha, beta), which only appear in the printed log, nor
    clip_weights (recomputed from the templates each run). The original's tensors are CUDA tensors (they load
    with ``map_location``); these are written on the CPU. Returns {name: path}."""
    folder = Path(directory) / "caches" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"keys": folder / f"keys_{shots}shots.pt", "values": folder / f"values_{shots}shots.pt"}
    torch.save(cache_keys.detach().to(dtype), paths["keys"])
    torch.save(cache_values.detach().to(dtype), paths["values"])
    if best_adapter_weight is not None:
        storage = best_adapter_weight.detach().to(dtype).t().contiguous()  # (D, N), as the keys are laid out
        paths["best_F"] = folder / f"best_F_{shots}shots.pt"
        torch.save(torch.nn.Parameter(storage.t()), paths["best_F"])
    for split, (features, labels) in (split_features or {}).items():
        paths[f"{split}_f"] = folder / f"{split}_f.pt"
        paths[f"{split}_l"] = folder / f"{split}_l.pt"
        torch.save(features.detach().to(dtype), paths[f"{split}_f"])
        torch.save(labels.detach().long(), paths[f"{split}_l"])
    return paths
