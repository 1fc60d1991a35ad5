"""Pixel statistics of a weights file: those its architecture's open_clip pretrained tags all agree on, else
open_clip's defaults said in log.txt and results.json; settable (--image-mean / --image-std /
--image-interpolation / --image-resize-mode), part of the run's identity, and carried to eval / export / predict."""
import json
import warnings

import open_clip
import pytest
import yaml
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from conftest import color_folder
from vlprompt.backbone import load_backbone, tag_pixel_statistics
from vlprompt.cli import main
from vlprompt.errors import BackboneError
from vlprompt.runs import export_run, load_method, resolve, run
from vlprompt.runs.assembly import recorded_pixels, transforms_for
from vlprompt.testing import make_tiny_checkpoint

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pixel_models"), "tiny-vit", seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("pixel_data") / "things", per_class=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pixel_cache"))


def _tags_like(monkeypatch, model_files, *architectures):
    """Give the tiny model's architecture the pretrained tags of real open_clip architectures (metadata only)."""
    name = model_files[0].stem
    table = {}
    for arch in architectures:
        table.update({f"{arch.lower().replace('-', '_')}_{tag}": open_clip.get_pretrained_cfg(arch, tag)
                      for tag in open_clip.list_pretrained_tags_by_model(arch)})
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, table)


def _load(model_files, **kw):
    cfg, weights = model_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(str(cfg), str(weights), device="cpu", **kw)


def _normalize(tf) -> T.Normalize:
    return next(step for step in tf.transforms if isinstance(step, T.Normalize))


def test_real_tags_agree_for_mobileclip_and_disagree_for_vit_l():
    tags, agreed, differing = tag_pixel_statistics("MobileCLIP-S1")
    assert tags and agreed == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear",
                               "resize_mode": "shortest"} and not differing
    tags, agreed, differing = tag_pixel_statistics("ViT-L-14")
    assert set(differing) == {"mean", "std"} and agreed["interpolation"] == "bicubic"
    assert tag_pixel_statistics("no-such-architecture") == ([], {}, {})


def test_a_weights_file_gets_the_statistics_all_its_tags_agree_on(monkeypatch, model_files):
    _tags_like(monkeypatch, model_files, "MobileCLIP-S1", "MobileCLIP-S2")
    bb = _load(model_files)
    stats = bb.pixel_statistics
    assert stats["mean"] == [0.0, 0.0, 0.0] and stats["std"] == [1.0, 1.0, 1.0]
    assert stats["interpolation"] == "bilinear" and "which all agree" in stats["source"]
    assert not bb.pixel_fallback
    train_tf, test_tf = transforms_for("coop", bb)
    assert list(_normalize(test_tf).mean) == [0.0, 0.0, 0.0] and list(_normalize(train_tf).std) == [1.0, 1.0, 1.0]
    assert test_tf.transforms[0].interpolation == InterpolationMode.BILINEAR


@pytest.mark.parametrize("tags", [("ViT-L-14",), ()], ids=["disagreeing", "tagless"])
def test_disagreeing_or_no_tags_get_the_defaults_said_in_log_and_results(tags, monkeypatch, model_files, folder,
                                                                         cache_dir, tmp_path):
    if tags:
        _tags_like(monkeypatch, model_files, *tags)
    bb = _load(model_files)
    assert bb.pixel_fallback and bb.pixel_statistics["mean"] == CLIP_MEAN
    why = "pretrained tags disagree" if tags else "has no open_clip pretrained tag"
    assert why in bb.pixel_statistics["source"] and "--image-mean" in bb.pixel_statistics["source"]
    cfg, weights = model_files
    results = run({"method": "zeroshot", "backbone": str(cfg), "pretrained": str(weights), "cache_dir": cache_dir,
                   "device": "cpu", "data": {"dataset": "folder", "root": str(folder)}}, tmp_path / "zs",
                  progress=False)
    assert results["pixel_statistics"]["mean"] == CLIP_MEAN and why in results["pixel_statistics"]["source"]
    log = (tmp_path / "zs" / "log.txt").read_text()
    assert "WARNING pixel statistics: mean" in log and why in log


def test_a_resize_mode_fallback_warns_only_where_the_policy_resizes_so(monkeypatch, model_files, caplog):
    import logging

    from vlprompt.runs.assembly import log_pixel_statistics

    _tags_like(monkeypatch, model_files, "ViT-H-14")  # its tags agree but on the resize mode
    bb = _load(model_files)
    assert bb.pixel_fallback == ("resize_mode",) and bb.pixel_statistics["interpolation"] == "bicubic"
    with caplog.at_level(logging.INFO, logger="vlprompt"):
        log_pixel_statistics(bb, "coop")  # CoOp's policy resizes the short side: nothing to warn about
        log_pixel_statistics(bb, "model")
    assert [r.levelname for r in caplog.records if "pixel statistics" in r.getMessage()] == ["INFO", "WARNING"]


def test_flags_change_the_transform_the_identity_and_follow_the_run(model_files, folder, cache_dir, tmp_path,
                                                                    capsys):
    cfg, weights = model_files
    base = {"method": "zeroshot", "backbone": str(cfg), "pretrained": str(weights), "cache_dir": cache_dir,
            "device": "cpu", "data": {"dataset": "folder", "root": str(folder)}}
    pixels = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "image_interpolation": "bilinear"}
    plain, given = resolve(base), resolve({**base, **pixels})
    assert given.identity()["image_mean"] == [0.5, 0.5, 0.5] and "image_mean" not in plain.identity()
    assert given.identity_hash() != plain.identity_hash()
    # the command line makes the same configuration
    argv = ["zeroshot", "--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root",
            str(folder), "--cache-dir", cache_dir, "--device", "cpu", "--image-mean", "0.5", "0.5", "0.5",
            "--image-std", "0.25", "0.25", "0.25", "--image-interpolation", "bilinear", "--show-config", "--quiet"]
    assert main(argv) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert {k: shown[k] for k in pixels} == pixels

    results = run(given, tmp_path / "zs", progress=False)
    assert results["pixel_statistics"]["std"] == [0.25, 0.25, 0.25]
    assert results["config"]["image_mean"] == [0.5, 0.5, 0.5]
    # eval / export / predict load the backbone with the statistics the run used
    _, meta, bb = load_method(tmp_path / "zs", device="cpu")
    assert meta["pixels"]["mean"] == [0.5, 0.5, 0.5] and bb.pixel_statistics["interpolation"] == "bilinear"
    _, test_tf = transforms_for(meta["preprocess"], bb)
    assert list(_normalize(test_tf).mean) == [0.5, 0.5, 0.5] and list(_normalize(test_tf).std) == [0.25] * 3
    assert test_tf.transforms[0].interpolation == InterpolationMode.BILINEAR
    head = json.loads((export_run(tmp_path / "zs", device="cpu") / "head.json").read_text())
    assert recorded_pixels(head) == {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                                     "resize_mode": "shortest"}


def test_a_method_json_without_statistics_keeps_what_a_weights_file_got_before(monkeypatch, model_files):
    """method.json files written before the statistics were recorded: a weights file had open_clip's defaults."""
    _tags_like(monkeypatch, model_files, "MobileCLIP-S1")
    cfg, weights = model_files
    old = recorded_pixels({"backbone": str(cfg), "pretrained": str(weights)})
    assert old["mean"] == CLIP_MEAN and old["interpolation"] == "bicubic"
    assert _load(model_files, pixels=old).pixel_statistics["mean"] == CLIP_MEAN
    assert recorded_pixels({"backbone": "RN50", "pretrained": "openai"}) is None  # a tag: its own, as before


@pytest.mark.parametrize("flags, named", [
    (["--image-mean", "0.5", "0.5"], "--image-mean takes 3 numbers"),
    (["--image-std", "0", "1", "1"], "--image-std must be 3 numbers > 0"),
    (["--image-std", "1", "1", "1", "1"], "--image-std takes 3 numbers"),
    (["--image-mean", "nan", "0", "0"], "--image-mean takes 3 numbers"),
    (["--image-interpolation", "lanczos"], "--image-interpolation"),
    (["--image-resize-mode", "squash"], "--image-resize-mode squash does not apply to --preprocess coop"),
])
def test_invalid_statistics_are_refused_naming_the_flag(flags, named, model_files, folder, cache_dir, tmp_path,
                                                        capsys):
    cfg, weights = model_files
    rc = main(["zeroshot", "--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root",
               str(folder), "--cache-dir", cache_dir, "--output", str(tmp_path / "zs"), "--quiet", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and err.count("\n") == 1, err
    assert not (tmp_path / "zs").exists()
    with pytest.raises(BackboneError, match="--image-std must be 3 numbers > 0"):
        _load(model_files, pixels={"std": [1, 0, 1]})


def test_resize_mode_applies_to_the_model_policy(model_files, folder, cache_dir):
    cfg, weights = model_files
    given = resolve({"method": "zeroshot", "backbone": str(cfg), "pretrained": str(weights), "preprocess": "model",
                     "image_resize_mode": "squash", "data": {"dataset": "folder", "root": str(folder)}})
    bb = _load(model_files, pixels=given.pixels())
    assert bb.preprocess_cfg["resize_mode"] == "squash"
    _, test_tf = transforms_for("model", bb)
    assert type(test_tf.transforms[0]).__name__ == "Resize" and test_tf.transforms[0].size == (32, 32)
