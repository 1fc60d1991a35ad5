"""Preprocessing that follows the weights: preprocess_cfg, build_transforms, hf-hub / local-dir backbones,
seeded augmentation through per-call generators."""
from __future__ import annotations

import json
import threading
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from vlprompt.backbone import load_backbone
from vlprompt.backbone.cache import FeatureCache
from vlprompt.data.transforms import (CLIP_MEAN, CLIP_STD, SeededCompose, build_test_transform, build_train_transform,
                                      build_transforms, transform_id)
from vlprompt.errors import BackboneError, DataError
from vlprompt.testing import TINY_CONFIGS, sharpen_

HALF = [0.5, 0.5, 0.5]
PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]


def _images(n=4, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(50, 40), (37, 61), (64, 64), (120, 45), (45, 120), (80, 100)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


def _clip_cfg(size=224):
    """What open_clip resolves for RN50 + the openai tag (defaults merged with the tag's metadata)."""
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), get_pretrained_cfg("RN50", "openai"))
    return {**cfg, "size": (size, size)}


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    """A directory laid out as open_clip's local-dir: loader expects (open_clip_config.json + weights)."""
    import open_clip

    d = tmp_path_factory.mktemp("local_model")
    cfg = TINY_CONFIGS["tiny-vit"]
    torch.manual_seed(3)
    model = sharpen_(open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"]))
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": HALF, "std": HALF, "interpolation": "bilinear"}}))
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    return d


def _logits(image_feats, text_feats, scale):
    return scale * F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T


# ------------------------------------------------------------------------------------------------------------
# hf-hub / local-dir backbones and the preprocess config that comes with them
# ------------------------------------------------------------------------------------------------------------
def test_local_dir_zero_shot_equals_open_clips_own_pipeline(local_dir):
    import open_clip

    name = f"local-dir:{local_dir}"
    images = _images(4)
    bb = load_backbone(name, None, device="cpu")
    assert bb.preprocess_cfg["mean"] == HALF and bb.preprocess_cfg["std"] == HALF
    json.dumps(bb.preprocess_cfg)  # JSON-able
    _, test_tf = build_transforms(bb.preprocess_cfg, policy="model")
    ours = _logits(bb.encode_image(torch.stack([test_tf(im) for im in images])), bb.encode_text(PROMPTS),
                   bb.logit_scale)

    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        theirs = _logits(model.encode_image(torch.stack([preprocess(im) for im in images])),
                         model.encode_text(tokenizer(PROMPTS)), model.logit_scale.exp().item())
    assert ours.std() > 0.1  # the images are told apart: the comparison means something
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_coop_policy_normalizes_with_the_weights_statistics(local_dir):
    bb = load_backbone(f"local-dir:{local_dir}", None, device="cpu")
    train, test = build_transforms(bb.preprocess_cfg, policy="coop")
    for tf in (train, test):
        norm = tf.transforms[-1]
        assert isinstance(norm, T.Normalize) and list(norm.mean) == HALF and list(norm.std) == HALF
    assert test.transforms[0].interpolation == T.InterpolationMode.BILINEAR  # the weights' interpolation
    assert train.transforms[0].interpolation == T.InterpolationMode.BILINEAR
    assert transform_id(test) != transform_id(build_test_transform(bb.image_size))


def test_model_policy_changes_train_and_test(local_dir):
    bb = load_backbone(f"local-dir:{local_dir}", None, device="cpu")
    m_train, m_test = build_transforms(bb.preprocess_cfg, policy="model")
    c_train, c_test = build_transforms(bb.preprocess_cfg, policy="coop")
    assert len({transform_id(t) for t in (m_train, m_test, c_train, c_test)}) == 4
    rrc = m_train.transforms[0]
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.scale == (0.9, 1.0)  # open_clip's train augmentation
    assert list(m_train.transforms[-1].mean) == HALF


def test_local_dir_with_a_weights_file_replaces_its_weights(local_dir, tmp_path):
    import open_clip

    cfg = TINY_CONFIGS["tiny-vit"]
    torch.manual_seed(11)
    other = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    torch.save(other.state_dict(), tmp_path / "other.pt")
    own = load_backbone(f"local-dir:{local_dir}", None, device="cpu")
    replaced = load_backbone(f"local-dir:{local_dir}", str(tmp_path / "other.pt"), device="cpu")
    assert replaced.fingerprint != own.fingerprint
    assert torch.equal(replaced.model.visual.conv1.weight, other.visual.conv1.weight)
    assert replaced.preprocess_cfg["mean"] == HALF  # preprocessing still from the directory
    with pytest.raises(BackboneError, match=r"^--pretrained openai: .* brings its own weights"):
        load_backbone(f"local-dir:{local_dir}", "openai", device="cpu")


def test_local_dir_problems_name_the_flag(tmp_path):
    with pytest.raises(BackboneError, match=r"^--backbone local-dir:.*no such directory"):
        load_backbone(f"local-dir:{tmp_path / 'nope'}", None, device="cpu")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIGS["tiny-vit"]}))
    with pytest.raises(BackboneError, match=r"^--backbone local-dir:.*no weights file"):
        load_backbone(f"local-dir:{tmp_path}", None, device="cpu")
    (tmp_path / "open_clip_config.json").write_text("{}")
    with pytest.raises(BackboneError, match="no open_clip 'model_cfg'"):
        load_backbone(f"local-dir:{tmp_path}", None, device="cpu")


def test_hf_hub_offline_fails_at_once_naming_the_flag():
    import time

    t0 = time.perf_counter()
    with pytest.raises(BackboneError, match=r"^--backbone hf-hub:org/none: could not fetch .*HF_HUB_OFFLINE"):
        load_backbone("hf-hub:org/none", None, device="cpu")
    assert time.perf_counter() - t0 < 5


def test_hf_hub_takes_config_weights_and_preprocessing_from_the_repo(local_dir, monkeypatch):
    """The hub repo is served from the local-dir files (no network): same model, same preprocessing."""
    import open_clip.factory
    import open_clip.pretrained

    import vlprompt.backbone.loading as backbone_mod

    served = []

    def fake_download(model_id, filename=None, revision=None, cache_dir=None):
        assert model_id == "org/tiny"
        served.append(filename)
        return str(local_dir / (filename or "open_clip_pytorch_model.bin"))

    monkeypatch.setattr(backbone_mod, "_hub_unreachable", lambda *a, **k: None)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", fake_download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", fake_download)
    hub = load_backbone("hf-hub:org/tiny", None, device="cpu")
    local = load_backbone(f"local-dir:{local_dir}", None, device="cpu")
    assert hub.fingerprint == local.fingerprint and hub.preprocess_cfg == local.preprocess_cfg
    assert None in served and "open_clip_config.json" in served


# ------------------------------------------------------------------------------------------------------------
# CLIP's own config: exactly today's transforms
# ------------------------------------------------------------------------------------------------------------
def test_clip_config_gives_todays_transforms_exactly():
    train, test = build_transforms(_clip_cfg(224), policy="coop")
    assert transform_id(test) == transform_id(build_test_transform(224))
    assert transform_id(train) == transform_id(build_train_transform(224))
    old_train, old_test = build_train_transform(224), build_test_transform(224)
    for k, img in enumerate(_images(6)):
        assert torch.equal(test(img), old_test(img))
        torch.manual_seed(k)
        expected = old_train(img)
        assert torch.equal(train(img, generator=torch.Generator().manual_seed(k)), expected)
        torch.manual_seed(k)
        assert torch.equal(train(img), expected)  # without a generator: the global RNG, as torchvision


def test_tiny_backbone_config_is_clips(tiny_vit):
    """Weights with no preprocess metadata get open_clip's defaults (CLIP's statistics, the tower's size)."""
    cfg = tiny_vit.preprocess_cfg
    assert tuple(cfg["mean"]) == CLIP_MEAN and tuple(cfg["std"]) == CLIP_STD and cfg["size"] == [32, 32]
    _, test = build_transforms(cfg)
    assert transform_id(test) == transform_id(build_test_transform(32))


def test_transform_ids_are_stable_and_distinct_per_config():
    base = _clip_cfg(224)
    variants = [base, {**base, "size": 336}, {**base, "mean": HALF}, {**base, "std": HALF},
                {**base, "interpolation": "bilinear"}]
    ids = []
    for cfg in variants:
        for policy in ("coop", "model"):
            a, b = build_transforms(cfg, policy), build_transforms(json.loads(json.dumps(cfg)), policy)
            assert [transform_id(t) for t in a] == [transform_id(t) for t in b]  # stable, JSON round trip too
            ids += [transform_id(t) for t in a]
    assert len(set(ids)) == len(ids) - 1  # only open_clip's train crop ignores interpolation (always bicubic)


@pytest.mark.parametrize("cfg,match", [
    ({"size": 224, "mean": HALF}, "missing std"),
    ({"size": 224, "mean": HALF, "std": HALF, "colour": 1}, "unknown key"),
    ({"size": 224, "mean": HALF, "std": [0.5, 0.0, 0.5]}, "std must be positive"),
    ({"size": 224, "mean": HALF, "std": HALF, "interpolation": "lanczos"}, "interpolation"),
    ({"size": 224, "mean": HALF, "std": HALF, "resize_mode": "crop"}, "resize_mode"),
    ({"size": 0, "mean": HALF, "std": HALF}, "size"),
])
def test_bad_preprocess_configs_are_refused(cfg, match):
    with pytest.raises(DataError, match=match):
        build_transforms(cfg)


def test_bad_policy_and_non_square_coop_are_refused():
    with pytest.raises(DataError, match="--preprocess"):
        build_transforms(_clip_cfg(), policy="clip")
    with pytest.raises(DataError, match="--preprocess model"):
        build_transforms({**_clip_cfg(), "size": [224, 256]}, policy="coop")
    build_transforms({**_clip_cfg(), "size": [224, 256]}, policy="model")


# ------------------------------------------------------------------------------------------------------------
# seeded augmentation: per-call generators
# ------------------------------------------------------------------------------------------------------------
def test_generator_draws_match_torchvision_including_the_fallback_crop():
    tf = SeededCompose([T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    ref = T.Compose(tf.transforms)
    # a 300x12 image makes most crops invalid: torchvision's central-crop fallback
    images = _images(3) + [Image.new("RGB", (300, 12), (10, 200, 30))]
    for img in images:
        for s in range(15):
            torch.manual_seed(s)
            assert torch.equal(tf(img, generator=torch.Generator().manual_seed(s)), ref(img))


def test_generator_calls_leave_the_global_rng_alone():
    train, _ = build_transforms(_clip_cfg(64))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train(_images(1)[0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), expected)


def test_seeded_compose_refuses_steps_that_escape_the_generator():
    with pytest.raises(DataError, match="ColorJitter"):
        SeededCompose([T.ColorJitter(0.5), T.ToTensor()])


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, img in enumerate(_images(12, seed=1)):
        p = d / f"c{i % 3}" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        img.resize((160, 130)).save(p)
        paths.append(str(p))
    return paths


def _views(backbone, root, paths, tf, tid, views=(1, 2), batch_size=3):
    fc = FeatureCache(root, progress=False)
    return torch.stack([fc.get(backbone, paths, tf, transform_id=tid, view=v, batch_size=batch_size).global_
                        for v in views])


@pytest.mark.parametrize("policy_tf", ["coop", "global_rng_transform"])
def test_views_from_two_threads_equal_one_thread(tiny_vit, image_files, tmp_path, policy_tf):
    """Features of an (image, view) do not depend on threads, order or batches: with the generator-taking
    train transform, and with a plain torchvision transform (seeded under a lock)."""
    if policy_tf == "coop":
        tf, _ = build_transforms(tiny_vit.preprocess_cfg)
    else:
        tf = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor()])
    tid = transform_id(tf)
    single = _views(tiny_vit, tmp_path / "single", image_files, tf, tid)
    results, errors = {}, []

    def run(key, paths, batch_size):
        try:
            results[key] = _views(tiny_vit, tmp_path / key, paths, tf, tid, batch_size=batch_size)
        except Exception as e:  # surfaced below: a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=run, args=("a", image_files, 1)),
               threading.Thread(target=run, args=("b", image_files[::-1], 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # batches of other sizes round differently; a mixed-up view differs by far more
    assert torch.allclose(results["a"], single, atol=1e-5)
    assert torch.allclose(results["b"].flip(1), single, atol=1e-5)
    assert not torch.allclose(single[0], single[1])  # the two views differ
