"""Runs: data + backbone + method + engine, wired together, with a run directory.

A run directory holds ``config.yaml`` (the resolved configuration), ``split.json`` (the exact samples used),
``log.txt``, ``metrics.jsonl`` and ``training_curve.png`` (per epoch), ``checkpoints/``, the learned tensors
``prompt.safetensors`` with ``method.json`` (everything needed to rebuild the method on any class list) and
``results.json``. The CLI only turns arguments into a :class:`RunConfig` and calls these functions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import yaml

from ._io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from .backbone import Backbone, load_backbone
from .cache import FeatureCache
from .data import (DatasetSplits, ImageDataset, build_test_transform, build_train_transform, check_samples,
                   few_shot_split, load_dataset, load_split, save_split, subsample_classes, transform_id)
from .engine.schedule import default_epochs
from .engine.trainer import (CachedViews, OnlineImages, Trainer, TrainConfig, TrainState, predict_logits,
                             seed_everything)
from .errors import CheckpointError, DataError, VLPromptError
from .methods import Method, build_method, get_method

log = logging.getLogger("vlprompt")


def default_cache_dir() -> str:
    return os.environ.get("VLPROMPT_CACHE", str(Path.home() / ".cache" / "vlprompt" / "features"))


@dataclass
class DataConfig:
    dataset: str
    root: str
    options: dict = field(default_factory=dict)
    shots: int = 16  # 0: all training images
    seed: int = 1
    classes: str = "all"  # all | base | new
    allow_fewer: bool = False
    on_bad_image: str = "error"  # error | skip


@dataclass
class RunConfig:
    method: str
    backbone: str
    pretrained: Optional[str]
    data: DataConfig
    method_options: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    device: Optional[str] = None
    precision: str = "amp"
    cache_dir: str = field(default_factory=default_cache_dir)
    preprocess: str = "coop"  # coop | model (the backbone's own eval transform)
    tensorboard: bool = False  # also log the per-epoch records to RUN/tensorboard

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["data"] = DataConfig(**d["data"])
        d["train"] = TrainConfig(**d["train"])
        return cls(**d)

    def identity_hash(self) -> str:
        """What decides the numbers (not where the cache lives, nor the device)."""
        d = self.to_dict()
        for k in ("cache_dir", "device", "tensorboard"):
            d.pop(k)
        d["train"].pop("checkpoint_every", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- logging ----------------------------------------------------------------------------------------
def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


# -- pieces -----------------------------------------------------------------------------------------
def open_backbone(cfg: RunConfig) -> Backbone:
    return load_backbone(cfg.backbone, cfg.pretrained, cfg.device, precision=cfg.precision)


def prepare_data(data: DataConfig, run_dir: Optional[Path] = None,
                 needs: Sequence[str] = ("train", "val", "test")) -> DatasetSplits:
    """The dataset with the protocol applied (few-shot sampling, then the base / new classes); saved to / reused
    from ``run_dir/split.json`` so that a resumed or re-evaluated run sees exactly the same samples. The images of
    the splits in ``needs`` are checked up front (the others are dropped), so a bad file stops the run at once."""
    split_file = run_dir / "split.json" if run_dir is not None else None
    if split_file is not None and split_file.exists():
        return load_split(split_file)
    splits = load_dataset(data.dataset, data.root, **data.options)
    if data.shots and data.shots > 0:  # CoOp samples the shots first, then keeps the base or new classes
        splits = few_shot_split(splits, data.shots, data.seed, allow_fewer=data.allow_fewer)
    if data.classes != "all":
        splits = subsample_classes(splits, data.classes)
    splits = splits.with_splits(**{name: [] for name in ("train", "val", "test") if name not in needs})
    for name in needs:
        samples = getattr(splits, name)
        if samples:
            ok, problems = check_samples(samples, mode=data.on_bad_image)
            if problems:
                log.warning("%s split: skipped %d unreadable image(s), e.g. %s", name, len(problems), problems[0])
                splits = splits.with_splits(**{name: ok})
    if split_file is not None:
        save_split(splits, split_file)
    return splits


def transforms_for(cfg: RunConfig, backbone: Backbone):
    size = backbone.image_size
    test = backbone.preprocess if cfg.preprocess == "model" else build_test_transform(size)
    train = build_train_transform(size) if cfg.train.augment else test
    return train, test


def eval_features(backbone: Backbone, samples, transform, cache: FeatureCache, local: bool, batch_size: int = 64):
    feats = cache.get(backbone, [s.path for s in samples], transform, transform_id=transform_id(transform),
                      view=0, seed=0, local=local, batch_size=batch_size)
    return CachedViews(feats.global_[None], None if feats.local is None else feats.local[None])


def evaluate(method: Method, backbone: Backbone, samples, transform, cache: FeatureCache,
             batch_size: int = 256, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Metrics and logits of ``method`` on ``samples`` (the frozen tower's features come from the cache)."""
    if not samples:
        raise DataError("nothing to evaluate: the split is empty")
    labels = torch.tensor([s.label for s in samples])
    targets = _targets(samples)
    if method.trains_image_encoder:
        source = OnlineImages(ImageDataset(samples, transform), backbone, local=False, encode=False)
    else:
        source = eval_features(backbone, samples, transform, cache, method.needs_local)
    logits = predict_logits(method, source, len(samples), batch_size, progress)
    return method.metrics(logits, labels, targets), logits


def _targets(samples) -> Optional[torch.Tensor]:
    if samples and all(s.target is not None for s in samples):
        return torch.tensor([float(s.target) for s in samples])
    return None


def train_source(cfg: RunConfig, method: Method, backbone: Backbone, splits: DatasetSplits, cache: FeatureCache,
                 train_tf):
    samples = splits.train
    if method.trains_image_encoder:
        return OnlineImages(ImageDataset(samples, train_tf), backbone, local=False, encode=False,
                            workers=cfg.train.batch_workers)
    if cfg.train.online:
        return OnlineImages(ImageDataset(samples, train_tf), backbone, local=method.needs_local, encode=True,
                            workers=cfg.train.batch_workers)
    views = cfg.train.views if cfg.train.augment else 1
    if views < 1:
        raise VLPromptError(f"--views must be >= 1, got {views}")
    paths = [s.path for s in samples]
    tid = transform_id(train_tf)
    g, loc = [], []
    for v in range(views):
        log.info("train features: view %d/%d", v + 1, views)
        feats = cache.get(backbone, paths, train_tf, transform_id=tid, view=v, seed=0, local=method.needs_local,
                          batch_size=cfg.train.feature_batch_size)
        g.append(feats.global_)
        if feats.local is not None:
            loc.append(feats.local)
    return CachedViews(torch.stack(g), torch.stack(loc) if loc else None)


# -- method files -------------------------------------------------------------------------------------
def save_method(run_dir: Path, cfg: RunConfig, method: Method, splits: DatasetSplits) -> None:
    atomic_save_safetensors(run_dir / "prompt.safetensors", method.learned_state())
    atomic_write_json(run_dir / "method.json", {
        "method": cfg.method, "config": method.config.to_dict(), "classnames": list(method.classnames),
        "backbone": cfg.backbone, "pretrained": cfg.pretrained, "dataset": cfg.data.dataset,
        "template": splits.template, "preprocess": cfg.preprocess, "image_size": method.backbone.image_size})


def load_method(run_dir: Path, backbone: Optional[Backbone] = None, classnames: Optional[Sequence[str]] = None,
                device: Optional[str] = None) -> tuple[Method, dict, Backbone]:
    """Rebuild a trained method from its run directory, optionally on another class list."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    meta_path = run_dir / "method.json"
    if not meta_path.exists():
        raise CheckpointError(f"{run_dir}: no method.json (not a finished training run)")
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(run_dir / "prompt.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{run_dir}: cannot read the trained method ({e})") from None
    if backbone is None:
        backbone = load_backbone(meta["backbone"], meta["pretrained"], device)
    method = build_method(meta["method"], meta["config"], backbone, meta["classnames"])
    method.load_learned_state({k: v.to(backbone.device) for k, v in state.items()})
    if classnames is not None and list(classnames) != list(meta["classnames"]):
        method.set_classnames(classnames)
    return method, meta, backbone


# -- training run -----------------------------------------------------------------------------------
def prepare_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, force: bool) -> Optional[dict]:
    """Create the directory; return the finished results when this exact run is already done."""
    cfg_file = run_dir / "config.yaml"
    results = run_dir / "results.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            for child in run_dir.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            old = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else None
            same = old is not None and RunConfig.from_dict(old).identity_hash() == cfg.identity_hash()
            if results.exists() and same:
                return json.loads(results.read_text())
            if not same:
                raise VLPromptError(f"{run_dir} holds another run (different configuration); choose another "
                                    f"--output or pass --force to overwrite it")
            if not resume and (run_dir / "checkpoints").exists():
                raise VLPromptError(f"{run_dir} holds an unfinished run: pass --resume to continue it or "
                                    f"--force to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return None


def run_training(cfg: RunConfig, output: str | Path, *, resume: bool = False, force: bool = False,
                 progress: bool = True) -> dict:
    run_dir = Path(output)
    get_method(cfg.method)  # unknown method: fail before anything else
    if cfg.train.epochs is None or cfg.train.epochs < 0:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, epochs=default_epochs(cfg.data.shots, cfg.data.dataset)))
    done = prepare_run_dir(run_dir, cfg, resume, force)
    if done is not None:
        log.info("%s is already finished (pass --force to retrain)", run_dir)
        return done
    handler = attach_log_file(run_dir)
    try:
        return _train(cfg, run_dir, resume, progress)
    finally:
        log.removeHandler(handler)
        handler.close()


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool) -> dict:
    t_start = time.perf_counter()
    seed_everything(cfg.train.seed)
    backbone = open_backbone(cfg)
    splits = prepare_data(cfg.data, run_dir)
    if not splits.train:
        raise DataError(f"{cfg.data.dataset}: no training images")
    log.info("%s: %d classes, %d train / %d val / %d test images", splits.name, splits.num_classes,
             len(splits.train), len(splits.val), len(splits.test))
    seed_everything(cfg.train.seed)
    method = build_method(cfg.method, cfg.method_options, backbone, splits.classnames)
    cache = FeatureCache(cfg.cache_dir, progress=progress)
    train_tf, test_tf = transforms_for(cfg, backbone)
    learns = bool(method.trainable_parameters())  # zero-shot methods learn nothing: no training at all
    t0 = time.perf_counter()
    source = train_source(cfg, method, backbone, splits, cache, train_tf) if learns else None
    t_features = time.perf_counter() - t0
    labels = torch.tensor([s.label for s in splits.train])
    targets = _targets(splits.train)
    writer = _tensorboard(run_dir) if (cfg.tensorboard and learns) else None
    selection = _Selection(method, run_dir) if (splits.val and cfg.train.eval_every) else None
    trainer = Trainer(method, cfg.train, run_dir, config_hash=cfg.identity_hash(), progress=progress,
                      on_epoch=lambda rec: (_on_epoch(run_dir, rec, writer),
                                            selection and selection.update(trainer.state.history))) \
        if learns else None
    if trainer is not None and resume and trainer.resume():
        _rewrite_metrics(run_dir, trainer.state.history)

    def val_metrics():
        return evaluate(method, backbone, splits.val, test_tf, cache)[0] if splits.val else {}

    t0 = time.perf_counter()
    if trainer is not None:
        trainer.fit(source, labels, targets, evaluate=val_metrics)
    state = trainer.state if trainer is not None else TrainState()
    if writer is not None:
        writer.close()
    t_train = time.perf_counter() - t0
    selected = selection.restore(state.history) if selection is not None else None
    save_method(run_dir, cfg, method, splits)
    plot_curve(run_dir, state.history)
    t0 = time.perf_counter()
    metrics, test_logits = evaluate(method, backbone, splits.test, test_tf, cache, progress=progress) \
        if splits.test else ({}, None)
    results = {
        "method": cfg.method, "dataset": cfg.data.dataset, "classes": cfg.data.classes,
        "backbone": cfg.backbone, "pretrained": cfg.pretrained, "shots": cfg.data.shots, "seed": cfg.train.seed,
        "epochs": cfg.train.epochs if learns else 0, "metrics": metrics,
        "train": {"final_loss": state.history[-1]["loss"] if state.history else None,
                  "final_train_accuracy": state.history[-1]["train_accuracy"] if state.history else None,
                  "steps": state.step, "skipped_steps": state.skipped_steps},
        "timings": {"features_s": t_features, "train_s": t_train, "eval_s": time.perf_counter() - t0,
                    "total_s": time.perf_counter() - t_start},
    }
    if selected is not None:
        results["selected_epoch"] = selected
    if hasattr(method, "after_training"):  # method-specific outputs (plots, ordinality of prototypes)
        results.update(method.after_training(run_dir, test_logits, splits.test) or {})
    atomic_write_json(run_dir / "results.json", results)
    log.info("test: %s", ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    return results


class _Selection:
    """Keep the learned tensors of the epoch with the best validation metric (methods with ``select_on =
    (metric, "min" | "max")``, when ``eval_every`` evaluates on a validation split carved from the training
    data); they replace the last epoch's at the end. The file survives interruptions, so resumed runs agree."""

    def __init__(self, method: Method, run_dir: Path):
        self.method = method
        self.key, self.mode = getattr(method, "select_on", (None, None))
        self.path = run_dir / "best.safetensors"

    def _best(self, history: list) -> Optional[dict]:
        recs = [r for r in history if f"val_{self.key}" in r]
        if not recs:
            return None
        pick = min if self.mode == "min" else max
        return pick(recs, key=lambda r: r[f"val_{self.key}"])  # the first of equals

    def update(self, history: list) -> None:
        """After each epoch (``history[-1]`` is its record): save the learned tensors when it is the best."""
        if self.key is not None and history and self._best(history) is history[-1]:
            atomic_save_safetensors(self.path, self.method.learned_state())

    def restore(self, history: list) -> Optional[int]:
        best = self._best(history) if self.key is not None else None
        if best is None or not self.path.exists():
            return None
        from safetensors.torch import load_file

        device = self.method.backbone.device
        self.method.load_learned_state({k: v.to(device) for k, v in load_file(str(self.path)).items()})
        log.info("selected epoch %d (val %s %.4f)", best["epoch"], self.key, best[f"val_{self.key}"])
        return int(best["epoch"])


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise VLPromptError("--tensorboard needs the tensorboard package: pip install 'vlprompt[tensorboard]'") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _on_epoch(run_dir: Path, record: dict, writer=None) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, record["epoch"])
        writer.flush()


def _rewrite_metrics(run_dir: Path, history: list) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def plot_curve(run_dir: Path, history: list) -> Optional[Path]:
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(epochs, [r["loss"] for r in history], color="tab:blue", label="loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [r["train_accuracy"] for r in history], color="tab:orange", label="train accuracy")
    if any("val_accuracy" in r for r in history):
        pts = [(r["epoch"], r["val_accuracy"]) for r in history if "val_accuracy" in r]
        ax2.plot(*zip(*pts), "o-", color="tab:green", label="val accuracy")
    ax2.set_ylabel("accuracy (%)")
    fig.legend(loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = run_dir / "training_curve.png"
    tmp = run_dir / ".training_curve.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


# -- after training ---------------------------------------------------------------------------------
def evaluate_run(run_dir: str | Path, data: DataConfig, *, split: str = "test", device: Optional[str] = None,
                 cache_dir: Optional[str] = None, progress: bool = True, backbone: Optional[Backbone] = None) -> dict:
    """Evaluate a trained run on any dataset / class split (its classes replace the trained ones)."""
    run_dir = Path(run_dir)
    splits = prepare_data(dataclasses.replace(data, shots=0), needs=(split,))
    method, meta, backbone = load_method(run_dir, backbone=backbone, classnames=splits.classnames, device=device)
    samples = getattr(splits, split)
    cfg_like = RunConfig(method=meta["method"], backbone=meta["backbone"], pretrained=meta["pretrained"],
                         data=data, preprocess=meta.get("preprocess", "coop"))
    _, test_tf = transforms_for(cfg_like, backbone)
    cache = FeatureCache(cache_dir or default_cache_dir(), progress=progress)
    metrics, _ = evaluate(method, backbone, samples, test_tf, cache, progress=progress)
    result = {"run": str(run_dir), "method": meta["method"], "trained_on": meta["dataset"],
              "dataset": data.dataset, "classes": data.classes, "split": split, "metrics": metrics}
    name = f"{data.dataset.replace(':', '_').replace('/', '_')}-{data.classes}-{split}.json"
    atomic_write_json(run_dir / "eval" / name, result)
    return result


def harmonic_mean(base: float, new: float) -> float:
    """CoCoOp's H = 2 * base * new / (base + new) (0 when both are 0)."""
    return 2.0 * base * new / (base + new) if (base + new) > 0 else 0.0


def base_to_new(run_dir: str | Path, data: DataConfig, *, metric: str = "accuracy", device: Optional[str] = None,
                cache_dir: Optional[str] = None, progress: bool = True) -> dict:
    """The base-to-new protocol: test accuracy on the base classes and on the new classes (each half
    relabelled from 0), and their harmonic mean. Writes ``RUN/eval/base2new-<dataset>.json``."""
    run_dir = Path(run_dir)
    _, meta, backbone = load_method(run_dir, device=device)
    out = {}
    for half in ("base", "new"):
        res = evaluate_run(run_dir, dataclasses.replace(data, classes=half), device=device, cache_dir=cache_dir,
                           progress=progress, backbone=backbone)
        out[half] = res["metrics"][metric]
    result = {"run": str(run_dir), "method": meta["method"], "dataset": data.dataset, "metric": metric,
              "base": out["base"], "new": out["new"], "harmonic_mean": harmonic_mean(out["base"], out["new"])}
    atomic_write_json(run_dir / "eval" / f"base2new-{data.dataset.replace(':', '_').replace('/', '_')}.json", result)
    return result


def export_run(run_dir: str | Path, output: Optional[str | Path] = None, device: Optional[str] = "cpu") -> Path:
    """Write a deployable head: ``head.safetensors`` + ``head.json``.

    Heads of kind ``linear`` hold the normalised class text features (K, E): prediction needs only the image
    tower. Methods whose text features depend on the image (CoCoOp) export kind ``prompt``: the learned tensors
    and the method's configuration, and prediction runs the text tower too.
    """
    run_dir = Path(run_dir)
    out = Path(output) if output else run_dir / "export"
    method, meta, backbone = load_method(run_dir, device=device)
    head = method.export_head()
    if head is None:
        tensors, info = method.learned_state(), {"kind": "prompt", "method": meta["method"], "config": meta["config"]}
    else:
        tensors, info = head
    info = {**info, "classnames": list(method.classnames), "backbone": meta["backbone"],
            "pretrained": meta["pretrained"], "preprocess": meta.get("preprocess", "coop"),
            "image_size": backbone.image_size, "source_run": str(run_dir), "vlprompt_head": 1}
    atomic_save_safetensors(out / "head.safetensors", tensors)
    atomic_write_json(out / "head.json", info)
    return out


def predict_images(head_dir: str | Path, images: Sequence[str], topk: int = 5, device: Optional[str] = None,
                   batch_size: int = 32) -> list[dict]:
    """Top-k classes of image files with an exported head."""
    from safetensors.torch import load_file

    from .data import load_image

    head_dir = Path(head_dir)
    try:
        info = json.loads((head_dir / "head.json").read_text())
        tensors = load_file(str(head_dir / "head.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{head_dir}: not an exported head ({e}); create one with `vlprompt export RUN`") from None
    backbone = load_backbone(info["backbone"], info["pretrained"], device)
    tf = backbone.preprocess if info.get("preprocess") == "model" else build_test_transform(backbone.image_size)
    kind = info["kind"]
    method = None
    if kind == "prompt":
        method = build_method(info["method"], info["config"], backbone, info["classnames"])
        method.load_learned_state({k: v.to(backbone.device) for k, v in tensors.items()})
        method.eval()
    classnames = info["classnames"]
    out = []
    for i in range(0, len(images), batch_size):
        paths = list(images[i:i + batch_size])
        x = torch.stack([tf(load_image(p)) for p in paths])
        with torch.no_grad():
            logits = head_logits(kind, tensors, info, backbone, x, method)
        probs = logits.softmax(-1)
        k = min(topk, probs.shape[1])
        p, idx = probs.topk(k, dim=-1)
        values = None
        if kind == "ordinal":  # ordinal heads also predict a value (expectation over rank values)
            from .methods.ordinalclip import head_values
            values = head_values(logits, tensors, info)["value"].tolist()
        for n, (path, pi, ii) in enumerate(zip(paths, p.tolist(), idx.tolist())):
            out.append({"image": path, "top": [{"class": classnames[j], "probability": q} for j, q in zip(ii, pi)]})
            if values is not None:
                out[-1]["value"] = values[n]
    return out


def head_logits(kind: str, tensors: dict, info: dict, backbone: Backbone, x: torch.Tensor, method=None):
    """Logits (B, K) of an exported head on preprocessed images (B, 3, H, W)."""
    from .methods.base import Features, cosine_logits

    if kind == "linear":
        return cosine_logits(backbone.encode_image(x), tensors["text_features"].to(backbone.device),
                             float(info["logit_scale"])).cpu()
    if kind == "prompt":
        needs_local = method.needs_local
        feats = backbone.encode_image(x, local=needs_local)
        f = Features(global_=feats[0], local=feats[1]) if needs_local else Features(global_=feats)
        return method(f).float().cpu()
    from .methods import get_method
    cls, _ = get_method(info["method"]) if "method" in info else (None, None)
    if cls is not None and hasattr(cls, "head_logits"):
        return cls.head_logits(tensors, info, backbone, x).cpu()
    raise CheckpointError(f"unknown head kind {kind!r}")


def interpret_run(run_dir: str | Path, topk: int = 5, device: Optional[str] = "cpu") -> list[dict]:
    """Nearest vocabulary words (Euclidean distance in the token-embedding space) to each learned context
    vector, as in CoOp's paper; for rank prompts (OrdinalCLIP) also to each rank's embedding."""
    method, meta, backbone = load_method(Path(run_dir), device=device)
    table = backbone.text._parts["token_embedding"].weight.detach().float()
    decode = backbone.tokenizer.decode

    def nearest(vectors: torch.Tensor):
        vals, ids = torch.cdist(vectors.float(), table).topk(topk, largest=False)
        return [([decode([t]).strip() for t in iv], dv) for dv, iv in zip(vals.tolist(), ids.tolist())]

    rows = []
    for module in method.modules():
        ctx = getattr(module, "ctx", None)
        if isinstance(ctx, torch.nn.Parameter):
            c4 = ctx.detach()
            c4 = c4.reshape(1, 1, *c4.shape) if c4.dim() == 2 else c4  # (N prompt sets, C, M, D)
            n, c, m, d = c4.shape
            for flat, (words, dist) in enumerate(nearest(c4.reshape(-1, d))):
                pi, rest = divmod(flat, c * m)
                ci, mi = divmod(rest, m)
                rows.append({"prompt": pi, "class": (method.classnames[ci] if c > 1 else None), "position": mi,
                             "words": words, "distances": dist})
        ranks = getattr(module, "rank_embeddings", None)
        if isinstance(ranks, torch.nn.Module):
            with torch.no_grad():
                emb = ranks()  # (R, T, D)
            r, t, d = emb.shape
            for flat, (words, dist) in enumerate(nearest(emb.reshape(-1, d))):
                ri, ti = divmod(flat, t)
                rows.append({"rank": method.classnames[ri], "position": ti, "words": words, "distances": dist})
    if not rows:
        raise VLPromptError(f"{meta['method']} has no learned context vectors to interpret")
    return rows
