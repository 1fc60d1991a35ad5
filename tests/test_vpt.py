"""VPT (deep and shallow) as the MaPLe repository runs it: equal to the original (tests/originals/vpt.py) on the same
weights in logits and gradients; the class text features of the hand-crafted prompt; ResNets and bad options
refused with one line; the published recipe as the preset; train / eval on new classes / export / predict /
import of an original checkpoint through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from originals import vpt
from towers_helpers import (LAYERS, NAMES, assert_gradients_equal, assert_logits_equal, assert_varies, cli,
                            images, method_gradients, randomise, to_original, tower_backbone, tower_folder,
                            write_dassl_log)
from vlprompt.errors import BackboneError, ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.runs.config import resolve


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return tower_backbone(tmp_path_factory.mktemp("vpt_model"))


@pytest.fixture(scope="module")
def bb(towers):
    return towers[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tower_folder(tmp_path_factory.mktemp("vpt_data") / "things")


@pytest.mark.parametrize("n_ctx, depth", [(3, LAYERS), (2, 1)])  # deep, shallow
def test_vpt_equals_the_original_in_logits_and_gradients(bb, n_ctx, depth):
    method = build_method("vpt", {"n_ctx_vision": n_ctx, "vision_depth": depth}, bb, NAMES)
    randomise(method)
    x, y = images(), torch.tensor([0, 1, 2, 0])
    logits = method(Features(images=x))
    learned = {k: v.detach().clone().requires_grad_() for k, v in to_original(method.learned_state()).items()}
    assert len(learned) == depth  # the input prompts and one set per deeper block
    text = vpt.fixed_text_features(bb.model, NAMES)
    ref = vpt.vpt_logits(bb.model, learned, x, text)
    assert_varies(ref.detach())
    assert_logits_equal(logits.detach(), ref.detach(), bb.logit_scale)
    ref_grads = dict(zip(learned, torch.autograd.grad(F.cross_entropy(ref, y), list(learned.values()))))
    assert_gradients_equal(method_gradients(method, F.cross_entropy(logits, y)), ref_grads)


def test_text_is_the_hand_crafted_prompt_of_every_dataset_and_templates_change_it(bb):
    method = build_method("vpt", {"vision_depth": 2}, bb, NAMES, template="{} texture.")
    assert method.templates == ["a photo of a {}."]  # the original's, whatever the dataset's own prompt
    torch.testing.assert_close(method.class_text, F.normalize(vpt.fixed_text_features(bb.model, NAMES), dim=-1),
                               rtol=1e-5, atol=1e-6)
    own = build_method("vpt", {"vision_depth": 2, "templates": ["dataset"]}, bb, NAMES, template="{} texture.")
    assert own.templates == ["{} texture."] and (own.class_text - method.class_text).abs().max() > 1e-3
    assert set(method.learned_state()) == {"deep.vision_input", "deep.vision.1"}  # the text learns nothing


def test_resnet_towers_and_bad_options_are_refused(bb, tiny_rn):
    with pytest.raises(BackboneError) as e:
        build_method("vpt", {}, tiny_rn, NAMES)
    assert "\n" not in str(e.value) and "vpt needs deep vision" in str(e.value)
    for options, message in (({"vision_depth": 0}, "must be >= 1"), ({"n_ctx_vision": 0}, "must be >= 1"),
                             ({"vision_depth": LAYERS + 1}, "exceeds the 4 layers of the image tower"),
                             ({"init_std": 0.0}, "must be > 0"), ({"templates": []}, "at least one template")):
        with pytest.raises(ConfigError, match=message):
            build_method("vpt", options, bb, NAMES)


def test_preset_is_the_published_deep_vpt_config(tmp_path):
    cfg = resolve({"method": "vpt", "data": {"dataset": "folder", "root": str(tmp_path), "shots": 16,
                                             "classes": "base"}})
    # configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml: N_CTX_VISION 8 (the "_4" file), depth 12 (l.34-37),
    # lr 0.0025, 5 epochs, warm-up (l.16-24), batch 4 (l.4); the text of trainers/vpt.py l.73
    assert cfg.method_options == {"templates": ["a photo of a {}."], "n_ctx_vision": 8, "vision_depth": 12,
                                  "init_std": 0.02}
    t = cfg.train
    assert (t.optimizer, t.lr, t.epochs, t.batch_size, t.momentum, t.weight_decay, t.warmup_epochs, t.warmup_lr) == (
        "sgd", 0.0025, 5, 4, 0.9, 5e-4, 1, 1e-5)


def _common(files, folder, cache):
    return ["--backbone", files[0], "--pretrained", files[1], "--dataset", "folder", "--root", folder,
            "--cache-dir", cache, "--quiet"]


def test_cli_trains_shallow_evaluates_new_classes_exports_predicts_and_imports(towers, folder, tmp_path, capsys):
    bb, files = towers
    run = tmp_path / "run"
    res = json.loads(cli(["train", "--method", "vpt", *_common(files, folder, tmp_path / "cache"), "--classes",
                          "base", "--shots", "2", "--epochs", "1", "--vision-depth", "1", "--n-ctx-vision", "2",
                          "--output", run], capsys)[0])
    assert res["train"]["steps"] == 1 and res["method_info"]["vision_prompt_blocks"] == []
    b2n = json.loads(cli(["eval", run, "--dataset", "folder", "--root", folder, "--base-to-new", "--quiet"],
                         capsys)[0])
    assert 0 <= b2n["new"] <= 100
    cli(["export", run, "--output", tmp_path / "head"], capsys)
    image = sorted(Path(folder).rglob("*.jpg"))[0]
    assert len(json.loads(cli(["predict", tmp_path / "head", image, "--json"], capsys)[0])[0]["top"]) == 2
    # an original VPT run: <output>/prompt_learner/model.pth.tar-5, the whole CustomCLIP in fp32
    init = vpt.init_vpt(bb.model, n_ctx_vision=3, depth_vision=12)
    learned = {k: torch.randn(v.shape) * 0.3 for k, v in init.items()}
    source = tmp_path / "source"
    vpt.write_original_checkpoint(source, learned, bb.model, epoch=5)
    write_dassl_log(source, vpt.dassl_config("deep", dataset="Things", shots=2, subsample="base"))
    out = tmp_path / "imported"
    res = json.loads(cli(["import", source, "--from", "vpt", *_common(files, folder, tmp_path / "cache"),
                          "--classes", "base", "--output", out], capsys)[0])
    assert (res["config"]["method_options"]["vision_depth"], res["config"]["method_options"]["n_ctx_vision"]) == (
        LAYERS, 3)  # depth 12 in the config, prompts at the 3 deeper blocks of this 4-layer tower
    import vlprompt
    from vlprompt.data import load_dataset, load_image
    from vlprompt.runs import transforms_for

    method, _, backbone = vlprompt.load_method(out)
    tf = transforms_for("coop", backbone)[1]
    x = torch.stack([tf(load_image(str(p))) for p in sorted(Path(folder).rglob("*.jpg"))[:3]])
    base = load_dataset("folder", str(folder)).classnames[:2]
    with torch.no_grad():
        reference = vpt.vpt_logits(backbone.model, learned, x, vpt.fixed_text_features(backbone.model, base))
        assert_logits_equal(method(Features(images=x)), reference, backbone.logit_scale)
