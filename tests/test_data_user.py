"""User data readers: ``folder``, ``csv`` and ``torchvision:<Name>`` (on local fakes: no network)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from conftest import jpeg, write_csv
from vlprompt.data import load_dataset
from vlprompt.errors import DataError


def _info(path) -> tuple[str, tuple[int, int]]:
    """(mode, size) of an image file, closing it."""
    with Image.open(path) as im:
        return im.mode, im.size


def _pixel(path) -> list[int]:
    with Image.open(path) as im:
        return np.asarray(im)[0, 0].tolist()


# ---------------------------------------------------------------------------------------------- folder


def test_folder_generated_split(tmp_path):
    for cls, n in (("golden_retriever", 10), ("tabby_cat", 10), ("zebra", 5)):
        for i in range(n):
            jpeg(tmp_path / "data" / cls / f"{i}.jpg", i)
    (tmp_path / "data" / "zebra" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "zebra" / ".hidden.jpg").write_bytes(b"")
    ds = load_dataset("folder", tmp_path / "data")
    assert ds.classnames == ["golden retriever", "tabby cat", "zebra"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (5 + 5 + 2, 2 + 2 + 1, 3 + 3 + 2)
    assert ds.template == "a photo of a {}." and ds.extra["split_source"] == "generated"
    assert not any(p.name.startswith("split") for p in (tmp_path / "data").iterdir())  # nothing written
    again = load_dataset("folder", tmp_path / "data")
    assert again.train == ds.train and again.test == ds.test  # deterministic
    assert load_dataset("folder", tmp_path / "data", split_seed=7).train != ds.train
    custom = load_dataset("folder", tmp_path / "data", template="a blurry photo of a {}.")
    assert custom.template == "a blurry photo of a {}."


def test_folder_with_split_subfolders(tmp_path):
    root = tmp_path / "data"
    for split, classes in (("train", {"ant": 5, "bee": 5}), ("val", {"ant": 1, "bee": 1}), ("test", {"ant": 2, "wasp": 2})):
        for cls, n in classes.items():
            for i in range(n):
                jpeg(root / split / cls / f"{i}.png", i)
    ds = load_dataset("folder", root)
    assert ds.classnames == ["ant", "bee", "wasp"]  # union, sorted
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 2, 4)
    assert {s.label for s in ds.test} == {0, 2} and ds.extra["split_source"] == "folders"
    assert all(s.path.startswith(str(root / "test")) for s in ds.test)


def test_folder_without_val_carves_it_from_train(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 10), ("test", 3)):
        for cls in ("a", "b"):
            for i in range(n):
                jpeg(root / split / cls / f"{i}.jpg", i)
    ds = load_dataset("folder", root)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (16, 4, 6)
    assert not set(s.path for s in ds.train) & set(s.path for s in ds.val)
    assert ds.extra["val_from_train"] is True


def test_folder_test_only_and_errors(tmp_path):
    root = tmp_path / "data"
    jpeg(root / "test" / "cat" / "1.jpg")
    ds = load_dataset("folder", root)
    assert ds.train == [] and len(ds.test) == 1
    with pytest.raises(DataError, match="no train/ folder"):
        from vlprompt.data import few_shot_split
        few_shot_split(ds, 1, seed=0)
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("folder", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_dataset("folder", tmp_path / "empty")
    (tmp_path / "e2" / "cls_a").mkdir(parents=True)
    jpeg(tmp_path / "e2" / "cls_b" / "1.jpg")
    with pytest.raises(DataError, match="cls a"):
        load_dataset("folder", tmp_path / "e2")


# ------------------------------------------------------------------------------------------------- csv


def test_csv_int_labels_classnames_split_and_target(tmp_path):
    img = tmp_path / "imgs"
    absolute = jpeg(tmp_path / "elsewhere" / "abs.jpg")
    rows = []
    for i in range(6):
        jpeg(img / f"{i}.jpg", i)
        rows.append([f"imgs/{i}.jpg", i % 3, ["young_adult", "middle aged", "old"][i % 3],
                     ["train", "train", "train", "val", "test", "TEST"][i], 20 + i * 10])
    rows.append([str(absolute), 1, "middle aged", "train", "33.5"])
    path = write_csv(tmp_path / "faces.csv", ["path", "label", "classname", "split", "age"], rows)
    ds = load_dataset("csv", path, target="age")
    assert ds.classnames == ["young adult", "middle aged", "old"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 1, 2)
    assert ds.train[0].path == str(img / "0.jpg") and ds.train[0].target == 20.0
    assert ds.train[-1].path == str(absolute) and ds.train[-1].target == 33.5 and ds.train[-1].label == 1
    assert [s.target for s in ds.test] == [60.0, 70.0]
    assert ds.extra["target"] == "age"
    with pytest.raises(DataError, match=r"unknown column\(s\) \['age'\].*target=<column>"):
        load_dataset("csv", path)  # a column that would not be read is refused, not ignored


def test_csv_class_name_labels_and_generated_split(tmp_path):
    rows = []
    for i in range(20):
        jpeg(tmp_path / "i" / f"{i}.jpg", i)
        rows.append([f"i/{i}.jpg", ["dog", "cat_face"][i % 2]])
    path = write_csv(tmp_path / "d.csv", ["path", "label"], rows)
    ds = load_dataset("csv", path)
    assert ds.classnames == ["cat face", "dog"]  # sorted distinct names, cleaned
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 4, 6)
    assert ds.extra["split_source"] == "generated"
    fixed = load_dataset("csv", path, classnames=["dog", "cat_face", "bird"])
    assert fixed.classnames == ["dog", "cat face", "bird"] and fixed.num_classes == 3
    names_file = tmp_path / "names.txt"
    names_file.write_text("dog\ncat face\n")
    assert load_dataset("csv", path, classnames=str(names_file)).classnames == ["dog", "cat face"]


def test_csv_integer_labels_without_names_warn_and_take_names_from_a_file(tmp_path):
    """Integer labels and no names: the class names would be "0", "1", "7" inside the prompts ("a photo of a 0."):
    one warning line in extra["warnings"] (the run puts it in log.txt and results.json); a names file (line i names
    label i) or a classname column gives words, and no warning."""
    rows = []
    for i in range(12):
        jpeg(tmp_path / "i" / f"{i}.jpg", i)
        rows.append([f"i/{i}.jpg", [0, 1, 7][i % 3]])
    path = write_csv(tmp_path / "d.csv", ["path", "label"], rows)
    ds = load_dataset("csv", path)
    assert ds.classnames == ["0", "1", "7"]
    (warning,) = ds.extra["warnings"]
    assert "\n" not in warning and str(path) in warning and "'a photo of a 0.'" in warning
    assert "classnames=" in warning and "classname column" in warning
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven"]) + "\n")
    named = load_dataset("csv", path, classnames=str(names))
    assert named.classnames[7] == "seven" and {s.classname for s in named.train} == {"zero", "one", "seven"}
    assert "warnings" not in named.extra
    with_column = write_csv(tmp_path / "c.csv", ["path", "label", "classname"],
                            [[r[0], r[1], {0: "cat", 1: "dog", 7: "owl"}[r[1]]] for r in rows])
    assert "warnings" not in load_dataset("csv", with_column).extra
    ages = write_csv(tmp_path / "a.csv", ["path", "label", "age"], [[r[0], r[1], 20 + r[1]] for r in rows])
    assert "warnings" not in load_dataset("csv", ages, target="age").extra  # ranks named by numbers: on purpose


def test_folder_of_numbered_class_folders_warns(tmp_path):
    for c in ("0", "1"):
        for i in range(4):
            jpeg(tmp_path / "data" / c / f"{i}.jpg", i)
    (warning,) = load_dataset("folder", tmp_path / "data").extra["warnings"]
    assert "'a photo of a 0.'" in warning and "class folders" in warning


def test_csv_unknown_class_names_file_row_and_class(tmp_path):
    jpeg(tmp_path / "a.jpg")
    path = write_csv(tmp_path / "d.csv", ["path", "label"], [["a.jpg", "dog"], ["a.jpg", "unicorn"]])
    with pytest.raises(DataError) as ei:
        load_dataset("csv", path, classnames=["dog", "cat"])
    assert "d.csv" in str(ei.value) and "row 3" in str(ei.value) and "'unicorn'" in str(ei.value)
    ipath = write_csv(tmp_path / "i.csv", ["path", "label"], [["a.jpg", 0], ["a.jpg", 5]])
    with pytest.raises(DataError, match=r"i\.csv row 3: label 5 is not a class index \(0\.\.1\)"):
        load_dataset("csv", ipath, classnames=["dog", "cat"])


def test_csv_non_numeric_target(tmp_path):
    jpeg(tmp_path / "a.jpg")
    path = write_csv(tmp_path / "ages.csv", ["path", "label", "age"],
                     [["a.jpg", 0, "31"], ["a.jpg", 1, "forty"], ["a.jpg", 1, "7"]])
    with pytest.raises(DataError) as ei:
        load_dataset("csv", path, target="age")
    msg = str(ei.value)
    assert "ages.csv" in msg and "row 3" in msg and "'age'" in msg and "'forty'" in msg
    nan = write_csv(tmp_path / "nan.csv", ["path", "label", "age"], [["a.jpg", 0, "nan"]])
    with pytest.raises(DataError, match="not a finite number"):
        load_dataset("csv", nan, target="age")
    with pytest.raises(DataError, match="no target column 'height'"):
        load_dataset("csv", path, target="height")


@pytest.mark.parametrize("header, rows, pattern", [
    (["path", "label"], [["missing.jpg", 0]], r"1 image file\(s\) that do not exist: .*missing\.jpg"),
    (["file", "label"], [["a.jpg", 0]], "no 'path' column"),
    (["path", "label", "split"], [["a.jpg", 0, "holdout"]], r"row 2: split 'holdout'"),
    (["path", "label", "classname"], [["a.jpg", 0, "x"], ["a.jpg", 0, "y"]], "label 0 is named 'x' in row 2 but 'y' in row 3"),
    (["path", "label"], [["a.jpg", ""]], "row 2: empty 'label'"),
    (["path", "label"], [], "no rows"),
])
def test_csv_bad_inputs(tmp_path, header, rows, pattern):
    jpeg(tmp_path / "a.jpg")
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(DataError, match=pattern):
        load_dataset("csv", path)


# ----------------------------------------------------------------------------------------- torchvision


def test_torchvision_dtd_uses_its_files(tmp_path):
    # torchvision's own DTD class on a local copy of its layout (download=True finds it and skips)
    data = tmp_path / "dtd" / "dtd"
    lines = {"train": [], "val": [], "test": []}
    k = 0
    for cls in ("banded", "zigzagged"):
        for split, n in (("train", 3), ("val", 2), ("test", 2)):
            for _ in range(n):
                jpeg(data / "images" / cls / f"{cls}_{k:04d}.jpg", k)
                lines[split].append(f"{cls}/{cls}_{k:04d}.jpg")
                k += 1
    (data / "labels").mkdir()
    for split, ls in lines.items():
        (data / "labels" / f"{split}1.txt").write_text("\n".join(ls) + "\n")
    ds = load_dataset("torchvision:DTD", tmp_path)
    assert ds.name == "torchvision:DTD" and ds.classnames == ["banded", "zigzagged"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 4, 4)
    assert ds.template == "{} texture." and ds.extra["exported"] is False
    assert ds.train[0].path == str(data / "images" / "banded" / "banded_0000.jpg")
    assert not (tmp_path / "vlprompt-export").exists()


def test_torchvision_eurosat_no_split_gets_coop_split_and_names(tmp_path):
    for cls in ("AnnualCrop", "Highway", "SeaLake"):
        for i in range(10):
            jpeg(tmp_path / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg", i)
    ds = load_dataset("torchvision:EuroSAT", tmp_path)
    assert ds.classnames == ["Annual Crop Land", "Highway or Road", "Sea or Lake"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 6, 9)
    assert ds.template == "a centered satellite photo of {}."


class FakeInMemory(torch.utils.data.Dataset):
    """Like CIFAR10: images in memory, ``train=`` selects the split, downloads itself."""

    classes = ["cat_face", "dog"]
    created = 0

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        assert download is True
        FakeInMemory.created += 1
        n = 6 if train else 4
        self.data = [np.full((8, 8, 3), (i * 30 + (0 if train else 7)) % 256, np.uint8) for i in range(n)]
        self.targets = [i % 2 for i in range(n)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return Image.fromarray(self.data[i]), self.targets[i]


class FakeSplitTensors(torch.utils.data.Dataset):
    """Like SVHN: ``split=`` in {train, test} (rejects others like torchvision does), tensor images."""

    def __init__(self, root, split="train", download=False):
        from torchvision.datasets.utils import verify_str_arg

        self.split = verify_str_arg(split, "split", ("train", "test"))
        self.n = 4 if split == "train" else 2

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 5, 5), 10 * i, dtype=torch.uint8), torch.tensor(i % 2)


class FakeBroken(torch.utils.data.Dataset):
    def __init__(self, root, download=False):
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")


def test_torchvision_in_memory_dataset_is_exported_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "FakeInMemory", FakeInMemory, raising=False)
    ds = load_dataset("torchvision:FakeInMemory", tmp_path)
    assert ds.classnames == ["cat face", "dog"] and ds.extra["exported"] is True
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 2, 4)  # val: 20% of each train class
    export = tmp_path / "vlprompt-export" / "FakeInMemory"
    assert (export / "train" / "manifest.json").is_file() and (export / "test" / "manifest.json").is_file()
    first = Path(ds.test[0].path)
    assert first.parent.parent == export / "test" and first.suffix == ".png"
    assert _pixel(first) == [7, 7, 7]
    mtimes = {p: p.stat().st_mtime_ns for p in export.rglob("*.png")}
    assert len(mtimes) == 10
    again = load_dataset("torchvision:FakeInMemory", tmp_path)
    assert again.train == ds.train and again.test == ds.test
    assert {p: p.stat().st_mtime_ns for p in export.rglob("*.png")} == mtimes  # reused, not rewritten


def test_torchvision_split_argument_probing_and_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "FakeSplitTensors", FakeSplitTensors, raising=False)
    ds = load_dataset("torchvision:FakeSplitTensors", tmp_path)
    assert ds.extra["splits_used"] == {"train": "train", "test": "test"} and ds.extra["val_from_train"] is True
    assert len(ds.train) + len(ds.val) == 4 and len(ds.test) == 2
    assert ds.classnames == ["0", "1"]  # no classes attribute: the label indices
    assert _info(ds.test[1].path)[0] == "RGB"


def test_torchvision_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"no dataset class 'NoSuchSet'.*CIFAR10"):
        load_dataset("torchvision:NoSuchSet", tmp_path)
    monkeypatch.setattr(torchvision.datasets, "FakeBroken", FakeBroken, raising=False)
    with pytest.raises(DataError, match=r"torchvision:FakeBroken: could not load.*Dataset not found"):
        load_dataset("torchvision:FakeBroken", tmp_path)
    with pytest.raises(DataError, match="torchvision:<Name>"):
        load_dataset("torchvision:", tmp_path)
