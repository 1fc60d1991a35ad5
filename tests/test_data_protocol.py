"""Few-shot sampling, base-to-new class split, split save/load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlprompt.data import (DatasetSplits, Sample, few_shot_split, group_by_label, load_split, require_split,
                           samples_per_class, save_split, subsample_classes)
from vlprompt.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def synthetic(num_classes: int = 5, train: int = 20, val: int = 6, test: int = 3, root: str = "/data") -> DatasetSplits:
    names = [f"class {i}" for i in range(num_classes)]

    def make(split: str, n: int) -> list[Sample]:
        # interleaved, unsorted order: sampling must not depend on the input order
        return [Sample(f"{root}/{split}/{c}/{i:03d}.jpg", c, names[c]) for i in reversed(range(n)) for c in range(num_classes)]

    return DatasetSplits("synthetic", names, make("train", train), make("val", val), make("test", test))


def test_few_shot_counts_and_val_min_k_4():
    ds = synthetic()
    for k, val_k in ((1, 1), (2, 2), (4, 4), (8, 4), (16, 4)):
        fs = few_shot_split(ds, k, seed=1)
        assert samples_per_class(fs.train, 5) == [k] * 5
        assert samples_per_class(fs.val, 5) == [val_k] * 5
        assert fs.test == ds.test
        assert set(fs.train) <= set(ds.train) and set(fs.val) <= set(ds.val)
        assert len(set(fs.train)) == len(fs.train)
        assert fs.extra["few_shot"] == {"shots": k, "seed": 1, "val_shots": val_k, "sampler": "dassl"}
    assert ds.extra == {}  # the input is not modified


def test_few_shot_deterministic_and_seed_dependent():
    ds = synthetic()
    a = few_shot_split(ds, 4, seed=1)
    assert few_shot_split(ds, 4, seed=1).train == a.train
    others = [few_shot_split(ds, 4, seed=s).train for s in (2, 3)]
    assert all(o != a.train for o in others) and others[0] != others[1]


def test_default_sampler_follows_the_split_order_and_sorted_does_not():
    ds = synthetic()
    shuffled = ds.with_splits(train=list(reversed(ds.train)))
    # Dassl's rule walks the split file as it is (that is how it reproduces the original images)...
    assert few_shot_split(shuffled, 4, seed=1).train != few_shot_split(ds, 4, seed=1).train
    # ...the earlier rule sorted each class first
    assert (few_shot_split(shuffled, 4, seed=1, sampler="sorted").train
            == few_shot_split(ds, 4, seed=1, sampler="sorted").train)


_CHILD = """
import json, sys
sys.path.insert(0, {src!r})
sys.path.insert(0, {tests!r})
from test_data_protocol import synthetic
from vlprompt.data import few_shot_split
fs = few_shot_split(synthetic(), 4, seed=int(sys.argv[1]))
print(json.dumps([s.path for s in fs.train] + [s.path for s in fs.val]))
"""


def test_few_shot_identical_across_processes():
    code = _CHILD.format(src=str(REPO / "src"), tests=str(REPO / "tests"))
    # another interpreter with its own str-hash seed (this one's is random): no dependence on hash()
    env = dict(os.environ, PYTHONHASHSEED="12345")
    res = subprocess.run([sys.executable, "-c", code, "3"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    child = json.loads(res.stdout.strip().splitlines()[-1])
    here = few_shot_split(synthetic(), 4, seed=3)
    assert child == [s.path for s in here.train] + [s.path for s in here.val]
    assert len(child) == 5 * 4 + 5 * 4


def test_too_few_images_names_class_and_counts():
    ds = synthetic()
    short = ds.with_splits(train=[s for s in ds.train if not (s.label == 2 and s.path >= "/data/train/2/003")])
    assert samples_per_class(short.train, 5)[2] == 3
    with pytest.raises(DataError) as ei:
        few_shot_split(short, 4, seed=1)
    msg = str(ei.value)
    assert "'class 2' has 3" in msg and "fewer than 4 train images" in msg and "allow_fewer" in msg
    assert few_shot_split(short, 3, seed=1).num_classes == 5  # 3 shots are fine

    with pytest.warns(UserWarning, match="'class 2' 3/4"):
        fs = few_shot_split(short, 4, seed=1, allow_fewer=True)
    assert samples_per_class(fs.train, 5) == [4, 4, 3, 4, 4]
    assert fs.extra["few_shot"]["short"] == {"train": {"class 2": [3, 4]}, "val": {}}


def test_too_few_val_images_is_reported_too():
    ds = synthetic(val=2)
    with pytest.raises(DataError, match="fewer than 4 val images"):
        few_shot_split(ds, 8, seed=1)
    assert samples_per_class(few_shot_split(ds, 2, seed=1).val, 5) == [2] * 5


def test_bad_shots_and_empty_train():
    ds = synthetic()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="shots"):
            few_shot_split(ds, bad, seed=1)
    with pytest.raises(DataError, match="seed"):
        few_shot_split(ds, 1, seed="1")
    empty = ds.with_splits(train=[])
    with pytest.raises(DataError, match="no train images"):
        few_shot_split(empty, 1, seed=1)
    with pytest.raises(DataError, match="no train images"):
        require_split(empty, "train")
    assert require_split(ds, "test") == ds.test


def test_subsample_classes_base_new_ceil_and_relabel():
    ds = synthetic(num_classes=5)
    base = subsample_classes(ds, "base")
    new = subsample_classes(ds, "new")
    assert base.classnames == ["class 0", "class 1", "class 2"]  # ceil(5/2) = 3
    assert new.classnames == ["class 3", "class 4"]
    assert sorted({s.label for s in base.train}) == [0, 1, 2] and sorted({s.label for s in new.test}) == [0, 1]
    assert all(s.classname == new.classnames[s.label] for s in new.train + new.val + new.test)
    assert all("/3/" in s.path for s in new.test if s.label == 0)  # class 3 became label 0
    assert len(base.test) == 9 and len(new.test) == 6 and len(new.train) == 40
    assert new.extra["subsample"] == {"which": "new", "original_labels": [3, 4], "num_classes_before": 5}
    assert subsample_classes(ds, "all") is ds
    even = synthetic(num_classes=4)
    assert subsample_classes(even, "base").num_classes == 2 and subsample_classes(even, "new").num_classes == 2
    with pytest.raises(DataError):
        subsample_classes(ds, "half")


def test_subsample_after_few_shot_as_cocoop():
    fs = few_shot_split(synthetic(num_classes=7), 2, seed=1)
    base = subsample_classes(fs, "base")
    assert base.num_classes == 4 and samples_per_class(base.train) == [2, 2, 2, 2]
    assert base.extra["few_shot"]["shots"] == 2


def test_save_and_load_split_roundtrip(tmp_path):
    files = []
    for i in range(4):
        p = tmp_path / "img" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
        files.append(str(p))
    ds = DatasetSplits("mine", ["young", "old"],
                       [Sample(files[0], 0, "young", 21.0), Sample(files[1], 1, "old", 70.5)],
                       [Sample(files[2], 1, "old")], [Sample(files[3], 0, "young", 5)],
                       template="a face of a {} person.", extra={"seed": 3, "obj": object()})
    path = save_split(ds, tmp_path / "run" / "split.json")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    back = load_split(path)
    assert back.train == ds.train and back.val == ds.val and back.test == ds.test
    assert back.classnames == ds.classnames and back.template == ds.template and back.name == "mine"
    assert back.extra == {"seed": 3}  # non-JSON values are dropped
    assert back.train[1].target == 70.5 and back.val[0].target is None

    os.remove(files[2])
    with pytest.raises(DataError, match=r"1 image file\(s\).*2\.jpg"):
        load_split(path)
    assert load_split(path, check_files=False).val[0].path == files[2]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda o: o.update(format="other"), "not a vlprompt split"),
    (lambda o: o.update(version=99), "version 99"),
    (lambda o: o.update(classnames=[]), "'classnames'"),
    (lambda o: o["train"].append(["/x.jpg", 7, "young"]), r"train\[2\] has label 7"),
    (lambda o: o["train"].append(["/x.jpg", 0, "old"]), r"names class 'old' but label 0 is 'young'"),
    (lambda o: o["test"].append(["/x.jpg", "0"]), r"test\[1\] must be"),
    (lambda o: o.pop("val"), "'val' must be a list"),
])
def test_load_split_rejects_malformed_files(tmp_path, mutate, pattern):
    ds = DatasetSplits("m", ["young", "old"], [Sample("/a.jpg", 0, "young"), Sample("/b.jpg", 1, "old")], [],
                       [Sample("/c.jpg", 0, "young")])
    path = save_split(ds, tmp_path / "s.json")
    obj = json.loads(path.read_text())
    mutate(obj)
    path.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=pattern):
        load_split(path, check_files=False)


def test_load_split_missing_or_not_json(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match="bad.json"):
        load_split(tmp_path / "bad.json")


def test_group_by_label():
    ds = synthetic(num_classes=3, train=2)
    groups = group_by_label(ds.train)
    assert list(groups) == [0, 1, 2] and all(len(v) == 2 for v in groups.values())


def test_every_public_name_resolves():
    import vlprompt.data as data

    missing = [n for n in data.__all__ if getattr(data, n, None) is None]
    assert missing == [] and len(data.__all__) == len(set(data.__all__))
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018


@pytest.mark.parametrize("sampler", ["dassl", "lpclip", "sorted"])
def test_val_shots_change_only_the_val_images(sampler):
    """``val_shots``: N val images per class instead of CoOp's min(K, 4), or (0) the whole val split as
    Tip-Adapter's code searches it; the training images stay those of the default protocol (drawn first)."""
    ds = synthetic()
    default = few_shot_split(ds, 8, seed=2, sampler=sampler)
    whole = few_shot_split(ds, 8, seed=2, sampler=sampler, val_shots=0)
    assert whole.train == default.train and whole.val == ds.val
    assert whole.extra["few_shot"]["val"] == "whole split"
    more = few_shot_split(ds, 8, seed=2, sampler=sampler, val_shots=6)
    assert more.train == default.train and samples_per_class(more.val, 5) == [6] * 5
    with pytest.raises(DataError, match="fewer than 7 val images"):
        few_shot_split(ds, 8, seed=2, sampler=sampler, val_shots=7)
    with pytest.raises(DataError, match="val_shots"):
        few_shot_split(ds, 8, seed=2, sampler=sampler, val_shots=-1)
