"""Evaluating a finished run (``vlprompt eval``): base-to-new only of runs trained on the base half, the
target dataset's own prompt template for hand-crafted-prompt methods evaluated on another dataset, and the run's
own feature cache."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import color_folder
from vlprompt.cli import main
from vlprompt.errors import ConfigError
from vlprompt.runs import DataConfig, base_to_new, evaluate_run, resolve, run
from vlprompt.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("evp_models"), "tiny-vit", seed=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 10 generated images (5 / 2 / 3 per class): base = the first 2 classes, new = the third."""
    return color_folder(tmp_path_factory.mktemp("evp_data") / "shapes")


def _request(model_files, folder, cache_dir, method="coop", **data):
    cfg, weights = model_files
    req = {"method": method, "backbone": str(cfg), "pretrained": str(weights), "cache_dir": str(cache_dir),
           "data": {"dataset": "folder", "root": str(folder), **data}}
    if method == "coop":
        req["data"].setdefault("shots", 2)
        req["train"] = {"epochs": 1, "batch_size": 4, "views": 1}
        req["method_options"] = {"n_ctx": 4}
    return req


def _files(root: Path) -> dict:
    """Every file under ``root`` with its size and mtime (to tell that nothing was written)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


# -- B1: base-to-new of runs trained on the base half only ---------------------------------------------------
def test_base_to_new_of_a_run_trained_on_every_class_is_refused(model_files, folder, tmp_path, capsys):
    run_dir = tmp_path / "coop-all"
    run(resolve(_request(model_files, folder, tmp_path / "cache")), run_dir, progress=False)
    before = _files(run_dir)
    capsys.readouterr()
    rc = main(["eval", str(run_dir), "--dataset", "folder", "--root", str(folder), "--base-to-new", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlprompt: error: --base-to-new: ")
    assert "trained on every class" in lines[0] and "--classes base" in lines[0]
    assert _files(run_dir) == before and not (run_dir / "eval").exists()
    with pytest.raises(ConfigError, match="trained on every class"):
        base_to_new(run_dir, DataConfig(dataset="folder", root=str(folder)), progress=False)
    # one class half of it is still an ordinary evaluation
    res = evaluate_run(run_dir, DataConfig(dataset="folder", root=str(folder), classes="new"), progress=False)
    assert res["metrics"]["num_samples"] == 3


def test_base_to_new_of_base_trained_and_zero_shot_runs(model_files, folder, tmp_path):
    data = DataConfig(dataset="folder", root=str(folder))
    base_run = tmp_path / "coop-base"
    run(resolve(_request(model_files, folder, tmp_path / "cache", classes="base")), base_run, progress=False)
    res = base_to_new(base_run, data, progress=False)
    assert (base_run / "eval" / "base2new-folder.json").is_file() and 0 <= res["harmonic_mean"] <= 100
    zs = tmp_path / "zs"  # zero-shot learns nothing: CLIP's row of the protocol, on every class
    run(resolve(_request(model_files, folder, tmp_path / "cache", method="zeroshot")), zs, progress=False)
    assert base_to_new(zs, data, progress=False)["new"] >= 0


def test_a_grid_refuses_base_to_new_of_cells_trained_on_every_class(model_files, folder, tmp_path):
    from vlprompt.grid.spec import expand, resolve_cells, spec_from_mapping

    spec = {**_request(model_files, folder, tmp_path / "cache"), "axes": {"seed": [1]},
            "evaluations": [{"base_to_new": True}]}
    with pytest.raises(ConfigError, match="base_to_new: the run .* trained on every class.*data.classes: base"):
        resolve_cells(expand(spec_from_mapping(spec)))
    spec["data"] = {**spec["data"], "classes": "base"}
    assert resolve_cells(expand(spec_from_mapping(spec)))


# -- B6: the run's own feature cache -------------------------------------------------------------------------
def test_eval_reads_the_runs_own_cache_unless_told_otherwise(model_files, folder, tmp_path, monkeypatch, capsys):
    default = tmp_path / "default-cache"
    monkeypatch.setenv("VLPROMPT_CACHE", str(default))
    own = tmp_path / "own-cache"
    run_dir = tmp_path / "zs"
    run(resolve(_request(model_files, folder, own, method="zeroshot")), run_dir, progress=False)
    filled = _files(own)
    capsys.readouterr()
    rc = main(["eval", str(run_dir), "--dataset", "folder", "--root", str(folder), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert not default.exists()  # the default cache is not filled again
    assert _files(own) == filled  # the test features were in the run's cache: read, nothing added
    other = tmp_path / "other-cache"
    rc = main(["eval", str(run_dir), "--dataset", "folder", "--root", str(folder), "--cache-dir", str(other),
               "--quiet"])
    assert rc == 0 and other.is_dir() and not default.exists()


# -- B2: hand-crafted prompts evaluated on another dataset use its own prompt ----------------------------------
TEXTURE = "{} texture."


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """Another folder dataset (other classes), read with a prompt of its own (the reader option ``template``)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("evp_target") / "textures"
    rng = np.random.default_rng(5)
    for c, name in enumerate(["striped", "dotted_pattern", "plain"]):
        (root / name).mkdir(parents=True)
        for i in range(10):
            arr = rng.integers(0, 120, (36, 36, 3), dtype=np.uint8)
            arr[::2 + c] += 120
            Image.fromarray(arr).save(root / name / f"{i}.jpg", quality=90)
    return DataConfig(dataset="folder", root=str(root), options={"template": TEXTURE})


def _logits(run_dir, data, cache, **load):
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.runs import evaluate, load_method, prepare_data, transforms_for

    splits, _ = prepare_data(dataclasses.replace(data, shots=0), None, needs=("test",))
    method, _, backbone = load_method(run_dir, classnames=splits.classnames, device="cpu", **load)
    _, tf = transforms_for("coop", backbone)
    return evaluate(method.eval(), backbone, splits.test, tf, FeatureCache(cache, progress=False))[1]


def test_zero_shot_made_elsewhere_and_evaluated_on_a_dataset_equals_zero_shot_made_on_it(model_files, folder, target,
                                                                                        tmp_path, capsys):
    cache = tmp_path / "cache"
    source = tmp_path / "zs-source"  # its dataset's prompt: "a photo of a {}."
    run(resolve(_request(model_files, folder, cache, method="zeroshot")), source, progress=False)
    made_on_target = tmp_path / "zs-target"
    req = _request(model_files, folder, cache, method="zeroshot")
    req["data"] = {"dataset": "folder", "root": target.root, "options": dict(target.options)}
    own = run(resolve(req), made_on_target, progress=False)
    assert json.loads((made_on_target / "method.json").read_text())["config"]["templates"] == [TEXTURE]
    capsys.readouterr()
    rc = main(["eval", str(source), "--dataset", "folder", "--root", target.root, "--dataset-option",
               f"template={TEXTURE}", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    evaluated = json.loads(out)
    assert evaluated["templates"] == [TEXTURE] and evaluated["templates_from"] == "evaluated dataset"
    assert evaluated["metrics"] == own["metrics"]
    written = json.loads((source / "eval" / "folder-all-test.json").read_text())
    assert written["templates"] == [TEXTURE]
    a = _logits(source, target, cache, dataset_template=TEXTURE)
    b = _logits(made_on_target, target, cache)
    assert torch.equal(a, b)
    assert not torch.equal(a, _logits(source, target, cache))  # the source's prompt: other logits (not vacuous)
    # a run written before the request was recorded: its templates equal its dataset's prompt, so they follow
    meta = json.loads((source / "method.json").read_text())
    del meta["template_request"]
    (source / "method.json").write_text(json.dumps(meta))
    assert evaluate_run(source, target, progress=False)["templates"] == [TEXTURE]


@pytest.mark.parametrize("templates, kept", [(["a photo of a {}."], ["a photo of a {}."]),
                                             (["imagenet-select"], None), (["ensemble"], "target")])
def test_explicit_templates_are_kept_on_another_dataset(templates, kept, model_files, folder, target, tmp_path):
    from vlprompt.data.templates import IMAGENET_TEMPLATES_SELECT

    req = _request(model_files, folder, tmp_path / "cache", method="zeroshot")
    req["method_options"] = {"templates": templates}
    run(resolve(req), tmp_path / "zs", progress=False)
    res = evaluate_run(tmp_path / "zs", target, progress=False)
    if kept == "target":  # CoOp's ensemble is its 7 prompts plus the dataset's own: the evaluated dataset's
        assert res["templates"] == [*IMAGENET_TEMPLATES_SELECT, TEXTURE]
        assert res["templates_from"] == "evaluated dataset"
    else:
        assert res["templates"] == (kept or list(IMAGENET_TEMPLATES_SELECT)) and res["templates_from"] == "run"


@pytest.mark.parametrize("method", ["text-bias", "text-transform"])
def test_baselines_on_hand_crafted_prompts_use_the_evaluated_datasets_prompt(method, model_files, folder, target,
                                                                              tmp_path):
    from vlprompt.methods.parts.handcrafted import class_text_features
    from vlprompt.runs import load_method, prepare_data

    req = _request(model_files, folder, tmp_path / "cache", method=method, shots=2)
    req["train"] = {"epochs": 1, "batch_size": 4, "views": 1, "lr": 0.5}  # a visible step away from zero-shot
    run(resolve(req), tmp_path / "run", progress=False)
    res = evaluate_run(tmp_path / "run", target, progress=False)
    assert res["templates"] == [TEXTURE] and res["templates_from"] == "evaluated dataset"
    splits, _ = prepare_data(dataclasses.replace(target, shots=0), None, needs=("test",))
    loaded, _, backbone = load_method(tmp_path / "run", classnames=splits.classnames, dataset_template=TEXTURE)
    assert torch.equal(loaded.class_text, class_text_features(backbone, splits.classnames, [TEXTURE]))
    learned = loaded.bias if method == "text-bias" else loaded.transform.bias
    assert learned.abs().max() > 0  # the learned tensors are loaded over the target's class features


def test_which_requests_follow_the_dataset():
    from vlprompt.methods import method_class

    for name in ("zeroshot", "text-bias", "text-transform", "finetune-image"):
        cls = method_class(name)
        assert cls.template_field == "templates"
        assert cls.template_follows_dataset(["dataset"]) and cls.template_follows_dataset(["ensemble", "{} x."])
        assert not cls.template_follows_dataset(["{} x."]) and not cls.template_follows_dataset(["imagenet80"])
    rank = method_class("rank-zeroshot")
    assert rank.template_follows_dataset(None) and not rank.template_follows_dataset("a photo of a {} year old.")
    assert not method_class("coop").template_follows_dataset(None)  # no hand-crafted prompt


def test_zero_shot_made_elsewhere_evaluated_on_dtd_equals_zero_shot_made_on_dtd(model_files, folder, tmp_path):
    from test_cli_baselines import make_dtd_subset

    dtd = make_dtd_subset(tmp_path, {"train": 1, "val": 1, "test": 1})
    data = DataConfig(dataset="dtd", root=dtd["root"], options={"split_file": dtd["split_file"]})
    cache = tmp_path / "cache"
    run(resolve(_request(model_files, folder, cache, method="zeroshot")), tmp_path / "zs-folder", progress=False)
    req = _request(model_files, folder, cache, method="zeroshot")
    req["data"] = {"dataset": "dtd", "root": dtd["root"], "options": {"split_file": dtd["split_file"]}}
    made_on_dtd = run(resolve(req), tmp_path / "zs-dtd", progress=False)
    res = evaluate_run(tmp_path / "zs-folder", data, progress=False)
    assert res["templates"] == ["{} texture."] and res["metrics"] == made_on_dtd["metrics"]
    assert torch.equal(_logits(tmp_path / "zs-folder", data, cache, dataset_template="{} texture."),
                       _logits(tmp_path / "zs-dtd", data, cache))
