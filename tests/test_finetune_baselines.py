"""The CoOp paper's other fine-tuning baselines (finetune-image, text-transform, text-bias): what they compute at
initialisation, that they learn, and that they go through the CLI like every method (train, eval, export,
predict)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlprompt.cli import main
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.testing import make_tiny_checkpoint

CLASSES = ["red thing", "green thing", "blue thing"]
TEMPLATES = [["dataset"], ["a photo of a {}.", "a sketch of a {}.", "{} texture."]]


def _features(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("templates", TEMPLATES)
@pytest.mark.parametrize("method", ["text-transform", "text-bias"])
def test_text_adapters_at_initialisation_equal_zero_shot(tiny_backbone, method, templates):
    """W = identity, b = 0 (text-transform) and b = 0 (text-bias) give zero-shot CLIP with the same templates."""
    opts = {"templates": templates}
    zs = build_method("zeroshot", opts, tiny_backbone, CLASSES, template="{} texture.").eval()
    ours = build_method(method, opts, tiny_backbone, CLASSES, template="{} texture.").eval()
    assert ours.templates == zs.templates
    x = Features(global_=_features(6, tiny_backbone.embed_dim))
    with torch.no_grad():
        expected = zs(x)
        got = ours(x)
    assert expected.std() > 0.01  # the classes' logits differ
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # on another class list too: the learned tensors are shared by the classes
    other = ["cat", "dog", "bird", "fish"]
    zs.set_classnames(other)
    ours.set_classnames(other)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), zs(x), rtol=1e-5, atol=1e-5)


def test_finetune_image_at_initialisation_equals_zero_shot(tiny_rn):
    zs = build_method("zeroshot", {}, tiny_rn, CLASSES, template="a photo of a {}.").eval()
    ft = build_method("finetune-image", {}, tiny_rn, CLASSES, template="a photo of a {}.").eval()
    images = torch.randn(4, 3, tiny_rn.image_size, tiny_rn.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = zs(Features(global_=tiny_rn.encode_image(images)))
        got = ft(Features(images=images))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the classifier is frozen; the image encoder (a copy: the backbone is untouched) is what trains
    names = {n.split(".")[0] for n, p in ft.named_parameters() if p.requires_grad}
    assert names == {"image_encoder"}
    assert all(not p.requires_grad for p in tiny_rn.model.parameters())


def test_text_adapters_learn_class_independent_tensors(tiny_vit):
    tt = build_method("text-transform", {}, tiny_vit, CLASSES)
    tb = build_method("text-bias", {}, tiny_vit, CLASSES)
    e = tiny_vit.embed_dim
    assert {k: tuple(v.shape) for k, v in tt.learned_state().items()} == {"transform.weight": (e, e),
                                                                          "transform.bias": (e,)}
    assert {k: tuple(v.shape) for k, v in tb.learned_state().items()} == {"bias": (e,)}
    x = Features(global_=_features(6, e))
    for m in (tt, tb):
        loss = F.cross_entropy(m(x), torch.tensor([0, 1, 2, 0, 1, 2]))
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters())


# -- through the CLI -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune")
    root = base / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red_thing", "green_thing", "blue_thing"]):
        for split, n in (("train", 3), ("val", 2), ("test", 2)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                arr = np.zeros((32, 32, 3), np.uint8)
                arr[..., c] = 200
                arr = np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{i}.png")
    cfg, weights = make_tiny_checkpoint(base / "model", "tiny-rn", seed=3, sharpen=True)
    return root, cfg, weights, base


@pytest.mark.parametrize("method, kind", [("text-transform", "linear"), ("text-bias", "linear"),
                                          ("finetune-image", "finetune-image")])
def test_baseline_trains_evaluates_exports_and_predicts_through_the_cli(files, method, kind, capsys):
    from vlprompt.data import build_test_transform, load_dataset, load_image
    from vlprompt.runs import load_method

    root, cfg, weights, base = files
    run_dir = base / f"run-{method}"
    common = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(root),
              "--cache-dir", str(base / "cache"), "--quiet"]
    train = ["--epochs", "2", "--batch-size", "3", "--lr", "0.05"] + ([] if method == "finetune-image" else
                                                                     ["--views", "1"])
    rc = main(["train", "--method", method, *common, "--shots", "2", *train, "--output", str(run_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == method and results["train"]["steps"] == 4  # 6 images / batch 3 x 2 epochs
    assert results["config"]["method_options"]["templates"] == ["a photo of a {}."]  # the folder's prompt
    method_obj, _, bb = load_method(run_dir, device="cpu")
    moved = [v for k, v in method_obj.learned_state().items()]
    init = build_method(method, {}, bb, CLASSES).learned_state()
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(moved, init.values()))  # it learned something

    rc = main(["eval", str(run_dir), "--dataset", "folder", "--root", str(root), "--cache-dir",
               str(base / "cache"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["metrics"]["accuracy"] == pytest.approx(results["metrics"]["accuracy"])

    rc = main(["export", str(run_dir)])
    capsys.readouterr()
    assert rc == 0 and json.loads((run_dir / "export" / "head.json").read_text())["kind"] == kind
    splits = load_dataset("folder", root)
    paths = [s.path for s in splits.test]
    rc = main(["predict", str(run_dir / "export"), *map(str, paths), "--topk", "1", "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    predicted = [row["top"][0]["class"] for row in json.loads(out)]
    # the head predicts what the trained method does on the same images
    method_obj.eval()
    x = torch.stack([build_test_transform(bb.image_size)(load_image(p)) for p in paths])
    with torch.no_grad():
        feats = Features(images=x) if method == "finetune-image" else Features(global_=bb.encode_image(x))
        expected = method_obj(feats).argmax(1)
    assert predicted == [splits.classnames[i] for i in expected.tolist()]
