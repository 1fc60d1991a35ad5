"""vlprompt grid: cells are ordinary runs named by their axis values, resolved before anything runs; the features
are encoded once per grid; a killed grid finishes on restart with the results of an uninterrupted one; a failing
cell is recorded and the others finish; the local pool, Ray and submitit give the same cell results; the protocol
presets expand to the papers' grids."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, require_shared
from vlprompt.cli import main
from vlprompt.errors import ConfigError, DataError
from vlprompt.grid import expand, load_preset, preset_names, resolve_cells, spec_from_mapping
from vlprompt.testing import make_tiny_checkpoint

CELLS = [f"{m}/dtd/shots{k}/seed{s}" for k in (1, 2) for m in ("coop", "plot") for s in (1, 2)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("grid_models"), "tiny-rn", seed=1, sharpen=True)


@pytest.fixture(scope="module")
def dtd(tmp_path_factory):
    """CoOp's DTD split cut to 5 classes x (4 train, 2 val, 3 test)."""
    root = require_shared("dtd")
    full = json.loads((root / "split_zhou_DescribableTextures.json").read_text())
    small = {}
    for split, k in {"train": 4, "val": 2, "test": 3}.items():
        seen: dict = {}
        small[split] = [e for e in full[split]
                        if e[1] < 5 and (seen.setdefault(e[1], []).append(e) or len(seen[e[1]]) <= k)]
    path = tmp_path_factory.mktemp("grid_split") / "split.json"
    path.write_text(json.dumps(small))
    return {"root": str(root.parent), "split_file": str(path)}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("grid_cache"))


def _spec(models, dtd, cache_dir, axes=None, **train):
    cfg, weights = models
    return {"backbone": str(cfg), "pretrained": str(weights), "device": "cpu", "precision": "fp32",
            "cache_dir": cache_dir,
            "data": {"dataset": "dtd", "root": dtd["root"], "options": {"split_file": dtd["split_file"]}},
            "train": {"epochs": 6, "views": 2, "batch_size": 4, **train},
            "axes": axes or {"method": ["coop", "plot"], "data.dataset": ["dtd"], "data.shots": [1, 2],
                             "seed": [1, 2]}}


def _write(tmp_path, spec, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _metrics(out: Path, names=CELLS) -> dict:
    return {n: json.loads((out / n / "results.json").read_text())["metrics"] for n in names}


@pytest.fixture(scope="module")
def reference(models, dtd, cache_dir, tmp_path_factory):
    """The 2 methods x 2 shots x 2 seeds grid, uninterrupted, with two worker processes."""
    tmp = tmp_path_factory.mktemp("grid_ref")
    spec = _write(tmp, _spec(models, dtd, cache_dir))
    out = tmp / "out"
    rc = main(["grid", spec, "--output", str(out), "--workers", "2", "--quiet"])
    return {"rc": rc, "out": out, "spec": spec}


# -- expansion -----------------------------------------------------------------------------------------
def test_every_preset_expands_to_its_protocols_cells():
    expected = {"coop-fewshot": 165, "plot-fewshot": 165, "coop-dg": 3, "cocoop-base2new": 33,
                "cocoop-cross-dataset": 3, "ordinal-folds": 21, "ordinal-fewshot": 7, "ordinal-shift": 8,
                "kgcoop-fewshot": 33, "prograd-base2new": 33, "prograd-dg": 3,
                "maple-base2new": 33, "maple-cross-dataset": 3, "clip-lora-fewshot": 165}
    expected.update({"maple-baselines-base2new": 99, "promptsrc-base2new": 66, "promptsrc-cross-dataset": 3,
                     "promptsrc-dg": 3, "promptsrc-fewshot": 165})
    expected.update({"tip-adapter-fewshot": 110, "lpp-fewshot": 550, "lpp-dg": 10})
    expected.update({"taskres-fewshot": 55})
    assert set(preset_names()) == set(expected)
    for name, n in expected.items():
        spec = load_preset(name)
        spec.set_value("data.root", "/data", "--root")
        cells = resolve_cells(expand(spec))
        assert len(cells) == n, name
    spec = load_preset("coop-fewshot")
    spec.set_axis("method", ["coop", "linear-probe"], "--methods")
    assert len(expand(spec)) == 330  # 165 per method
    dg = expand(_rooted("coop-dg"))
    assert [e["dataset"] for e in dg[0].evaluations] == ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    b2n = _rooted("cocoop-base2new")
    cells = resolve_cells(expand(b2n))
    assert cells[0].config.data.classes == "base" and cells[0].evaluations == [{"base_to_new": True}]
    assert len(expand(_rooted("cocoop-cross-dataset"))[0].evaluations) == 10
    # KgCoOp's and ProGrad's own grids (their scripts), and theirs on the grids they share with CoOp / CoCoOp
    kg = resolve_cells(expand(_rooted("kgcoop-fewshot")))
    assert {(c.config.backbone, c.config.data.shots, c.config.data.classes) for c in kg} == {("ViT-B-16", 4, "all")}
    assert {c.config.train.epochs for c in kg} == {100} and {c.config.method for c in kg} == {"kgcoop"}
    pg = resolve_cells(expand(_rooted("prograd-base2new")))
    assert {(c.config.backbone, c.config.data.shots, c.config.data.classes) for c in pg} == {("RN50", 4, "base")}
    assert {c.config.data.dataset: c.config.train.epochs for c in pg}["imagenet"] == 50
    assert pg[0].evaluations == [{"base_to_new": True}]
    dg = resolve_cells(expand(_rooted("prograd-dg")))
    assert dg[0].config.data.shots == 4 and len(dg[0].evaluations) == 4
    for name, method in (("cocoop-base2new", "kgcoop"), ("coop-fewshot", "prograd")):
        spec = _rooted(name)
        spec.set_axis("method", [method], "--methods")
        assert {c.config.method for c in resolve_cells(expand(spec))} == {method}
    # MaPLe: each protocol's cells get the recipe of that protocol (the method's own preset)
    b2n = resolve_cells(expand(_rooted("maple-base2new")))
    assert b2n[0].config.method_options["depth"] == 9 and b2n[0].evaluations == [{"base_to_new": True}]
    xd = resolve_cells(expand(_rooted("maple-cross-dataset")))
    assert xd[0].config.method_options["depth"] == 3 and len(xd[0].evaluations) == 14
    lora = resolve_cells(expand(_rooted("clip-lora-fewshot")))
    assert sorted({c.config.train.iterations for c in lora}) == [500, 1000, 2000, 4000, 8000]


def _rooted(name):
    spec = load_preset(name)
    spec.set_value("data.root", "/data", "--root")
    return spec


def test_ordinal_shift_removes_a_share_of_the_training_images_of_some_ranks(tmp_path):
    """OrdinalCLIP's distribution shift through the morph2 reader: N ranks lose the given share of their training
    images; validation and test are untouched; the same seed draws the same ranks and images."""
    from vlprompt.data import load_dataset

    root = tmp_path / "morph"
    (root / "data_list").mkdir(parents=True)
    from PIL import Image

    lines = {"train": [], "test": []}
    for i in range(200):
        age = 16 + i % 20
        split = "test" if i % 5 == 0 else "train"
        name = f"img{i:03d}_{age}.jpg"
        Image.new("RGB", (8, 8)).save(root / name)
        lines[split].append(f"{name} {age}")
    (root / "data_list" / "ET_proto_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (root / "data_list" / "ET_proto_val.txt").write_text("\n".join(lines["test"]) + "\n")
    base = load_dataset("morph2", root, ranks="16:35")
    shifted = load_dataset("morph2", root, ranks="16:35", shift_ranks=4, shift_removed=0.9)
    assert shifted.val == base.val and shifted.test == base.test
    info = shifted.extra["shift"]
    assert len(info["ranks"]) == 4
    for name in shifted.classnames:
        before = sum(s.classname == name for s in base.train)
        after = sum(s.classname == name for s in shifted.train)
        assert after == (before - round(0.9 * before) if name in info["ranks"] else before), name
    again = load_dataset("morph2", root, ranks="16:35", shift_ranks=4, shift_removed=0.9)
    assert again.train == shifted.train
    with pytest.raises(DataError, match="shift_removed"):
        load_dataset("morph2", root, ranks="16:35", shift_ranks=4, shift_removed=1.0)


def test_narrowing_a_preset_keeps_its_cell_names_and_selects_sub_grids(capsys):
    spec = _rooted("coop-fewshot")
    spec.set_axis("data.dataset", ["dtd", "oxford_flowers"], "--datasets")
    names = [c.name for c in expand(spec)]
    assert len(names) == 2 * 5 * 3 and "coop/dtd/shots4/seed1" in names
    folds = _rooted("ordinal-folds")
    folds.set_axis("data.dataset", ["adience"], "--datasets")
    cells = expand(folds)
    assert [c.name for c in cells] == [f"ordinalclip/adience/fold{k}" for k in range(5)]
    assert cells[0].request["data"]["root"] == "/data/adience"
    with pytest.raises(ConfigError, match="--datasets utkface: not in this grid"):
        _rooted("ordinal-folds").set_axis("data.dataset", ["utkface"], "--datasets")


def test_cell_names_are_the_same_from_a_file_and_from_flags(models, dtd, cache_dir, tmp_path, capsys):
    spec = _spec(models, dtd, cache_dir, axes={"seed": [1, 2], "data.shots": [1, 2], "method": ["coop", "plot"],
                                               "data.dataset": ["dtd"]})
    from_file = [c.name for c in expand(spec_from_mapping(spec))]
    assert sorted(from_file) == sorted(CELLS)
    base = {k: v for k, v in spec.items() if k != "axes"}
    path = _write(tmp_path, base)
    rc = main(["grid", path, "--methods", "coop,plot", "--datasets", "dtd", "--shots", "1,2", "--seeds", "1,2",
               "--output", str(tmp_path / "out"), "--status"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert sorted(line.split()[1] for line in out.splitlines()[:-1]) == sorted(CELLS)
    assert out.splitlines()[-1] == "8 pending (8 cells)"


def test_a_list_outside_axes_is_one_value_not_an_axis():
    spec = spec_from_mapping({"method": "zeroshot", "data": {"dataset": "dtd", "root": "/d"},
                              "method_options": {"templates": ["a photo of a {}.", "a {} texture."]},
                              "axes": {"backbone": ["RN50", "ViT-B-16"]}})
    cells = resolve_cells(expand(spec))
    assert [c.name for c in cells] == ["RN50", "ViT-B-16"]  # only the axes name the cells
    assert all(c.config.method_options["templates"] == ["a photo of a {}.", "a {} texture."] for c in cells)


def test_a_bad_cell_stops_the_grid_before_anything_runs(models, dtd, cache_dir, tmp_path, capsys):
    spec = _write(tmp_path, _spec(models, dtd, cache_dir, axes={"method": ["coop"], "train.epochs": [2, -1]}))
    rc = main(["grid", spec, "--output", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc == 2 and "grid cell coop/epochs-1" in err and "epochs" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_axis_that_changes_nothing_is_refused(models, dtd, cache_dir):
    spec = _spec(models, dtd, cache_dir, axes={"method": ["coop"], "device": ["cpu", "auto"]})
    with pytest.raises(ConfigError, match="same run"):
        resolve_cells(expand(spec_from_mapping(spec)))


def test_options_of_another_executor_are_refused(models, dtd, cache_dir, tmp_path, capsys):
    spec = _write(tmp_path, _spec(models, dtd, cache_dir, axes={"method": ["coop"]}))
    rc = main(["grid", spec, "--output", str(tmp_path / "o"), "--ray-address", "auto"])
    assert rc == 2 and "--ray-address does not apply to --executor local" in capsys.readouterr()[1]
    assert not (tmp_path / "o").exists()


# -- running -------------------------------------------------------------------------------------------
def test_grid_of_2_methods_2_shots_2_seeds_with_two_workers(reference, models, dtd, cache_dir, capsys):
    assert reference["rc"] == 0
    out = reference["out"]
    metrics = _metrics(out)
    for name in CELLS:  # each cell is an ordinary run directory
        res = json.loads((out / name / "results.json").read_text())
        method, _, shots, seed = name.split("/")
        assert res["method"] == method and res["shots"] == int(shots[5:]) and res["seed"] == int(seed[4:])
        assert (out / name / "config.yaml").is_file() and (out / name / "split.json").is_file()
    assert len({json.dumps(m, sort_keys=True) for m in metrics.values()}) > 1
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(["grid", reference["spec"], "--output", str(out), "--workers", "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr()[0])
    assert summary["skipped"] == 8 and summary["ran"] == 0 and time.perf_counter() - t0 < 30
    assert main(["grid", reference["spec"], "--output", str(out), "--status"]) == 0
    assert capsys.readouterr()[0].splitlines()[-1] == "8 done (8 cells)"


def _marker_status(run_dir):
    from vlprompt.runs import directory

    return (directory.read_marker(run_dir) or {}).get("status")


def test_sigkill_of_the_grid_then_rerun_gives_the_results_of_an_uninterrupted_grid(reference, tmp_path, capsys):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    # its own process group: the kill takes the grid and its workers at once, as a cluster's job kill does
    proc = subprocess.Popen([sys.executable, "-m", "vlprompt", "grid", reference["spec"], "--output", str(out),
                             "--workers", "2", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # kill it as soon as one cell is finished and another has a checkpoint
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = [n for n in CELLS if _marker_status(out / n) == "done"]  # results.json comes just before
            ckpt = [n for n in CELLS if n not in done and (out / n / "checkpoints").is_dir()
                    and any((out / n / "checkpoints").iterdir())]
            if done and ckpt:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the grid finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    time.sleep(0.5)
    assert main(["grid", reference["spec"], "--output", str(out), "--status"]) == 0
    states = [line.split()[0] for line in capsys.readouterr()[0].splitlines()[:-1]]
    assert "done" in states and "interrupted" in states and "running" not in states
    assert main(["grid", reference["spec"], "--output", str(out), "--workers", "2", "--quiet"]) == 0
    assert _metrics(out) == _metrics(reference["out"])


def test_a_kill_between_results_and_the_done_mark_is_an_interrupted_cell_that_reruns_to_the_same_numbers(
        reference, tmp_path, capsys):
    """results.json is written just before run.json says done: a kill in between leaves a cell that is not done
    (never counted as finished), and the rerun finishes it with the numbers of the uninterrupted grid."""
    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    cell = out / CELLS[0]
    marker = json.loads((cell / "run.json").read_text())
    (cell / "run.json").write_text(json.dumps({**marker, "status": "running"}))
    capsys.readouterr()
    assert main(["grid", reference["spec"], "--output", str(out), "--status"]) == 0
    lines = capsys.readouterr()[0].splitlines()
    assert lines[-1] == "7 done, 1 interrupted (8 cells)", lines
    assert main(["grid", reference["spec"], "--output", str(out), "--workers", "1", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr()[0])
    assert summary["ran"] == 1 and summary["skipped"] == 7
    assert _marker_status(cell) == "done" and _metrics(out) == _metrics(reference["out"])


def test_features_are_encoded_once_per_grid_before_the_cells_start(models, dtd, tmp_path, monkeypatch):
    import vlprompt.runs
    from vlprompt.backbone import cache as cache_mod

    encoded, in_cell = [], [False]
    encode = cache_mod._Store.encode

    def counting_encode(self, positions, identities, paths, keys, **kw):
        encoded.extend((str(self.directory), keys[p], in_cell[0]) for p in positions)
        return encode(self, positions, identities, paths, keys, **kw)

    run = vlprompt.runs.run

    def flagged_run(*a, **kw):
        in_cell[0] = True
        try:
            return run(*a, **kw)
        finally:
            in_cell[0] = False

    monkeypatch.setattr(cache_mod._Store, "encode", counting_encode)
    monkeypatch.setattr(vlprompt.runs, "run", flagged_run)
    spec = _write(tmp_path, _spec(models, dtd, str(tmp_path / "cache"), epochs=2))
    assert main(["grid", spec, "--output", str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    assert encoded and not any(cell for *_, cell in encoded), "a cell encoded images itself"
    pairs = [(d, k) for d, k, _ in encoded]
    assert len(pairs) == len(set(pairs))  # each (image, transform/view/local) once
    # what the cells read: 15 test images (global, and local for PLOT) and 2 views of the union of the train
    # images the shots/seeds draw, global for CoOp and local for PLOT
    trains = {s[0] for n in CELLS for s in
              json.loads((tmp_path / "out" / n / "split.json").read_text())["train"]}
    assert len(pairs) == 15 * 2 + 2 * len(trains) * 2


def test_a_failing_cell_is_recorded_and_the_others_finish(models, dtd, cache_dir, tmp_path, capsys):
    spec = _write(tmp_path, _spec(models, dtd, cache_dir, axes={"method": ["coop"], "data.shots": [9, 2]}, epochs=2))
    out = tmp_path / "out"
    rc = main(["grid", spec, "--output", str(out), "--workers", "1", "--quiet"])
    summary = json.loads(capsys.readouterr()[0])
    assert rc == 1 and list(summary["failed"]) == ["coop/shots9"]
    assert "fewer than 9" in summary["failed"]["coop/shots9"]
    assert (out / "coop/shots2/results.json").is_file()
    marker = json.loads((out / "coop/shots9/run.json").read_text())
    assert marker["status"] == "failed" and "fewer than 9" in marker["error"]
    assert main(["grid", spec, "--output", str(out), "--status"]) == 0
    lines = capsys.readouterr()[0].splitlines()
    assert lines[0].startswith("failed      coop/shots9") and "fewer than 9" in lines[0]
    assert lines[1].startswith("done        coop/shots2") and lines[-1] == "1 done, 1 failed (2 cells)"


def test_ray_and_submitit_give_the_cell_results_of_the_local_pool(reference, models, dtd, cache_dir, tmp_path,
                                                                  capsys):
    pytest.importorskip("ray")
    pytest.importorskip("submitit")
    names = ["coop/dtd/shots1/seed1", "plot/dtd/shots2/seed2"]
    spec = _write(tmp_path, _spec(models, dtd, cache_dir, axes={"method": ["coop", "plot"], "data.dataset": ["dtd"],
                                                                 "data.shots": [1, 2], "seed": [1, 2]}))
    ref = _metrics(reference["out"], names)
    picked = ["--set", "method=coop", "--set", "data.shots=1", "--set", "seed=1"]
    assert main(["grid", spec, *picked, "--output", str(tmp_path / "ray"), "--executor", "ray", "--workers", "1",
                 "--cpus-per-cell", "1", "--quiet"]) == 0, capsys.readouterr()[1]
    picked = ["--set", "method=plot", "--set", "data.shots=2", "--set", "seed=2"]
    assert main(["grid", spec, *picked, "--output", str(tmp_path / "slurm"), "--executor", "slurm",
                 "--submitit-cluster", "local", "--cpus-per-cell", "1", "--gpus-per-cell", "0", "--quiet"]) == 0, \
        capsys.readouterr()[1]
    assert _metrics(tmp_path / "ray", names[:1]) == {names[0]: ref[names[0]]}
    assert _metrics(tmp_path / "slurm", names[1:]) == {names[1]: ref[names[1]]}


def test_cells_evaluations_run_after_training_and_count_in_the_state(models, dtd, cache_dir, tmp_path, capsys):
    spec = _spec(models, dtd, cache_dir, axes={"method": ["coop"], "seed": [1]}, epochs=2)
    spec["data"].update(shots=1, classes="base")
    spec["evaluations"] = [{"base_to_new": True}, {"dataset": "dtd", "options": {"split_file": dtd["split_file"]}}]
    path = _write(tmp_path, spec)
    out = tmp_path / "out"
    assert main(["grid", path, "--output", str(out), "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    run_dir = out / "coop/seed1"
    b2n = json.loads((run_dir / "eval" / "base2new-dtd.json").read_text())
    whole = json.loads((run_dir / "eval" / "dtd-all-test.json").read_text())
    identity = json.loads((run_dir / "results.json").read_text())["identity"]
    assert b2n["identity"] == identity == whole["identity"] and whole["metrics"]["num_samples"] == 15
    (run_dir / "eval" / "base2new-dtd.json").unlink()  # an evaluation missing: the cell is not done
    assert main(["grid", path, "--output", str(out), "--status"]) == 0
    assert capsys.readouterr()[0].splitlines()[0].startswith("pending     coop/seed1  trained; 1 evaluation(s)")
    assert main(["grid", path, "--output", str(out), "--workers", "1", "--quiet"]) == 0
    assert json.loads((run_dir / "eval" / "base2new-dtd.json").read_text()) == b2n
