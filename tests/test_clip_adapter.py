"""CLIP-Adapter: the method computes what gaopengcuhk/CLIP-Adapter computes (the written-out original,
tests/originals/clip_adapter.py) on the same weights -- logits, gradients and a training trajectory under Dassl's SGD
-- for any embedding width; its preset (CoOp's command, the README's instruction) field by field; a CLI run on a
generated folder (train / eval on other classes / export / predict / import of an original-format checkpoint); one
clear line for each bad option value."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import color_folder
from originals import clip_adapter as original, coop_base
from vlprompt.cli import main
from vlprompt.engine.sources import CachedViews
from vlprompt.engine.trainer import Trainer, TrainConfig, epoch_seed
from vlprompt.errors import ConfigError
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, Features
from vlprompt.runs import resolve
from vlprompt.runs.assembly import load_method
from vlprompt.runs.importer import import_run
from vlprompt.testing import make_tiny_checkpoint

NAMES = ["golden_retriever", "sword lily", "banded", "cup (drinking)"]  # CoOp's names: "_" becomes a space
NAME = "clip-adapter"
#: the protocols of its paper: few-shot (Tip-Adapter's exp.log), base-to-new (Tip-Adapter issue #6)
PROTOCOLS = [("coop-fewshot", ["clip-adapter"], 165), ("cocoop-base2new", ["clip-adapter"], 33)]


def feats(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def build(backbone, names=NAMES, **options):
    return build_method("clip-adapter", options, backbone, names, template="a photo of a {}, a type of pet.")


def load_weights(method, weights):
    with torch.no_grad():
        method.adapter[0].weight.copy_(weights["fc.0.weight"])
        method.adapter[2].weight.copy_(weights["fc.2.weight"])


# -- 1. the computation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.2, 0.6])
def test_logits_and_gradients_equal_the_original_at_any_width(tiny_vit, ratio):
    model, e = tiny_vit.model, tiny_vit.embed_dim
    weights = original.init_adapter(e, generator=torch.Generator().manual_seed(0))  # the original: 1024 only
    text = original.text_features(model, NAMES, "OxfordPets")
    method = build(tiny_vit, ratio=ratio)
    assert method.learned_tensor("adapter.0.weight").shape == (e // 4, e)
    load_weights(method, weights)
    image = feats(6, e, seed=1) * 3
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    params = {k: torch.nn.Parameter(v.clone()) for k, v in weights.items()}
    expected = original.logits(model, image, params, text, ratio)
    out = method.training_step(Batch(Features(global_=image), labels))
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6 * model.logit_scale.exp().item())
    assert expected.std(dim=0).min() > 1e-2 and original.adapter(image, weights).abs().max() > 0
    out.loss.backward()
    F.cross_entropy(expected, labels).backward()
    for mine, k in ((method.adapter[0].weight, "fc.0.weight"), (method.adapter[2].weight, "fc.2.weight")):
        assert params[k].grad.abs().max() > 0
        torch.testing.assert_close(mine.grad, params[k].grad, rtol=1e-5, atol=1e-5 * params[k].grad.abs().max().item())


def test_default_init_is_nn_linear_and_follows_the_seed(tiny_vit):
    e = tiny_vit.embed_dim
    torch.manual_seed(3)
    a = build(tiny_vit)
    torch.manual_seed(3)
    b = build(tiny_vit)
    assert torch.equal(a.adapter[0].weight, b.adapter[0].weight)
    for layer, fan_in in ((a.adapter[0], e), (a.adapter[2], e // 4)):
        assert layer.bias is None and layer.weight.abs().max() <= 1 / fan_in ** 0.5
        assert layer.weight.std() > 0.4 / fan_in ** 0.5  # uniform in +-1/sqrt(fan_in): std 0.577 / sqrt(fan_in)


def test_training_trajectory_is_dassls_sgd(tiny_vit, tmp_path):
    method = build(tiny_vit)
    weights = {k: v.detach().clone() for k, v in (("fc.0.weight", method.adapter[0].weight),
                                                  ("fc.2.weight", method.adapter[2].weight))}
    n, e = 10, tiny_vit.embed_dim
    labels = torch.arange(len(NAMES)).repeat(3)[:n]
    images = feats(n, e, seed=4) * 3
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.05, views=1, checkpoint_every=0).validate()  # CoOp's SGD
    Trainer(method, cfg, tmp_path, seed=2, progress=False).fit(CachedViews(images[None]), labels)
    text = original.text_features(tiny_vit.model, NAMES, "OxfordPets")
    params = {k: torch.nn.Parameter(v.clone()) for k, v in weights.items()}
    optim = coop_base.dassl_optimizer(params.values(), "sgd", 0.05)
    sched = coop_base.dassl_scheduler(optim, 3)
    for epoch in range(3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(2, epoch)))
        for i in range(0, (n // 4) * 4, 4):
            idx = order[i:i + 4]
            loss = F.cross_entropy(original.logits(tiny_vit.model, images[idx], params, text), labels[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
        sched.step()
    assert (params["fc.0.weight"] - weights["fc.0.weight"]).abs().max() > 1e-4
    torch.testing.assert_close(method.adapter[0].weight.detach(), params["fc.0.weight"].detach(), rtol=1e-5,
                               atol=1e-7)
    torch.testing.assert_close(method.adapter[2].weight.detach(), params["fc.2.weight"].detach(), rtol=1e-5,
                               atol=1e-7)


# -- 2. the recipe ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, shots, epochs", [("dtd", 1, 50), ("dtd", 2, 100), ("dtd", 4, 100),
                                                    ("dtd", 8, 200), ("eurosat", 16, 200), ("imagenet", 16, 50)])
def test_preset_is_coops_command(dataset, shots, epochs):
    """None is shipped; README.md:14 says to follow CoOp's command: CoOp's configs/trainers/CoOp/rn50*.yaml."""
    cfg = resolve({"method": "clip-adapter", "data": {"dataset": dataset, "root": "/nonexistent", "shots": shots}})
    train = cfg.train.to_dict()
    assert {k: train[k] for k in ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "epochs", "scheduler",
                                  "warmup_epochs", "warmup_lr")} == {
        "optimizer": "sgd", "lr": 0.002,  # rn50*.yaml OPTIM.NAME / LR
        "momentum": 0.9, "weight_decay": 5e-4,  # Dassl defaults.py OPTIM.MOMENTUM / WEIGHT_DECAY
        "batch_size": 32,  # rn50*.yaml DATALOADER.TRAIN_X.BATCH_SIZE
        "epochs": epochs,  # CoOp's main.sh: rn50_ep50 (1 shot), _ep100 (2, 4), rn50 (8, 16: 200); ImageNet 50
        "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5}
    assert cfg.method_options == {"templates": ["dataset"],  # clip_adapter.py:18-34, 79-86: the dataset's prompt
                                  "ratio": 0.2,  # clip_adapter.py:104, a literal
                                  "reduction": 4}  # clip_adapter.py:97: Adapter(1024, 4)


@pytest.mark.parametrize("options, flag", [({"ratio": 0.0}, "--ratio"), ({"ratio": 1.5}, "--ratio"),
                                           ({"reduction": 0}, "--reduction"), ({"reduction": 2.5}, "--reduction")])
def test_each_bad_option_value_is_one_clear_error(options, flag):
    with pytest.raises(ConfigError, match=flag):
        resolve({"method": "clip-adapter", "data": {"dataset": "dtd", "root": "/x"}, "method_options": options})


def test_a_reduction_wider_than_the_embedding_is_refused_when_built(tiny_vit):
    with pytest.raises(ConfigError, match="--reduction 100 leaves no hidden unit of the 64-wide embedding"):
        build(tiny_vit, reduction=100)


# -- 3. the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ca_models"), "tiny-vit", seed=6, sharpen=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("ca_data") / "things", per_class=8, size=(36, 40))


def test_cli_train_eval_on_other_classes_export_predict(model_files, folder, tmp_path, capsys):
    cfg, weights = model_files
    cache = str(tmp_path / "cache")
    common = ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(folder),
              "--cache-dir", cache, "--device", "cpu", "--quiet"]
    out = tmp_path / "run"
    assert main(["train", "--method", "clip-adapter", *common, "--shots", "2", "--epochs", "2", "--batch-size", "4",
                 "--views", "2", "--output", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["config"]["method_options"] == {"templates": ["a photo of a {}."], "ratio": 0.2, "reduction": 4}
    # class-agnostic: the adapter evaluates on another class list (base-to-new, cross-dataset)
    other = tmp_path / "other"
    for new, old in {"teal_thing": "blue_thing", "red_thing": "red_thing"}.items():
        shutil.copytree(folder / old, other / new)
    assert main(["eval", str(out), "--dataset", "folder", "--root", str(other), "--cache-dir", cache, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["num_samples"] > 0
    assert main(["export", str(out), "--output", str(tmp_path / "head"), "--quiet"]) == 0
    capsys.readouterr()
    head = json.loads((tmp_path / "head" / "head.json").read_text())
    assert head["kind"] == "prompt"  # the adapter runs on every image: predict rebuilds the method
    image = sorted(Path(folder).rglob("*.jpg"))[0]
    assert main(["predict", str(tmp_path / "head"), str(image), "--json", "--quiet"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 3
    assert main(["train", "--method", "clip-adapter", *common, "--ratio", "0", "--output", str(tmp_path / "x")]) == 2
    assert "--ratio" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_import_of_an_original_checkpoint_equals_the_original(model_files, folder, tmp_path):
    from vlprompt.backbone import load_backbone

    cfg_file, weights_file = model_files
    backbone = load_backbone(str(cfg_file), str(weights_file), "cpu")
    e = backbone.embed_dim
    weights = original.init_adapter(e, generator=torch.Generator().manual_seed(8))
    run = tmp_path / "original"
    path = original.write_original_checkpoint(run, weights, 200)
    assert path == run / "clip_adapter" / "model.pth.tar-200"
    coop_base.write_dassl_log(run, {"seed": 2, "trainer": "CLIP_Adapter"}, {
        "DATASET": {"NAME": "Caltech101", "NUM_SHOTS": 2, "SUBSAMPLE_CLASSES": "all"}, "SEED": 2,
        "OPTIM": {"NAME": "sgd", "LR": 0.002, "MAX_EPOCH": 200, "WARMUP_EPOCH": 1, "WARMUP_CONS_LR": 1e-5},
        "TRAINER": {"NAME": "CLIP_Adapter"}})
    request = {"backbone": str(cfg_file), "pretrained": str(weights_file), "device": "cpu",
               "cache_dir": str(tmp_path / "cache"), "data": {"dataset": "folder", "root": str(folder)}}
    results = import_run("clip-adapter", run, request, tmp_path / "out")
    assert results["config"]["method_options"]["reduction"] == 4 and results["seed"] == 2
    method, meta, _ = load_method(tmp_path / "out", backbone=backbone)
    text = original.text_features(backbone.model, meta["classnames"], "Caltech101")  # "a photo of a {}."
    image = feats(5, e, seed=9) * 3
    with torch.no_grad():
        torch.testing.assert_close(method.eval()(Features(global_=image)),
                                   original.logits(backbone.model, image, weights, text), rtol=0,
                                   atol=1e-6 * backbone.logit_scale)
    # a run of another trainer is refused, naming it
    coop_base.write_dassl_log(run, {"trainer": "CoOp"}, {"TRAINER": {"NAME": "CoOp"}, "SEED": 1,
                                                         "DATASET": {"NUM_SHOTS": 4}})
    with pytest.raises(Exception, match="trainer is CoOp"):
        import_run("clip-adapter", run, request, tmp_path / "coop")


# -- 4. the published numbers -------------------------------------------------------------------------------------
def test_published_numbers_are_tip_adapters_exp_log_clip_a_rows():
    from vlprompt.papers import load_papers

    rows = [n for n in load_papers() if n.method == "clip-adapter"]
    assert len(rows) == 55 and {n.shots for n in rows} == {1, 2, 4, 8, 16}
    assert all((n.protocol, n.backbone, n.pretrained, n.metric) == ("fewshot", "RN50", "openai", "accuracy")
               and "exp.log" in n.source and "issue #7" in n.source for n in rows)
    by = {(n.dataset, n.shots): n.value for n in rows}
    # exp.log lines 6 (imagenet), 46 (dtd), 70 (oxford_flowers), 86 (stanford_cars): 16 / 8 / 4 / 2 / 1 shots
    assert [by["imagenet", k] for k in (16, 8, 4, 2, 1)] == [63.59, 62.68, 61.84, 61.52, 61.20]
    assert [by["dtd", k] for k in (16, 8, 4, 2, 1)] == [65.96, 61.00, 56.86, 51.48, 45.80]
    assert [by["oxford_flowers", k] for k in (16, 8, 4, 2, 1)] == [93.90, 91.72, 87.17, 81.61, 73.49]
    assert [by["stanford_cars", k] for k in (16, 8, 4, 2, 1)] == [74.01, 67.89, 62.45, 58.74, 55.13]
    # a transcription error in any cell moves the 11-dataset means (computed in RECIPES_regularised.md section 6)
    means = [sum(v for (d, k), v in by.items() if k == shots) / 11 for shots in (16, 8, 4, 2, 1)]
    assert means == pytest.approx([74.44, 71.40, 68.61, 65.55, 62.67], abs=0.006)


@pytest.mark.parametrize("dataset, shots", [("dtd", 16), ("imagenet", 1), ("eurosat", 4)])
def test_a_default_run_meets_the_numbers_conditions_and_another_ratio_does_not(dataset, shots):
    """The conditions name what a run records: its identity after the method is built (the templates it used)."""
    from vlprompt.data.templates import template_for
    from vlprompt.methods.adapters.clip_adapter import CLIPAdapter
    from vlprompt.papers import load_papers, matches
    from vlprompt.reporting.collect import flatten

    def identity(**options):
        cfg = resolve({"method": "clip-adapter", "backbone": "RN50", "data": {"dataset": dataset, "root": "/x",
                                                                           "shots": shots},
                       "method_options": options})
        ident = cfg.identity()
        ident["method_options"]["templates"] = CLIPAdapter.expand_templates(ident["method_options"]["templates"],
                                                                            template_for(dataset))
        return flatten(ident)

    (number,) = [n for n in load_papers() if (n.method, n.dataset, n.shots) == ("clip-adapter", dataset, shots)]
    kw = dict(method="clip-adapter", dataset=dataset, protocol="fewshot", backbone="RN50-quickgelu",
              pretrained="openai", shots=shots, metric="accuracy")
    assert matches(number, **kw, flat_identity=identity())
    assert not matches(number, **kw, flat_identity=identity(ratio=0.5))
    assert not matches(number, **kw, flat_identity=identity(templates=["imagenet80"]))


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
