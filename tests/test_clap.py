"""CLAP and ZS-LP: the method computes what jusiro/CLAP computes (the written-out original, tests/originals/clap.py)
on the same weights -- the class features, the multipliers from every augmented support view, logits, loss and
gradients, and the whole training trajectory of its unusual loop (an "epoch" of N // 256 steps, each a slice of one
shuffle of the 20 N support features: ``--sampling pool``); its preset field by field; a CLI run on a generated
folder (train / eval / export / predict / import of an original-format checkpoint); one clear line for each bad
option value and for another class list."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import color_folder
from originals import clap as original
from vlprompt.cli import main
from vlprompt.engine.sources import CachedViews, SplitFeatures
from vlprompt.engine.trainer import Trainer, TrainConfig, epoch_seed
from vlprompt.errors import CheckpointError, ConfigError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, Features
from vlprompt.runs import resolve
from vlprompt.runs.assembly import load_method
from vlprompt.runs.importer import import_run
from vlprompt.testing import make_tiny_checkpoint

RAW = ["golden_retriever", "sword lily", "american_pit_bull_terrier"]
NAME = "clap"
#: the protocols of its scripts: few-shot (scripts/adapt.sh), domain generalisation (scripts/eval.sh)
PROTOCOLS = [("coop-fewshot", ["clap"], 165), ("coop-dg", ["clap"], 3)]


def build(backbone, dataset="oxford_pets", names=RAW, **options):
    from vlprompt.data.templates import template_for
    from vlprompt.methods.adapters.clap import CLAP
    from vlprompt.runs.config import resolve_data

    preset = CLAP.preset(resolve_data({"dataset": dataset, "root": "/nonexistent"}))["method_options"]
    return build_method("clap", {**preset, **options}, backbone, [n.replace("_", " ") for n in names],
                        template=template_for(dataset), source_names=names)


def support(backbone, views=4, per_class=4, seed=0, spread=0.8):
    """Seeded features (V, N, E) of V views of N support images around one direction per class near its class
    features, so that the zero-shot probabilities are neither 0 nor 1; labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    k, e = len(RAW), backbone.embed_dim
    labels = torch.arange(k).repeat_interleave(per_class)
    centers = torch.randn(k, e, generator=g)
    return centers[labels][None] + spread * torch.randn(views, len(labels), e, generator=g), labels


def split(views, labels):
    return SplitFeatures(labels, None, lambda: Features(global_=views[0]), lambda: Features(global_=views))


def scale(backbone):
    return backbone.model.logit_scale.detach()  # the log of the scale, as the original's model holds it


# -- 1. the computation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, dassl", [("oxford_pets", "OxfordPets"), ("imagenet", "ImageNet")])
def test_class_features_are_the_originals(tiny_vit, dataset, dassl):
    base, _ = original.base_text_features(tiny_vit.model, RAW, dassl)
    method = build(tiny_vit, dataset)
    torch.testing.assert_close(method.base, base, rtol=0, atol=1e-5 * base.abs().max().item())
    torch.testing.assert_close(method.prototypes.detach(), base, rtol=0, atol=1e-5 * base.abs().max().item())


@pytest.mark.parametrize("rule, constraint", [("zeroshot", "l2"), ("balanced", "l2_balanced"),
                                              ("corrected", "l2_corrected"), ("constant", "l2_constant")])
def test_multipliers_from_every_view_equal_the_originals(tiny_vit, rule, constraint):
    method = build(tiny_vit, multipliers=rule)
    views, labels = support(tiny_vit)
    info = method.setup(split(views, labels), None)
    pool, pool_labels = views.reshape(-1, views.shape[-1]), labels.repeat(views.shape[0])
    expected = original.init_lagrangian_multipliers(pool_labels, original.zs_lp_logits(pool, method.base,
                                                                                         scale(tiny_vit)), constraint)
    torch.testing.assert_close(method.multipliers, expected, rtol=1e-5, atol=1e-7)
    assert info["multipliers"]["mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    if rule == "zeroshot":
        assert 0 < expected.min() < expected.max() < 1  # they differ between classes


def test_random_init_takes_its_multipliers_from_the_random_prototypes(tiny_vit):
    """The original's "zero-shot" logits come from the model as initialised (extract_features): with INIT RANDOM,
    from the Kaiming-normal prototypes."""
    torch.manual_seed(11)
    method = build(tiny_vit, init="random")
    torch.manual_seed(11)
    expected_start = original.init_prototypes(method.base, "RANDOM")
    torch.testing.assert_close(method.prototypes.detach(), expected_start.detach())
    views, labels = support(tiny_vit)
    method.setup(split(views, labels), None)
    pool, pool_labels = views.reshape(-1, views.shape[-1]), labels.repeat(views.shape[0])
    expected = original.init_lagrangian_multipliers(pool_labels, original.zs_lp_logits(pool, expected_start.detach(),
                                                                                         scale(tiny_vit)))
    torch.testing.assert_close(method.multipliers, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("constraint", ["l2", "cosine", "none"])
def test_logits_loss_and_gradients_equal_the_originals(tiny_vit, constraint):
    method = build(tiny_vit, constraint=constraint)
    views, labels = support(tiny_vit)
    method.setup(split(views, labels), None)
    with torch.no_grad():
        method.prototypes.add_(0.3 * torch.randn(method.prototypes.shape, generator=torch.Generator().manual_seed(1)))
    protos = torch.nn.Parameter(method.prototypes.detach().clone())
    lam = method.multipliers if constraint != "none" else torch.zeros(len(RAW))
    batch = views[1, :7]
    expected = original.clap_loss(batch, labels[:7], protos, method.base, lam, scale(tiny_vit), constraint)
    out = method.training_step(Batch(Features(global_=batch), labels[:7]))
    torch.testing.assert_close(out.logits, original.zs_lp_logits(batch, protos, scale(tiny_vit)), rtol=0,
                               atol=1e-6 * tiny_vit.logit_scale)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    assert set(out.parts) == ({"ce"} if constraint == "none" else {"ce", "penalty"})
    if constraint != "none":
        assert float(out.parts["penalty"]) > 0
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(method.prototypes.grad, protos.grad, rtol=1e-5, atol=1e-5 * protos.grad.abs().max())


@pytest.mark.parametrize("constraint, per_class, batch_size, epochs", [
    ("l2", 4, 32, 6),  # N = 12 < batch: one step per epoch on 32 of the 48 pooled features
    ("l2", 8, 8, 4),  # N = 24 >= batch: N // batch = 3 steps per epoch, each 8 of the 96 pooled features
    ("none", 8, 8, 3)])  # ZS-LP
def test_training_trajectory_equals_the_originals_loop(tiny_vit, tmp_path, constraint, per_class, batch_size,
                                                       epochs):
    """vlprompt's trainer with --sampling pool against CLAP's loop (clap_train) fed the same shuffles of the
    pool: the same steps per epoch, batches, multipliers, Dassl learning rates and momentum SGD."""
    method = build(tiny_vit, constraint=constraint)
    views, labels = support(tiny_vit, views=4, per_class=per_class, seed=2)
    v, n, e = views.shape
    method.setup(split(views, labels), None)
    base = method.base.detach().clone()
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0,
                      views=v, sampling="pool", checkpoint_every=0).validate()
    state = Trainer(method, cfg, tmp_path, seed=3, progress=False).fit(CachedViews(views), labels)
    # the pool as the original concatenates it (pass by pass): index v * N + i is view v of image i
    pool, pool_labels = views.reshape(v * n, e), labels.repeat(v)
    orders = torch.stack([torch.randperm(v * n, generator=torch.Generator().manual_seed(epoch_seed(3, ep)))
                          for ep in range(epochs)])
    ref = original.clap_train(pool, pool_labels, base, scale(tiny_vit), n, constraint=constraint, epochs=epochs,
                              lr=0.1, batch_size=batch_size, orders=orders)
    steps = original.num_batches(n, batch_size)
    assert state.step == steps * epochs and len(ref["losses"]) == steps * epochs
    assert [h["lr"] for h in state.history] == pytest.approx(ref["lrs"], rel=1e-12)
    losses = [h["loss"] for h in state.history]
    assert losses == pytest.approx([sum(ref["losses"][i * steps:(i + 1) * steps]) / steps for i in range(epochs)],
                                   rel=1e-5)
    assert (ref["prototypes"] - base).abs().max() > 1e-3
    torch.testing.assert_close(method.prototypes.detach(), ref["prototypes"], rtol=1e-5, atol=1e-6)


def test_pool_batches_mix_views_and_are_refused_without_several_views():
    from vlprompt.engine.trainer import Trainer as T

    trainer = T.__new__(T)
    trainer.cfg = TrainConfig(epochs=1, batch_size=4, views=5, sampling="pool").validate()
    batches = trainer._batches(6, torch.Generator().manual_seed(1), 5)
    assert len(batches) == 1 and len(batches[0]) == 4 and int(batches[0].max()) < 30  # 6 // 4 steps over 30
    assert len(trainer._batches(3, torch.Generator().manual_seed(1), 5)[0]) == 4  # N < batch: 4 of the 15
    for request, flag in (({"online": True}, "--online"), ({"augment": False}, "--no-augment"),
                          ({"views": 1}, "--views 1")):
        with pytest.raises(ConfigError, match=flag):
            resolve({"method": "clap", "data": {"dataset": "dtd", "root": "/x"}, "train": request})
    cfg = resolve({"method": "clap", "data": {"dataset": "dtd", "root": "/x"}})
    assert cfg.identity()["train"]["sampling"] == "pool"  # part of the identity once set


# -- 2. the recipe ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, shots", [("dtd", 1), ("eurosat", 16), ("imagenet", 4)])
def test_preset_is_adapt_sh(dataset, shots):
    cfg = resolve({"method": "clap", "data": {"dataset": dataset, "root": "/nonexistent", "shots": shots}})
    train = cfg.train.to_dict()
    assert {k: train[k] for k in ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "scheduler",
                                  "warmup_epochs", "warmup_lr", "views", "sampling", "augment")} == {
        "optimizer": "sgd", "lr": 0.1,  # SGD_lr1e-1_B256_ep300.yaml lines 15-16
        "momentum": 0.9,  # Dassl defaults.py OPTIM.MOMENTUM
        "weight_decay": 0.0,  # yaml line 17
        "batch_size": 256,  # yaml line 3
        "epochs": 300, "scheduler": "cosine",  # yaml lines 18-19, whatever the shots
        "warmup_epochs": 1, "warmup_lr": 1e-5,  # yaml lines 20-22
        "views": 20,  # adapters.py:143: epochs_aumentation = 20 augmented passes of the support set
        "sampling": "pool",  # adapters.py:431-456: len(train_loader_x) steps over a shuffle of the 20 N features
        "augment": True}  # Dassl's random_resized_crop (0.08-1) + random_flip (yaml lines 8-13)
    assert cfg.method_options == {
        "templates": ["imagenet-select", "dataset"] if dataset == "imagenet" else ["dataset"],  # adapters.py:112-116
        "clean_names": False, "average": "raw",  # adapters.py:91-128: raw names, mean of unnormalised features
        "constraint": "l2", "multipliers": "zeroshot", "init": "zeroshot"}  # scripts/adapt.sh ... ZS l2


@pytest.mark.parametrize("options, flag", [({"constraint": "l1"}, "--constraint"),
                                           ({"multipliers": "adaptive"}, "--multipliers"),
                                           ({"init": "kaiming"}, "--init"),
                                           ({"constraint": "none", "multipliers": "balanced"}, "--multipliers"),
                                           ({"average": "median"}, "--average")])
def test_each_bad_option_value_is_one_clear_error(options, flag):
    with pytest.raises(ConfigError, match=flag):
        resolve({"method": "clap", "data": {"dataset": "dtd", "root": "/x"}, "method_options": options})


def test_training_without_setup_says_what_is_missing(tiny_vit):
    method = build(tiny_vit)
    with pytest.raises(VLPromptError, match="setup"):
        method.training_step(Batch(Features(global_=torch.randn(2, tiny_vit.embed_dim)), torch.tensor([0, 1])))


# -- 3. the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("clap_models"), "tiny-vit", seed=7, sharpen=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("clap_data") / "things", per_class=8, size=(36, 40))


def test_cli_train_eval_export_predict(model_files, folder, tmp_path, capsys):
    cfg, weights = model_files
    cache = str(tmp_path / "cache")
    common = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(folder),
              "--cache-dir", cache, "--device", "cpu", "--quiet"]
    out = tmp_path / "run"
    assert main(["train", "--method", "clap", *common, "--shots", "2", "--epochs", "3", "--views", "3",
                 "--output", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    lam = res["setup"]["multipliers"]
    assert 0 < lam["min"] <= lam["mean"] <= lam["max"] < 1 and res["train"]["steps"] == 3  # 6 images < 256: 1 step
    assert res["config"]["train"]["sampling"] == "pool" and res["method_info"]["prompts"][0] == \
        "a photo of a blue_thing."
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_penalty"} <= set(records[-1])
    assert main(["eval", str(out), "--dataset", "folder", "--root", str(folder), "--cache-dir", cache, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    assert main(["export", str(out), "--output", str(tmp_path / "head"), "--quiet"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "head" / "head.json").read_text())["kind"] == "linear"
    image = sorted(Path(folder).rglob("*.jpg"))[0]
    assert main(["predict", str(tmp_path / "head"), str(image), "--json", "--quiet"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 3
    # ZS-LP is the same method without the penalty
    zslp = tmp_path / "zslp"
    assert main(["train", "--method", "clap", *common, "--shots", "2", "--epochs", "2", "--views", "3",
                 "--constraint", "none", "--output", str(zslp)]) == 0
    assert json.loads(capsys.readouterr().out).get("setup") == {}
    # another class list is refused in one line
    other = tmp_path / "other"
    for new, old in {"teal_thing": "blue_thing"}.items():
        import shutil

        shutil.copytree(folder / old, other / new)
    assert main(["eval", str(out), "--dataset", "folder", "--root", str(other), "--cache-dir", cache, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a CLAP / ZS-LP linear probe is class-specific" in err and len(err.splitlines()) == 1
    assert main(["train", "--method", "clap", *common, "--constraint", "l1", "--output", str(tmp_path / "x")]) == 2
    assert "--constraint" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_import_of_an_original_checkpoint_equals_the_original(model_files, folder, tmp_path):
    from vlprompt.backbone import load_backbone
    from vlprompt.data import load_dataset

    cfg_file, weights = model_files
    backbone = load_backbone(str(cfg_file), str(weights), "cpu")
    raw = load_dataset("folder", str(folder)).extra["source_classnames"]
    base, _ = original.base_text_features(backbone.model, raw, "Caltech101")  # "a photo of a {}.", raw names
    protos = base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(4))
    run = tmp_path / "original"
    config = {"DATASET": {"NAME": "Caltech101", "NUM_SHOTS": 2, "SUBSAMPLE_CLASSES": "all"}, "SEED": 3,
              "OPTIM": {"NAME": "sgd", "LR": 0.1, "MAX_EPOCH": 300, "WEIGHT_DECAY": 0.0, "WARMUP_EPOCH": 1,
                        "WARMUP_CONS_LR": 1e-5},
              "TRAINER": {"NAME": "ADAPTER", "ADAPTER": {"INIT": "ZS", "CONSTRAINT": "none", "ENHANCED_BASE": "none"}}}
    assert original.write_original_checkpoint(run, protos, base, config=config) == run / "adapter" / \
        "model.pth.tar-300"
    request = {"backbone": str(cfg_file), "pretrained": str(weights), "device": "cpu",
               "cache_dir": str(tmp_path / "cache"), "data": {"dataset": "folder", "root": str(folder)}}
    results = import_run("clap", run, request, tmp_path / "out")
    assert results["config"]["method_options"]["constraint"] == "none"  # a ZS-LP run
    assert (results["seed"], results["config"]["train"]["epochs"], results["config"]["train"]["weight_decay"]) == \
        (3, 300, 0.0)
    method, _, _ = load_method(tmp_path / "out", backbone=backbone)
    image = torch.randn(5, backbone.embed_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(method.eval()(Features(global_=image)),
                                   original.zs_lp_logits(image, protos, backbone.model.logit_scale), rtol=0,
                                   atol=1e-6 * backbone.logit_scale)
    for init, constraint, message in (("TipA", "none", "INIT TipA is not a CLAP or ZS-LP run"),
                                      ("ZS", "l2_adaptative", "no adaptative outer step")):
        config["TRAINER"]["ADAPTER"].update(INIT=init, CONSTRAINT=constraint)
        original.write_original_checkpoint(run, protos, base, config=config)
        with pytest.raises(CheckpointError, match=message):
            import_run("clap", run, request, tmp_path / "refused")
    config["TRAINER"]["ADAPTER"].update(INIT="ZS", CONSTRAINT="l2_corrected")
    original.write_original_checkpoint(run, protos, base, config=config)
    assert import_run("clap", run, request, tmp_path / "corrected")["config"]["method_options"]["multipliers"] == \
        "corrected"
    # a run of other class names (here: cleaned) does not match the saved class features
    with pytest.raises(CheckpointError, match="blue thing"):
        import_run("clap", run, {**request, "method_options": {"clean_names": True}}, tmp_path / "clean")


def test_sub_list_of_classes_takes_their_rows(tiny_vit):
    method = build(tiny_vit)
    image = torch.randn(3, tiny_vit.embed_dim, generator=torch.Generator().manual_seed(6))
    full = method(Features(global_=image))
    method.set_classnames(["american pit bull terrier", "golden retriever"])
    torch.testing.assert_close(method(Features(global_=image)), full[:, [2, 0]])
    assert math.isclose(method.export_head()[0]["text_features"].norm(dim=-1)[0].item(), 1.0, rel_tol=1e-6)


# -- protocols ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, methods, cells", PROTOCOLS)
def test_runs_in_its_papers_protocol_presets(preset, methods, cells):
    from vlprompt.grid import expand, load_preset, resolve_cells

    spec = load_preset(preset)
    spec.set_value("data.root", "/data", "--root")
    if methods:
        spec.set_axis("method", methods, "--methods")
    resolved = resolve_cells(expand(spec))
    assert len(resolved) == cells and {c.config.method for c in resolved} == {NAME}
    cfg = next(c.config for c in resolved if c.config.data.dataset == "imagenet")
    assert cfg.train.to_dict() == resolve({"method": NAME, "backbone": cfg.backbone, "data": cfg.data.to_dict(),
                                           "seed": cfg.seed}).train.to_dict()  # the method's own recipe
