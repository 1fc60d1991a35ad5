"""Tip-Adapter and Tip-Adapter-F: what vlprompt computes equals the original's computation written out in
tests/originals/tip_adapter.py (gaopengcuhk/Tip-Adapter@d0e2d6f) on the same weights -- the cache, the logits, the
search of (alpha, beta), Tip-Adapter-F's whole training loop with its epoch selection -- the recipe resolves field
by field to the original's configs, the CLI trains / evaluates / exports / predicts on DTD from ../shared and
imports the files the original writes, and bad values are one clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from originals import tip_adapter as tip
from test_cli_baselines import make_dtd_subset
from vlprompt.cli import main
from vlprompt.engine.sources import CachedViews
from vlprompt.engine.trainer import TrainConfig, Trainer, epoch_seed
from vlprompt.errors import ConfigError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.adapters.tip_adapter import RECIPES, TipAdapter, search_grid
from vlprompt.methods.base import Features
from vlprompt.runs import resolve
from vlprompt.testing import make_tiny_checkpoint

NAMES = ["banded", "blotchy", "braided", "bubbly"]
TEMPLATE = "{} texture."


class Split:
    """A split as setup / after_training see it: features (N, E), views (V, N, E), labels (N,)."""

    def __init__(self, labels, features=None, views=None):
        self.labels, self.targets = labels, None
        self._features, self._views = features, views

    def __len__(self):
        return len(self.labels)

    def features(self):
        return Features(global_=self._features)

    def views(self):
        return Features(global_=self._views)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def clustered(n_classes, per_class, dim, seed, spread=0.8, centers_seed=100):
    """Raw features (N, E) around one direction per class (so accuracies are neither 0 nor 100 %), labels in the
    original's list order (class-major)."""
    centers = F.normalize(seeded(n_classes, dim, seed=centers_seed), dim=-1) * 3
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return centers[labels] + spread * 3 * seeded(len(labels), dim, seed=seed), labels


def tip_method(backbone, name="tip-adapter", **options):
    opts = {"templates": [TEMPLATE], "alpha": 2.0, "beta": 1.0, "search_scale": [13.0, 13.0], **options}
    return build_method(name, opts, backbone, NAMES)


# -- equality with the original -----------------------------------------------------------------------------
def test_cache_and_logits_equal_the_original(sharp_rn):
    method = tip_method(sharp_rn)
    clip_weights = tip.clip_classifier(sharp_rn.model, NAMES, [TEMPLATE])  # (E, K)
    torch.testing.assert_close(method.zeroshot, clip_weights.t(), rtol=0, atol=1e-6)
    assert (clip_weights.t() @ clip_weights - torch.eye(4)).abs().max() > 1e-2  # the classes are told apart
    raw, labels = clustered(4, 3, sharp_rn.embed_dim, seed=1)
    views = torch.stack([raw + 0.5 * seeded(*raw.shape, seed=10 + v) for v in range(5)])  # 5 augmented views
    info = method.setup(Split(labels, views=views), None)
    assert info == {"cache_images": 12, "cache_views": 5}
    keys = tip.build_cache_keys(views)  # (E, N): mean of the raw views, then normalised
    torch.testing.assert_close(method.cache_keys, keys.t(), rtol=0, atol=1e-6)
    assert (method.cache_keys - F.normalize(F.normalize(views, dim=-1).mean(0), dim=-1)).abs().max() > 1e-4
    query = F.normalize(seeded(7, sharp_rn.embed_dim, seed=2), dim=-1)
    values = tip.build_cache_values(labels)
    for alpha, beta in ((2.0, 1.0), (0.7, 5.5), (0.0, 3.0)):
        method.alpha.fill_(alpha)
        method.beta.fill_(beta)
        with torch.no_grad():
            ours = method(Features(global_=query * 3.0))  # any scale: the features are normalised first
        expected = tip.tip_logits(query, clip_weights, values, alpha, beta, cache_keys=keys)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6 * tip.CLIP_LOGIT_SCALE)
        assert (expected - tip.CLIP_LOGIT_SCALE * query @ clip_weights).abs().max() > 1e-3 or alpha == 0


def test_search_equals_the_original_first_strictly_better_pair(sharp_rn):
    method = tip_method(sharp_rn, search_scale=[12.0, 60.0], search_steps=[30, 12])
    feats, labels = clustered(4, 4, sharp_rn.embed_dim, seed=3, spread=1.0)
    val, val_labels = clustered(4, 6, sharp_rn.embed_dim, seed=4, spread=1.0)
    text = F.normalize(seeded(4, sharp_rn.embed_dim, seed=9), dim=-1)  # a poor classifier: the cache helps
    method.zeroshot = text
    method.set_cache(feats, labels)
    keys, values = F.normalize(feats, dim=-1).t(), tip.build_cache_values(labels)
    val_n = F.normalize(val, dim=-1)
    beta, alpha, acc = tip.search_hp(keys, values, val_n, val_labels, text.t(), [12, 60], [30, 12])
    betas, alphas = tip.search_grid([12, 60], [30, 12])
    grid = np.array([[tip.cls_acc(tip.tip_logits(val_n, text.t(), values, a, b, cache_keys=keys), val_labels)
                      for a in alphas] for b in betas])
    assert grid.max() > grid[0, 0] and (grid == grid.max()).sum() > 1  # a later pair wins, among ties
    found = method.search(val, val_labels)
    assert (found["beta"], found["alpha"], found["val_accuracy"]) == (beta, alpha, acc)
    assert search_grid(12, 30) == betas and search_grid(60, 12) == alphas
    nothing = method.search(val, torch.full_like(val_labels, -1))  # nothing scores: the start (0, 0) stays
    assert (nothing["beta"], nothing["alpha"], nothing["val_accuracy"]) == (0.0, 0.0, 0.0)
    after = method.after_training(Split(val_labels, features=val))
    assert (after["alpha"], after["beta"]) == (alpha, beta) and after["searched"] and after["val_images"] == 24
    assert float(method.alpha) == pytest.approx(alpha) and float(method.beta) == pytest.approx(beta)
    kept = tip_method(sharp_rn, search=False)
    kept.set_cache(feats, labels)
    assert kept.after_training(Split(val_labels, features=val)) == {"alpha": 2.0, "beta": 1.0, "searched": False}
    assert kept.after_training(None)["searched"] is False  # no val split (ImageNet): the initial pair stays


def _trainer_draws(n, views, epochs, batch, seed):
    """The features and orders vlprompt's trainer draws (CachedViews, one view per image and step): per epoch
    the index batches and each image's view, from the epoch's generator as Trainer.fit draws them."""
    orders, chosen = [], []
    for e in range(epochs):
        gen = torch.Generator().manual_seed(epoch_seed(seed, e))
        order = torch.randperm(n, generator=gen)
        pick = torch.empty(n, dtype=torch.long)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            pick[idx] = torch.randint(0, views, (len(idx),), generator=gen)
        orders.append(order)
        chosen.append(pick)
    return torch.stack(orders), torch.stack(chosen)


def test_tip_adapter_f_training_equals_the_original_loop(sharp_rn, tmp_path):
    """AdamW eps 1e-4 + weight decay 0.01, the cosine stepped per iteration, the last smaller batch kept, CE with the
    initial alpha / beta, the first best epoch on the selection split: the original's loop (fed the same views and
    orders) gives the same keys, losses and per-epoch accuracies; the kept epoch is the first best."""
    epochs, batch, n_views, seed = 4, 5, 3, 7
    raw, labels = clustered(4, 3, sharp_rn.embed_dim, seed=5, spread=1.2)
    views = torch.stack([raw + 0.6 * seeded(*raw.shape, seed=20 + v) for v in range(n_views)])
    val, val_labels = clustered(4, 5, sharp_rn.embed_dim, seed=6, spread=1.2)
    method = tip_method(sharp_rn, "tip-adapter-f", alpha=1.17, beta=1.0)
    method.setup(Split(labels, views=views), None)
    keys0 = method.cache_keys.detach().clone()
    cfg = TrainConfig(epochs=epochs, batch_size=batch, last_batch="keep", optimizer="adamw", lr=0.01, adam_eps=1e-4,
                      weight_decay=0.01, scheduler="cosine_step", warmup_epochs=0, checkpoint_every=0,
                      eval_every=1).validate()

    def val_accuracy():
        with torch.no_grad():
            return method.metrics(method(Features(global_=val)), val_labels)

    state = Trainer(method, cfg, tmp_path, seed=seed, progress=False).fit(CachedViews(views), labels,
                                                                           evaluate=val_accuracy)
    orders, chosen = _trainer_draws(12, n_views, epochs, batch, seed)
    per_epoch = F.normalize(views[chosen, torch.arange(12)], dim=-1)  # (epochs, N, E)
    clip_weights = method.zeroshot.t()
    out = tip.tip_adapter_f_train(keys0.t(), tip.build_cache_values(labels), clip_weights, per_epoch, labels,
                                  F.normalize(val, dim=-1), val_labels, 1.17, 1.0, lr=0.01, epochs=epochs,
                                  batch_size=batch, orders=orders)
    assert len(out["losses"]) == epochs * 3 and [r["steps"] for r in state.history] == [3] * epochs
    assert (out["weight"] - keys0).abs().max() > 1e-3  # the keys moved
    torch.testing.assert_close(method.cache_keys.detach(), out["weight"], rtol=1e-5, atol=1e-6)
    losses = np.array(out["losses"]).reshape(epochs, 3).mean(1)
    np.testing.assert_allclose([r["loss"] for r in state.history], losses, rtol=1e-5)
    np.testing.assert_allclose([r["val_accuracy"] for r in state.history], out["epoch_accs"], rtol=1e-6)
    lrs = [r["lr"] for r in state.history]  # the lr of each epoch's last step, per iteration over 12 steps
    np.testing.assert_allclose(lrs, [out["lrs"][3 * e + 2] for e in range(epochs)], rtol=1e-9)
    from vlprompt.engine.callbacks import BestEpoch

    assert BestEpoch(method, tmp_path)._best(state.history)["epoch"] == out["best_epoch"] + 1  # the first best


def test_tip_adapter_f_keys_are_the_only_trained_tensor(sharp_rn):
    method = tip_method(sharp_rn, "tip-adapter-f")
    raw, labels = clustered(4, 2, sharp_rn.embed_dim, seed=8)
    method.setup(Split(labels, views=raw[None]), None)
    assert [tuple(p.shape) for p in method.trainable_parameters()] == [(8, sharp_rn.embed_dim)]
    assert sorted(method.learned_state()) == ["alpha", "beta", "cache_keys", "cache_labels"]
    plain = tip_method(sharp_rn)
    plain.load_learned_state(method.learned_state())  # a Tip-Adapter-F state loads into Tip-Adapter, resized
    assert plain.cache_keys.shape == (8, sharp_rn.embed_dim) and not plain.trainable_parameters()


# -- the recipe ------------------------------------------------------------------------------------------
def _resolved(method, dataset, shots=16, **extra):
    return resolve({"method": method, "data": {"dataset": dataset, "root": "/nonexistent", "shots": shots},
                    **extra})


@pytest.mark.parametrize("dataset,alpha,scale,epochs,templates", [
    # configs/<name>.yaml at d0e2d6f: init_alpha l.21, search_scale l.17, train_epoch l.31; datasets/<name>.py
    ("imagenet", 1.17, [7.0, 3.0], 20, ["imagenet-select"]),  # configs/imagenet.yaml; datasets/imagenet.py:177-183
    ("caltech101", 3.0, [12.0, 5.0], 20, ["dataset"]),
    ("dtd", 2.0, [13.0, 13.0], 20, ["dataset"]),  # datasets/dtd.py:8 "{} texture." = CoOp's
    ("eurosat", 2.0, [12.0, 10.0], 100, ["dataset"]),  # configs/eurosat.yaml:31 train_epoch 100
    ("fgvc_aircraft", 5.0, [30.0, 30.0], 20, ["dataset"]),  # configs/fgvc.yaml
    ("food101", 1.17, [10.0, 10.0], 20, ["dataset"]),
    ("oxford_flowers", 10.0, [50.0, 50.0], 20, ["dataset"]),
    ("oxford_pets", 1.17, [7.0, 3.0], 20, ["dataset"]),
    ("stanford_cars", 3.0, [20.0, 10.0], 20, ["dataset"]),
    ("sun397", 1.17, [12.0, 10.0], 20, ["dataset"]),
    ("ucf101", 3.0, [7.0, 3.0], 20, ["dataset"]),
])
def test_recipe_is_the_originals_config_field_by_field(dataset, alpha, scale, epochs, templates):
    for shots in (1, 16):  # README.md:40: the same configs for 1 to 16 shots
        options = {"templates": templates, "alpha": alpha, "beta": 1.0,  # init_beta, configs/*.yaml:20
                   "cache_views": 10,  # augment_epoch, configs/*.yaml:30
                   "search": True, "search_scale": scale, "search_steps": [200, 20]}  # search_step l.18
        tip_cfg = _resolved("tip-adapter", dataset, shots)
        assert tip_cfg.method_options == options and tip_cfg.train is None
        assert tip_cfg.data.crop_scale == [0.5, 1.0]  # main.py:173-178: RandomResizedCrop(scale=(0.5, 1))
        assert tip_cfg.data.val_shots is None  # vlprompt's protocol; --val-shots 0 is the original's whole split
        f = _resolved("tip-adapter-f", dataset, shots)
        assert f.method_options == options and f.data.crop_scale == [0.5, 1.0]
        train = f.train.to_dict()
        assert {k: train[k] for k in ("epochs", "batch_size", "last_batch", "optimizer", "lr", "adam_eps",
                                      "weight_decay", "scheduler", "warmup_epochs", "eval_every", "views")} == {
            "epochs": epochs,  # train_epoch, configs/*.yaml:31
            "batch_size": 256, "last_batch": "keep",  # main.py:181, datasets/utils.py:373 (drop_last False)
            "optimizer": "adamw", "lr": 0.001, "adam_eps": 1e-4,  # main.py:72, configs/*.yaml:29
            "weight_decay": 0.01,  # torch's AdamW default, main.py:72 gives none
            "scheduler": "cosine_step", "warmup_epochs": 0,  # main.py:73,106: CosineAnnealingLR per iteration
            "eval_every": 1,  # main.py:112-124: evaluated after each epoch (on val here, never test)
            "views": 10}
    assert set(RECIPES) == {"imagenet", "caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers",
                            "oxford_pets", "stanford_cars", "sun397", "ucf101"}


def test_recipe_of_other_data_is_imagenets_and_the_user_overrides_it():
    cfg = _resolved("tip-adapter", "folder", method_options={"alpha": 4.0})
    assert cfg.method_options["alpha"] == 4.0 and cfg.method_options["search_scale"] == [7.0, 3.0]
    assert cfg.method_options["templates"] == ["dataset"]
    cfg = resolve({"method": "tip-adapter", "data": {"dataset": "dtd", "root": "/x", "crop_scale": [0.08, 1]}})
    assert cfg.data.crop_scale == [0.08, 1.0]  # the user's crop over the recipe's


@pytest.mark.parametrize("options,flag", [
    ({"alpha": -1.0}, "--alpha"), ({"beta": -0.5}, "--beta"), ({"cache_views": 0}, "--cache-views"),
    ({"search_scale": [0.05, 3.0]}, "--search-scale"), ({"search_scale": [7.0]}, "--search-scale"),
    ({"search_steps": [0, 20]}, "--search-steps"), ({"templates": ["no placeholder"]}, "--templates"),
    ({"search": "yes"}, "--search"),
])
def test_each_bad_option_value_is_one_clear_error(options, flag):
    with pytest.raises(ConfigError, match=flag):
        _resolved("tip-adapter", "dtd", method_options=options)


@pytest.mark.parametrize("data,message", [
    ({"crop_scale": [0.9, 0.5]}, "--crop-scale"), ({"crop_scale": [0.0, 1.0]}, "--crop-scale"),
    ({"crop_scale": [0.5, 1.0, 1.0]}, "--crop-scale"), ({"val_shots": -1}, "--val-shots"),
])
def test_bad_data_values_are_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        resolve({"method": "tip-adapter", "data": {"dataset": "dtd", "root": "/x", **data}})


def test_options_that_would_not_apply_are_refused():
    with pytest.raises(ConfigError, match="--crop-scale does not apply: zeroshot"):
        resolve({"method": "zeroshot", "data": {"dataset": "dtd", "root": "/x", "crop_scale": [0.5, 1]}})
    with pytest.raises(ConfigError, match="--crop-scale does not apply"):
        resolve({"method": "tip-adapter-f", "data": {"dataset": "dtd", "root": "/x"}, "train": {"augment": False}})
    with pytest.raises(ConfigError, match="--preprocess model"):
        resolve({"method": "tip-adapter", "data": {"dataset": "dtd", "root": "/x"}, "preprocess": "model"})
    with pytest.raises(ConfigError, match="--val-shots 0 applies to few-shot sampling"):
        resolve({"method": "tip-adapter", "data": {"dataset": "dtd", "root": "/x", "shots": 0, "val_shots": 0}})
    with pytest.raises(ConfigError, match="--val-shots does not apply: coop reads no val image"):
        resolve({"method": "coop", "data": {"dataset": "dtd", "root": "/x", "val_shots": 0}})
    assert resolve({"method": "coop", "data": {"dataset": "dtd", "root": "/x", "val_shots": 0},
                    "train": {"eval_every": 5}}).data.val_shots == 0
    with pytest.raises(ConfigError, match="learns nothing by gradient"):
        resolve({"method": "tip-adapter", "data": {"dataset": "dtd", "root": "/x"}, "train": {"epochs": 3}})


def test_identity_omits_unset_data_fields_so_earlier_runs_keep_theirs():
    cfg = resolve({"method": "coop", "data": {"dataset": "dtd", "root": "/x"}})
    ident = cfg.identity()
    assert "crop_scale" not in ident["data"] and "val_shots" not in ident["data"]
    assert "last_batch" not in ident["train"]
    tip_ident = _resolved("tip-adapter-f", "dtd").identity()
    assert tip_ident["data"]["crop_scale"] == [0.5, 1.0] and tip_ident["train"]["last_batch"] == "keep"


def test_crop_scale_keys_the_cached_views_and_changes_only_the_train_crop(sharp_rn):
    from torchvision import transforms as T

    from vlprompt.data import transform_id
    from vlprompt.runs import transforms_for

    coop_train, coop_test = transforms_for("coop", sharp_rn)
    default_train, _ = transforms_for("coop", sharp_rn, [0.08, 1.0])
    tip_train, tip_test = transforms_for("coop", sharp_rn, [0.5, 1.0])
    assert transform_id(coop_train) == transform_id(default_train)  # CoOp's cached views are unchanged
    assert transform_id(tip_train) != transform_id(coop_train) and transform_id(tip_test) == transform_id(coop_test)
    crop = next(t for t in tip_train.transforms if isinstance(t, T.RandomResizedCrop))
    assert crop.scale == (0.5, 1.0)


# -- the CLI on DTD (../shared) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tip_models"), "tiny-rn", seed=1, sharpen=True)


@pytest.fixture(scope="module")
def dtd(tmp_path_factory):
    return make_dtd_subset(tmp_path_factory.mktemp("tip_split"), {"train": 6, "val": 5, "test": 3})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tip_cache"))


def _common(model_files, dtd, cache_dir):
    cfg, weights = model_files
    return ["--backbone", cfg, "--pretrained", weights, "--dataset", "dtd", "--root", dtd["root"],
            "--dataset-option", f"split_file={dtd['split_file']}", "--cache-dir", cache_dir, "--quiet"]


def _main(argv, capsys, rc=0):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == rc, err
    return out if rc == 0 else err


@pytest.mark.parametrize("name", ["tip-adapter", "tip-adapter-f"])
def test_cli_trains_evaluates_exports_and_predicts_on_dtd(name, model_files, dtd, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    epochs = ["--epochs", "3", "--views", "4"] if name == "tip-adapter-f" else []
    res = json.loads(_main(["train", "--method", name, *_common(model_files, dtd, cache_dir), "--shots", "4",
                            "--cache-views", "4", "--val-shots", "0", *epochs, "--output", out], capsys))
    assert res["setup"] == {"cache_images": 40, "cache_views": 4}  # 10 classes x 4 shots, 4 views each
    after = res["after_training"]
    assert after["searched"] and after["val_images"] == 50  # --val-shots 0: the whole val split (5 per class)
    assert after["alpha"] in search_grid(13, 20) and after["beta"] in search_grid(13, 200)
    assert res["config"]["data"]["crop_scale"] == [0.5, 1.0]
    if name == "tip-adapter-f":
        assert res["selected_epoch"] in (1, 2, 3) and res["train"]["steps"] == 3  # 40 images: one batch an epoch
    ev = json.loads(_main(["eval", out, "--dataset", "dtd", "--root", dtd["root"], "--dataset-option",
                           f"split_file={dtd['split_file']}", "--cache-dir", cache_dir, "--quiet"], capsys))
    assert ev["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    _main(["export", out, "--output", tmp_path / "head"], capsys)
    image = dtd["image_dir"] / dtd["test"][0][0]
    pred = json.loads(_main(["predict", tmp_path / "head", image, "--topk", "3", "--json"], capsys))
    assert len(pred[0]["top"]) == 3
    # the cache belongs to its classes: a subset of them evaluates (the cached images of those classes)...
    sub = json.loads(_main(["eval", out, "--dataset", "dtd", "--root", dtd["root"], "--dataset-option",
                            f"split_file={dtd['split_file']}", "--classes", "base", "--cache-dir", cache_dir,
                            "--quiet"], capsys))
    assert sub["metrics"]["num_samples"] == 15  # 5 base classes x 3 test images
    if name == "tip-adapter":  # ...any other class list is one clear error (exit 2)
        base_run = tmp_path / "base"
        _main(["train", "--method", name, *_common(model_files, dtd, cache_dir), "--shots", "4", "--cache-views",
               "4", "--classes", "base", "--output", base_run], capsys)
        err = _main(["eval", base_run, "--dataset", "dtd", "--root", dtd["root"], "--dataset-option",
                     f"split_file={dtd['split_file']}", "--classes", "new", "--cache-dir", cache_dir, "--quiet"],
                    capsys, rc=2)
        assert "cache (one-hot values of its training images) is class-specific" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_cached_views_follow_the_crop_scale(model_files, dtd, cache_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    keys = {}
    for scale in (["0.5", "1"], ["0.08", "1"]):
        out = tmp_path / scale[0]
        _main(["train", "--method", "tip-adapter", *_common(model_files, dtd, cache_dir), "--shots", "2",
               "--cache-views", "2", "--crop-scale", *scale, "--no-search", "--output", out], capsys)
        keys[scale[0]] = load_file(str(out / "prompt.safetensors"))["cache_keys"]
    assert (keys["0.5"] - keys["0.08"]).abs().max() > 1e-4  # other crops, other cached views


def test_import_of_the_originals_files_equals_the_original(model_files, dtd, cache_dir, tmp_path, capsys):
    """caches/<dataset>/ as the original writes it (fp16 keys (E, N), one-hot values (N, C), best_F (N, E) a
    transposed view): imported onto DTD, the run's logits are the original's with those tensors."""
    from vlprompt.backbone import load_backbone
    from vlprompt.runs.assembly import load_method

    cfg, weights = model_files
    backbone = load_backbone(str(cfg), str(weights), "cpu")
    classes = sorted({e[2] for e in dtd["train"]}, key=[e[2] for e in dtd["train"]].index)
    n_classes = len(classes)
    raw, labels = clustered(n_classes, 4, backbone.embed_dim, seed=11)
    keys = F.normalize(raw, dim=-1).t()  # (E, N)
    values = tip.build_cache_values(labels)
    best = F.normalize(raw + 0.3 * seeded(*raw.shape, seed=12), dim=-1)  # (N, E)
    tip.write_original_checkpoint(tmp_path / "orig", "dtd", 4, keys, values, best)
    folder = tmp_path / "orig" / "caches" / "dtd"
    err = _main(["import", folder, "--from", "tip-adapter", *_common(model_files, dtd, cache_dir), "--output",
                 tmp_path / "no_alpha"], capsys, rc=2)
    assert "give --alpha and --beta" in err
    query = F.normalize(seeded(5, backbone.embed_dim, seed=13), dim=-1)
    for name, key_tensor in (("tip-adapter", keys.half().float()), ("tip-adapter-f", best.half().float().t())):
        out = tmp_path / name
        res = json.loads(_main(["import", folder, "--from", name, *_common(model_files, dtd, cache_dir),
                                "--alpha", "1.5", "--beta", "5.5", "--output", out], capsys))
        assert res["config"]["data"]["shots"] == 4 and res["imported_from"]["format"] == "tensor-files"
        assert set(res["imported_from"]["files"]) == {"values_4shots.pt", "keys_4shots.pt" if name == "tip-adapter"
                                                      else "best_F_4shots.pt"}
        method, meta, _ = load_method(out, backbone=backbone)
        method.eval()
        clip_weights = tip.clip_classifier(backbone.model, [c.replace("_", " ") for c in method.classnames],
                                           [TEMPLATE])
        expected = tip.tip_logits(query, clip_weights, values, 1.5, 5.5, cache_keys=key_tensor)
        with torch.no_grad():
            torch.testing.assert_close(method(Features(global_=query)), expected, rtol=0,
                                       atol=1e-6 * tip.CLIP_LOGIT_SCALE)
    # a folder with the runs of several shots: one of its files picks the run
    tip.write_original_checkpoint(tmp_path / "orig", "dtd", 2, keys, values)
    err = _main(["import", folder, "--from", "tip-adapter", *_common(model_files, dtd, cache_dir), "--alpha", "1",
                 "--beta", "1", "--output", tmp_path / "several"], capsys, rc=2)
    assert "runs of 2, 4 shots" in err
    _main(["import", folder / "values_2shots.pt", "--from", "tip-adapter", *_common(model_files, dtd, cache_dir),
           "--alpha", "1", "--beta", "1", "--output", tmp_path / "two"], capsys)
    # a cache of other classes is refused, naming both counts
    tip.write_original_checkpoint(tmp_path / "other", "dtd", 4, keys[:, :12], tip.build_cache_values(labels[:12]))
    err = _main(["import", tmp_path / "other" / "caches" / "dtd", "--from", "tip-adapter",
                 *_common(model_files, dtd, cache_dir), "--alpha", "1", "--beta", "1", "--output", tmp_path / "o"],
                capsys, rc=2)
    assert "a cache of 3 classes, but the data has 10" in err


def test_imported_run_refuses_other_files(model_files, dtd, cache_dir, tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    torch.save({"not": "a tensor"}, tmp_path / "junk" / "values_4shots.pt")
    err = _main(["import", tmp_path / "junk", "--from", "tip-adapter", *_common(model_files, dtd, cache_dir),
                 "--alpha", "1", "--beta", "1", "--output", tmp_path / "o"], capsys, rc=2)
    assert "holds a dict, not a tensor" in err
    (tmp_path / "empty").mkdir()
    err = _main(["import", tmp_path / "empty", "--from", "tip-adapter", *_common(model_files, dtd, cache_dir),
                 "--alpha", "1", "--beta", "1", "--output", tmp_path / "o2"], capsys, rc=2)
    assert "no .pt files" in err


@pytest.mark.parametrize("name", ["tip-adapter", "tip-adapter-f"])
def test_a_subset_of_the_classes_keeps_their_logits_and_other_lists_are_refused(sharp_rn, name):
    """ImageNet-A / -R evaluate 200 of ImageNet's classes: the cache restricted to their images gives exactly the
    columns of those classes; a class the cache does not hold is refused, naming it."""
    method = tip_method(sharp_rn, name)
    raw, labels = clustered(4, 3, sharp_rn.embed_dim, seed=14)
    method.setup(Split(labels, views=raw[None]), None)
    query = Features(global_=seeded(5, sharp_rn.embed_dim, seed=15))
    with pytest.raises(VLPromptError, match="cache .* is class-specific.*or a subset of them"):
        method.set_classnames([NAMES[1], "dotted"])
    with torch.no_grad():
        full = method(query)
        method.set_classnames([NAMES[3], NAMES[1]])
        torch.testing.assert_close(method(query), full[:, [3, 1]], rtol=0, atol=1e-5)
    assert method.cache_keys.shape[0] == 6 and isinstance(method, TipAdapter)


# -- published numbers ---------------------------------------------------------------------------------------
def test_published_numbers_are_exp_logs_and_join_runs_of_the_recipe_only():
    """gaopengcuhk/Tip-Adapter exp.log: every Tip / Tip-F row of the 10 datasets with a val split, zero-shot CLIP of
    all 11; they join a run of the recipe whose search used the whole val split, as it is written after the run
    (templates resolved), and not a run of CoOp's val protocol nor of another alpha."""
    from vlprompt.papers import load_papers, matches
    from vlprompt.reporting.collect import flatten

    rows = [n for n in load_papers() if n.paper == "Tip-Adapter"]
    by = {(n.method, n.dataset, n.shots): n.value for n in rows}
    assert [by["tip-adapter", "dtd", k] for k in (16, 8, 4, 2, 1)] == [60.93, 58.63, 53.96, 49.47, 46.22]
    assert [by["tip-adapter-f", "eurosat", k] for k in (16, 8, 4, 2, 1)] == [84.54, 77.93, 74.12, 66.15, 59.53]
    assert by["tip-adapter-f", "fgvc_aircraft", 16] == 35.55 and by["zeroshot", "imagenet", 0] == 60.32
    assert not any(n.dataset == "imagenet" and n.method != "zeroshot" for n in rows)  # test-searched: left out
    assert len(rows) == 11 + 2 * 10 * 5 and all("exp.log" in n.source for n in rows)
    for method in ("tip-adapter", "tip-adapter-f"):
        cfg = resolve({"method": method, "backbone": "RN50", "pretrained": "openai",
                       "data": {"dataset": "dtd", "root": "/x", "shots": 16, "val_shots": 0}})
        dtd16 = next(n for n in rows if (n.method, n.dataset, n.shots) == (method, "dtd", 16))
        as_run = flatten({**cfg.identity(), "method_options": {**cfg.method_options, "templates": [TEMPLATE]}})

        def joins(flat):
            return matches(dtd16, method=method, dataset="dtd", protocol="fewshot", backbone="RN50",
                           pretrained="openai", shots=16, metric="accuracy", flat_identity=flat)

        assert joins(flatten(cfg.identity())) and joins(as_run)
        coop_val = resolve({"method": method, "data": {"dataset": "dtd", "root": "/x", "shots": 16}})
        assert not joins(flatten(coop_val.identity()))  # min(shots, 4) val images: another protocol
        other = resolve({"method": method, "data": {"dataset": "dtd", "root": "/x", "shots": 16, "val_shots": 0},
                         "method_options": {"alpha": 3.0}})
        assert not joins(flatten(other.identity()))


def test_protocol_presets_run_tip_adapter_on_its_and_coops_protocols():
    from vlprompt.grid import expand, load_preset, resolve_cells

    spec = load_preset("tip-adapter-fewshot")
    spec.set_value("data.root", "/data", "--root")
    cells = resolve_cells(expand(spec))
    assert len(cells) == 2 * 11 * 5 and {c.config.seed for c in cells} == {1}  # main.py:164: one seed
    assert all(c.config.data.val_shots == 0 and c.config.data.crop_scale == [0.5, 1.0] for c in cells)
    eurosat = next(c for c in cells if c.name == "tip-adapter-f/eurosat/shots16/seed1")
    assert eurosat.config.train.epochs == 100
    for preset, n in (("coop-fewshot", 165), ("coop-dg", 3)):  # CoOp's protocols (val min(K, 4), seeds 1-3)
        spec = load_preset(preset)
        spec.set_value("data.root", "/data", "--root")
        spec.set_axis("method", ["tip-adapter", "tip-adapter-f"], "--methods")
        cells = resolve_cells(expand(spec))
        assert len(cells) == 2 * n and all(c.config.data.val_shots is None for c in cells)
