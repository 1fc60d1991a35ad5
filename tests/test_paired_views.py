"""Images paired with the frozen tower's cached features of the same augmented view (PromptSRC's regulariser
reads both): the rebuilt view of each image, encoded by the frozen tower, gives exactly the cached features, for
any batch, view draw and worker count; a method declaring images + global gets such batches in training and
images alone in evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import color_folder
from vlprompt.backbone.cache import FeatureCache
from vlprompt.data import load_dataset
from vlprompt.engine.sources import PairedViews, feature_requests, train_source
from vlprompt.methods.base import Method, MethodConfig
from vlprompt.runs import transforms_for


@dataclass
class _Cfg(MethodConfig):
    pass


class _Paired(Method):
    name = "paired"
    config_class = _Cfg
    inputs = frozenset({"images", "global"})
    eval_inputs = frozenset({"images"})


class _Train:
    views, online, augment, batch_workers, feature_batch_size, cache_dtype, eval_every = 3, False, True, 0, 8, \
        "float32", 0


@pytest.mark.parametrize("workers", [0, 2])
def test_paired_images_encode_to_their_cached_features(tiny_vit, tmp_path, workers):
    root = color_folder(tmp_path / "data" / "shapes")
    samples = load_dataset("folder", str(root)).train[:7]
    tfs = transforms_for("coop", tiny_vit)
    cache = FeatureCache(tmp_path / "cache", progress=False)
    train = _Train()
    train.batch_workers = workers
    source = train_source(_Paired(_Cfg(), tiny_vit, ["a"]), train, tiny_vit, samples, tfs, cache)
    assert isinstance(source, PairedViews) and source.num_views == 3
    gen = torch.Generator().manual_seed(4)
    seen_views = set()
    for idx in (torch.tensor([0, 3, 6, 1]), torch.tensor([5, 2])):
        before = gen.get_state()
        feats = source.batch(idx, gen)
        replay = torch.Generator()
        replay.set_state(before)
        seen_views |= set(torch.randint(0, 3, (len(idx),), generator=replay).tolist())
        assert feats.images.shape == (len(idx), 3, 32, 32)
        torch.testing.assert_close(tiny_vit.encode_image(feats.images), feats.global_, rtol=1e-5, atol=1e-5)
    assert len(seen_views) > 1  # more than one view was drawn (the pairing is per view)
    # the generator advanced exactly as a plain cached-views source's would (same data order downstream)
    plain = train_source(type("G", (_Paired,), {"inputs": frozenset({"global"}), "name": "g"})(_Cfg(), tiny_vit,
                                                                                                ["a"]),
                         train, tiny_vit, samples, tfs, cache)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(source.batch(torch.arange(7), g1).global_, plain.batch(torch.arange(7), g2).global_)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_paired_method_requests_train_views_but_evaluates_on_images():
    requests = feature_requests(_Paired, _Cfg(), _Train())
    assert [(r.split, r.transform, r.views) for r in requests] == [("train", "train", 3)]  # no test features
