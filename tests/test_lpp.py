"""LP++: what vlprompt computes equals the original's computation written out in tests/originals/lp_plus_plus.py
(FereshteShakeri/FewShot-CLIP-Strong-Baseline@f81054f) on the same weights -- the initialisation from the class
sums and the zero-shot similarities, the random bias, the data-derived step sizes, the whole full-batch loop with
alpha moved every 10 steps by its never-zeroed gradient, the selection with ties to the later step -- a killed run
resumes bit for bit, the recipe resolves field by field, the CLI trains / evaluates / exports / predicts on DTD
from ../shared, and bad values are one clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from originals import lp_plus_plus as lpp
from originals import tip_adapter as tip
from test_cli_baselines import make_dtd_subset
from test_tip_adapter import Split, clustered, seeded
from vlprompt.cli import main
from vlprompt.engine.callbacks import BestEpoch
from vlprompt.engine.sources import CachedViews
from vlprompt.engine.trainer import TrainConfig, Trainer
from vlprompt.errors import ConfigError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.base import Features
from vlprompt.runs import resolve
from vlprompt.runs.importer import importable_methods
from vlprompt.testing import make_tiny_checkpoint

NAMES = ["banded", "blotchy", "braided"]
TEMPLATE = "{} texture."
SHOTS = 4


def lpp_method(backbone, seed=5, **options):
    torch.manual_seed(seed)  # the run seeds torch before building the method: the head's bias follows it
    return build_method("lpp", {"templates": [TEMPLATE], **options}, backbone, NAMES)


def support(backbone, seed=1, spread=1.0):
    raw, labels = clustered(3, SHOTS, backbone.embed_dim, seed=seed, spread=spread)
    return raw, labels


def test_initialisation_and_step_sizes_equal_the_original(sharp_rn):
    raw, labels = support(sharp_rn)
    method = lpp_method(sharp_rn, seed=5)
    info = method.setup(Split(labels, views=raw[None]), None)
    feats = F.normalize(raw, dim=-1)
    clip_weights = tip.clip_classifier(sharp_rn.model, NAMES, [TEMPLATE])
    torch.testing.assert_close(method.zeroshot, clip_weights.t(), rtol=0, atol=1e-6)
    torch.manual_seed(5)
    head = lpp.init_classifier(feats, labels, SHOTS)
    assert torch.equal(method.linear.bias, head.bias)  # nn.Linear's random bias, drawn as the original draws it
    assert method.linear.bias.abs().max() <= 1 / sharp_rn.embed_dim ** 0.5
    torch.testing.assert_close(method.linear.weight, head.weight, rtol=0, atol=1e-6)  # class sums
    alpha0 = lpp.calculate_init_alpha(feats, labels, SHOTS, clip_weights)
    torch.testing.assert_close(method.alpha.detach(), torch.full((1, 3), float(alpha0)), rtol=1e-6, atol=1e-6)
    own = [float((feats[labels == c] @ clip_weights[:, c]).mean()) for c in range(3)]
    assert len(set(np.round(own, 4))) == 3  # the own-class cosines differ: the mean over classes is tested
    assert info["lr_w"] == pytest.approx(lpp.calculate_lr_w(feats), rel=1e-5)
    assert info["lr_alpha"] == pytest.approx(float(lpp.calculate_lr_alpha(feats, clip_weights)), rel=1e-5)
    assert info["support_images"] == 12 and info["alpha_init"] == pytest.approx(float(alpha0), rel=1e-6)
    query = seeded(6, sharp_rn.embed_dim, seed=2)
    with torch.no_grad():
        ours = method(Features(global_=query))
    with torch.no_grad():
        expected = lpp.lpp_logits(F.normalize(query, dim=-1), head.weight, head.bias,
                                  alpha0.float() * torch.ones(1, 3), clip_weights)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def _config(epochs, **kw):
    return TrainConfig(**{"epochs": epochs, "batch_size": 0, "optimizer": "sgd", "lr": 1.0, "momentum": 0.9,
                          "weight_decay": 0.0, "scheduler": "constant", "warmup_epochs": 0, "eval_every": 1,
                          "checkpoint_every": 0, **kw}).validate()


def _fit(method, cfg, run_dir, raw, labels, val, val_labels, resume=False):
    def val_accuracy():
        with torch.no_grad():
            return method.metrics(method(Features(global_=val)), val_labels)

    trainer = Trainer(method, cfg, run_dir, seed=3, progress=False)
    if resume:
        assert trainer.resume()
    return trainer.fit(CachedViews(raw[None]), labels, evaluate=val_accuracy)


def test_full_batch_loop_equals_the_original(sharp_rn, tmp_path):
    """25 full-batch steps: the head by momentum SGD at lr_w, alpha moved at steps 10 and 20 by the running sum of
    its gradients; the same weights, bias, alpha, losses and val accuracies as the original's loop, and the kept
    step is the LAST of the best (>=)."""
    raw, labels = support(sharp_rn, spread=1.3)
    val, val_labels = clustered(3, 4, sharp_rn.embed_dim, seed=7, spread=1.3)
    method = lpp_method(sharp_rn, seed=9)
    method.setup(Split(labels, views=raw[None]), None)
    state = _fit(method, _config(25), tmp_path, raw, labels, val, val_labels)
    feats = F.normalize(raw, dim=-1)
    torch.manual_seed(9)
    head = lpp.init_classifier(feats, labels, SHOTS)
    out = lpp.lpp_train(feats, labels, F.normalize(val, dim=-1), val_labels, method.zeroshot.t(), SHOTS, epochs=25,
                        classifier=head)
    assert (out["alpha"] - out["alpha_init"].float()).abs().max() > 1e-3  # alpha moved (steps 10 and 20)
    torch.testing.assert_close(method.linear.weight.detach(), out["weight"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.linear.bias.detach(), out["bias"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.alpha.detach(), out["alpha"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in state.history], out["losses"], rtol=1e-5)
    accs = [r["val_accuracy"] for r in state.history]
    best = BestEpoch(method, tmp_path)._best(state.history)
    assert best["epoch"] == out["best_epoch"] + 1 and best["val_accuracy"] == pytest.approx(out["best_val_acc"])
    assert accs.count(max(accs)) > 1  # ties: the later step wins, as the original's >=
    # a zeroed gradient would move alpha by the last 10 steps only: the running sum is what is reproduced
    assert int(method.steps) == 25 and (method.alpha_grad_sum.abs().sum() > 0)


def test_killed_run_resumes_bit_for_bit_with_the_gradient_sum(sharp_rn, tmp_path):
    raw, labels = support(sharp_rn, seed=2, spread=1.3)
    val, val_labels = clustered(3, 3, sharp_rn.embed_dim, seed=8, spread=1.3)
    full = lpp_method(sharp_rn, seed=4)
    full.setup(Split(labels, views=raw[None]), None)
    _fit(full, _config(25), tmp_path / "full", raw, labels, val, val_labels)
    part = lpp_method(sharp_rn, seed=4)
    part.setup(Split(labels, views=raw[None]), None)
    _fit(part, _config(25, checkpoint_every=5, max_steps=13), tmp_path / "killed", raw, labels, val, val_labels)
    assert int(part.steps) == 13  # stopped between two alpha updates, with a gradient sum under way
    resumed = lpp_method(sharp_rn, seed=4)
    resumed.setup(Split(labels, views=raw[None]), None)  # a resumed run sets itself up again, then loads
    _fit(resumed, _config(25, checkpoint_every=5), tmp_path / "killed", raw, labels, val, val_labels, resume=True)
    for name, t in full.learned_state().items():
        assert torch.equal(resumed.learned_state()[name], t), name
    assert torch.equal(resumed.alpha_grad_sum, full.alpha_grad_sum)


def test_a_checkpoint_without_the_gradient_sum_is_refused(sharp_rn):
    method = lpp_method(sharp_rn)
    with pytest.raises(VLPromptError, match="alpha_grad_sum"):
        method.load_training_state({})


# -- the recipe ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,templates", [("dtd", ["dataset"]), ("imagenet", ["imagenet-select"]),
                                               ("folder", ["dataset"])])
def test_recipe_is_the_originals_field_by_field(dataset, templates):
    for shots in (1, 4, 16):
        cfg = resolve({"method": "lpp", "data": {"dataset": dataset, "root": "/x", "shots": shots}})
        # Tip-Adapter's prompts (utils.py:35-52, datasets/*.py; ImageNet: imagenet.py:178-184, CoOp's 7)
        assert cfg.method_options == {"templates": templates, "alpha_every": 10}  # linear_probe_p2.py:138
        assert cfg.data.crop_scale == [0.5, 1.0]  # main.py:69-74: RandomResizedCrop(224, scale=(0.5, 1))
        train = cfg.train.to_dict()
        assert {k: train[k] for k in ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                                      "scheduler", "warmup_epochs", "eval_every", "views", "augment")} == {
            "epochs": 300,  # train_epoch, configs/base.yaml:17: 300 full-batch steps
            "batch_size": 0,  # full batch: linear_probe_p2.py:123-135
            "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0,  # linear_probe_p2.py:116
            "lr": 1.0, "scheduler": "constant", "warmup_epochs": 0,  # lr_w as it is, constant
            "eval_every": 1,  # val accuracy after every step, linear_probe_p2.py:141-155
            "views": 1, "augment": True}  # one augmented view per support image, main.py:96-101


@pytest.mark.parametrize("request_extra,message", [
    ({"train": {"views": 2}}, "--views 2 does not apply to lpp"),
    ({"train": {"online": True}}, "--online does not apply to lpp"),
    ({"method_options": {"alpha_every": 0}}, "--alpha-every"),
    ({"method_options": {"templates": []}}, "--templates"),
    ({"data": {"dataset": "dtd", "root": "/x", "crop_scale": [1.5, 2]}}, "--crop-scale"),
])
def test_each_bad_value_is_one_clear_error(request_extra, message):
    req = {"method": "lpp", "data": {"dataset": "dtd", "root": "/x"}, **request_extra}
    with pytest.raises(ConfigError, match=message):
        resolve(req)


def test_lpp_saves_no_weights_so_nothing_is_importable():
    # linear_probe_p2.py:156: the torch.save of the head is commented out; a run leaves a CSV of accuracies
    assert "lpp" not in importable_methods()
    assert {"tip-adapter", "tip-adapter-f"} <= set(importable_methods())


def test_setup_refuses_a_class_without_training_images(sharp_rn):
    raw, labels = support(sharp_rn)
    method = lpp_method(sharp_rn)
    with pytest.raises(VLPromptError, match="no training image of class"):
        method.setup(Split(labels.clamp(max=1), views=raw[None]), None)
    with pytest.raises(VLPromptError, match="call setup"):
        method.param_groups(1.0)


# -- the CLI on DTD (../shared) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lpp_models"), "tiny-rn", seed=2, sharpen=True)


@pytest.fixture(scope="module")
def dtd(tmp_path_factory):
    return make_dtd_subset(tmp_path_factory.mktemp("lpp_split"), {"train": 4, "val": 4, "test": 3})


def _main(argv, capsys, rc=0):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == rc, err
    return out if rc == 0 else err


def test_cli_trains_evaluates_exports_and_predicts_on_dtd(model_files, dtd, tmp_path, capsys):
    cfg, weights = model_files
    common = ["--backbone", cfg, "--pretrained", weights, "--dataset", "dtd", "--root", dtd["root"],
              "--dataset-option", f"split_file={dtd['split_file']}", "--cache-dir", tmp_path / "cache", "--quiet"]
    out = tmp_path / "run"
    res = json.loads(_main(["train", "--method", "lpp", *common, "--shots", "4", "--val-shots", "4", "--epochs",
                            "30", "--output", out], capsys))
    assert res["setup"]["support_images"] == 40 and res["setup"]["lr_w"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30 and all(r["steps"] == 1 for r in records)  # one full-batch step an epoch
    best = max(r["val_accuracy"] for r in records)
    assert res["selected_epoch"] == max(r["epoch"] for r in records if r["val_accuracy"] == best)  # the later
    ev = json.loads(_main(["eval", out, "--dataset", "dtd", "--root", dtd["root"], "--dataset-option",
                           f"split_file={dtd['split_file']}", "--cache-dir", tmp_path / "cache", "--quiet"], capsys))
    assert ev["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    _main(["export", out, "--output", tmp_path / "head"], capsys)
    image = dtd["image_dir"] / dtd["test"][0][0]
    pred = json.loads(_main(["predict", tmp_path / "head", image, "--topk", "2", "--json"], capsys))
    assert len(pred[0]["top"]) == 2
    sub = json.loads(_main(["eval", out, "--dataset", "dtd", "--root", dtd["root"], "--dataset-option",
                            f"split_file={dtd['split_file']}", "--classes", "new", "--cache-dir", tmp_path / "cache",
                            "--quiet"], capsys))
    assert sub["metrics"]["num_samples"] == 15  # a subset of its classes: their rows (ImageNet-A / -R)


def test_a_subset_of_the_classes_keeps_their_logits_and_other_lists_are_refused(sharp_rn):
    raw, labels = support(sharp_rn)
    method = lpp_method(sharp_rn)
    method.setup(Split(labels, views=raw[None]), None)
    query = Features(global_=seeded(5, sharp_rn.embed_dim, seed=3))
    with pytest.raises(VLPromptError, match="lpp's head .* is class-specific.*or a subset of them"):
        method.set_classnames([NAMES[0], "dotted"])
    with torch.no_grad():
        full = method(query)
        method.set_classnames([NAMES[2], NAMES[0]])
        torch.testing.assert_close(method(query), full[:, [2, 0]], rtol=0, atol=1e-6)
    assert method.learned_tensor("linear.weight").shape == (2, sharp_rn.embed_dim)


def test_protocol_presets_run_lpp_with_its_k_shot_val_and_its_ten_tasks():
    from vlprompt.grid import expand, load_preset, resolve_cells

    spec = load_preset("lpp-fewshot")
    spec.set_value("data.root", "/data", "--root")
    cells = resolve_cells(expand(spec))
    assert len(cells) == 11 * 5 * 10 and {c.config.seed for c in cells} == set(range(1, 11))  # main.py:89-94
    assert all(c.config.data.val_shots == c.config.data.shots for c in cells)  # main.py:94: K-shot val
    assert "lpp/dtd/shots4/seed3" in {c.name for c in cells}
    dg = load_preset("lpp-dg")
    dg.set_value("data.root", "/data", "--root")
    cells = expand(dg)
    assert len(cells) == 10 and [e["dataset"] for e in cells[0].evaluations] == [
        "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    spec = load_preset("coop-fewshot")
    spec.set_value("data.root", "/data", "--root")
    spec.set_axis("method", ["lpp"], "--methods")
    assert len(resolve_cells(expand(spec))) == 165
