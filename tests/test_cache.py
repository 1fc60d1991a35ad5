"""The on-disk image feature cache: hits, misses, invalidation on every key part, recovery from damage."""
from __future__ import annotations

import json
import logging
import os
import random
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vlprompt.backbone import cache as cache_mod  # noqa: E402
from vlprompt.backbone import load_backbone  # noqa: E402
from vlprompt.backbone.cache import (CacheError, FeatureCache, cache_info, clear_cache, default_loader,  # noqa: E402
                            seeded, view_seed)
from vlprompt.errors import DataError  # noqa: E402
from vlprompt.testing import make_tiny_checkpoint  # noqa: E402

N = 6


# ------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    out = {}
    for kind, seed in (("tiny-vit", 0), ("tiny-vit", 1), ("tiny-rn", 0)):
        cfg, weights = make_tiny_checkpoint(d, kind, seed=seed, sharpen=True)
        out[(kind, seed)] = load_backbone(str(cfg), str(weights), device="cpu")
    return out


class Counting:
    """A backbone wrapper that counts the images it encodes."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.calls = 0
        self.images = 0

    def __getattr__(self, name):
        return getattr(self.backbone, name)

    def encode_image(self, images, local=False):
        self.calls += 1
        self.images += len(images)
        return self.backbone.encode_image(images, local=local)


@pytest.fixture
def vit(models):
    return Counting(models[("tiny-vit", 0)])


@pytest.fixture
def rn(models):
    return Counting(models[("tiny-rn", 0)])


def write_noise(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images" / "cls"
    d.mkdir(parents=True)
    paths = []
    for i in range(N):
        p = d / f"img{i}.png"
        write_noise(p, i)
        paths.append(str(p))
    return paths


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def eval_tf(size=32):
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def aug_tf(size=32):
    # RandomChoice / RandomOrder draw from Python's `random`, the others from torch: both must be seeded
    return T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                      T.RandomChoice([T.ColorJitter(brightness=0.5), T.ColorJitter(contrast=0.5), T.Grayscale(3)]),
                      T.RandomOrder([T.RandomRotation(20), T.RandomAffine(0, translate=(0.1, 0.1))]),
                      T.ToTensor()])


def direct(backbone, paths, transform, local=False):
    """Features computed without the cache, on the same transformed images (one batch)."""
    batch = torch.stack([transform(default_loader(p)) for p in paths])
    return backbone.encode_image(batch, local=local)


def get(root, backbone, paths, transform=None, **kw):
    kw.setdefault("transform_id", "eval32")
    return FeatureCache(root, progress=False, **{k: kw.pop(k) for k in ("shard_size", "hash_files") if k in kw}
                        ).get(backbone, paths, transform or eval_tf(), **kw)


def shards(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("shard-"))


def index_of(directory):
    return json.loads((directory / "index.json").read_text())


def journal_of(directory):
    """(live shard -> record, file key -> (shard, row)) as the cache replays its journal."""
    return cache_mod._read_journal(directory, None)


def rerecord(directory, name):
    """Re-record a shard rewritten by hand (bytes and header checksum), as a writer bug would have left it."""
    import hashlib

    path = directory / name
    data = path.read_bytes()
    header = data[8:8 + int.from_bytes(data[:8], "little")]
    lines = (directory / "shards.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        rec = json.loads(line)
        if rec.get("add") == name:
            rec.update(bytes=len(data), header_sha256=hashlib.sha256(header).hexdigest())
        out.append(json.dumps(rec))
    (directory / "shards.jsonl").write_text("\n".join(out) + "\n")


# ------------------------------------------------------------------------------------------------------------
# hit / miss
# ------------------------------------------------------------------------------------------------------------
def test_miss_then_hit_does_not_run_the_model(vit, images, root):
    first = get(root, vit, images)
    assert (first.misses, first.hits) == (N, 0)
    assert vit.images == N
    assert first.global_.shape == (N, 64) and first.global_.dtype == torch.float32 and first.local is None
    assert first.global_.device.type == "cpu"

    vit.calls = vit.images = 0
    second = get(root, vit, images)  # a new FeatureCache object: what another run sees
    assert (second.misses, second.hits) == (0, N)
    assert vit.calls == 0
    assert torch.equal(first.global_, second.global_)
    assert second.keys == first.keys


def test_cached_features_equal_direct_encoding(vit, images, root):
    got = get(root, vit, images)
    assert torch.equal(got.global_, direct(vit, images, eval_tf()))
    hit = get(root, vit, images)
    assert torch.equal(hit.global_, direct(vit, images, eval_tf()))


@pytest.mark.parametrize("kind,size,tokens", [("vit", 32, 16), ("rn", 64, 4)])
def test_local_features_shape_and_values(kind, size, tokens, vit, rn, images, root):
    backbone = vit if kind == "vit" else rn
    tf = eval_tf(size)
    got = get(root, backbone, images, tf, transform_id=f"eval{size}", local=True)
    assert got.global_.shape == (N, 64)
    assert got.local.shape == (N, tokens, 64)
    g, loc = direct(backbone, images, tf, local=True)
    assert torch.equal(got.global_, g) and torch.equal(got.local, loc)
    hit = get(root, backbone, images, tf, transform_id=f"eval{size}", local=True)
    assert hit.hits == N and torch.equal(hit.local, got.local) and torch.equal(hit.global_, got.global_)


def test_partial_hit_encodes_only_new_images(vit, images, root):
    first = get(root, vit, images[:3], shard_size=2)
    assert vit.images == 3
    vit.images = 0
    both = get(root, vit, images, shard_size=2)
    assert (both.hits, both.misses) == (3, N - 3)
    assert vit.images == N - 3
    assert torch.equal(both.global_[:3], first.global_)
    assert torch.allclose(both.global_, direct(vit, images, eval_tf()), atol=1e-5)
    # order of the request is kept, and duplicates are served
    vit.images = 0
    mixed = get(root, vit, [images[4], images[0], images[4]])
    assert vit.images == 0 and mixed.hits == 2
    assert torch.equal(mixed.global_, both.global_[[4, 0, 4]])


def test_dataset_interface_shares_the_cache_with_paths(vit, images, root):
    class DS(torch.utils.data.Dataset):
        def __init__(self, paths, transform):
            self.paths, self.transform = paths, transform

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return self.transform(Image.open(self.paths[i]).convert("RGB")), i

    by_paths = get(root, vit, images)
    vit.calls = 0
    by_ds = FeatureCache(root, progress=False).get(vit, DS(images, eval_tf()), transform_id="eval32")
    assert by_ds.hits == N and vit.calls == 0
    assert torch.equal(by_ds.global_, by_paths.global_)
    fresh = FeatureCache(root / "other", progress=False).get(vit, DS(images, eval_tf()), transform_id="eval32")
    assert torch.equal(fresh.global_, by_paths.global_)
    with pytest.raises(CacheError, match="transform_id"):
        FeatureCache(root, progress=False).get(vit, DS(images, eval_tf()))


def test_objects_with_a_path_attribute_are_accepted(vit, images, root):
    class Sample:
        def __init__(self, path):
            self.path = path

    a = get(root, vit, images)
    vit.calls = 0
    b = get(root, vit, [Sample(p) for p in images])
    assert b.hits == N and vit.calls == 0 and torch.equal(a.global_, b.global_)


def test_empty_request_and_missing_file(vit, images, root):
    empty = get(root, vit, [])
    assert empty.global_.shape == (0, 64) and len(empty) == 0
    with pytest.raises(DataError, match="nope.png"):
        get(root, vit, images + [str(root / "nope.png")])


# ------------------------------------------------------------------------------------------------------------
# invalidation
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["weights", "transform_id", "view", "seed", "local", "dtype"])
def test_changing_a_key_part_misses(change, models, vit, images, root):
    base = get(root, vit, images)
    other = Counting(models[("tiny-vit", 1)])
    assert other.fingerprint != vit.fingerprint
    backbone, kw = vit, {}
    if change == "weights":
        backbone = other
    elif change == "transform_id":
        kw["transform_id"] = "eval32-v2"
    elif change == "view":
        kw["view"] = 1
    elif change == "seed":
        kw["seed"] = 1
    elif change == "local":
        kw["local"] = True
    elif change == "dtype":
        kw["dtype"] = torch.float16
    backbone.images = 0
    changed = get(root, backbone, images, **kw)
    assert (changed.hits, changed.misses) == (0, N)
    assert backbone.images == N
    assert changed.directory != base.directory
    if change == "weights":
        assert not torch.allclose(changed.global_, base.global_)
    # the original entry is still there and still valid
    vit.images = 0
    again = get(root, vit, images)
    assert again.hits == N and vit.images == 0 and torch.equal(again.global_, base.global_)


def test_modified_file_misses(vit, images, root):
    base = get(root, vit, images)
    write_noise(images[2], 100)  # new content
    st = os.stat(images[2])
    os.utime(images[2], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    vit.images = 0
    after = get(root, vit, images)
    assert (after.hits, after.misses) == (N - 1, 1) and vit.images == 1
    assert not torch.allclose(after.global_[2], base.global_[2])
    assert torch.allclose(after.global_, direct(vit, images, eval_tf()), atol=1e-5)
    others = [0, 1, 3, 4, 5]
    assert torch.equal(after.global_[others], base.global_[others])


def test_touched_file_misses_by_stat_but_hits_by_content_hash(vit, images, root):
    get(root, vit, images, hash_files=True)
    get(root / "stat", vit, images)
    st = os.stat(images[0])
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, new mtime
    assert get(root / "stat", vit, images).misses == 1
    assert get(root, vit, images, hash_files=True).misses == 0
    write_noise(images[0], 77)
    assert get(root, vit, images, hash_files=True).misses == 1


def test_float16_storage_returns_float32_identical_on_hit(vit, images, root):
    miss = get(root, vit, images, dtype=torch.float16, local=True)
    assert miss.global_.dtype == torch.float32 and miss.local.dtype == torch.float32
    g, loc = direct(vit, images, eval_tf(), local=True)
    assert torch.equal(miss.global_, g.half().float()) and torch.equal(miss.local, loc.half().float())
    hit = get(root, vit, images, dtype=torch.float16, local=True)
    assert hit.hits == N and torch.equal(hit.global_, miss.global_) and torch.equal(hit.local, miss.local)
    assert index_of(miss.directory)["dtype"] == "float16"


# ------------------------------------------------------------------------------------------------------------
# damage and recovery
# ------------------------------------------------------------------------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2  # inside the tensor data, past the JSON header
    for i in range(mid, mid + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _delete(path):
    path.unlink()


def _garbage(path):
    path.write_bytes(b"\x00" * path.stat().st_size)


@pytest.mark.parametrize("damage", [_truncate, _flip, _delete, _garbage], ids=["truncated", "corrupted", "deleted",
                                                                                   "zeroed"])
def test_damaged_shard_is_detected_and_rebuilt(damage, vit, images, root, caplog):
    kw = dict(shard_size=2, batch_size=2, local=True)
    first = get(root, vit, images, **kw)
    assert shards(first.directory) == ["shard-00000.safetensors", "shard-00001.safetensors",
                                       "shard-00002.safetensors"]
    damage(first.directory / "shard-00001.safetensors")
    vit.images = 0
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone.cache"):
        again = get(root, vit, images, **kw)
    assert "shard-00001.safetensors" in caplog.text and "invalid" in caplog.text
    assert (again.hits, again.misses) == (N - 2, 2) and vit.images == 2
    assert torch.equal(again.global_, first.global_) and torch.equal(again.local, first.local)
    # the cache is consistent again: everything hits, nothing is warned about
    caplog.clear()
    vit.images = 0
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone.cache"):
        third = get(root, vit, images, **kw)
    assert third.hits == N and vit.images == 0 and not caplog.records
    assert torch.equal(third.global_, first.global_)


def test_damage_in_the_flipped_region_really_changes_values(vit, images, root):
    """The corruption test above must hit tensor bytes, else it would pass for the wrong reason."""
    from safetensors.torch import load_file

    first = get(root, vit, images, shard_size=2, batch_size=2, local=True)
    path = first.directory / "shard-00001.safetensors"
    before = {k: v.clone() for k, v in load_file(str(path)).items()}  # load_file maps the file: copy
    _flip(path)
    after = load_file(str(path))
    assert before.keys() == after.keys() == {"global", "local"}
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fix_checksum", [False, True])
def test_wrong_shape_shard_is_detected(fix_checksum, vit, images, root, caplog):
    from safetensors.torch import save_file

    first = get(root, vit, images, shard_size=2, batch_size=2)
    d = first.directory
    path = d / "shard-00000.safetensors"
    keys = json.dumps([k for k in first.keys[:2]])
    save_file({"global": torch.zeros(2, 32)}, str(path), metadata={"keys": keys})
    if fix_checksum:  # a writer bug, not disk damage: only the shape check can tell
        rerecord(d, "shard-00000.safetensors")
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone.cache"):
        again = get(root, vit, images, shard_size=2, batch_size=2)
    assert "shard-00000.safetensors" in caplog.text
    assert ("expected" in caplog.text) if fix_checksum else ("bytes" in caplog.text or "checksum" in caplog.text)
    assert again.misses == 2 and torch.equal(again.global_, first.global_)


def test_shard_with_other_keys_is_detected(vit, images, root, caplog):
    """A valid shard whose rows belong to other images (index and shard out of step) is never used."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    first = get(root, vit, images, shard_size=2, batch_size=2)
    d = first.directory
    path = d / "shard-00000.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "keys": json.dumps(first.keys[2:4])})
    rerecord(d, "shard-00000.safetensors")
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone.cache"):
        again = get(root, vit, images, shard_size=2, batch_size=2)
    assert "holds" in caplog.text and again.misses == 2
    assert torch.equal(again.global_, first.global_)


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", '{"shards": {}}'])
def test_broken_index_is_rebuilt(content, vit, images, root, caplog):
    first = get(root, vit, images, shard_size=4)
    (first.directory / "index.json").write_text(content)
    vit.images = 0
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone.cache"):
        again = get(root, vit, images, shard_size=4)
    assert "index" in caplog.text
    assert again.misses == N and vit.images == N
    assert torch.equal(again.global_, first.global_)
    assert shards(again.directory) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert get(root, vit, images).hits == N


def test_index_of_other_features_is_rebuilt(vit, images, root, caplog):
    first = get(root, vit, images)
    index = index_of(first.directory)
    index["view"] = 3  # e.g. a directory copied by hand to the wrong place
    (first.directory / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone.cache"):
        again = get(root, vit, images)
    assert "other features" in caplog.text and again.misses == N


def test_kill_between_shard_and_index_write_leaves_a_consistent_cache(vit, images, root, monkeypatch):
    first = get(root, vit, images[:2], shard_size=2, batch_size=2)
    real = cache_mod._append_journal

    def killed(directory, record):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(cache_mod, "_append_journal", killed)
    with pytest.raises(KeyboardInterrupt):
        get(root, vit, images, shard_size=2, batch_size=2)
    d = first.directory
    assert len(shards(d)) == 2  # the new shard was written, the journal does not know it
    assert len(journal_of(d)[1]) == 2
    monkeypatch.setattr(cache_mod, "_append_journal", real)

    vit.images = 0
    again = get(root, vit, images, shard_size=2, batch_size=2)
    assert (again.hits, again.misses) == (2, N - 2) and vit.images == N - 2
    assert torch.equal(again.global_[:2], first.global_)
    assert torch.allclose(again.global_, direct(vit, images, eval_tf()), atol=1e-5)
    live, entries = journal_of(d)
    assert sorted(live) == shards(d) and len(entries) == N
    assert get(root, vit, images).hits == N


def test_leftovers_of_a_killed_writer_are_ignored_and_removed(vit, images, root):
    first = get(root, vit, images[:2])
    d = first.directory
    (d / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"half a shard")
    (d / "shard-00007.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # not in the index
    again = get(root, vit, images)
    assert (again.hits, again.misses) == (2, N - 2)
    assert not (d / ".shard-00001.safetensors.abc123.tmp").exists()
    assert sorted(journal_of(d)[0]) == shards(d)
    assert torch.allclose(again.global_, direct(vit, images, eval_tf()), atol=1e-5)


def test_kill_during_encoding_keeps_finished_shards(vit, images, root):
    class Dies(Counting):
        def encode_image(self, images, local=False):
            if self.calls == 2:
                raise RuntimeError("out of memory")
            return super().encode_image(images, local)

    dying = Dies(vit.backbone)
    with pytest.raises(RuntimeError):
        get(root, dying, images, shard_size=2, batch_size=2)
    vit.images = 0
    again = get(root, vit, images, shard_size=2, batch_size=2)
    assert (again.hits, again.misses) == (4, 2) and vit.images == 2


def test_concurrent_writers_do_not_corrupt_the_cache(vit, images, root):
    errors = []

    def run(subset):
        try:
            for _ in range(3):
                FeatureCache(root, shard_size=1, progress=False).get(vit.backbone, subset, eval_tf(),
                                                                      transform_id="eval32", batch_size=1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in (images[:4], images[2:], images[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    vit.images = 0
    final = get(root, vit, images)
    assert final.hits == N and vit.images == 0
    assert sorted(journal_of(final.directory)[0]) == shards(final.directory)
    assert torch.allclose(final.global_, direct(vit, images, eval_tf()), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# augmented views
# ------------------------------------------------------------------------------------------------------------
def test_views_are_deterministic_and_independent_of_batching(vit, images, root):
    tf = aug_tf()
    fc = FeatureCache(root, progress=False)
    a = fc.get(vit, images, tf, transform_id="aug", view=1, batch_size=4)
    rev = FeatureCache(root / "b", progress=False).get(vit, images[::-1], tf, transform_id="aug", view=1,
                                                       batch_size=1)
    workers = FeatureCache(root / "c", progress=False).get(vit, images, tf, transform_id="aug", view=1,
                                                           batch_size=3, num_workers=2)
    assert torch.allclose(rev.global_.flip(0), a.global_, atol=1e-5)
    assert torch.allclose(workers.global_, a.global_, atol=1e-5)
    # the images themselves are bitwise identical whatever the order
    imgs = fc.transformed(images, tf, view=1)
    assert torch.equal(fc.transformed(images[::-1], tf, view=1).flip(0), imgs)
    assert torch.equal(a.global_, vit.encode_image(imgs))  # same single batch: exact
    # another view, another seed: other images
    other_view = fc.transformed(images, tf, view=2)
    other_seed = fc.transformed(images, tf, view=1, seed=5)
    for other in (other_view, other_seed):
        assert all(not torch.equal(other[i], imgs[i]) for i in range(N))
    b = fc.get(vit, images, tf, transform_id="aug", view=2)
    assert not torch.allclose(b.global_, a.global_, atol=1e-3)


def test_view_seeding_does_not_touch_the_global_rngs(vit, images, root):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    FeatureCache(root, progress=False).get(vit, images, aug_tf(), transform_id="aug", view=3)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_view_seed_is_a_stable_hash():
    assert view_seed(0, 1, "cls/a.png:10") == view_seed(0, 1, "cls/a.png:10")
    assert len({view_seed(0, 1, "x"), view_seed(1, 1, "x"), view_seed(0, 2, "x"), view_seed(0, 1, "y")}) == 4
    # fixed value: Python's hash() randomisation must not be involved
    assert view_seed(0, 0, "") == int.from_bytes(
        __import__("hashlib").sha256(b"0|0|").digest()[:8], "little") & ((1 << 63) - 1)
    with seeded(5):
        a = (torch.rand(2), random.random())
    with seeded(5):
        b = (torch.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# ------------------------------------------------------------------------------------------------------------
# housekeeping
# ------------------------------------------------------------------------------------------------------------
def test_info_and_clear(vit, models, images, root):
    get(root, vit, images)
    get(root, vit, images, view=1)
    get(root, Counting(models[("tiny-vit", 1)]), images[:2])
    (root / "keep.txt").write_text("not the cache's")
    info = cache_info(root)
    assert len(info) == 3 and sorted(i["images"] for i in info) == [2, N, N]
    assert all(i["bytes"] > 0 and i["transform_id"] == "eval32" for i in info)
    assert clear_cache(root, fingerprint=vit.fingerprint) == 2
    assert len(cache_info(root)) == 1
    assert clear_cache(root) == 1 and cache_info(root) == []
    assert (root / "keep.txt").read_text() == "not the cache's"
    assert get(root, vit, images).misses == N


def test_bad_arguments(vit, images, root):
    with pytest.raises(CacheError):
        FeatureCache(root, shard_size=0)
    with pytest.raises(CacheError, match="dtype"):
        get(root, vit, images, dtype=torch.int8)
    with pytest.raises(CacheError, match="transform"):
        FeatureCache(root, progress=False).get(vit, images, None)


# ------------------------------------------------------------------------------------------------------------
# scale: lazy rows, cheap checks, an append-only journal, parallel extraction
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lazy_rows_equal_the_features_get_returns(dtype, rn, images, root):
    fc = FeatureCache(root, shard_size=2, progress=False)
    whole = fc.get(rn, images, eval_tf(64), transform_id="eval64", local=True, batch_size=3, dtype=dtype)
    rows = fc.open(rn, images, eval_tf(64), transform_id="eval64", local=True, dtype=dtype)
    assert (rows.hits, rows.misses) == (N, 0) and rows.local_tokens == whole.local.shape[1]
    for pick in ([4, 0, 5], [1, 2, 3], [2, 2], list(range(N))):  # across shards, one run, repeats, all
        g, loc = rows.read(torch.tensor(pick))
        assert g.dtype == loc.dtype == torch.float32
        assert torch.equal(g, whole.global_[pick]) and torch.equal(loc, whole.local[pick])


def test_adding_shards_appends_to_the_journal_without_rewriting_it(vit, images, root):
    fc = FeatureCache(root, shard_size=1, progress=False)
    first = fc.get(vit, images[:2], eval_tf(), transform_id="eval32")
    d = first.directory
    journal, index = (d / "shards.jsonl").read_bytes(), (d / "index.json").read_bytes()
    index_mtime = (d / "index.json").stat().st_mtime_ns
    fc.get(vit, images, eval_tf(), transform_id="eval32")
    grown = (d / "shards.jsonl").read_bytes()
    assert grown.startswith(journal) and grown.count(b"\n") == N  # one line per shard, the old ones untouched
    assert (d / "index.json").read_bytes() == index and (d / "index.json").stat().st_mtime_ns == index_mtime


def test_torn_last_journal_line_is_ignored_and_cut_off(vit, images, root):
    first = get(root, vit, images[:3], shard_size=3)
    d = first.directory
    with open(d / "shards.jsonl", "ab") as f:
        f.write(b'{"add":"shard-00001.safetensors","rows":3,"keys":["x')  # killed mid-append
    again = get(root, vit, images, shard_size=3)
    assert (again.hits, again.misses) == (3, N - 3)
    lines = (d / "shards.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])
    assert get(root, vit, images).hits == N and torch.equal(again.global_[:3], first.global_)


def test_lookup_reads_headers_and_each_row_is_checked_when_read(vit, images, root):
    """Opening does not re-hash tensor data: damage inside a row passes the cheap checks, is caught by that
    row's checksum when read (other rows of the shard stay readable), and drops the shard for the next run."""
    fc = FeatureCache(root, shard_size=N, progress=False)
    whole = fc.get(vit, images, eval_tf(), transform_id="eval32")
    d = whole.directory
    rows = fc.open(vit, images, eval_tf(), transform_id="eval32")
    shard = rows._shards[0]
    path = d / shard.name
    data = bytearray(path.read_bytes())
    row_bytes = rows.embed_dim * 4
    data[shard.global_offset + 3 * row_bytes + 5] ^= 0xFF  # row 3 only
    path.write_bytes(bytes(data))
    reopened = fc.open(vit, images, eval_tf(), transform_id="eval32")  # size and header are intact
    assert reopened.hits == N
    assert torch.equal(reopened.read(torch.tensor([0, 5]))[0], whole.global_[[0, 5]])
    with pytest.raises(cache_mod.CorruptRows, match="row 3 fails its checksum"):
        reopened.read(torch.tensor([2, 3]))
    assert not path.exists() and journal_of(d)[0] == {}
    vit.images = 0
    assert get(root, vit, images).misses == N and vit.images == N


def test_features_are_bitwise_identical_for_any_worker_count(tiny_rn, tmp_path):
    """Decode + augment run in DataLoader worker processes; each (image, view) keeps its own seed, and the
    tower sees the same batches, so the cached views do not depend on --workers."""
    from vlprompt.data.transforms import build_transforms

    d = tmp_path / "imgs" / "c"
    d.mkdir(parents=True)
    paths = []
    for i in range(7):
        write_noise(d / f"{i}.png", 100 + i)
        paths.append(str(d / f"{i}.png"))
    train_tf, _ = build_transforms(tiny_rn.preprocess_cfg, "coop")
    out = []
    for workers in (0, 1, 2):
        fc = FeatureCache(tmp_path / f"cache{workers}", progress=False)
        out.append(fc.get(tiny_rn, paths, train_tf, transform_id="train", view=1, local=True, batch_size=3,
                          num_workers=workers))
    for other in out[1:]:
        assert torch.equal(other.global_, out[0].global_) and torch.equal(other.local, out[0].local)
    assert out[0].global_.std(0).abs().sum() > 0  # the images differ: the comparison is not vacuous


def test_resnet_tower_in_channels_last_equals_the_plain_layout(models):
    """encode_image runs ResNet towers in channels_last (faster oneDNN convolutions); the numbers stay those of
    open_clip's plain forward to float32 rounding (relative 1e-5)."""
    import copy

    bb = models[("tiny-rn", 0)]
    plain = copy.deepcopy(bb.model).eval()
    plain.visual.to(memory_format=torch.contiguous_format)  # the fixture's tower may have been converted already
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = plain.encode_image(x)
    got = bb.encode_image(x)
    assert bb.model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.visual.layer1[0].conv2.weight.is_contiguous()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    g, loc = bb.encode_image(x, local=True)
    assert torch.allclose(g, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_frozen_resnet_encoding_folds_the_batch_norms_into_a_copy_and_computes_the_same(models, caplog):
    """Without gradients on a CPU a ResNet tower is encoded by a copy with every batch norm folded into the
    convolution before it: global and local features equal open_clip's plain forward to float32 rounding; the
    backbone's own tower keeps its batch norms (state dict and fingerprint unchanged); a change of the tower's
    weights rebuilds the copy; with gradients the tower itself runs; a folding that computes something else is
    refused with a warning and the tower itself runs."""
    import copy

    from vlprompt.backbone import model as backbone_model

    bb = copy.deepcopy(models[("tiny-rn", 0)])
    bb.__dict__.pop("_folded_visual", None)
    keys, fingerprint = sorted(bb.model.state_dict()), bb.fingerprint
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def plain():
        with torch.no_grad():
            return bb.model.encode_image(x)

    got, (g, loc) = bb.encode_image(x), bb.encode_image(x, local=True)
    folded = bb.__dict__["_folded_visual"][1]
    assert folded is not None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bb.model.visual.modules()) > 5
    ref = plain()
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert float((g - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert float((got - ref.roll(1, 0)).abs().max()) > 100 * float((got - ref).abs().max())
    assert sorted(bb.model.state_dict()) == keys
    bb._fingerprint = None
    assert bb.fingerprint == fingerprint
    with torch.no_grad():  # the weights change in place: the folded copy follows
        bb.model.visual.layer1[0].bn1.running_var.mul_(4.0)
    changed, ref = bb.encode_image(x), plain()
    assert float((changed - got).abs().max()) > 1e-3 * float(got.abs().max())
    assert float((changed - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # with gradients (a method learning through the tower), the tower itself
    calls = []
    hook = bb.model.visual.register_forward_hook(lambda *a: calls.append(1))
    bb.encode_image(x, grad=True)
    assert calls == [1]
    hook.remove()
    # a folding that does not compute what the tower computes is not used
    bb.__dict__.pop("_folded_visual")
    real = backbone_model.fold_batch_norms

    def wrong(module):
        out = real(module)
        with torch.no_grad():
            out.conv1.weight.mul_(1.5)
        return out

    backbone_model.fold_batch_norms = wrong
    try:
        with caplog.at_level("WARNING", logger="vlprompt"):
            again = bb.encode_image(x)
    finally:
        backbone_model.fold_batch_norms = real
    assert bb.__dict__["_folded_visual"][1] is None and "folded" in caplog.text
    assert float((again - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


# ------------------------------------------------------------------------------------------------------------
# read-only caches (a lab's shared cache, a read-only mount)
# ------------------------------------------------------------------------------------------------------------
def tree(folder):
    """Every file and folder under ``folder`` with its size and mtime: equal trees mean nothing was written."""
    return {str(p): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("access", [True, False], ids=["os.access says read-only", "writes fail"])
def test_a_read_only_cache_serves_what_it_holds_and_a_miss_names_it(access, vit, images, root, read_only):
    filled = get(root, vit, images[:4], local=True)
    before = tree(root)
    read_only(root, access=access)
    vit.images = 0
    again = get(root, vit, images[:4], local=True)
    assert (again.hits, again.misses) == (4, 0) and vit.images == 0
    assert torch.equal(again.global_, filled.global_) and torch.equal(again.local, filled.local)
    rows = FeatureCache(root, progress=False).open(vit, images[:4], eval_tf(), transform_id="eval32", local=True)
    assert torch.equal(rows.read(torch.tensor([3, 0]))[0], filled.global_[[3, 0]])
    rows.close()
    for request in (dict(paths=images), dict(paths=images[:4], transform_id="another")):  # 2 missing; a new dir
        with pytest.raises(CacheError) as e:
            get(root, vit, request["paths"], local=True, transform_id=request.get("transform_id", "eval32"))
        message = str(e.value)
        assert "\n" not in message and f"feature cache {root} is read-only" in message
        assert "pass a writable --cache-dir" in message
    assert "lacks 2 of the 6" in str(CacheError_of(lambda: get(root, vit, images, local=True)))
    assert vit.images == 0 and tree(root) == before


def CacheError_of(call):
    with pytest.raises(CacheError) as e:
        call()
    return e.value


def test_a_read_only_cache_with_damaged_shards_is_left_as_it_is(vit, images, root, read_only, caplog):
    first = get(root, vit, images, shard_size=2, batch_size=2)
    _flip(first.directory / "shard-00001.safetensors")  # found when its rows are read (row checksums)
    _truncate(first.directory / "shard-00002.safetensors")  # found at look-up (byte size)
    before = tree(root)
    read_only(root)
    with caplog.at_level(logging.WARNING, logger="vlprompt.backbone.cache"):
        assert get(root, vit, images[:2]).hits == 2  # the intact shard still serves
        message = str(CacheError_of(lambda: get(root, vit, images[:4])))
        assert "shard-00001.safetensors is invalid" in message and "read-only" in message
        message = str(CacheError_of(lambda: get(root, vit, images)))
        assert "lacks 2 of the 6" in message  # the truncated shard's images
    assert "shard-00002.safetensors is invalid" in caplog.text and "not using it (read-only cache)" in caplog.text
    assert tree(root) == before and vit.images == N  # nothing dropped, rewritten or encoded


def test_clearing_a_read_only_cache_is_one_line(vit, images, root, read_only):
    get(root, vit, images)
    read_only(root)
    with pytest.raises(CacheError, match="read-only here .* cannot be cleared"):
        clear_cache(root)
