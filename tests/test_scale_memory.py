"""Bounded memory at scale: cached views are read batch by batch, so a run's memory does not grow with the
number of views; the same views and numbers are drawn as from in-memory features; --workers and
--cache-dtype reach the feature extraction of a run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from vlprompt.backbone.cache import FeatureCache
from vlprompt.engine.sources import CachedViews

E, M = 256, 49  # RN50-like local features (49 tokens), a narrower joint space to keep the test small

# A stand-in image tower: deterministic features of each image (a seeded function of its pixels), so a
# parent process can fill the cache and child processes hit it.
FAKE_TOWER = textwrap.dedent(f"""
    import torch

    class FakeTower:
        fingerprint, name, embed_dim, device = "fake-tower", "fake", {E}, torch.device("cpu")

        def encode_image(self, images, local=False):
            out_g, out_l = [], []
            for img in images:
                g = torch.Generator().manual_seed(int(img.sum().item() * 1000) % (2 ** 31))
                out_g.append(torch.randn({E}, generator=g))
                out_l.append(torch.randn({M}, {E}, generator=g))
            g, loc = torch.stack(out_g), torch.stack(out_l)
            return (g, loc) if local else g
""")
_ns: dict = {}
exec(FAKE_TOWER, _ns)
FakeTower = _ns["FakeTower"]


def _images(directory, n):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = directory / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _train_cfg(views, workers=0, cache_dtype="float32"):
    return SimpleNamespace(views=views, online=False, augment=True, batch_workers=workers, feature_batch_size=64,
                           cache_dtype=cache_dtype)


class LocalMethod:
    """What the source factory reads of a method: its declared inputs (global and local features)."""

    name = "local-method"
    config = None

    @classmethod
    def input_kinds(cls, config):
        return frozenset({"global", "local"})


LOCAL_METHOD = LocalMethod()

CHILD = FAKE_TOWER + textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace
    from torchvision import transforms as T
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.engine.sources import train_source

    class LocalMethod:
        name = "local-method"
        config = None

        @classmethod
        def input_kinds(cls, config):
            return frozenset({"global", "local"})

    views, root, paths = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    train = SimpleNamespace(views=views, online=False, augment=True, batch_workers=0, feature_batch_size=64,
                            cache_dtype="float32")
    samples = [SimpleNamespace(path=p) for p in paths]
    source = train_source(LocalMethod(), train, FakeTower(), samples, (T.ToTensor(), T.ToTensor()),
                          FeatureCache(root, progress=False))
    gen = torch.Generator().manual_seed(0)
    for epoch in range(2):
        for idx in torch.randperm(len(paths), generator=gen).split(32):
            feats = source.batch(idx, gen)
            assert feats.local.shape == (len(idx), {M}, {E})
    status = open("/proc/self/status").read()
    print(json.dumps({line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
                      if line.startswith(("VmHWM", "VmRSS"))}))
""").replace("{M}", str(M)).replace("{E}", str(E))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS is read from /proc (Linux)")
def test_cached_views_peak_memory_does_not_grow_with_the_number_of_views(tmp_path):
    n, views = 256, 10
    paths = _images(tmp_path / "imgs" / "c", n)
    root = tmp_path / "cache"
    fc = FeatureCache(root, shard_size=64, progress=False)
    for v in range(views):  # fill the cache here; the measured children only read it
        fc.get(FakeTower(), paths, T.ToTensor(), transform_id="tt", view=v, local=True)
    view_mb = n * (M + 1) * E * 4 / 2 ** 20  # 12.5 MB of float32 features per view
    peaks = {}
    for v in (1, views):
        out = subprocess.run([sys.executable, "-c", CHILD, str(v), str(root), json.dumps(paths)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[v] = json.loads(out.stdout.strip().splitlines()[-1])["VmHWM"] / 1024  # MB
    growth = peaks[views] - peaks[1]
    # holding the views in memory would add (views - 1) x view_mb = 112 MB (twice that while stacking)
    print(f"peak RSS: V=1 {peaks[1]:.0f} MB, V={views} {peaks[views]:.0f} MB ({view_mb:.1f} MB per view)")
    assert growth < 0.15 * (views - 1) * view_mb, (peaks, view_mb)


def test_lazy_views_draw_the_same_views_and_numbers_as_in_memory_features(tmp_path):
    """The training data per step is unchanged: same view per image from the epoch generator, same floats."""
    paths = _images(tmp_path / "imgs" / "c", 40)
    fc = FeatureCache(tmp_path / "cache", shard_size=16, progress=False)
    rows = [fc.open(FakeTower(), paths, T.ToTensor(), transform_id="tt", view=v, local=True) for v in range(3)]
    whole = [r.read_all() for r in rows]
    lazy = CachedViews.from_rows(rows)
    memory = CachedViews(torch.stack([w[0] for w in whole]), torch.stack([w[1] for w in whole]))
    assert lazy.num_views == memory.num_views == 3 and len(lazy) == 40
    for seed in range(3):
        ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for idx in torch.randperm(40, generator=torch.Generator().manual_seed(seed)).split(16):
            a, b = lazy.batch(idx, ga), memory.batch(idx, gb)
            assert torch.equal(a.global_, b.global_) and torch.equal(a.local, b.local)
        assert torch.equal(ga.get_state(), gb.get_state())  # the same numbers were drawn
    assert torch.equal(lazy.global_, memory.global_) and torch.equal(lazy.local, memory.local)


def test_views_are_told_apart_by_index_not_by_content(tmp_path):
    """A batch mixing views reads each image's row from the drawn view's shard files."""
    paths = _images(tmp_path / "imgs" / "c", 20)
    fc = FeatureCache(tmp_path / "cache", shard_size=8, progress=False)
    tfs = [T.ToTensor(), T.Compose([T.ToTensor(), T.Lambda(lambda x: 1 - x)])]
    rows = [fc.open(FakeTower(), paths, tf, transform_id=f"tt{v}", view=v, local=False) for v, tf in enumerate(tfs)]
    whole = torch.stack([r.read_all()[0] for r in rows])
    assert not torch.equal(whole[0], whole[1])
    lazy = CachedViews.from_rows(rows)
    idx = torch.arange(20)
    gen = torch.Generator().manual_seed(3)
    views = torch.randint(0, 2, (20,), generator=torch.Generator().manual_seed(3))
    assert 0 < int(views.sum()) < 20
    assert torch.equal(lazy.batch(idx, gen).global_, whole[views, idx])


def test_run_feature_extraction_uses_workers_and_the_cache_dtype(tmp_path, monkeypatch):
    from vlprompt.engine.sources import train_source

    seen = []
    real = torch.utils.data.DataLoader

    class Recording(real):
        def __init__(self, *a, **kw):
            seen.append(kw.get("num_workers"))
            super().__init__(*a, **kw)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    paths = _images(tmp_path / "imgs" / "c", 6)
    samples = [SimpleNamespace(path=p) for p in paths]
    fc = FeatureCache(tmp_path / "cache", progress=False)
    tfs = (T.ToTensor(), T.ToTensor())
    half = train_source(LOCAL_METHOD, _train_cfg(2, workers=2, cache_dtype="float16"), FakeTower(), samples, tfs, fc)
    assert seen == [2, 2]
    dirs = {r.directory for r in half._rows}
    assert len(dirs) == 2 and all(json.loads((d / "index.json").read_text())["dtype"] == "float16" for d in dirs)
    full = train_source(LOCAL_METHOD, _train_cfg(2), FakeTower(), samples, tfs, fc)
    assert not dirs & {r.directory for r in full._rows}  # the dtype is part of the cache key
    assert torch.equal(half.global_, full.global_.half().float())
    assert 0 < (half.local - full.local).abs().max() <= 2 ** -10 * full.local.abs().max()
