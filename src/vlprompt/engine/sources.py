"""The inputs of the training loop: where a batch's image features (or images) come from.

* :class:`CachedViews`: features of V augmented views of every training image, computed once through the
  feature cache; each step draws one view per image.
* :class:`OnlineImages`: every step loads, augments and (unless the method trains its own image encoder)
  encodes its images, exactly as the papers do.

Both give ``batch(idx, gen) -> Features`` for the indices of a batch and the epoch's generator.
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from ..errors import VLPromptError
from ..methods.base import Features


class CachedViews:
    """Features of V views per training image; one view drawn per image and step.

    Either in memory -- ``CachedViews(global_ (V, N, E), local (V, N, M, E) or None)`` -- or on disk,
    :meth:`from_rows` over V :class:`vlprompt.cache.CachedRows` (one per view): then a step reads only its
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

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Features:
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


class OnlineImages:
    """Augment and load the batch's images at every step; encode them with the frozen tower unless the method
    trains its own image encoder (then the images themselves are passed)."""

    def __init__(self, dataset, backbone, local: bool, encode: bool, workers: int = 0):
        self.dataset = dataset
        self.backbone = backbone
        self.local = local
        self.encode = encode
        self.workers = workers

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        if self.workers > 0 and hasattr(self.dataset, "loader") and hasattr(self.dataset, "samples"):
            from concurrent.futures import ThreadPoolExecutor

            # decoding (the slow part) runs in threads; the random transforms run here, in order, each under
            # its own seed drawn from the epoch's RNG, so results do not depend on thread scheduling
            paths = [self.dataset.samples[int(i)].path for i in idx]
            seeds = torch.randint(0, 2 ** 62, (len(idx),)).tolist()
            with ThreadPoolExecutor(self.workers) as pool:
                pil = list(pool.map(self.dataset.loader, paths))
            out = []
            for img, s in zip(pil, seeds):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s)
                    random.seed(s)
                    out.append(self.dataset.transform(img))
            return torch.stack(out)
        return torch.stack([self.dataset[int(i)][0] for i in idx])

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Features:
        images = self._images(idx)
        if not self.encode:
            return Features(images=images)
        out = self.backbone.encode_image(images, local=self.local)
        if self.local:
            return Features(global_=out[0], local=out[1])
        return Features(global_=out)


