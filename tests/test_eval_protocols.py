"""Evaluating a finished run (``vlprompt eval``): base-to-new only of runs trained on the base half, the
target dataset's own prompt template for hand-crafted-prompt methods evaluated on another dataset, and the run's
own feature cache."""
import json
import os
from pathlib import Path

import pytest

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
