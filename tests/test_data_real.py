"""The readers on the real datasets of ../shared/assets/data (CoOp's layouts, downsized images).

Skipped, with the reason, when that folder is absent. Set VLPROMPT_SHARED to the shared folder (or
directly to its assets/data) to use another copy. Nothing is written into it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from vlprompt.data import (ImageDataset, build_test_transform, check_samples, few_shot_split, load_dataset,
                           load_image, samples_per_class, subsample_classes)
from vlprompt.errors import DataError


def _info(path) -> tuple[str, tuple[int, int]]:
    """(mode, size) of an image file, closing it."""
    with Image.open(path) as im:
        return im.mode, im.size


def _shared_data() -> Path:
    env = os.environ.get("VLPROMPT_SHARED")
    if env:
        p = Path(env).expanduser()
        return p / "assets" / "data" if (p / "assets" / "data").is_dir() else p
    return Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "data"


DATA = _shared_data()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared datasets not found at {DATA} "
                                                          f"(set VLPROMPT_SHARED to the shared folder)")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))


def test_oxford_flowers_coop_split():
    ds = load_dataset("oxford_flowers", DATA)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4093, 1633, 2463)
    assert ds.num_classes == 102
    assert ds.classnames[0] == "pink primrose" and ds.classnames[101] == "blackberry lily"
    # the split file's names are used; they are cat_to_name.json's except one CoOp fixed ("lotus lotus")
    names = json.loads((DATA / "oxford_flowers" / "cat_to_name.json").read_text())
    differ = [(i, ds.classnames[i], names[str(i + 1)]) for i in range(102) if ds.classnames[i] != names[str(i + 1)]]
    assert differ == [(77, "lotus", "lotus lotus")]
    assert ds.template == "a photo of a {}, a type of flower."
    assert ds.train[0].path == str(DATA / "oxford_flowers" / "jpg" / "image_00190.jpg") and ds.train[0].label == 76
    assert ds.extra["split_generated"] is False
    # the copy in coop_splits/ is the same split
    same = load_dataset("oxford_flowers", DATA, split_file=DATA / "coop_splits" / "split_zhou_OxfordFlowers.json")
    assert same.train == ds.train and same.test == ds.test


def test_oxford_flowers_16_shots_and_images():
    ds = load_dataset("oxford_flowers", DATA)
    fs = few_shot_split(ds, 16, seed=1)
    assert len(fs.train) == 16 * 102 and len(fs.val) == 4 * 102
    assert samples_per_class(fs.train, 102) == [16] * 102
    assert fs.train != few_shot_split(ds, 16, seed=2).train
    ok, problems = check_samples(fs.train + fs.val)
    assert problems == [] and len(ok) == 2040
    x, label, index = ImageDataset(fs.train[:3], build_test_transform(224))[2]
    assert tuple(x.shape) == (3, 224, 224) and label == fs.train[2].label and index == 2


def test_dtd_ten_classes():
    ds = load_dataset("dtd", DATA)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (600, 240, 360)
    assert ds.classnames == ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
                             "crosshatched", "crystalline"]
    assert samples_per_class(ds.train) == [60] * 10 and ds.template == "{} texture."
    base, new = subsample_classes(ds, "base"), subsample_classes(ds, "new")
    assert base.classnames == ds.classnames[:5] and new.classnames == ds.classnames[5:]
    assert len(new.test) == 180 and {s.label for s in new.test} == set(range(5))


def test_full_dtd_split_names_absent_files():
    full = DATA / "coop_splits" / "split_zhou_DescribableTextures.json"
    split = json.loads(full.read_text())
    absent = [e[0] for k in ("train", "val", "test") for e in split[k]
              if not (DATA / "dtd" / "images" / e[0]).exists()]
    assert len(absent) == 5640 - 1200
    with pytest.raises(DataError) as ei:
        load_dataset("dtd", DATA, split_file=full)
    msg = str(ei.value)
    assert f"{len(absent)} image file(s) that do not exist" in msg and str(full) in msg
    assert absent[0] in msg  # names the first missing file


@pytest.mark.parametrize("name, file, n_classes, counts, example", [
    ("caltech101", "split_zhou_Caltech101.json", 100, (4128, 1649, 2465), "face"),
    ("oxford_pets", "split_zhou_OxfordPets.json", 37, (2944, 736, 3669), "yorkshire terrier"),
    ("stanford_cars", "split_zhou_StanfordCars.json", 196, (6509, 1635, 8041), "2012 Audi TTS Coupe"),
    ("eurosat", "split_zhou_EuroSAT.json", 10, (13500, 5400, 8100), "Annual Crop Land"),
    ("ucf101", "split_zhou_UCF101.json", 101, (7639, 1898, 3783), "Apply Eye Makeup"),
    ("dtd", "split_zhou_DescribableTextures.json", 47, (2820, 1128, 1692), "zigzagged"),
])
def test_real_coop_split_files_parse(tmp_path, name, file, n_classes, counts, example):
    # the images of these datasets are not shipped: read the split files alone against an empty folder
    (tmp_path / "empty").mkdir()
    from vlprompt.data.standard import SPLIT_FILE_DATASETS

    spec = SPLIT_FILE_DATASETS[name]
    image_dir = tmp_path / spec.dir_name / spec.image_subdir
    image_dir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(name, tmp_path, split_file=DATA / "coop_splits" / file, check_files=False)
    assert ds.num_classes == n_classes and (len(ds.train), len(ds.val), len(ds.test)) == counts
    assert example in ds.classnames and not any("_" in c for c in ds.classnames)
    with pytest.raises(DataError, match=f"{sum(counts)} image file"):
        load_dataset(name, tmp_path, split_file=DATA / "coop_splits" / file)


def test_imagenet_1000_classes_val_only():
    ds = load_dataset("imagenet", DATA)
    assert ds.num_classes == 1000 and len(ds.test) == 1000 and ds.train == [] and ds.val == []
    assert ds.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert sorted({s.label for s in ds.test}) == list(range(1000))
    assert all(s.classname == ds.classnames[s.label] for s in ds.test)
    # CLIP's class names repeat two names (crane the bird and the machine; maillot twice): kept as they are
    assert len(set(ds.classnames)) == 998
    assert [ds.extra["wnids"][i] for i, c in enumerate(ds.classnames) if c == "crane"] == ["n02012849", "n03126707"]
    with pytest.raises(DataError, match="no training images"):
        few_shot_split(ds, 1, seed=1)
    gray = [s for s in ds.test if _info(s.path)[0] == "L"]
    assert len(gray) == 23
    img = load_image(gray[0].path)
    assert img.mode == "RGB" and img.size == _info(gray[0].path)[1]


def test_cifar10_as_folder():
    ds = load_dataset("folder", DATA / "cifar10")  # cifar10/test/<class>/: a test-only split folder
    assert ds.classnames == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.train == [] and len(ds.test) == 10000 and samples_per_class(ds.test) == [1000] * 10
    gen = load_dataset("folder", DATA / "cifar10" / "test")  # the class folders themselves: generated split
    assert (len(gen.train), len(gen.val), len(gen.test)) == (5000, 2000, 3000)
    assert gen.train == load_dataset("folder", DATA / "cifar10" / "test").train
    assert load_image(gen.test[0].path).size == (32, 32)


def test_utkface_csv_with_age_target(tmp_path):
    folder = DATA / "utkface" / "crop_part1"
    files = sorted(os.listdir(folder))
    ages = [int(f.split("_")[0]) for f in files]
    max_age = max(ages)
    csv_path = tmp_path / "utk.csv"
    with open(csv_path, "w") as f:
        f.write("path,label,age\n")
        for name, age in zip(files, ages):
            f.write(f"{folder / name},{age - 1},{age}\n")
    names = [f"{a} years old" for a in range(1, max_age + 1)]
    ds = load_dataset("csv", csv_path, target="age", classnames=names)
    everything = ds.train + ds.val + ds.test
    assert len(everything) == len(files) == 9780 and ds.num_classes == max_age == 110
    assert all(s.target == s.label + 1 for s in everything)
    by_path = {s.path: s.target for s in everything}
    assert by_path[str(folder / "100_1_0_20170110183726390.jpg.chip.jpg")] == 100.0
    assert ds.classnames[99] == "100 years old"
    assert min(by_path.values()) == 1.0 and max(by_path.values()) == 110.0


def test_truncated_real_jpeg(tmp_path):
    from vlprompt.data import Sample

    original = DATA / "oxford_flowers" / "jpg" / "image_00001.jpg"
    data = original.read_bytes()
    cut = tmp_path / "image_00001.jpg"
    cut.write_bytes(data[: len(data) * 3 // 5])
    assert load_image(original).size == _info(original)[1]
    with pytest.raises(DataError, match="image_00001.jpg.*truncated"):
        load_image(cut)
    ok, problems = check_samples([Sample(str(original), 0, "x"), Sample(str(cut), 0, "x")], mode="skip", decode=True)
    assert [s.path for s in ok] == [str(original)] and problems[0][0] == str(cut) and "truncated" in problems[0][1]
