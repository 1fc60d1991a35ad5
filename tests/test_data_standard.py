"""The standard readers on small synthetic copies of CoOp's layouts (tiny generated JPEGs)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import jpeg as _jpeg
from vlprompt.data import DATASETS, dataset_names, describe_datasets, few_shot_split, load_dataset, require_split
from vlprompt.errors import DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # generated splits that cannot go into a dataset folder go here, never into the user's ~/.cache
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "user-cache"))


def jpeg(path: Path, value: int = 0) -> Path:
    return _jpeg(path, value, rest=(40, 90))


# dataset -> (folder under root, image sub-folder, split file name, [(relpath, label, classname)] per class,
#             expected cleaned class names)
SPLIT_DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   [("Faces/image_{:04d}.jpg", "face"), ("yin_yang/image_{:04d}.jpg", "yin_yang")], ["face", "yin yang"]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    [("Abyssinian_{}.jpg", "abyssinian"), ("yorkshire_terrier_{}.jpg", "yorkshire_terrier")],
                    ["abyssinian", "yorkshire terrier"]),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json",
                      [("cars_train/{:05d}.jpg", "2012 Audi TTS Coupe"), ("cars_test/{:05d}.jpg", "2007 BMW X5 SUV")],
                      ["2012 Audi TTS Coupe", "2007 BMW X5 SUV"]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       [("image_{:05d}.jpg", "pink primrose"), ("image_1{:04d}.jpg", "blackberry lily")],
                       ["pink primrose", "blackberry lily"]),
    "food101": ("food-101", "images", "split_zhou_Food101.json",
                [("apple_pie/{}.jpg", "apple_pie"), ("waffles/{}.jpg", "waffles")], ["apple pie", "waffles"]),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               [("a/abbey/sun_{}.jpg", "abbey"), ("a/apartment_building/outdoor/sun_{}.jpg", "outdoor apartment_building")],
               ["abbey", "outdoor apartment building"]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
            [("banded/banded_{:04d}.jpg", "banded"), ("zigzagged/zigzagged_{:04d}.jpg", "zigzagged")],
            ["banded", "zigzagged"]),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                [("AnnualCrop/AnnualCrop_{}.jpg", "Annual Crop Land"), ("SeaLake/SeaLake_{}.jpg", "Sea or Lake")],
                ["Annual Crop Land", "Sea or Lake"]),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               [("Apply_Eye_Makeup/v_ApplyEyeMakeup_g{:02d}_c01.jpg", "Apply_Eye_Makeup"),
                ("Yo_Yo/v_YoYo_g{:02d}_c01.jpg", "Yo_Yo")], ["Apply Eye Makeup", "Yo Yo"]),
}

TEMPLATES = {"caltech101": "a photo of a {}.", "oxford_pets": "a photo of a {}, a type of pet.",
             "stanford_cars": "a photo of a {}.", "oxford_flowers": "a photo of a {}, a type of flower.",
             "food101": "a photo of {}, a type of food.", "sun397": "a photo of a {}.", "dtd": "{} texture.",
             "eurosat": "a centered satellite photo of {}.", "ucf101": "a photo of a person doing {}."}


def build_split_dataset(root: Path, name: str, per_split=(3, 2, 2)) -> dict:
    folder, sub, split_name, classes, _ = SPLIT_DATASETS[name]
    image_dir = root / folder / sub if sub else root / folder
    split = {"train": [], "val": [], "test": []}
    k = 1
    for label, (pattern, cname) in enumerate(classes):
        for s, n in zip(("train", "val", "test"), per_split):
            for _ in range(n):
                rel = pattern.format(k)
                jpeg(image_dir / rel, k)
                split[s].append([rel, label, cname])
                k += 1
    (root / folder / split_name).write_text(json.dumps(split))
    return split


@pytest.mark.parametrize("name", sorted(SPLIT_DATASETS))
def test_split_file_datasets_read_coop_layout(tmp_path, name):
    split = build_split_dataset(tmp_path, name)
    ds = load_dataset(name, tmp_path)
    assert ds.name == name
    assert ds.classnames == SPLIT_DATASETS[name][4]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 4, 4)
    assert ds.template == TEMPLATES[name] == DATASETS[name].template
    folder, sub = SPLIT_DATASETS[name][:2]
    image_dir = tmp_path / folder / sub if sub else tmp_path / folder
    assert ds.train[0].path == str(image_dir / split["train"][0][0])
    assert all(os.path.isabs(s.path) and os.path.isfile(s.path) for s in ds.train + ds.val + ds.test)
    assert [s.label for s in ds.test] == [0, 0, 1, 1]
    assert all(s.classname == ds.classnames[s.label] for s in ds.train + ds.val + ds.test)
    assert ds.extra["split_generated"] is False
    # the dataset folder itself also works as root
    assert load_dataset(name, tmp_path / folder).classnames == ds.classnames


@pytest.mark.parametrize("name", ["oxford_pets", "ucf101", "food101", "dtd"])
def test_split_files_keep_the_names_as_spelled_through_the_protocol(tmp_path, name):
    """The names as the split file spells them (underscores: what Dassl, hence TaskRes and CLAP, prompt with) are
    recorded beside the cleaned ones, follow the base / new relabelling and survive split.json."""
    from vlprompt.data import few_shot_split, load_split, save_split, source_classnames, subsample_classes

    build_split_dataset(tmp_path, name)
    ds = load_dataset(name, tmp_path)
    raw = [c for _, c in SPLIT_DATASETS[name][3]]
    assert source_classnames(ds) == raw
    assert ("source_classnames" in ds.extra) == (raw != ds.classnames)  # recorded only where they differ
    few = few_shot_split(ds, 2, seed=1)
    assert source_classnames(few) == raw
    new = subsample_classes(few, "new")
    assert new.classnames == ds.classnames[1:] and source_classnames(new) == raw[1:]
    save_split(new, tmp_path / "split.json")
    assert source_classnames(load_split(tmp_path / "split.json")) == raw[1:]


def test_split_file_naming_absent_files(tmp_path):
    split = build_split_dataset(tmp_path, "dtd")
    split["test"] += [[f"banded/ghost_{i}.jpg", 0, "banded"] for i in range(7)]
    path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    path.write_text(json.dumps(split))
    with pytest.raises(DataError) as ei:
        load_dataset("dtd", tmp_path)
    msg = str(ei.value)
    assert "7 image file(s)" in msg and "ghost_0.jpg" in msg and "(and 2 more)" in msg and str(path) in msg
    assert load_dataset("dtd", tmp_path, check_files=False).test[-1].path.endswith("ghost_6.jpg")


@pytest.mark.parametrize("bad, pattern", [
    ({"train": [["a.jpg", 0]], "val": [], "test": []}, r"train\[0\]"),
    ({"train": [], "val": []}, "'test'"),
    ({"train": [["a.jpg", "x", "c"]], "val": [], "test": []}, "non-integer label"),
    ({"train": [["a.jpg", 1, "c"]], "val": [], "test": []}, "without gaps"),
    ({"train": [["a.jpg", 0, "c"], ["b.jpg", 0, "d"]], "val": [], "test": []}, "named both"),
])
def test_malformed_split_file(tmp_path, bad, pattern):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=pattern):
        load_dataset("dtd", tmp_path, check_files=False)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(DataError, match="split_zhou_DescribableTextures.json"):
        load_dataset("dtd", tmp_path)


def test_explicit_split_file_option(tmp_path):
    split = build_split_dataset(tmp_path, "eurosat")
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({"train": split["train"][:2], "val": split["val"][:1], "test": split["test"][:1]}))
    ds = load_dataset("eurosat", tmp_path, split_file=other)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2, 1, 1) and ds.extra["split_file"] == str(other)
    with pytest.raises(DataError, match="nope.json"):
        load_dataset("eurosat", tmp_path, split_file=tmp_path / "nope.json")


def _class_folders(image_dir: Path, classes: dict[str, int]) -> None:
    k = 0
    for cls, n in classes.items():
        for i in range(n):
            jpeg(image_dir / cls / f"{cls}_{i:03d}.jpg", k)
            k += 1


def test_missing_split_is_generated_and_saved(tmp_path):
    _class_folders(tmp_path / "dtd" / "images", {"banded": 10, "zigzagged": 10, "cracked": 7})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # writable folder: no warning
        ds = load_dataset("dtd", tmp_path)
    saved = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    assert saved.is_file() and ds.extra["split_generated"] is True and ds.extra["split_file"] == str(saved)
    assert ds.classnames == ["banded", "cracked", "zigzagged"]  # sorted folders
    # CoOp's rule: round(50%) train, round(20%) val, the rest test, per class
    counts = {c: [sum(s.label == i for s in part) for part in (ds.train, ds.val, ds.test)]
              for i, c in enumerate(ds.classnames)}
    assert counts == {"banded": [5, 2, 3], "zigzagged": [5, 2, 3], "cracked": [4, 1, 2]}
    on_disk = json.loads(saved.read_text())
    assert sorted(on_disk) == ["test", "train", "val"]
    assert on_disk["train"][0][0].startswith(("banded/", "cracked/", "zigzagged/")) and len(on_disk["train"][0]) == 3
    assert not list((tmp_path / "dtd").glob(".*.tmp"))  # atomic write left no temp file
    # next load reads the saved file: same split
    again = load_dataset("dtd", tmp_path)
    assert again.extra["split_generated"] is False and again.train == ds.train and again.test == ds.test

    # deterministic: an identical copy elsewhere gets the same split; another seed a different one
    other = tmp_path / "copy"
    _class_folders(other / "dtd" / "images", {"banded": 10, "zigzagged": 10, "cracked": 7})
    ds2 = load_dataset("dtd", other)
    rel = lambda d, root: [os.path.relpath(s.path, root) for s in d.train]  # noqa: E731
    assert rel(ds2, other) == rel(ds, tmp_path)
    (other / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    ds3 = load_dataset("dtd", other, split_seed=2)
    assert rel(ds3, other) != rel(ds, tmp_path) and len(ds3.train) == len(ds.train)


def test_generation_caltech_ignores_and_renames(tmp_path):
    _class_folders(tmp_path / "caltech-101" / "101_ObjectCategories",
                   {"BACKGROUND_Google": 5, "Faces": 5, "Faces_easy": 5, "Leopards": 5, "yin_yang": 5})
    ds = load_dataset("caltech101", tmp_path)
    assert ds.classnames == ["face", "leopard", "yin yang"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 6)
    assert not any("BACKGROUND" in s.path or "Faces_easy" in s.path for s in ds.train + ds.val + ds.test)
    saved = json.loads((tmp_path / "caltech-101" / "split_zhou_Caltech101.json").read_text())
    assert {e[2] for e in saved["train"]} == {"face", "leopard", "yin_yang"}  # CoOp's raw names on disk


def test_generation_eurosat_uses_coop_names(tmp_path):
    _class_folders(tmp_path / "eurosat" / "2750", {"AnnualCrop": 4, "HerbaceousVegetation": 4, "SeaLake": 4})
    ds = load_dataset("eurosat", tmp_path)
    assert ds.classnames == ["Annual Crop Land", "Herbaceous Vegetation Land", "Sea or Lake"]
    assert ds.template == "a centered satellite photo of {}."


def test_generation_food101_and_sun397_folders(tmp_path):
    _class_folders(tmp_path / "food-101" / "images", {"apple_pie": 6, "waffles": 6})
    assert load_dataset("food101", tmp_path).classnames == ["apple pie", "waffles"]
    _class_folders(tmp_path / "sun397" / "SUN397" / "a", {"abbey": 5})
    _class_folders(tmp_path / "sun397" / "SUN397" / "a" / "apartment_building", {"outdoor": 5})
    ds = load_dataset("sun397", tmp_path)
    assert ds.classnames == ["abbey", "outdoor apartment building"]


def test_generation_sun397_from_partition_files(tmp_path):
    d = tmp_path / "sun397"
    names = ["/a/abbey", "/b/bedroom"]
    (d).mkdir()
    (d / "ClassName.txt").write_text("\n".join(names) + "\n")
    train_lines, test_lines = [], []
    for c in names:
        for i in range(6):
            jpeg(d / "SUN397" / c.lstrip("/") / f"sun_{i}.jpg", i)
            (train_lines if i < 4 else test_lines).append(f"{c}/sun_{i}.jpg")
    (d / "Training_01.txt").write_text("\n".join(train_lines))
    (d / "Testing_01.txt").write_text("\n".join(test_lines))
    ds = load_dataset("sun397", tmp_path)
    assert ds.classnames == ["abbey", "bedroom"]
    # CoOp: official test list; 20% of each class of the training list becomes val
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 2, 4)


def test_generation_pets_from_annotations(tmp_path):
    d = tmp_path / "oxford_pets"
    lines = []
    for i in range(1, 11):
        jpeg(d / "images" / f"Abyssinian_{i}.jpg", i)
        jpeg(d / "images" / f"american_bulldog_{i}.jpg", i)
        lines += [f"Abyssinian_{i} 1 1 1", f"american_bulldog_{i} 2 2 1"]
    (d / "annotations").mkdir()
    (d / "annotations" / "trainval.txt").write_text("\n".join(lines[:16]) + "\n")
    (d / "annotations" / "test.txt").write_text("# comment\n" + "\n".join(lines[16:]) + "\n")
    ds = load_dataset("oxford_pets", tmp_path)
    assert ds.classnames == ["abyssinian", "american bulldog"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 4)
    assert (d / "split_zhou_OxfordPets.json").is_file()


def test_generation_flowers_from_imagelabels(tmp_path):
    sio = pytest.importorskip("scipy.io")
    d = tmp_path / "oxford_flowers"
    labels = [1, 2] * 5 + [3] * 4
    for i in range(len(labels)):
        jpeg(d / "jpg" / f"image_{i + 1:05d}.jpg", i)
    sio.savemat(str(d / "imagelabels.mat"), {"labels": np.array([labels])})
    (d / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "hard-leaved pocket orchid",
                                                    "3": "canterbury bells"}))
    ds = load_dataset("oxford_flowers", tmp_path)
    assert ds.classnames == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    # per class round(n/2) train (Python's round, as CoOp: round(2.5) == 2), round(n/5) val, rest test
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2 + 2 + 2, 1 + 1 + 1, 2 + 2 + 1)
    assert all(s.classname == "canterbury bells" for s in ds.test if s.path.endswith(("00011.jpg", "00014.jpg")))


def test_generation_stanford_cars_from_devkit(tmp_path):
    sio = pytest.importorskip("scipy.io")
    d = tmp_path / "stanford_cars"
    (d / "devkit").mkdir(parents=True)
    meta = np.empty((1, 2), dtype=object)
    meta[0, 0], meta[0, 1] = "AM General Hummer SUV 2000", "Acura RL Sedan 2012"
    sio.savemat(str(d / "devkit" / "cars_meta.mat"), {"class_names": meta})

    def annos(folder, n):
        a = np.zeros((1, n), dtype=[("fname", "O"), ("class", "O")])
        for i in range(n):
            jpeg(d / folder / f"{i + 1:05d}.jpg", i)
            a[0, i] = (f"{i + 1:05d}.jpg", np.array([[i % 2 + 1]], dtype=np.uint8))
        return {"annotations": a}

    sio.savemat(str(d / "devkit" / "cars_train_annos.mat"), annos("cars_train", 10))
    sio.savemat(str(d / "cars_test_annos_withlabels.mat"), annos("cars_test", 4))
    ds = load_dataset("stanford_cars", tmp_path)
    assert ds.classnames == ["2000 AM General Hummer SUV", "2012 Acura RL Sedan"]  # year first, as CoOp
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 2, 4)
    assert ds.test[0].path.startswith(str(d / "cars_test"))


def test_generation_ucf101_from_lists(tmp_path):
    d = tmp_path / "ucf101"
    (d / "ucfTrainTestlist").mkdir(parents=True)
    (d / "ucfTrainTestlist" / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    train, test = [], []
    for action, folder in (("ApplyEyeMakeup", "Apply_Eye_Makeup"), ("YoYo", "Yo_Yo")):
        for g in range(1, 8):
            jpeg(d / "UCF-101-midframes" / folder / f"v_{action}_g{g:02d}_c01.jpg", g)
            (train if g <= 5 else test).append(f"{action}/v_{action}_g{g:02d}_c01.avi")
    (d / "ucfTrainTestlist" / "trainlist01.txt").write_text("\n".join(f"{t} 1" for t in train))
    (d / "ucfTrainTestlist" / "testlist01.txt").write_text("\n".join(test))
    ds = load_dataset("ucf101", tmp_path)
    assert ds.classnames == ["Apply Eye Makeup", "Yo Yo"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 2, 4)


def test_generated_split_goes_to_user_cache_when_folder_not_writable(tmp_path, monkeypatch):
    import vlprompt.data._splitfile as sf

    _class_folders(tmp_path / "data" / "dtd" / "images", {"banded": 5, "zigzagged": 5})
    real = sf.atomic_write_json
    dataset_dir = tmp_path / "data" / "dtd"

    def read_only(path, obj):
        if Path(path).parent == dataset_dir:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, obj)

    monkeypatch.setattr(sf, "atomic_write_json", read_only)
    with pytest.warns(UserWarning, match="not writable"):
        ds = load_dataset("dtd", tmp_path / "data")
    cached = Path(ds.extra["split_file"])
    assert cached.is_file() and str(cached).startswith(str(tmp_path / "user-cache"))
    assert not (dataset_dir / "split_zhou_DescribableTextures.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_dataset("dtd", tmp_path / "data")  # found in the cache, not generated again
    assert again.extra["split_generated"] is False and again.extra["split_file"] == str(cached)
    assert again.train == ds.train


def test_missing_dataset_folder_shows_layout(tmp_path):
    with pytest.raises(DataError, match=r"split_zhou_OxfordFlowers\.json"):
        load_dataset("oxford_flowers", tmp_path)
    (tmp_path / "stanford_cars").mkdir()
    with pytest.raises(DataError, match="cars_meta.mat"):
        load_dataset("stanford_cars", tmp_path)


def make_fgvc(root: Path) -> Path:
    d = root / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "F-16A/B"]
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    k = 1000000
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for v in variants:
            for _ in range(n):
                jpeg(d / "images" / f"{k}.jpg", k)
                lines.append(f"{k} {v}")
                k += 1
        (d / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return d


def test_fgvc_aircraft_official_lists(tmp_path):
    d = make_fgvc(tmp_path)
    ds = load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == ["707-320", "A300B4", "F-16A/B"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 6, 6)
    assert ds.template == "a photo of a {}, a type of aircraft."
    assert ds.train[0].path == str(d / "images" / "1000000.jpg") and ds.train[-1].label == 2
    with open(d / "images_variant_test.txt", "a") as f:
        f.write("1999999 Boeing 797\n")
    with pytest.raises(DataError, match=r"images_variant_test\.txt line 7.*Boeing 797"):
        load_dataset("fgvc_aircraft", tmp_path)


def make_imagenet(root: Path, wnids_names: dict[str, str], train: dict[str, int] | None, val: dict[str, int]):
    d = root / "imagenet"
    d.mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids_names.items()))
    for split, counts in (("train", train), ("val", val)):
        for w, n in (counts or {}).items():
            for i in range(n):
                jpeg(d / "images" / split / w / f"{w}_{i}.JPEG", i)
    return d


NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead shark", "n01496331": "electric ray"}


def test_imagenet_train_and_val(tmp_path):
    make_imagenet(tmp_path, NAMES, {w: 3 for w in NAMES}, {w: 1 for w in list(NAMES)[:4]})
    ds = load_dataset("imagenet", tmp_path)
    assert ds.classnames == list(NAMES.values()) and len(ds.train) == 18 and len(ds.test) == 4
    assert ds.val == []  # no separate val set; CoOp's val == test only on request
    assert {s.label for s in ds.test} == {0, 1, 2, 3}
    assert load_dataset("imagenet", tmp_path, val_from_test=True).val == ds.test
    fs = few_shot_split(ds, 2, seed=1)
    assert len(fs.train) == 12 and fs.val == []
    with pytest.raises(DataError, match="separate validation"):
        require_split(ds, "val")


def test_imagenet_val_only_errors_only_when_training_is_asked(tmp_path):
    make_imagenet(tmp_path, NAMES, None, {w: 1 for w in NAMES})
    ds = load_dataset("imagenet", tmp_path)  # evaluation works
    assert ds.train == [] and len(ds.test) == 6
    with pytest.raises(DataError, match=r"no training images.*images/train"):
        few_shot_split(ds, 1, seed=1)
    with pytest.raises(DataError, match="no training images"):
        require_split(ds, "train")


def test_imagenet_unknown_wnid_folder(tmp_path):
    d = make_imagenet(tmp_path, NAMES, None, {"n01440764": 1})
    jpeg(d / "images" / "val" / "n99999999" / "x.JPEG")
    with pytest.raises(DataError, match="n99999999"):
        load_dataset("imagenet", tmp_path)


def _variant(root: Path, folder: str, sub: str, class_dirs: list[str], per: int = 2) -> Path:
    for c in class_dirs:
        for i in range(per):
            jpeg(root / folder / sub / c / f"img_{i}.jpg", i)
    return root / folder


@pytest.mark.parametrize("name, folder, sub", [("imagenet_a", "imagenet-adversarial", "imagenet-a"),
                                               ("imagenet_r", "imagenet-rendition", "imagenet-r")])
def test_imagenet_a_r_relabelled_to_their_classes(tmp_path, name, folder, sub):
    make_imagenet(tmp_path, NAMES, None, {"n01440764": 1})
    present = ["n01496331", "n01443537", "n01491361"]  # 3 of the 6 ImageNet classes
    _variant(tmp_path, folder, sub, present)
    (tmp_path / folder / sub / "README.txt").write_text("not a class")
    ds = load_dataset(name, tmp_path)  # classnames.txt found in <root>/imagenet
    assert ds.classnames == ["goldfish", "tiger shark", "electric ray"]  # sorted wnids
    assert ds.extra["wnids"] == sorted(present)
    assert sorted({s.label for s in ds.test}) == [0, 1, 2] and len(ds.test) == 6
    assert all(s.classname == ds.classnames[s.label] for s in ds.test)
    assert ds.train == [] and ds.val == []
    with pytest.raises(DataError, match="test-only"):
        few_shot_split(ds, 1, seed=1)
    # a classnames.txt in the variant folder (CoOp's layout) is preferred; an explicit path wins
    (tmp_path / folder / "classnames.txt").write_text("".join(f"{w} {n.upper()}\n" for w, n in NAMES.items()))
    assert load_dataset(name, tmp_path).classnames[0] == "GOLDFISH"
    custom = tmp_path / "names.txt"
    custom.write_text("".join(f"{w} x_{n}\n" for w, n in NAMES.items()))
    assert load_dataset(name, tmp_path, classnames=custom).classnames[0] == "x goldfish"


def test_imagenet_variant_without_classnames(tmp_path):
    _variant(tmp_path, "imagenet-rendition", "imagenet-r", ["n01443537"])
    with pytest.raises(DataError, match="classnames="):
        load_dataset("imagenet_r", tmp_path)


def test_imagenet_sketch_and_v2_keep_1000_style_labels(tmp_path):
    make_imagenet(tmp_path, NAMES, None, {"n01440764": 1})
    _variant(tmp_path, "imagenet-sketch", "images", ["n01443537", "n01494475"])
    ds = load_dataset("imagenet_sketch", tmp_path)
    assert ds.num_classes == 6 and sorted({s.label for s in ds.test}) == [1, 4]
    _variant(tmp_path, "imagenetv2", "imagenetv2-matched-frequency-format-val", ["0", "5", "2"])
    v2 = load_dataset("imagenetv2", tmp_path)
    assert v2.num_classes == 6 and sorted({s.label for s in v2.test}) == [0, 2, 5]
    assert {s.classname for s in v2.test if s.label == 5} == {"electric ray"}
    jpeg(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "6" / "x.jpg")
    with pytest.raises(DataError, match="class indices"):
        load_dataset("imagenetv2", tmp_path)


def test_registry_names_options_and_errors(tmp_path):
    names = dataset_names()
    for n in ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
              "sun397", "dtd", "eurosat", "ucf101", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r",
              "folder", "csv", "torchvision:<Name>"]:
        assert n in names
    assert all(info.layout and info.title for info in DATASETS.values())
    assert DATASETS["imagenet_r"].test_only and not DATASETS["dtd"].test_only
    assert "split_seed" in DATASETS["dtd"].options and "classnames" in DATASETS["imagenet_a"].options
    with pytest.raises(DataError, match=r"unknown dataset 'flowers'.*oxford_flowers.*torchvision:<Name>"):
        load_dataset("flowers", tmp_path)
    with pytest.raises(DataError, match=r"does not take option\(s\) \['shots'\]"):
        load_dataset("dtd", tmp_path, shots=4)
    build_split_dataset(tmp_path, "dtd")
    assert load_dataset("DescribableTextures", tmp_path).name == "dtd"  # CoOp's name as an alias


def test_describe_datasets_lists_layouts():
    text = describe_datasets()
    assert text.count("layout:") == len(DATASETS)
    assert "oxford_flowers: Oxford 102 Flowers" in text and "cat_to_name.json" in text
    assert "imagenet_r: ImageNet-R" in text and "[test only]" in text
    assert "prompt: '{} texture.'" in text and "torchvision:<Name>" in text
