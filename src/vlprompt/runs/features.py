"""Feature precomputation (``vlprompt features``): encode a dataset's splits into the feature cache once, with
the very transforms and cache keys the runs use, so that later runs only read them."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from ..backbone import Backbone
from ..backbone.cache import FeatureCache
from ..data import DatasetSplits, transform_id
from ..errors import VLPromptError
from .assembly import transforms_for

log = logging.getLogger("vlprompt")


def cache_features(backbone: Backbone, splits: DatasetSplits, cache: FeatureCache, *,
                   which: Sequence[str] = ("train", "val", "test"), views: int = 0, local: bool = False,
                   preprocess: str = "coop", batch_size: int = 64,
                   crop_scale: Optional[Sequence[float]] = None) -> list[dict]:
    """Compute and cache the features later runs read: every split in ``which`` under the test transform
    (view 0; what evaluation, zero-shot and the linear probe use) and, with ``views`` > 0, views 0..views-1 of
    the train split under CoOp's train augmentation (what ``vlprompt train --views N`` uses; ``crop_scale``: its
    crop's area range, ``--crop-scale``). ``local`` caches local features too (PLOT). Returns one summary per
    request: split, transform, view, images, hits, misses."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise VLPromptError(f"views must be an integer >= 0, got {views!r}")
    unknown = [w for w in which if w not in ("train", "val", "test")]
    if unknown:
        raise VLPromptError(f"unknown split(s) {unknown}: use train, val, test")
    train_tf, test_tf = transforms_for(preprocess, backbone, crop_scale)
    out = []
    for name in which:
        samples = getattr(splits, name)
        if not samples:
            log.info("%s: no %s images", splits.name, name)
            continue
        log.info("%s %s: %d images, test transform", splits.name, name, len(samples))
        feats = cache.get(backbone, [s.path for s in samples], test_tf, transform_id=transform_id(test_tf), view=0,
                          seed=0, local=local, batch_size=batch_size)
        out.append({"split": name, "transform": "test", "view": 0, "images": len(samples), "hits": feats.hits,
                    "misses": feats.misses, "local": local, "directory": str(feats.directory)})
    if views:
        if "train" not in which or not splits.train:
            raise VLPromptError("augmented views are of the train split: it is not selected or empty")
        tid = transform_id(train_tf)
        paths = [s.path for s in splits.train]
        for v in range(views):
            log.info("%s train: view %d/%d (augmented)", splits.name, v + 1, views)
            feats = cache.get(backbone, paths, train_tf, transform_id=tid, view=v, seed=0, local=local,
                              batch_size=batch_size)
            out.append({"split": "train", "transform": "train", "view": v, "images": len(paths), "hits": feats.hits,
                        "misses": feats.misses, "local": local, "directory": str(feats.directory)})
    return out
