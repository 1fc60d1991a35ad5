"""The inputs of the training loop: where a batch's image features (or images) come from.

* :class:`CachedViews`: features of V augmented views of every training image, computed once through the
  feature cache; each step draws one view per image.
* :class:`OnlineImages`: every step loads, augments and (unless the method trains its own image encoder)
  encodes its images, exactly as the papers do.

Both give ``batch(idx, gen) -> Features`` for the indices of a batch and the epoch's generator.
"""
from __future__ import annotations

import random
from typing import Optional

import torch

from ..methods.base import Features


class CachedViews:
    """Features of V views per training image, (V, N, E) and optionally (V, N, M, E); one view drawn per step."""

    def __init__(self, global_: torch.Tensor, local: Optional[torch.Tensor] = None):
        self.global_ = global_
        self.local = local

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Features:
        views = torch.randint(0, self.global_.shape[0], (len(idx),), generator=gen)
        local = None if self.local is None else self.local[views, idx].float()
        return Features(global_=self.global_[views, idx].float(), local=local)


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


