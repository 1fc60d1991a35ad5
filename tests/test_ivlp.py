"""IVLP and deep language prompting: equal to the original (muzairkhattak/multimodal-prompt-learning, written out
in tests/originals/ivlp.py) on the same weights in logits and gradients, on every text path; the original's word
init; widths and depths read from the model; ResNets and bad options refused with one line; the published recipes
as presets; train / eval on new classes / export / predict / import of an original checkpoint through the CLI."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from originals import ivlp, mpl_clip
from originals.mpl_dassl import loaded_by_original
from towers_helpers import (LAYERS, NAMES, assert_gradients_equal, assert_logits_equal, assert_varies, cli,
                            images, method_gradients, randomise, to_original, tower_backbone, tower_folder,
                            write_dassl_log)
from vlprompt.backbone import load_backbone
from vlprompt.errors import BackboneError, ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.runs.config import resolve
from vlprompt.safe_pickle import load_checkpoint


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return tower_backbone(tmp_path_factory.mktemp("ivlp_model"))


@pytest.fixture(scope="module")
def bb(towers):
    return towers[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tower_folder(tmp_path_factory.mktemp("ivlp_data") / "things")


def _reference(model, method, x, n_ctx, depth_text, depth_vision, classnames=NAMES):
    """The original's logits on ``method``'s tensors (as leaves with gradients) and its fixed prompt parts."""
    learned = {k: v.detach().clone().requires_grad_() for k, v in to_original(method.learned_state()).items()}
    _, fixed = ivlp.init_ivlp(model, classnames, n_ctx_text=n_ctx, n_ctx_vision=2, depth_text=depth_text,
                              depth_vision=depth_vision)
    return ivlp.ivlp_logits(model, learned, fixed, x), learned


# -- equality with the original --------------------------------------------------------------------------------
@pytest.mark.parametrize("text_mode", ["auto", "plain", "cut"])
@pytest.mark.parametrize("depths", [(LAYERS, LAYERS), (2, 3)])
def test_ivlp_equals_the_original_in_logits_and_gradients(bb, text_mode, depths):
    depth_text, depth_vision = depths
    method = build_method("ivlp", {"text_depth": depth_text, "vision_depth": depth_vision, "text_mode": text_mode},
                          bb, NAMES)
    randomise(method)
    x, y = images(), torch.tensor([0, 1, 2, 0])
    logits = method(Features(images=x))
    ref, learned = _reference(bb.model, method, x, 2, depth_text, depth_vision)
    assert_varies(ref.detach())
    assert_logits_equal(logits.detach(), ref.detach(), bb.logit_scale)
    grads = method_gradients(method, F.cross_entropy(logits, y))
    ref_grads = dict(zip(learned, torch.autograd.grad(F.cross_entropy(ref, y), list(learned.values()))))
    assert_gradients_equal(grads, ref_grads)
    assert len(grads) == 2 + (depth_text - 1) + (depth_vision - 1)  # ctx, vision input, every deep prompt


def test_deep_language_equals_the_original_language_only_config_on_cached_image_features(bb):
    method = build_method("deep-language", {"n_ctx": 4, "text_depth": LAYERS}, bb, NAMES)
    randomise(method)
    assert method.input_kinds(method.config) == {"global"}  # the frozen image features: from the cache
    x, y = images(), torch.tensor([0, 1, 2, 0])
    logits = method(Features(global_=bb.encode_image(x)))
    learned = {k: v.detach().clone().requires_grad_() for k, v in to_original(method.learned_state()).items()}
    _, fixed = ivlp.init_ivlp(bb.model, NAMES, n_ctx_text=4, n_ctx_vision=0, depth_text=LAYERS, depth_vision=0)
    assert fixed["prompt_prefix"] == "a photo of a"
    ref = ivlp.ivlp_logits(bb.model, learned, fixed, x)
    assert_logits_equal(logits.detach(), ref.detach(), bb.logit_scale)
    ref_grads = dict(zip(learned, torch.autograd.grad(F.cross_entropy(ref, y), list(learned.values()))))
    assert_gradients_equal(method_gradients(method, F.cross_entropy(logits, y)), ref_grads)


def test_word_init_learns_the_first_tokens_and_keeps_the_rest_of_the_init_fixed(bb):
    method = build_method("ivlp", {"text_depth": 2, "vision_depth": 2}, bb, NAMES)  # 2 vectors, "a photo of a"
    ctx, prefix = mpl_clip.context_init(bb.model, 2, "a photo of a")
    torch.testing.assert_close(method.prompt.ctx[0, 0].detach(), ctx, rtol=0, atol=0)  # "a photo"
    parts = mpl_clip.class_prompts(bb.model, NAMES, prefix, 2)  # "a photo of a {class}."
    expected = mpl_clip.construct_prompts(ctx, parts["token_prefix"], parts["token_suffix"])
    torch.testing.assert_close(method.prompt.full_embeddings()[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(method.prompt.eot, parts["tokenized_prompts"].argmax(-1))
    # all four words learned with 4 vectors; random without an init
    assert build_method("deep-language", {"n_ctx": 4, "text_depth": 2}, bb, NAMES).prompt.tail.shape[1] == 72
    random = build_method("deep-language", {"n_ctx": 3, "init": None, "text_depth": 2}, bb, NAMES)
    assert 0.01 < float(random.prompt.ctx.detach().std()) < 0.03
    with pytest.raises(ConfigError, match="has 4 tokens"):  # the original would learn <eot> and padding
        build_method("ivlp", {"n_ctx": 5, "text_depth": 2, "vision_depth": 2}, bb, NAMES)


def test_widths_and_depths_are_read_from_the_model(tmp_path):
    """Towers of other widths and depths (text 3 blocks of 64, image 5 blocks of 128): no width or depth is
    hard-coded; a depth is bounded by its own tower."""
    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 5, "width": 128, "patch_size": 16,
                                           "head_width": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3}}
    model = open_clip.CLIP(**cfg)
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = load_backbone(str(tmp_path / "m.json"), str(tmp_path / "m.pt"), "cpu")
    method = build_method("ivlp", {"text_depth": 3, "vision_depth": 5, "n_ctx_vision": 3}, other, NAMES)
    shapes = {k: tuple(v.shape) for k, v in method.learned_state().items()}
    assert shapes == {"prompt.ctx": (1, 1, 2, 64), "deep.vision_input": (3, 128),
                      **{f"deep.text.{i}": (2, 64) for i in (1, 2)},
                      **{f"deep.vision.{i}": (3, 128) for i in (1, 2, 3, 4)}}
    x = images(2)
    with torch.no_grad():
        assert method(Features(images=x)).shape == (2, 3)
    with pytest.raises(ConfigError, match=r"text_depth \(--text-depth\) 5 exceeds the 3 layers of the text tower"):
        build_method("ivlp", {"text_depth": 5, "vision_depth": 5}, other, NAMES)
    with pytest.raises(ConfigError, match=r"vision_depth \(--vision-depth\) 6 exceeds the 5 layers of the image"):
        build_method("ivlp", {"text_depth": 3, "vision_depth": 6}, other, NAMES)


def test_resnet_image_towers_are_refused_in_one_line_and_deep_language_runs_on_them(tiny_rn):
    with pytest.raises(BackboneError) as e:
        build_method("ivlp", {"text_depth": 2, "vision_depth": 2}, tiny_rn, NAMES)
    assert "\n" not in str(e.value) and "ivlp needs deep vision" in str(e.value) and "ResNet" in str(e.value)
    method = build_method("deep-language", {"text_depth": 2}, tiny_rn, NAMES)  # text prompts only: any tower
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert method(Features(global_=tiny_rn.encode_image(x))).shape == (2, 3)


@pytest.mark.parametrize("options, message", [
    ({"vision_depth": 0, "n_ctx_vision": 0}, "--method deep-language"),
    ({"vision_depth": 0}, "need both above 0"),
    ({"n_ctx_vision": 0}, "need both above 0"),
    ({"text_depth": 0}, "must be >= 1"),
    ({"class_position": "middle"}, "must be the context"),
    ({"init_length": "n_ctx", "n_ctx": None}, "give --n-ctx"),
])
def test_bad_options_are_refused_when_the_config_is_built(bb, options, message):
    with pytest.raises(ConfigError, match=message):
        build_method("ivlp", {"text_depth": 2, "vision_depth": 2, **options}, bb, NAMES)


@pytest.mark.parametrize("options, message", [
    ({"text_depth": LAYERS + 1}, "exceeds the 4 layers of the text tower"),
    ({"class_position": "front"}, "must be the context"),
    ({"vision_depth": 2}, "unknown option"),  # no vision prompts: not an option of deep language prompting
    ({"init": "a photo", "n_ctx": 3}, "has 2 tokens"),
])
def test_deep_language_refuses_bad_options(bb, options, message):
    with pytest.raises(ConfigError, match=message):
        build_method("deep-language", {"text_depth": 2, **options}, bb, NAMES)


# -- presets --------------------------------------------------------------------------------------------------
def test_presets_are_the_published_configs(tmp_path):
    data = {"dataset": "folder", "root": str(tmp_path), "shots": 16, "classes": "base"}
    cfg = resolve({"method": "ivlp", "backbone": "ViT-B-16", "data": data})
    # configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml l.34-39 (prompts), l.16-24 (optim), l.4 (batch)
    assert {k: cfg.method_options[k] for k in ("n_ctx", "n_ctx_vision", "text_depth", "vision_depth", "init",
                                               "init_length")} == {
        "n_ctx": 2, "n_ctx_vision": 2, "text_depth": 12, "vision_depth": 12, "init": "a photo of a",
        "init_length": "n_ctx"}
    t = cfg.train
    assert (t.optimizer, t.lr, t.epochs, t.batch_size, t.scheduler, t.warmup_epochs, t.warmup_lr) == (
        "sgd", 0.0035, 5, 4, "cosine", 1, 1e-5)
    assert (t.momentum, t.weight_decay) == (0.9, 5e-4)  # Dassl's defaults
    assert t.views is None  # the image tower runs on every step's images: no cached views
    # .../vit_b16_c2_ep5_batch4_4ctx_language_only.yaml: 4 words learned, depth 12, lr 0.0025
    lang = resolve({"method": "deep-language", "backbone": "ViT-B-16", "data": data})
    assert {k: lang.method_options[k] for k in ("n_ctx", "text_depth", "init")} == {
        "n_ctx": 4, "text_depth": 12, "init": "a photo of a"}
    assert "vision_depth" not in lang.method_options and lang.train.lr == 0.0025 and lang.train.epochs == 5
    assert lang.train.views == 10  # the frozen image features of cached views
    # the same recipe for every data (only base-to-new was published)
    other = resolve({"method": "ivlp", "data": {**data, "classes": "all", "dataset": "imagenet"}})
    assert other.train == cfg.train and other.method_options == cfg.method_options


# -- the command line -------------------------------------------------------------------------------------------
def _common(files, folder, cache):
    return ["--backbone", files[0], "--pretrained", files[1], "--dataset", "folder", "--root", folder,
            "--cache-dir", cache, "--quiet"]


def test_cli_trains_evaluates_new_classes_exports_and_predicts(towers, folder, tmp_path, capsys):
    _, files = towers
    run = tmp_path / "run"
    args = ["train", "--method", "ivlp", *_common(files, folder, tmp_path / "cache"), "--classes", "base",
            "--shots", "2", "--epochs", "2", "--text-depth", "3", "--vision-depth", "4", "--output", run]
    res = json.loads(cli(args, capsys)[0])
    assert res["train"]["steps"] == 2 and res["method_info"]["vision_prompt_blocks"] == [1, 2, 3]
    assert res["config"]["method_options"]["n_ctx"] == 2
    b2n = json.loads(cli(["eval", run, "--dataset", "folder", "--root", folder, "--base-to-new", "--quiet"],
                         capsys)[0])
    assert 0 <= b2n["new"] <= 100 and b2n["harmonic_mean"] >= 0
    cli(["export", run, "--output", tmp_path / "head"], capsys)
    assert json.loads((tmp_path / "head" / "head.json").read_text())["kind"] == "prompt"
    image = sorted(Path(folder).rglob("*.jpg"))[0]
    pred = json.loads(cli(["predict", tmp_path / "head", image, "--topk", "2", "--json"], capsys)[0])
    assert len(pred[0]["top"]) == 2 and {t["class"] for t in pred[0]["top"]} <= {"blue thing", "green thing",
                                                                                  "blue_thing", "green_thing"}
    # the prediction is the method's own forward on the preprocessed image (the prompted tower, not CLIP's)
    import vlprompt
    from vlprompt.data import load_image
    from vlprompt.runs import transforms_for

    method, _, backbone = vlprompt.load_method(run)
    x = transforms_for("coop", backbone)[1](load_image(str(image)))[None]
    with torch.no_grad():
        probs = method(Features(images=x)).softmax(-1)[0]
    assert pred[0]["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.parametrize("bad, message", [
    (["--text-depth", "9"], "exceeds the 4 layers"),
    (["--vision-depth", "0", "--n-ctx-vision", "0"], "--method deep-language"),
    (["--views", "3"], "does not apply"),
    (["--n-ctx", "6"], "has 4 tokens"),
])
def test_cli_refuses_bad_options_in_one_line_before_writing(towers, folder, tmp_path, capsys, bad, message):
    _, files = towers
    out = tmp_path / "run"
    _, err = cli(["train", "--method", "ivlp", *_common(files, folder, tmp_path / "cache"), "--shots", "2",
                  "--text-depth", "2", "--vision-depth", "2", *bad, "--output", out], capsys, code=2)
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_cli_refuses_a_resnet_backbone_in_one_line(tiny_dir, folder, tmp_path, capsys):
    from vlprompt.testing import make_tiny_checkpoint

    files = make_tiny_checkpoint(tiny_dir, "tiny-rn")
    _, err = cli(["train", "--method", "ivlp", *_common(files, folder, tmp_path / "cache"), "--shots", "2",
                  "--text-depth", "2", "--vision-depth", "2", "--output", tmp_path / "run"], capsys, code=2)
    assert "ivlp needs deep vision" in err and "ResNet" in err and err.count("\n") == 1


@pytest.mark.parametrize("method", ["ivlp", "deep-language"])
def test_import_of_an_original_checkpoint_equals_the_original(towers, folder, tmp_path, capsys, method):
    """A Dassl output folder as the original leaves it (``VLPromptLearner/model.pth.tar-5``, the whole CustomCLIP in
    fp16, its yacs config in log.txt; depth 12 on a 4-layer model: prompts at blocks 1..3) imports by the tensors'
    original names, and the imported run's logits are the original's on the saved tensors."""
    bb, files = towers
    from vlprompt.data import load_dataset, load_image
    from vlprompt.runs import transforms_for

    base = load_dataset("folder", str(folder)).classnames[:2]
    recipe = "ivlp" if method == "ivlp" else "language_only"
    keys = ("n_ctx_text", "n_ctx_vision", "depth_text", "depth_vision", "ctx_init")
    learned, fixed = ivlp.init_ivlp(bb.model, base, **{k: ivlp.RECIPES[recipe][k] for k in keys},
                                    generator=torch.Generator().manual_seed(3))
    learned = {k: (v if k == "prompt_learner.ctx" else torch.randn(v.shape) * 0.3) for k, v in learned.items()}
    source = tmp_path / "source"
    path = ivlp.write_original_checkpoint(source, {**learned, **fixed}, bb.model, epoch=5)
    write_dassl_log(source, ivlp.dassl_config(recipe, dataset="Things", shots=2, subsample="base"))
    run = tmp_path / "imported"
    res = json.loads(cli(["import", source, "--from", method, *_common(files, folder, tmp_path / "cache"),
                          "--classes", "base", "--output", run], capsys)[0])
    assert res["imported_from"]["path"] == str(path.resolve()) and res["shots"] == 2
    opts = res["config"]["method_options"]
    assert (opts["text_depth"], opts["n_ctx"], opts["init"]) == (LAYERS, ivlp.RECIPES[recipe]["n_ctx_text"],
                                                                  "a photo of a")
    assert res["config"]["train"]["lr"] == ivlp.RECIPES[recipe]["lr"]
    import vlprompt

    imported, _, backbone = vlprompt.load_method(run)
    samples = sorted(Path(folder).rglob("*.jpg"))[:3]
    tf = transforms_for("coop", backbone)[1]
    x = torch.stack([tf(load_image(str(p))) for p in samples])
    saved = {k: v.float() for k, v in loaded_by_original(load_checkpoint(path)["state_dict"]).items()
             if k in learned}  # as saved (the context in fp16)
    with torch.no_grad():
        feats = Features(images=x, global_=backbone.encode_image(x))
        ours = imported(feats)
        reference = ivlp.ivlp_logits(backbone.model, saved, fixed, x)
    assert_varies(reference, min_std=0.01)
    assert_logits_equal(ours, reference, backbone.logit_scale)
    # the other name refuses it, naming the one to use
    other = "deep-language" if method == "ivlp" else "ivlp"
    _, err = cli(["import", source, "--from", other, *_common(files, folder, tmp_path / "cache"), "--classes",
                  "base", "--output", tmp_path / "other"], capsys, code=2)
    assert f"--from {method}" in err


def test_import_refuses_another_backbone_and_another_class_list(towers, folder, tmp_path, capsys, tiny_dir):
    bb, files = towers
    from vlprompt.data import load_dataset

    names = load_dataset("folder", str(folder)).classnames
    learned, fixed = ivlp.init_ivlp(bb.model, names[::-1], depth_text=3, depth_vision=3)
    source = tmp_path / "source"
    ivlp.write_original_checkpoint(source, {**learned, **fixed}, bb.model, epoch=5)
    write_dassl_log(source, ivlp.dassl_config("ivlp", dataset="Things", shots=2, subsample="all"))
    _, err = cli(["import", source, "--from", "ivlp", *_common(files, folder, tmp_path / "cache"), "--output",
                  tmp_path / "a"], capsys, code=2)
    assert "class tokens of class 0" in err  # another class order
    other, _ = tower_backbone(tmp_path / "other", seed=9)
    learned, fixed = ivlp.init_ivlp(other.model, names, depth_text=3, depth_vision=3)
    source = tmp_path / "source2"
    ivlp.write_original_checkpoint(source, {**learned, **fixed}, other.model, epoch=5)
    write_dassl_log(source, ivlp.dassl_config("ivlp", dataset="Things", shots=2, subsample="all"))
    _, err = cli(["import", source, "--from", "ivlp", *_common(files, folder, tmp_path / "cache"), "--output",
                  tmp_path / "b"], capsys, code=2)
    assert "other CLIP weights" in err or "another backbone or other weights" in err


@pytest.mark.parametrize("name", ["ivlp", "promptsrc"])
def test_under_half_precision_autocast_the_learned_tensors_stay_float32(bb, monkeypatch, name):
    """The backbone's autocast (fp16 / bf16 on a GPU; bf16 on the CPU here, the same code path): the towers run
    in half precision with the prompts cast where they enter, the learned tensors and their gradients stay
    float32, and the logits are the fp32 ones to half-precision rounding."""
    from vlprompt.methods.base import Batch

    method = build_method(name, {"text_depth": 3, "vision_depth": 3}, bb, NAMES)
    randomise(method)
    x, y = images(), torch.tensor([0, 1, 2, 0])
    feats = Features(images=x, global_=bb.encode_image(x))
    reference = method.training_step(Batch(feats, y)).logits.detach()
    half = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(bb, "autocast", half)
    monkeypatch.setattr(bb.text, "autocast", half)
    with half():  # the trainer runs training_step under the backbone's autocast
        out = method.training_step(Batch(feats, y))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for p in method.trainable_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    diff = float((out.logits.detach().float() - reference).abs().max())
    assert 0 < diff < 0.05 * bb.logit_scale  # bf16 (8 bits): the towers did run in half precision
