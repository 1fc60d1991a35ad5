"""Zero-shot and the linear probe are runs like any other: the same data preparation (the very images CoOp trains
on), the same run directory, results and identity, and the same eval / export / predict / table afterwards. On
a subset of DTD from ../shared with a tiny sharpened model."""
import json

import numpy as np
import pytest
import torch
import yaml

from test_cli_baselines import load_tiny_backbone, make_dtd_subset, run_cli
from vlprompt.testing import make_tiny_checkpoint

SHOTS, SEED = 4, 1


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("br_models"), "tiny-rn", seed=1, sharpen=True)


@pytest.fixture(scope="module")
def dtd(tmp_path_factory):
    """8 train / 6 val / 2 test images per class: more than the shots (4) and the val shots (min(4, 4)), so the
    order of few-shot sampling and class subsampling decides which images are drawn."""
    return make_dtd_subset(tmp_path_factory.mktemp("br_split"), {"train": 8, "val": 6, "test": 2})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("br_cache"))


def _args(model_files, dtd, cache_dir, split_file=None):
    cfg, weights = model_files
    return ["--backbone", str(cfg), "--pretrained", str(weights), "--dataset", "dtd", "--root", dtd["root"],
            "--dataset-option", f"split_file={split_file or dtd['split_file']}", "--cache-dir", cache_dir, "--quiet"]


@pytest.fixture(scope="module")
def runs(model_files, dtd, cache_dir, tmp_path_factory):
    """Run directories made on first use, shared by the tests of this module (each run takes a few seconds)."""
    root = tmp_path_factory.mktemp("br_runs")
    argv = {
        "lp": ["linear-probe", "--classes", "base", "--shots", str(SHOTS), "--seed", str(SEED)],
        "coop": ["train", "--method", "coop", "--classes", "base", "--shots", str(SHOTS), "--seed", str(SEED),
                 "--epochs", "1", "--views", "1"],
        "zs": ["zeroshot", "--classes", "base"],
        "lp_seed0": ["linear-probe", "--classes", "base", "--shots", str(SHOTS), "--seed", "0"],
    }
    made = {}

    def get(name):
        if name not in made:
            from vlprompt.cli import main

            out = root / name
            rc = main([*argv[name], *_args(model_files, dtd, cache_dir), "--output", str(out)])
            assert rc == 0, f"{name} run failed"
            made[name] = out
        return made[name]

    return get


def _split(run_dir):
    return json.loads((run_dir / "split.json").read_text())


def _results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def _paths(entries):
    return [e[0] for e in entries]


def test_linear_probe_and_coop_train_on_the_same_base_images(runs, dtd, capsys):
    lp, coop = _split(runs("lp")), _split(runs("coop"))
    capsys.readouterr()
    assert len(lp["train"]) == 5 * SHOTS and len(lp["val"]) == 5 * min(SHOTS, 4)
    assert lp["classnames"] == coop["classnames"] and len(lp["classnames"]) == 5
    assert lp["train"] == coop["train"]
    assert lp["val"] == coop["val"]
    assert lp["test"] == coop["test"]

    # CoOp's order: the shots are drawn from all classes first, then the base half is kept. Drawing after
    # subsampling (what the linear probe did before) picks other images, so this comparison can tell.
    from vlprompt.data import few_shot_split, load_dataset, subsample_classes

    splits = load_dataset("dtd", dtd["root"], split_file=dtd["split_file"])
    other_order = few_shot_split(subsample_classes(splits, "base"), SHOTS, SEED)
    drawn = set(_paths(lp["train"])) | set(_paths(lp["val"]))
    assert drawn != {s.path for s in other_order.train} | {s.path for s in other_order.val}


def test_seed_0_samples_the_shots_of_seed_0(runs, dtd, capsys):
    run0, run1 = runs("lp_seed0"), runs("lp")
    capsys.readouterr()
    results = _results(run0)
    assert results["seed"] == 0 and results["config"]["seed"] == 0 and results["identity"]["seed"] == 0
    assert yaml.safe_load((run0 / "config.yaml").read_text())["seed"] == 0
    split0 = _split(run0)
    assert split0["extra"]["few_shot"]["seed"] == 0

    from vlprompt.data import few_shot_split, load_dataset, subsample_classes

    splits = load_dataset("dtd", dtd["root"], split_file=dtd["split_file"])
    expected = subsample_classes(few_shot_split(splits, SHOTS, 0), "base")
    assert _paths(split0["train"]) == [s.path for s in expected.train]
    assert _paths(split0["val"]) == [s.path for s in expected.val]
    assert set(_paths(split0["train"])) != set(_paths(_split(run1)["train"]))  # not seed 1's shots
    assert results["config_hash"] != _results(run1)["config_hash"]


def _cached_features(model_files, cache_dir, samples):
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.runs import transforms_for
    from vlprompt.data import transform_id

    backbone = load_tiny_backbone(model_files)
    _, test_tf = transforms_for("coop", backbone)
    feats = FeatureCache(cache_dir, progress=False).get(backbone, [s.path for s in samples], test_tf,
                                                        transform_id=transform_id(test_tf))
    return feats.global_.double().numpy()


def test_linear_probe_accuracy_equals_sklearns_own_predictions(runs, model_files, cache_dir, capsys):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from vlprompt.data import load_split
    from vlprompt.methods.base import Features
    from vlprompt.runs import load_method

    run_dir = runs("lp")
    capsys.readouterr()
    results = _results(run_dir)
    splits = load_split(run_dir / "split.json")
    x = {n: _cached_features(model_files, cache_dir, getattr(splits, n)) for n in ("train", "test")}
    y = {n: np.array([s.label for s in getattr(splits, n)]) for n in ("train", "test")}
    with threadpool_limits(limits=1, user_api="blas"):
        clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=results["setup"]["C"]).fit(x["train"], y["train"])
    pred = clf.predict(x["test"])
    assert len(set(pred.tolist())) >= 2, "sklearn predicts a single class: the comparison would be weak"
    assert results["metrics"]["accuracy"] == pytest.approx(100.0 * (pred == y["test"]).mean(), abs=1e-5)
    # image by image: the saved affine head predicts what sklearn's classifier predicts
    method, _, _ = load_method(run_dir, device="cpu")
    with torch.no_grad():
        logits = method.eval()(Features(global_=torch.from_numpy(x["test"]).float()))
    np.testing.assert_array_equal(logits.argmax(1).numpy(), pred)
    np.testing.assert_allclose(logits.double().numpy(), clf.decision_function(x["test"]), atol=1e-3, rtol=1e-4)


@pytest.fixture(scope="module")
def other_test_images(dtd, tmp_path_factory):
    """A split file whose test images (the 3rd to 5th of each class in CoOp's DTD test split) the runs never saw."""
    from conftest import require_shared

    full = json.loads((require_shared("dtd") / "split_zhou_DescribableTextures.json").read_text())
    seen, test = {}, []
    for e in full["test"]:
        seen[e[1]] = seen.get(e[1], 0) + 1
        if 2 < seen[e[1]] <= 5:
            test.append(e)
    path = tmp_path_factory.mktemp("br_other") / "split_other.json"
    path.write_text(json.dumps({"train": dtd["train"], "val": dtd["val"], "test": test}))
    assert not set(e[0] for e in test) & set(e[0] for e in dtd["test"])
    return path, test


def test_linear_probe_run_evaluates_exports_and_predicts(runs, model_files, dtd, cache_dir, other_test_images,
                                                         tmp_path, capsys):
    run_dir = runs("lp")
    split_file, _ = other_test_images
    args = _args(model_files, dtd, cache_dir, split_file)
    eval_args = [a for a in args if a not in ("--backbone", "--pretrained", str(model_files[0]),
                                              str(model_files[1]))]
    capsys.readouterr()
    rc, stdout, err = run_cli(["eval", str(run_dir), *eval_args, "--classes", "base"], capsys)
    assert rc == 0, err
    evaluated = json.loads(stdout)
    assert evaluated["metrics"]["num_samples"] == 5 * 3 and evaluated["method"] == "linear-probe"
    assert evaluated["identity"] == _results(run_dir)["identity"]
    assert (run_dir / "eval" / "dtd-base-test.json").is_file()

    rc, stdout, err = run_cli(["export", str(run_dir), "--output", str(tmp_path / "head")], capsys)
    assert rc == 0, err
    head = json.loads((tmp_path / "head" / "head.json").read_text())
    assert head["kind"] == "affine" and head["method"] == "linear-probe"
    assert head["classnames"] == _split(run_dir)["classnames"]

    # predict (images encoded directly, no cache) agrees with the run's own logits and with eval's accuracy
    from vlprompt.backbone.cache import FeatureCache
    from vlprompt.data import load_dataset, subsample_classes
    from vlprompt.runs import evaluate, load_method, transforms_for

    samples = subsample_classes(load_dataset("dtd", dtd["root"], split_file=str(split_file)), "base").test
    method, _, backbone = load_method(run_dir, device="cpu")
    _, test_tf = transforms_for("coop", backbone)
    _, logits = evaluate(method.eval(), backbone, samples, test_tf, FeatureCache(cache_dir, progress=False))
    assert len(set(logits.argmax(1).tolist())) >= 2, "one class predicted for every image: a weak comparison"
    rc, stdout, err = run_cli(["predict", str(tmp_path / "head"), *[s.path for s in samples], "--topk", "5",
                               "--device", "cpu", "--json"], capsys)
    assert rc == 0, err
    rows = json.loads(stdout)
    names = head["classnames"]
    assert [r["top"][0]["class"] for r in rows] == [names[i] for i in logits.argmax(1).tolist()]
    for row, lg in zip(rows, logits):
        probs = {t["class"]: t["probability"] for t in row["top"]}
        assert [probs[c] for c in names] == pytest.approx(lg.softmax(-1).tolist(), abs=1e-4)
    top1 = np.array([names.index(r["top"][0]["class"]) for r in rows])
    labels = np.array([s.label for s in samples])
    assert evaluated["metrics"]["accuracy"] == pytest.approx(100.0 * (top1 == labels).mean(), abs=1e-4)


def test_linear_probe_on_other_class_names_is_one_clear_error(runs, model_files, dtd, cache_dir, capsys):
    run_dir = runs("lp")
    capsys.readouterr()
    eval_args = ["--dataset", "dtd", "--root", dtd["root"], "--dataset-option", f"split_file={dtd['split_file']}",
                 "--cache-dir", cache_dir, "--quiet"]
    # the new half: as many classes as the probe has, other names; the weights must not be reused silently
    rc, stdout, err = run_cli(["eval", str(run_dir), *eval_args, "--classes", "new"], capsys)
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlprompt: error: ") and "classes it was trained on" in lines[0], err
    assert not (run_dir / "eval" / "dtd-new-test.json").exists()


def test_zeroshot_and_coop_runs_are_recorded_alike_and_tabled(runs, capsys):
    zs, coop = runs("zs"), runs("coop")
    capsys.readouterr()
    for run_dir in (zs, coop):
        results = _results(run_dir)
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert results["config"] == cfg
        assert set(results["identity"]) <= set(cfg) and results["identity"]["method"] == cfg["method"]
        from vlprompt.methods.base import added_fields_at_default
        from vlprompt.runs.config import DataConfig

        # (a data field added later is left out of the identity at its default: earlier runs keep theirs)
        later = added_fields_at_default(DataConfig(**cfg["data"]))
        assert later and results["identity"]["data"] == {k: v for k, v in cfg["data"].items() if k not in later}
        from vlprompt.runs import config_hash

        assert results["config_hash"] == config_hash(results["identity"])
        assert json.loads((run_dir / "run.json").read_text())["status"] == "done"
    assert _results(zs)["identity"]["data"]["classes"] == _results(coop)["identity"]["data"]["classes"] == "base"
    assert _split(zs)["test"] == _split(coop)["test"]  # the same test images

    rc, stdout, err = run_cli(["table", str(zs), str(coop), "--json"], capsys)
    assert rc == 0, err
    rows = json.loads(stdout)["runs"]
    assert len(rows) == 2
    by_method = {r["identity"]["method"]: r for r in rows}
    assert set(by_method) == {"zeroshot", "coop"}
    assert by_method["zeroshot"]["mean"] == pytest.approx(_results(zs)["metrics"]["accuracy"])
    assert by_method["coop"]["mean"] == pytest.approx(_results(coop)["metrics"]["accuracy"])
