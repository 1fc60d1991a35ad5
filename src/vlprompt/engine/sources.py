"""The inputs of the training loop: where a batch's image features (or images) come from.

* :class:`CachedViews`: features of V augmented views of every training image, computed once through the
  feature cache; each step draws one view per image.
* :class:`OnlineImages`: every step loads, augments and (unless the method trains its own image encoder)
  encodes its images, exactly as the papers do.

Both give ``batch(idx, gen) -> Features`` for the indices of a batch and the epoch's generator. Sources that decode
image files also take ``prefetch(idx)``: the training loop and the evaluation name the next batch before running
the current one, and with ``--workers N`` its files are decoded in N threads meanwhile (:class:`ImageDecoder`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import VLPromptError
from ..methods.base import INPUT_KINDS, Features

log = logging.getLogger("vlprompt")


class CachedViews:
    """Features of V views per training image; one view drawn per image and step.

    Either in memory -- ``CachedViews(global_ (V, N, E), local (V, N, M, E) or None)`` -- or on disk,
    :meth:`from_rows` over V :class:`vlprompt.backbone.cache.CachedRows` (one per view): then a step reads only its
    batch's rows, so memory does not grow with V x N (x M). Both draw the same views from ``gen`` and give the
    same float32 numbers for the same stored features.
    """

    def __init__(self, global_: torch.Tensor, local: Optional[torch.Tensor] = None):
        self._global = global_
        self._local = local
        self._rows: Optional[list] = None
        self.num_views = int(global_.shape[0])

    @classmethod
    def from_rows(cls, views: Sequence) -> "CachedViews":
        """Cached views read lazily: ``views[v]`` holds view v of the N images (:meth:`FeatureCache.open`)."""
        views = list(views)
        if not views or len({len(v) for v in views}) != 1:
            raise VLPromptError(f"cached views need at least one view and the same images in each (got "
                                f"{[len(v) for v in views]})")
        self = cls.__new__(cls)
        self._global = self._local = None
        self._rows = views
        self.num_views = len(views)
        return self

    def __len__(self) -> int:
        return len(self._rows[0]) if self._rows is not None else int(self._global.shape[1])

    @property
    def global_(self) -> torch.Tensor:
        """(V, N, E) float32 -- read whole into memory when on disk (fit methods' features; not for training)."""
        if self._rows is None:
            return self._global
        return torch.stack([rows.read_all()[0] for rows in self._rows])

    @property
    def local(self) -> Optional[torch.Tensor]:
        """(V, N, M, E) float32 or None -- read whole into memory when on disk."""
        if self._rows is None:
            return self._local
        if not self._rows[0].local:
            return None
        return torch.stack([rows.read_all()[1] for rows in self._rows])

    def batch(self, idx: torch.Tensor, gen: torch.Generator, views: Optional[torch.Tensor] = None) -> Features:
        """The features of images ``idx``: view ``views[j]`` of image ``idx[j]``, or one view per image drawn from
        ``gen``."""
        if views is None:
            views = torch.randint(0, self.num_views, (len(idx),), generator=gen)
        if self._rows is None:
            local = None if self._local is None else self._local[views, idx].float()
            return Features(global_=self._global[views, idx].float(), local=local)
        first = self._rows[0]
        g = torch.empty(len(idx), first.embed_dim)
        loc = torch.empty(len(idx), first.local_tokens, first.embed_dim) if first.local else None
        for v in views.unique().tolist():
            sel = (views == v).nonzero().squeeze(1)
            rg, rl = self._rows[v].read(idx[sel])
            g[sel] = rg
            if loc is not None:
                loc[sel] = rl
        return Features(global_=g, local=loc)


class ImageDecoder:
    """Decodes image files in ``workers`` threads, one batch ahead: ``prefetch(paths)`` starts decoding the next
    batch's files while the current step runs (the tower, the text side, backward: the overlap), ``decode(paths)``
    returns them (waiting for the prefetched ones, or decoding now in the threads when they were not prefetched).
    Decoding is a pure function of the file, so what a step sees does not depend on the overlap; the random
    transforms run afterwards in the caller's thread, in order. A file that cannot be read raises when its batch is
    used, as without prefetching. The threads end with the decoder (``close``, or when it is garbage collected with
    its source)."""

    def __init__(self, loader, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.loader = loader
        self.pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="vlprompt-decode")
        self._pending: Optional[tuple[tuple[str, ...], list]] = None
        self.prefetched = 0  # batches served from a prefetch (for tests and logs)

    def prefetch(self, paths: Sequence[str]) -> None:
        key = tuple(paths)
        if self._pending is None or self._pending[0] != key:
            self._pending = (key, [self.pool.submit(self.loader, p) for p in key])

    def decode(self, paths: Sequence[str]) -> list:
        key = tuple(paths)
        if self._pending is not None and self._pending[0] == key:
            futures, self._pending = self._pending[1], None
            self.prefetched += 1
            return [f.result() for f in futures]
        return list(self.pool.map(self.loader, key))

    def close(self) -> None:
        self._pending = None
        self.pool.shutdown(wait=False, cancel_futures=True)


class OnlineImages:
    """Augment and load the batch's images at every step; encode them with the frozen tower unless the method
    trains its own image encoder (then the images themselves are passed)."""

    def __init__(self, dataset, backbone, local: bool, encode: bool, workers: int = 0, keep_images: bool = False):
        self.dataset = dataset
        self.backbone = backbone
        self.local = local
        self.encode = encode
        self.keep_images = keep_images  # the images too, with their frozen features (paired inputs)
        self.decoder = (ImageDecoder(dataset.loader, workers)
                        if workers > 0 and hasattr(dataset, "loader") and hasattr(dataset, "samples") else None)

    def _paths(self, idx: torch.Tensor) -> list[str]:
        return [self.dataset.samples[int(i)].path for i in idx]

    def prefetch(self, idx: torch.Tensor) -> None:
        if self.decoder is not None:
            self.decoder.prefetch(self._paths(idx))

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        if not (hasattr(self.dataset, "loader") and hasattr(self.dataset, "samples")):
            return torch.stack([self.dataset[int(i)][0] for i in idx])
        from ..backbone.cache import apply_view_transform

        # each image's random transform draws from its own seed, the seeds drawn in order from the epoch's RNG: the
        # batch does not depend on --workers (the files decoded in threads, possibly while the previous step ran)
        seeds = torch.randint(0, 2 ** 62, (len(idx),)).tolist()
        paths = self._paths(idx)
        pil = self.decoder.decode(paths) if self.decoder is not None else [self.dataset.loader(p) for p in paths]
        tf = self.dataset.transform
        return torch.stack([img if tf is None else apply_view_transform(tf, img, s) for img, s in zip(pil, seeds)])

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Features:
        images = self._images(idx)
        if not self.encode:
            return Features(images=images)
        out = self.backbone.encode_image(images, local=self.local)
        kept = images if self.keep_images else None
        if self.local:
            return Features(global_=out[0], local=out[1], images=kept)
        return Features(global_=out, images=kept)




class PairedViews:
    """Images and the frozen tower's cached features of the same augmented views: each step draws one view per
    image (as :class:`CachedViews`, from the same generator), reads its cached features and rebuilds that very view
    of the image (the cache's own seeded augmentation, :func:`vlprompt.backbone.cache.view_seed`), so a method
    that runs its own tower on the images and regularises it toward the frozen tower (PromptSRC) needs no second
    tower pass per step."""

    def __init__(self, rows: CachedViews, paths: Sequence[str], transform, identities: Sequence[str], *,
                 seed: int = 0, workers: int = 0):
        self.rows = rows
        self.paths = list(paths)
        self.transform = transform
        self.identities = list(identities)
        self.seed = seed
        self.num_views = rows.num_views
        if workers > 0:
            from ..data import load_image

            self.decoder: Optional[ImageDecoder] = ImageDecoder(load_image, workers)
        else:
            self.decoder = None

    def __len__(self) -> int:
        return len(self.paths)

    def prefetch(self, idx: torch.Tensor) -> None:
        if self.decoder is not None:
            self.decoder.prefetch([self.paths[int(i)] for i in idx])

    def _view(self, image, i: int, view: int) -> torch.Tensor:
        from ..backbone.cache import apply_view_transform, view_seed

        return apply_view_transform(self.transform, image, view_seed(self.seed, view, self.identities[i]))

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Features:
        state = gen.get_state()
        feats = self.rows.batch(idx, gen)  # draws the views
        replay = torch.Generator()
        replay.set_state(state)
        views = torch.randint(0, self.num_views, (len(idx),), generator=replay)  # the same draw, replayed
        pairs = list(zip(idx.tolist(), views.tolist()))
        if self.decoder is not None:  # each view's transform is seeded by its own (seed, view, image): in threads
            decoded = self.decoder.decode([self.paths[i] for i, _ in pairs])
            images = list(self.decoder.pool.map(lambda a: self._view(a[0], *a[1]), zip(decoded, pairs)))
        else:
            from ..data import load_image

            images = [self._view(load_image(self.paths[i]), i, v) for i, v in pairs]
        return Features(global_=feats.global_, local=feats.local, images=torch.stack(images))


# -- one source factory: what a method reads, for runs, evaluations, predictions and the grid's feature pass --------
@dataclass(frozen=True)
class FeatureRequest:
    """Cached frozen-tower features a run reads: the images of ``split`` under the ``transform`` (``test``: the
    test transform, view 0; ``train``: the train augmentation, views 0..views-1), with local features or not."""

    split: str
    transform: str
    views: int
    local: bool


def input_kinds(method_cls, config, *, evaluation: bool = False) -> frozenset:
    """What a method reads of an image: in training (``input_kinds``) or in evaluation (``eval_input_kinds``)."""
    kinds = frozenset(method_cls.eval_input_kinds(config) if evaluation and hasattr(method_cls, "eval_input_kinds")
                      else method_cls.input_kinds(config))
    unknown = kinds - set(INPUT_KINDS)
    if not kinds or unknown:
        raise VLPromptError(f"{method_cls.name}: inputs must be a non-empty subset of {INPUT_KINDS}, got {sorted(kinds)}")
    return kinds


def uses_cached_features(method_cls, config) -> bool:
    """Whether the method reads the frozen tower's features (global / local), which the feature cache holds."""
    return bool(input_kinds(method_cls, config) & {"global", "local"})


def uses_train_augmentation(method_cls, config, train_cfg) -> bool:
    """Whether a run reads training images through the train augmentation: it trains with ``augment`` (cached
    views, online, or its own image tower), or its setup reads the augmented views (``train_views``)."""
    augment = train_cfg is None or train_cfg.augment
    if method_cls.trains(config) and train_cfg is not None and train_cfg.augment:
        return True
    return "train_views" in method_cls.setup_reads and method_cls.needs_training_data(config) and augment


def reads_val(method_cls, config, train_cfg) -> bool:
    """Whether a run reads its val split: its setup / after-training hooks do, or it evaluates val while training."""
    if not method_cls.needs_training_data(config):
        return False
    return "val" in method_cls.setup_reads or bool(method_cls.trains(config) and train_cfg is not None
                                                   and train_cfg.eval_every)


def training_views(train_cfg) -> int:
    """Cached views a training run draws from: ``train.views`` (1 without augmentation)."""
    return 1 if not train_cfg.augment else int(train_cfg.views or 1)


def feature_requests(method_cls, config, train_cfg) -> list[FeatureRequest]:
    """Every cached feature a run of ``method_cls`` with this method config and training config reads, from its
    declarations alone (:attr:`Method.inputs`, :attr:`Method.setup_reads`, :meth:`Method.trains`): the run, the
    grid's feature pass and torchrun's shared extraction all ask this. Methods that run an image tower
    themselves on images only (no frozen features) read nothing from the cache."""
    kinds = input_kinds(method_cls, config)
    local = "local" in kinds
    out = []
    eval_kinds = input_kinds(method_cls, config, evaluation=True)
    if eval_kinds & {"global", "local"}:
        out.append(FeatureRequest("test", "test", 1, "local" in eval_kinds))
    if not method_cls.needs_training_data(config):
        return out
    reads = method_cls.setup_reads
    for split in ("train", "val"):
        if split in reads:
            out.append(FeatureRequest(split, "test", 1, local))
    if "train_views" in reads:
        augment = train_cfg is None or train_cfg.augment
        out.append(FeatureRequest("train", "train" if augment else "test", method_cls.setup_views(config, train_cfg),
                                  local))
    if method_cls.trains(config) and train_cfg is not None:
        cached = bool(kinds & {"global", "local"})
        if cached and not train_cfg.online:
            out.append(FeatureRequest("train", "train" if train_cfg.augment else "test",
                                      training_views(train_cfg), local))
        if train_cfg.eval_every and eval_kinds & {"global", "local"}:
            out.append(FeatureRequest("val", "test", 1, "local" in eval_kinds))
    return list(dict.fromkeys(out))


class SplitFeatures:
    """A split as a method's :meth:`~vlprompt.methods.base.Method.setup` and ``after_training`` see it (the
    :class:`vlprompt.methods.base.SplitData` protocol): labels, targets, and its features read from the cache on
    first use (each computed once)."""

    def __init__(self, labels: torch.Tensor, targets: Optional[torch.Tensor], features_fn, views_fn=None):
        self.labels = labels
        self.targets = targets
        self._features_fn = features_fn
        self._views_fn = views_fn
        self._features = None
        self._views = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def features(self) -> Features:
        if self._features is None:
            self._features = self._features_fn()
        return self._features

    def views(self) -> Features:
        if self._views_fn is None:
            raise VLPromptError("this split has no cached augmented views (the method did not declare "
                                "setup_reads={'train_views'})")
        if self._views is None:
            self._views = self._views_fn()
        return self._views


def features_of_images(method, backbone, images: torch.Tensor) -> Features:
    """What ``method`` reads of preprocessed images (B, 3, H, W) when nothing is cached (``predict``): the frozen
    tower's global / local features and / or the images themselves, as its inputs declare."""
    kinds = input_kinds(type(method), method.config, evaluation=True)
    global_ = local = None
    if kinds & {"global", "local"}:
        out = backbone.encode_image(images, local="local" in kinds)
        global_, local = out if "local" in kinds else (out, None)
    return Features(global_=global_, local=local, images=images if "images" in kinds else None)


def _cached_rows(backbone, samples, transform, cache, *, views: int, local: bool, batch_size: int, workers: int,
                 dtype=torch.float32, what: str = "") -> CachedViews:
    from ..data import transform_id

    paths = [s.path for s in samples]
    tid = transform_id(transform)
    rows = []
    for v in range(views):  # encoded now where missing; read batch by batch afterwards
        if what and views > 1:
            log.info("%s features: view %d/%d", what, v + 1, views)
        rows.append(cache.open(backbone, paths, transform, transform_id=tid, view=v, seed=0, local=local,
                               batch_size=batch_size, num_workers=workers, dtype=dtype))
    return CachedViews.from_rows(rows)


def eval_source(method, backbone, samples, transform, cache, *, batch_size: int = 64, workers: int = 0):
    """What ``method`` reads of ``samples`` in evaluation: one view under the (test) ``transform``, from the
    cache, or the images themselves for a method that runs its own image tower."""
    from ..data import ImageDataset

    kinds = input_kinds(type(method), method.config, evaluation=True)
    if "images" in kinds and kinds & {"global", "local"}:
        return OnlineImages(ImageDataset(samples, transform), backbone, local="local" in kinds, encode=True,
                            workers=workers, keep_images=True)
    if not kinds & {"global", "local"}:
        return OnlineImages(ImageDataset(samples, transform), backbone, local=False, encode=False, workers=workers)
    return _cached_rows(backbone, samples, transform, cache, views=1, local="local" in kinds, batch_size=batch_size,
                        workers=workers)


def train_source(method, train_cfg, backbone, samples, transforms, cache):
    """What ``method`` reads of the training images at every step: cached views of the train augmentation (the
    test transform without augmentation), or images augmented and encoded at every step (``online``), or the
    augmented images themselves (a method that runs its own image tower)."""
    from ..backbone.cache import DTYPES
    from ..data import ImageDataset

    train_tf, test_tf = transforms
    tf = train_tf if train_cfg.augment else test_tf
    kinds = input_kinds(type(method), method.config)
    frozen = kinds & {"global", "local"}
    if not frozen:
        return OnlineImages(ImageDataset(samples, tf), backbone, local=False, encode=False,
                            workers=train_cfg.batch_workers)
    if train_cfg.online:
        return OnlineImages(ImageDataset(samples, tf), backbone, local="local" in kinds, encode=True,
                            workers=train_cfg.batch_workers, keep_images="images" in kinds)
    rows = _cached_rows(backbone, samples, tf, cache, views=training_views(train_cfg), local="local" in kinds,
                        batch_size=train_cfg.feature_batch_size, workers=train_cfg.batch_workers,
                        dtype=DTYPES[train_cfg.cache_dtype], what="train")
    if "images" in kinds:  # the images of the very views whose frozen features the cache holds
        return PairedViews(rows, [s.path for s in samples], tf, cache.augmentation_identities(samples),
                           workers=train_cfg.batch_workers)
    return rows


def split_data(method, train_cfg, backbone, samples, transforms, cache, *, eval_batch: int = 64,
               workers: int = 0) -> SplitFeatures:
    """A split as the method's setup / after-training hooks see it: its un-augmented features (the test
    transform, view 0) and, for a method that reads them, every cached augmented view (the train augmentation,
    :meth:`Method.setup_views` views)."""
    kinds = input_kinds(type(method), method.config)
    local = "local" in kinds
    train_tf, test_tf = transforms
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    targets = sample_targets(samples)

    def features() -> Features:
        rows = _cached_rows(backbone, samples, test_tf, cache, views=1, local=local, batch_size=eval_batch,
                            workers=workers)
        return Features(global_=rows.global_[0], local=None if rows.local is None else rows.local[0])

    def views() -> Features:
        # the very entries a training run draws its views from (same transform, view seeds and dtype)
        from ..backbone.cache import DTYPES

        n = type(method).setup_views(method.config, train_cfg)
        if n < 1:
            raise VLPromptError(f"{method.name} reads the cached augmented views but asks for {n}")
        augment = train_cfg is None or train_cfg.augment
        rows = _cached_rows(backbone, samples, train_tf if augment else test_tf, cache, views=n, local=local,
                            batch_size=train_cfg.feature_batch_size if train_cfg is not None else eval_batch,
                            workers=workers, what="setup",
                            dtype=DTYPES[train_cfg.cache_dtype] if train_cfg is not None else torch.float32)
        return Features(global_=rows.global_, local=rows.local)

    return SplitFeatures(labels, targets, features, views if "train_views" in type(method).setup_reads else None)


def sample_targets(samples) -> Optional[torch.Tensor]:
    """(N,) float targets of ordinal samples, or None when a sample has none."""
    if samples and all(s.target is not None for s in samples):
        return torch.tensor([float(s.target) for s in samples])
    return None
