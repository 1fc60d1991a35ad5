"""The original few-shot samples: the default sampler draws exactly the images CoOp / CoCoOp's code (Dassl) draws
for a seed, the linear-probe script's sampler is an option, Dassl's cached ``split_fewshot`` pickles are read
without running code, and a run keeps the images it started with.

The two reference rules below are written out from the original code, not from vlprompt's:
Dassl.pytorch ``dassl/data/datasets/base_dataset.py`` (``generate_fewshot_dataset`` / ``split_dataset_by_label``,
called by CoOp's ``datasets/*.py`` for train then val after ``set_random_seed`` seeded the global ``random``), and
CoOp's ``lpclip/linear_probe.py`` (``np.random.seed(seed)``, ``np.random.choice`` per class).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import color_folder, require_shared
from vlprompt.data import DatasetSplits, Sample, few_shot_split, load_dataset, load_split
from vlprompt.data.protocol import read_dassl_few_shot
from vlprompt.errors import ConfigError, DataError
from vlprompt.runs import resolve, run
from vlprompt.runs.config import config_hash
from vlprompt.testing import make_tiny_checkpoint

SEEDS = (1, 2, 3)


# -- the original rules, transcribed ------------------------------------------------------------------------
def dassl_generate_fewshot_dataset(data_source, num_shots):
    """Dassl's DatasetBase.generate_fewshot_dataset(data_source, num_shots=num_shots) (repeat=True)."""
    tracker = defaultdict(list)  # split_dataset_by_label
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            sampled_items = random.choices(items, k=num_shots)
        dataset.extend(sampled_items)
    return dataset


def dassl_fewshot(train, val, num_shots, seed):
    """What CoOp's dataset classes do after set_random_seed(seed): train, then val with min(K, 4)."""
    state = random.getstate()
    try:
        random.seed(seed)
        return (dassl_generate_fewshot_dataset(train, num_shots),
                dassl_generate_fewshot_dataset(val, min(num_shots, 4)))
    finally:
        random.setstate(state)


def lpclip_fewshot(train_label, val_label, num_shot, seed):
    """CoOp's lpclip/linear_probe.py sampling: indices into the train / val feature arrays."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        all_label_list = np.unique(train_label)
        selected_idx_list = []
        for label in all_label_list:
            label_collection = np.where(train_label == label)[0]
            selected_idx = np.random.choice(label_collection, size=num_shot, replace=False)
            selected_idx_list.extend(selected_idx)
        val_num_shot = {1: 1, 2: 2, 4: 4, 8: 4, 16: 4}[num_shot]
        val_selected_idx_list = []
        for label in all_label_list:
            label_collection = np.where(val_label == label)[0]
            selected_idx = np.random.choice(label_collection, size=val_num_shot, replace=False)
            val_selected_idx_list.extend(selected_idx)
        return selected_idx_list, val_selected_idx_list
    finally:
        np.random.set_state(state)


# -- a split file in neither sorted nor class order -----------------------------------------------------------
def scrambled(num_classes=6, train=12, val=6, root="/data/toy/images") -> DatasetSplits:
    names = [f"class {c}" for c in range(num_classes)]

    def rows(split, n, seed):
        items = [Sample(f"{root}/c{c}/{split}_{i:02d}.jpg", c, names[c]) for c in range(num_classes) for i in range(n)]
        random.Random(seed).shuffle(items)
        return items

    return DatasetSplits("toy", names, rows("train", train, 10), rows("val", val, 11), rows("test", 2, 12))


def _first_appearance(samples):
    return list(dict.fromkeys(s.label for s in samples))


def test_the_toy_split_is_in_neither_sorted_nor_class_order():
    ds = scrambled()
    for part in (ds.train, ds.val):
        assert _first_appearance(part) != sorted(_first_appearance(part))
        assert [s.path for s in part if s.label == 0] != sorted(s.path for s in part if s.label == 0)


@pytest.mark.parametrize("shots", [1, 4, 8])
def test_default_sampler_draws_dassls_images_for_seeds_1_to_3(shots):
    ds = scrambled()
    for seed in SEEDS:
        train, val = dassl_fewshot(ds.train, ds.val, shots, seed)
        fs = few_shot_split(ds, shots, seed)
        assert fs.train == train and fs.val == val  # the same images, in Dassl's order
        assert fs.extra["few_shot"]["sampler"] == "dassl"


def test_dassl_short_class_takes_all_and_keeps_the_other_classes_on_dassls_images():
    ds = scrambled()
    short_label = _first_appearance(ds.train)[1]  # early in the walk: every class after it depends on the stream
    keep = [s for s in ds.train if s.label == short_label][:3]
    ds = ds.with_splits(train=[s for s in ds.train if s.label != short_label or s in keep])
    for seed in SEEDS:
        train, val = dassl_fewshot(ds.train, ds.val, 4, seed)  # Dassl repeats the short class (random.choices)
        with pytest.warns(UserWarning, match="3/4"):
            fs = few_shot_split(ds, 4, seed, allow_fewer=True)
        assert [s for s in fs.train if s.label != short_label] == [s for s in train if s.label != short_label]
        assert sorted(s.path for s in fs.train if s.label == short_label) == sorted(s.path for s in keep)
        assert fs.val == val


@pytest.mark.parametrize("shots", [1, 4, 8])
def test_lpclip_sampler_draws_the_linear_probe_scripts_images_for_seeds_1_to_3(shots):
    ds = scrambled()
    train_label = np.array([s.label for s in ds.train])
    val_label = np.array([s.label for s in ds.val])
    for seed in SEEDS:
        ti, vi = lpclip_fewshot(train_label, val_label, shots, seed)
        fs = few_shot_split(ds, shots, seed, sampler="lpclip")
        assert fs.train == [ds.train[i] for i in ti] and fs.val == [ds.val[i] for i in vi]
        assert fs.extra["few_shot"]["sampler"] == "lpclip"
    assert few_shot_split(ds, 4, 1, sampler="lpclip").train != few_shot_split(ds, 4, 1).train


def test_sorted_sampler_is_the_earlier_rule_independent_of_input_order():
    ds = scrambled()
    a = few_shot_split(ds, 4, 1, sampler="sorted")
    reordered = ds.with_splits(train=ds.train[::-1], val=ds.val[::-1])
    assert few_shot_split(reordered, 4, 1, sampler="sorted").train == a.train
    # the earlier rule, as it was: labels in order, each class sorted by path, one random.Random(seed) stream
    rng, expected = random.Random(1), []
    for c in range(ds.num_classes):
        expected += rng.sample(sorted((s for s in ds.train if s.label == c), key=lambda s: s.path), 4)
    assert a.train == expected
    with pytest.raises(DataError, match="unknown few-shot sampler 'numpy'"):
        few_shot_split(ds, 4, 1, sampler="numpy")


# -- Dassl's split_fewshot pickles ----------------------------------------------------------------------------
DASSL_MODULE = "dassl.data.datasets.base_dataset"


@pytest.fixture()
def dassl_datum(monkeypatch):
    """A stand-in for Dassl's Datum, importable under Dassl's module name while the test writes pickles."""

    class Datum:
        def __init__(self, impath="", label=0, domain=0, classname=""):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

        @property
        def label(self):
            return self._label

    Datum.__module__, Datum.__qualname__ = DASSL_MODULE, "Datum"
    parts = DASSL_MODULE.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[DASSL_MODULE].Datum = Datum
    return Datum


ORIGINAL_ROOT = "/home/someone/DATA/toy/images"  # where the original machine had the dataset


def _write_dassl_pickle(path, datum_cls, ds, shots, seed):
    """The pickle CoOp's dataset classes write: Dassl's sample of Datum objects with the original machine's paths."""
    local_root = os.path.commonpath([os.path.dirname(s.path) for s in ds.train + ds.val + ds.test])

    def datums(samples):
        return [datum_cls(ORIGINAL_ROOT + s.path[len(local_root):], s.label, 0, s.classname) for s in samples]

    train, val = dassl_fewshot(datums(ds.train), datums(ds.val), shots, seed)
    with open(path, "wb") as f:
        pickle.dump({"train": train, "val": val}, f, protocol=pickle.HIGHEST_PROTOCOL)


def test_dassl_pickle_is_read_onto_the_local_root_as_dassl_sampled_it(dassl_datum, tmp_path, monkeypatch):
    ds = scrambled(root=str(tmp_path / "here" / "toy" / "images"))
    for seed in SEEDS:
        _write_dassl_pickle(tmp_path / f"shot_4-seed_{seed}.pkl", dassl_datum, ds, 4, seed)
    for name in list(sys.modules):  # read without Dassl (nor the stand-in) importable
        if name.startswith("dassl"):
            monkeypatch.delitem(sys.modules, name)
    for seed in SEEDS:
        got = read_dassl_few_shot(tmp_path / f"shot_4-seed_{seed}.pkl", ds, 4)
        expected = few_shot_split(ds, 4, seed)  # the default sampler: the same images, in the same order
        assert got.train == expected.train and got.val == expected.val and got.test == ds.test
        assert got.extra["few_shot"]["file"] == str(tmp_path / f"shot_4-seed_{seed}.pkl")
    with pytest.raises(DataError, match="holds 4 train images per class, not --shots 8"):
        read_dassl_few_shot(tmp_path / "shot_4-seed_1.pkl", ds, 8)


def test_dassl_pickle_errors_name_the_first_image_not_found_or_disagreeing(dassl_datum, tmp_path):
    ds = scrambled(root=str(tmp_path / "toy" / "images"))
    good = [dassl_datum(f"{ORIGINAL_ROOT}/c0/train_0{i}.jpg", 0, 0, "class 0") for i in range(2)]
    cases = {
        "missing": ([*good, dassl_datum(f"{ORIGINAL_ROOT}/c9/train_00.jpg", 9, 0, "class 9")],
                    f"train image {ORIGINAL_ROOT}/c9/train_00.jpg is not among the train images"),
        "relabelled": ([*good, dassl_datum(f"{ORIGINAL_ROOT}/c1/train_00.jpg", 2, 0, "class 2")],
                       f"train image {ORIGINAL_ROOT}/c1/train_00.jpg has label 2"),
        "val image given as train": ([dassl_datum(f"{ORIGINAL_ROOT}/c0/val_00.jpg", 0, 0, "class 0")],
                                     "val_00.jpg is not among the train images"),
        "a class left out": (good, "no train image of class"),
    }
    for name, (train, message) in cases.items():
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump({"train": train, "val": []}, f, protocol=pickle.HIGHEST_PROTOCOL)
        with pytest.raises(DataError, match=message.replace("(", r"\(")):
            read_dassl_few_shot(tmp_path / f"{name}.pkl", ds)
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(DataError, match="not a Dassl few-shot cache"):
        read_dassl_few_shot(tmp_path / "list.pkl", ds)
    with pytest.raises(DataError, match="not found"):
        read_dassl_few_shot(tmp_path / "absent.pkl", ds)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"train": [_Evil(marker)], "val": []}, f, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(DataError, match="refusing to load.*system"):
        read_dassl_few_shot(tmp_path / "evil.pkl", scrambled())
    assert not marker.exists()


# -- the real split files of CoOp -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,folder,split_file,images", [
    ("dtd", "dtd", "split_zhou_DescribableTextures.json", "images"),
    ("oxford_flowers", "oxford_flowers", "split_zhou_OxfordFlowers.json", "jpg"),
])
def test_real_split_files_give_dassls_images(name, folder, split_file, images):
    path = require_shared(folder, split_file)
    raw = json.loads(path.read_text())
    ds = load_dataset(name, str(path.parent.parent))

    class Row:  # a split file row as Dassl's read_split makes it a Datum
        def __init__(self, row):
            self.label, self.path = row[1], str(path.parent / images / row[0])

    rows = {split: [Row(r) for r in raw[split]] for split in ("train", "val")}
    for seed in SEEDS:
        train, val = dassl_fewshot(rows["train"], rows["val"], 4, seed)
        fs = few_shot_split(ds, 4, seed)
        assert [s.path for s in fs.train] == [r.path for r in train]  # 40/40 on DTD's subset, 408/408 on Flowers
        assert [s.path for s in fs.val] == [r.path for r in val]
        assert len(fs.train) == 4 * ds.num_classes


# -- the run layer --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("dassl_models"), "tiny-vit", seed=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 10 generated images (5 / 2 / 3 per class by the folder reader)."""
    return color_folder(tmp_path_factory.mktemp("dassl_data") / "shapes")


def _request(model_files, folder, tmp_path, method="coop", **data):
    cfg, weights = model_files
    req = {"method": method, "backbone": str(cfg), "pretrained": str(weights), "cache_dir": str(tmp_path / "cache"),
           "data": {"dataset": "folder", "root": str(folder), "shots": 2, **data}}
    if method == "coop":
        req["train"] = {"epochs": 1, "views": 1}
    return req


def test_sampler_is_part_of_the_identity_and_refused_where_it_does_not_apply(model_files, folder, tmp_path):
    req = _request(model_files, folder, tmp_path)
    dassl, lpclip = resolve(req), resolve({**req, "data": {**req["data"], "sampler": "lpclip"}})
    assert dassl.data.sampler == "dassl" and dassl.identity()["data"]["sampler"] == "dassl"
    assert dassl.identity_hash() != lpclip.identity_hash()
    zs = _request(model_files, folder, tmp_path, method="zeroshot", shots=0)
    with pytest.raises(ConfigError, match="--sampler lpclip applies to few-shot sampling"):
        resolve({**zs, "data": {**zs["data"], "sampler": "lpclip"}})
    with pytest.raises(ConfigError, match="data.sampler"):
        resolve({**req, "data": {**req["data"], "sampler": "numpy"}})
    pkl = {**req["data"], "fewshot_file": "shot_2-seed_1.pkl"}
    assert resolve({**req, "data": pkl}).data.fewshot_file == os.path.abspath("shot_2-seed_1.pkl")
    for extra, message in (({"sampler": "lpclip"}, "--sampler lpclip does not apply with --fewshot-file"),
                           ({"allow_fewer": True}, "--allow-fewer does not apply with --fewshot-file"),
                           ({"shots": 0}, "--fewshot-file is a few-shot sample")):
        with pytest.raises(ConfigError, match=message):
            resolve({**(zs if "shots" in extra else req), "data": {**pkl, **extra}})


def test_a_run_trains_on_the_images_of_a_dassl_pickle(dassl_datum, model_files, folder, tmp_path):
    ds = load_dataset("folder", str(folder))
    _write_dassl_pickle(tmp_path / "shot_2-seed_3.pkl", dassl_datum, ds, 2, 3)
    pkl = str(tmp_path / "shot_2-seed_3.pkl")
    req = _request(model_files, folder, tmp_path, method="linear-probe", fewshot_file=pkl)
    res = run(resolve(req), tmp_path / "run", progress=False)
    split = load_split(tmp_path / "run" / "split.json")
    expected = few_shot_split(ds, 2, 3)
    assert split.train == expected.train and split.val == expected.val
    assert res["identity"]["data"]["fewshot_file"] == pkl


def _unfinish(run_dir: Path) -> None:
    """Make a finished run look killed after its last checkpoint."""
    (run_dir / "results.json").unlink()
    marker = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**marker, "status": "running"}))
    assert any((run_dir / "checkpoints").iterdir())


def test_a_resumed_run_keeps_its_own_split_json(model_files, folder, tmp_path, monkeypatch):
    req = _request(model_files, folder, tmp_path, sampler="sorted")  # drawn by the earlier rule
    run(resolve(req), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "split.json").read_text()
    _unfinish(tmp_path / "run")

    def no_sampling(*a, **k):
        raise AssertionError("a resumed run sampled its images again")

    monkeypatch.setattr("vlprompt.data.protocol.few_shot_split", no_sampling)
    monkeypatch.setattr("vlprompt.runs.execute.few_shot_split", no_sampling)
    res = run(resolve(req), tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "split.json").read_text() == before and res["config"]["data"]["sampler"] == "sorted"


def test_a_run_written_before_the_sampler_existed_resumes_on_its_own_images(model_files, folder, tmp_path):
    req = _request(model_files, folder, tmp_path)
    old = {**req, "data": {**req["data"], "sampler": "sorted"}}
    res = run(resolve(old), tmp_path / "run", progress=False)
    old_images = load_split(tmp_path / "run" / "split.json").train
    assert old_images != few_shot_split(load_dataset("folder", str(folder)), 2, 1).train  # dassl would differ
    # rewrite the directory as the earlier vlprompt wrote it: no data.sampler / fewshot_file, hashes without them
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for key in ("sampler", "fewshot_file"):
        config["data"].pop(key)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    identity, request_identity = res["identity"], resolve(old).identity()
    for ident in (identity, request_identity):
        for key in ("sampler", "fewshot_file"):
            ident["data"].pop(key)
    marker = json.loads((tmp_path / "run" / "run.json").read_text())
    marker.update(config_hash=config_hash(identity), request_hash=config_hash(request_identity))
    (tmp_path / "run" / "run.json").write_text(json.dumps(marker))
    _unfinish(tmp_path / "run")
    res = run(resolve(req), tmp_path / "run", resume=True, progress=False)  # the same command after the upgrade
    assert load_split(tmp_path / "run" / "split.json").train == old_images
    assert res["config"]["data"]["sampler"] == "sorted"  # what the run really used


def test_lpclip_linear_probe_fits_the_rows_in_the_scripts_order(model_files, folder, tmp_path, monkeypatch):
    """--sampler lpclip: the linear probe's L-BFGS (order-sensitive at tol 1e-4) is fed the rows CoOp's
    lpclip/linear_probe.py feeds it: ``train_feature[selected_idx_list]``, its features in the order
    feat_extractor.py wrote them (the train split in file order), grouped by np.unique(label), each class in
    np.random.choice's draw order. The split file here interleaves the classes and is not sorted."""
    from conftest import write_csv
    from vlprompt.backbone import load_backbone
    from vlprompt.cache import FeatureCache
    from vlprompt.data import transform_id
    from vlprompt.methods.baselines import linear_probe
    from vlprompt.runs import transforms_for

    images = sorted(str(p) for p in folder.rglob("*.jpg"))
    rows = [[p, Path(p).parent.name, ("train", "train", "train", "val", "val", "test")[i % 6]]
            for i, p in enumerate(images)]
    random.Random(4).shuffle(rows)
    csv_file = write_csv(tmp_path / "split.csv", ["path", "label", "split"], rows)
    fitted = []
    real_fit = linear_probe.fit_logistic

    def spy(x, y, C, max_iter=1000):
        fitted.append((x.copy(), y.copy()))
        return real_fit(x, y, C, max_iter)

    monkeypatch.setattr(linear_probe, "fit_logistic", spy)
    cfg, weights = model_files
    req = {"method": "linear-probe", "backbone": str(cfg), "pretrained": str(weights), "seed": 2,
           "cache_dir": str(tmp_path / "cache"),
           "data": {"dataset": "csv", "root": str(csv_file), "shots": 2, "sampler": "lpclip"}}
    run(resolve(req), tmp_path / "run", progress=False)

    # the script, written out: features of the whole train split in file order, then its sampling
    ds = load_dataset("csv", str(csv_file))
    assert _first_appearance(ds.train) != sorted(_first_appearance(ds.train))
    backbone = load_backbone(str(cfg), str(weights), device="cpu")
    _, test_tf = transforms_for("coop", backbone)
    feats = FeatureCache(tmp_path / "cache", progress=False).get(
        backbone, [s.path for s in ds.train], test_tf, transform_id=transform_id(test_tf)).global_
    train_feature = feats.double().numpy()
    train_label = np.array([s.label for s in ds.train])
    np.random.seed(2)
    selected_idx_list = []
    for label in np.unique(train_label):
        label_collection = np.where(train_label == label)[0]
        selected_idx_list.extend(np.random.choice(label_collection, size=2, replace=False))
    assert fitted and all(np.array_equal(x, train_feature[selected_idx_list]) for x, _ in fitted)
    assert all(np.array_equal(y, train_label[selected_idx_list]) for _, y in fitted)
    # not vacuous: the file order is not the class order, and a draw order is not the sorted one
    assert not np.array_equal(fitted[0][0], train_feature[sorted(selected_idx_list)])
    assert any(a > b for a, b in zip(selected_idx_list[::2], selected_idx_list[1::2]))
