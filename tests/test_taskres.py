"""TaskRes: the method computes what geekyutao/TaskRes computes (the written-out original, tests/originals/taskres.py)
on the same weights -- its base classifier (unnormalised template mean of the raw class names), logits, gradients,
and a training trajectory under Dassl's Adam with L2 weight decay; its preset field by field with sources; a CLI
run on a generated folder (train / eval / export / predict / import of an original-format checkpoint); one clear
line for each bad option value and for another class list, and ImageNet-A-style sub-lists served by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import color_folder
from originals import coop_base, taskres as original
from vlprompt.cli import main
from vlprompt.engine.sources import CachedViews
from vlprompt.engine.trainer import Trainer, TrainConfig, epoch_seed
from vlprompt.errors import CheckpointError, ConfigError, VLPromptError
from vlprompt.methods import build_method
from vlprompt.methods.base import Batch, Features
from vlprompt.runs import resolve
from vlprompt.runs.assembly import load_method
from vlprompt.runs.importer import import_run
from vlprompt.testing import make_tiny_checkpoint

# underscores (kept by the original), spaces, a merging name
RAW = ["golden_retriever", "sword lily", "american_pit_bull_terrier", "cup (drinking)"]
CLEAN = [n.replace("_", " ") for n in RAW]
NAME = "taskres"
#: the protocols of its scripts: few-shot (train_regular.sh, seed 1), domain generalisation (test_dg.sh)
PROTOCOLS = [("taskres-fewshot", None, 55), ("coop-dg", ["taskres"], 3)]


def feats(n, dim, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def build(backbone, dataset="oxford_pets", names=RAW, **options):
    """TaskRes as a run builds it for ``dataset`` (its preset's options), on the source names ``names``."""
    from vlprompt.data.templates import template_for
    from vlprompt.runs.config import resolve_data
    from vlprompt.methods.adapters.taskres import TaskRes

    preset = TaskRes.preset(resolve_data({"dataset": dataset, "root": "/nonexistent"}))["method_options"]
    return build_method("taskres", {**preset, **options}, backbone, [n.replace("_", " ") for n in names],
                        template=template_for(dataset), source_names=names)


# -- 1. the computation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset, dassl", [("oxford_pets", "OxfordPets"), ("imagenet", "ImageNet"),
                                            ("dtd", "DescribableTextures")])
def test_base_is_the_originals_unnormalised_template_mean_of_raw_names(tiny_vit, dataset, dassl):
    method = build(tiny_vit, dataset)
    base = original.base_text_features(tiny_vit.model, RAW, dassl)
    assert len(method.templates) == len(original.base_templates(dassl))  # ImageNet: CoOp's 7 + its own
    torch.testing.assert_close(method.base, base, rtol=0, atol=1e-5 * base.abs().max().item())
    assert base.std(dim=0).min() > 1e-3 and not torch.allclose(base.norm(dim=-1), torch.ones(len(RAW)))
    # the variants are other class features: cleaned names, CLIP's normalised ensembling
    cleaned = build(tiny_vit, dataset, clean_names=True).base
    assert (cleaned[0] - base[0]).norm() > 1e-3 * base[0].norm()  # golden_retriever -> golden retriever
    torch.testing.assert_close(cleaned[1], base[1], rtol=0, atol=1e-5 * base.abs().max().item())  # no underscore
    normalised = build(tiny_vit, dataset, average="normalised").base
    torch.testing.assert_close(normalised.norm(dim=-1), torch.ones(len(RAW)))


def test_logits_and_gradients_equal_the_original(tiny_vit):
    model = tiny_vit.model
    base = original.base_text_features(model, RAW, "OxfordPets")
    method = build(tiny_vit)
    with torch.no_grad():
        method.residual.copy_(feats(len(RAW), tiny_vit.embed_dim, seed=1) * 0.3)
    image = feats(6, tiny_vit.embed_dim, seed=2)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    for alpha in (0.5, 1.0):
        method.config.alpha = alpha
        residual = torch.nn.Parameter(method.residual.detach().clone())
        expected = original.logits(model, image, base, residual, alpha)
        out = method.training_step(Batch(Features(global_=image), labels))
        scale = model.logit_scale.exp().item()
        torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6 * scale)
        assert expected.std(dim=0).min() > 1e-2  # the logits of the classes vary
        method.zero_grad()
        out.loss.backward()
        F.cross_entropy(expected, labels).backward()
        torch.testing.assert_close(method.residual.grad, residual.grad, rtol=1e-5,
                                   atol=1e-5 * residual.grad.abs().max().item())
    # zeros at the start: zero-shot CLIP with the base classifier
    fresh = build(tiny_vit)
    assert torch.equal(fresh.residual, torch.zeros_like(fresh.residual))


def test_training_trajectory_is_dassls_adam_with_l2_weight_decay(tiny_vit, tmp_path):
    """A few epochs of vlprompt's loop against the original's: Dassl's Adam (torch Adam, weight decay 5e-4 added to
    the gradient), its cosine after the constant warm-up epoch, the same batches."""
    method = build(tiny_vit)
    n, e = 12, tiny_vit.embed_dim
    labels = torch.arange(len(RAW)).repeat(3)
    images = feats(n, e, seed=3)
    cfg = TrainConfig(epochs=4, batch_size=5, optimizer="adam", lr=2e-3, weight_decay=5e-4, views=1,
                      checkpoint_every=0).validate()
    base = method.base.detach().clone()
    Trainer(method, cfg, tmp_path, seed=7, progress=False).fit(CachedViews(images[None]), labels)
    residual = torch.nn.Parameter(torch.zeros_like(base))
    optim = coop_base.dassl_optimizer([residual], "adam", 2e-3)
    sched = coop_base.dassl_scheduler(optim, 4)
    for epoch in range(4):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(7, epoch)))
        for i in range(0, (n // 5) * 5, 5):  # Dassl drops the last partial batch
            idx = order[i:i + 5]
            loss = F.cross_entropy(original.logits(tiny_vit.model, images[idx], base, residual, 0.5), labels[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
        sched.step()
    assert residual.detach().abs().max() > 1e-3
    torch.testing.assert_close(method.residual.detach(), residual.detach(), rtol=1e-5, atol=1e-7)


# -- 2. the recipe ----------------------------------------------------------------------------------------------
def _resolved(dataset, shots=16, **extra):
    return resolve({"method": "taskres", "data": {"dataset": dataset, "root": "/nonexistent", "shots": shots},
                    **extra})


@pytest.mark.parametrize("dataset, shots, lr, epochs, alpha", [
    ("dtd", 1, 2e-3, 100, 0.5), ("dtd", 4, 2e-3, 100, 0.5), ("dtd", 8, 2e-3, 200, 0.5),
    ("oxford_flowers", 16, 2e-3, 200, 1.0), ("oxford_flowers", 2, 2e-3, 100, 1.0),
    ("imagenet", 16, 2e-4, 200, 0.5), ("imagenet", 1, 2e-4, 100, 0.5)])
def test_preset_is_train_regular_sh(dataset, shots, lr, epochs, alpha):
    cfg = _resolved(dataset, shots)
    train = cfg.train.to_dict()
    assert {k: train[k] for k in ("optimizer", "lr", "epochs", "batch_size", "weight_decay", "adam_eps", "scheduler",
                                  "warmup_epochs", "warmup_lr")} == {
        "optimizer": "adam",  # adam_lr2e-3_B256_ep100.yaml line 18 (OPTIM.NAME); Dassl builds torch.optim.Adam
        "lr": lr,  # line 19; ImageNet: train_regular.sh picks adam_lr2e-4_B256_ep100 / _ep200
        "epochs": epochs,  # train_regular.sh: *_ep100 for 1 / 2 / 4 shots, *_ep200 for 8 / 16 (yaml line 20)
        "batch_size": 256,  # yaml line 3
        "weight_decay": 5e-4,  # Dassl defaults.py OPTIM.WEIGHT_DECAY, as L2 in Adam's gradient
        "adam_eps": 1e-8,  # torch's Adam default (Dassl passes none)
        "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5}  # yaml lines 21-24
    opts = cfg.method_options
    assert opts["alpha"] == alpha  # train_regular.sh RESIDUAL_SCALE: 0.5, OxfordFlowers 1.0
    assert opts["templates"] == (["imagenet-select", "dataset"] if dataset == "imagenet" else ["dataset"])
    assert opts["clean_names"] is False and opts["average"] == "raw"  # taskres.py:134 (raw names), :140 (mean)
    assert cfg.train.sampling == "images" and "sampling" not in cfg.identity()["train"]


@pytest.mark.parametrize("options, flag", [({"alpha": 0.0}, "--alpha"), ({"alpha": -1.0}, "--alpha"),
                                           ({"average": "mean"}, "--average"), ({"templates": []}, "--templates"),
                                           ({"clean_names": "yes"}, "--clean-names")])
def test_each_bad_option_value_is_one_clear_error(options, flag):
    with pytest.raises(ConfigError, match=flag):
        _resolved("dtd", method_options=options)


# -- 3. the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("taskres_models"), "tiny-vit", seed=5, sharpen=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return color_folder(tmp_path_factory.mktemp("taskres_data") / "things", per_class=8, size=(36, 40))


def named_folder(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """A copy of some class folders of ``src`` under other names (``{new: old}``)."""
    for new, old in names.items():
        shutil.copytree(src / old, dst / new)
    return dst


def _common(model_files, folder, cache):
    cfg, weights = model_files
    return ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "folder", "--root", str(folder),
            "--cache-dir", str(cache), "--device", "cpu", "--quiet"]


def test_cli_train_eval_export_predict_and_class_lists(model_files, folder, tmp_path, capsys):
    common = _common(model_files, folder, tmp_path / "cache")
    out = tmp_path / "run"
    assert main(["train", "--method", "taskres", *common, "--shots", "2", "--epochs", "3", "--batch-size", "4",
                 "--views", "2", "--output", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["config"]["method_options"]["alpha"] == 0.5 and res["config"]["train"]["optimizer"] == "adam"
    # the class folders' own names go into the prompts, underscores kept (as the original's Dassl names)
    assert res["method_info"]["prompts"][0] == "a photo of a blue_thing."
    method, _, backbone = load_method(out)
    assert method.learned_tensor("residual").abs().max() > 0 and set(method.learned_state()) == {"base", "residual"}
    assert main(["eval", str(out), "--dataset", "folder", "--root", str(folder), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    assert main(["export", str(out), "--output", str(tmp_path / "head"), "--quiet"]) == 0
    capsys.readouterr()
    image = sorted(Path(folder).rglob("*.jpg"))[0]
    assert main(["predict", str(tmp_path / "head"), str(image), "--json", "--quiet"]) == 0
    predicted = json.loads(capsys.readouterr().out)[0]["top"]
    with torch.no_grad():  # the exported linear head is the method's classifier
        from vlprompt.data import load_image
        from vlprompt.runs.assembly import transforms_for

        x = transforms_for("coop", backbone)[1](load_image(str(image)))[None]
        probs = method.eval()(Features(global_=backbone.encode_image(x))).softmax(-1)[0]
    assert predicted[0]["probability"] == pytest.approx(float(probs.max()), rel=1e-4)
    # a sub-list of the trained classes (ImageNet-A style): the rows of those names; another name is refused
    sub = named_folder(folder, tmp_path / "sub", {"red_thing": "red_thing", "blue_thing": "blue_thing"})
    assert main(["eval", str(out), "--dataset", "folder", "--root", str(sub), "--cache-dir", str(tmp_path / "cache"),
                 "--quiet"]) == 0
    capsys.readouterr()
    other = named_folder(folder, tmp_path / "other", {"red_thing": "red_thing", "teal_thing": "blue_thing"})
    assert main(["eval", str(out), "--dataset", "folder", "--root", str(other), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a TaskRes residual is class-specific" in err and "'teal thing'" in err and len(err.splitlines()) == 1
    assert main(["train", "--method", "taskres", *common, "--alpha", "0", "--output", str(tmp_path / "x")]) == 2
    assert "--alpha" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_sub_list_rows_are_the_trained_rows_by_name(tiny_vit):
    method = build(tiny_vit)
    with torch.no_grad():
        method.residual.copy_(feats(len(RAW), tiny_vit.embed_dim, seed=4))
    image = feats(3, tiny_vit.embed_dim, seed=5)
    full = method(Features(global_=image))
    method.set_classnames([CLEAN[2], CLEAN[0]])
    torch.testing.assert_close(method(Features(global_=image)), full[:, [2, 0]])
    with pytest.raises(VLPromptError, match="class-specific"):
        method.set_classnames(["cat"])
    method.set_classnames(CLEAN)
    torch.testing.assert_close(method(Features(global_=image)), full)


def test_import_of_an_original_checkpoint_equals_the_original(model_files, folder, tmp_path):
    """What a TaskRes run saves (prompt_learner/model.pth.tar-N with its log.txt) imports and gives the original's
    logits with the saved base; a base of other class names is refused naming the class."""
    from vlprompt.backbone import load_backbone
    from vlprompt.data import load_dataset

    cfg_file, weights = model_files
    backbone = load_backbone(str(cfg_file), str(weights), "cpu")
    splits = load_dataset("folder", str(folder))
    raw = splits.extra["source_classnames"]
    assert raw == ["blue_thing", "green_thing", "red_thing"] and splits.classnames[0] == "blue thing"
    base = original.base_text_features(backbone.model, raw, "Caltech101")  # "a photo of a {}.", the folder's
    residual = feats(len(raw), backbone.embed_dim, seed=6) * 0.5
    run = tmp_path / "original"
    original.write_original_checkpoint(run, {"text_feature_residuals": residual, "base_text_features": base}, 200)
    coop_base.write_dassl_log(run, {"seed": 1, "trainer": "TaskRes"}, {
        "DATASET": {"NAME": "Caltech101", "NUM_SHOTS": 2, "SUBSAMPLE_CLASSES": "all"}, "SEED": 1,
        "OPTIM": {"NAME": "adam", "LR": 0.002, "MAX_EPOCH": 200, "WARMUP_EPOCH": 1, "WARMUP_CONS_LR": 1e-5},
        "TRAINER": {"NAME": "TaskRes", "TaskRes": {"RESIDUAL_SCALE": 1.0, "ENHANCED_BASE": "none", "PREC": "fp16"}}})
    request = {"backbone": str(cfg_file), "pretrained": str(weights), "device": "cpu",
               "cache_dir": str(tmp_path / "cache"), "data": {"dataset": "folder", "root": str(folder)}}
    results = import_run("taskres", run, request, tmp_path / "out")
    assert results["config"]["method_options"]["alpha"] == 1.0 and results["config"]["data"]["shots"] == 2
    assert results["config"]["train"]["epochs"] == 200
    method, _, _ = load_method(tmp_path / "out", backbone=backbone)
    image = feats(5, backbone.embed_dim, seed=7)
    expected = original.logits(backbone.model, image, base, residual, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(method.eval()(Features(global_=image)), expected, rtol=0,
                                   atol=1e-6 * backbone.logit_scale)
    # the saved base is checked against the one rebuilt: cleaned names make another base
    with pytest.raises(CheckpointError, match=r"class 0 \('blue thing'\) differ"):
        import_run("taskres", run, {**request, "method_options": {"clean_names": True}}, tmp_path / "clean")
    # without its log.txt the residual scale is unknown: --alpha must say it
    (run / "log.txt").unlink()
    with pytest.raises(ConfigError, match="--alpha"):
        import_run("taskres", run, {**request, "data": {**request["data"], "shots": 2}}, tmp_path / "noalpha")


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
