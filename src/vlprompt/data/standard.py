"""Readers of the standard prompt-learning benchmarks in the on-disk layouts of CoOp's DATASETS.md.

``root`` is the folder holding all datasets (CoOp's ``DATASET.ROOT``, e.g. ``$DATA``); a reader also
accepts the dataset's own folder as ``root``. The eleven few-shot datasets read CoOp's fixed split files
``split_zhou_<Name>.json``; when one is missing a split is generated deterministically the way CoOp
generated it and saved under that name (see :func:`read_split_file_dataset`). ImageNet reads its folders
(its val set is the test set, as in CoOp); the four ImageNet variants are test-only.

Cross-dataset transfer and domain generalisation need nothing beyond this: train on one dataset
(e.g. ``imagenet``) and evaluate on another reader (``caltech101``, ``imagenet_sketch``, ...), each with
its own class list.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import DataError
from ._splitfile import find_split_file, parse_coop_split, read_coop_split, write_coop_split, coop_split_json
from ._util import (MAX_NAMED, check_exist, clean_classname, list_images, list_subdirs, split_camel_case,
                    split_per_class, split_trainval)
from .base import DatasetSplits, Sample, with_source_names
from .templates import template_for

Generator = Callable[[Path, Path, int], tuple[list[Sample], list[Sample], list[Sample]]]


def resolve_dataset_dir(root: str | os.PathLike, dir_name: str, markers: Sequence[str], dataset: str,
                        layout: str) -> Path:
    """``root/dir_name`` when it exists; ``root`` itself when it is the dataset folder (named
    ``dir_name`` or holding one of ``markers``); else a DataError showing the expected layout."""
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if not root.is_dir():
        raise DataError(f"{dataset}: data root {root} is not a folder. Expected layout:\n{layout}")
    candidate = root / dir_name
    if candidate.is_dir():
        return candidate
    if root.name == dir_name or any((root / m).exists() for m in markers):
        return root
    raise DataError(f"{dataset}: folder {candidate} not found. Expected layout under the data root:\n{layout}")


# --------------------------------------------------------------------------------------------------
# Split generators (used only when the split file is missing). They return samples carrying CoOp's
# raw class names; the caller saves them as a split file and reads that back.


def folder_generator(ignored: Sequence[str] = (), new_cnames: Optional[dict[str, str]] = None) -> Generator:
    """CoOp's ``DTD.read_and_split_data``: class folders (sorted), per class 50% train / 20% val / 30% test."""

    def generate(dataset_dir: Path, image_dir: Path, seed: int):
        classes = [c for c in list_subdirs(image_dir) if c not in ignored]
        if not classes:
            raise DataError(f"no class folders in {image_dir}")
        samples = []
        for label, folder in enumerate(classes):
            name = (new_cnames or {}).get(folder, folder)
            samples += [Sample(p, label, name) for p in list_images(image_dir / folder)]
        return split_per_class(samples, seed)

    return generate


def _loadmat(path: Path, dataset: str):
    if not path.is_file():
        raise DataError(f"{dataset}: {path} not found (needed to generate the split)")
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn and POT
        raise DataError(f"{dataset}: reading {path} needs scipy (pip install scipy)")
    try:
        return loadmat(str(path))
    except Exception as e:
        raise DataError(f"{dataset}: cannot read MATLAB file {path}: {e}") from e


def _read_lines(path: Path, dataset: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{dataset}: {path} not found (needed to generate the split)")
    with open(path, "r", encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def _flowers_generator(dataset_dir: Path, image_dir: Path, seed: int):
    mat = _loadmat(dataset_dir / "imagelabels.mat", "oxford_flowers")
    names_file = dataset_dir / "cat_to_name.json"
    if not names_file.is_file():
        raise DataError(f"oxford_flowers: {names_file} not found")
    with open(names_file, "r", encoding="utf-8") as f:
        lab2cname = json.load(f)
    labels = [int(x) for x in mat["labels"].ravel()]
    samples = []
    for i, label in enumerate(labels):
        if str(label) not in lab2cname:
            raise DataError(f"oxford_flowers: {names_file} has no name for label {label}")
        samples.append(Sample(str(image_dir / f"image_{i + 1:05d}.jpg"), label - 1, lab2cname[str(label)]))
    return split_per_class(samples, seed)


def _pets_generator(dataset_dir: Path, image_dir: Path, seed: int):
    anno = dataset_dir / "annotations"
    if (anno / "trainval.txt").is_file() and (anno / "test.txt").is_file():
        # CoOp: the official trainval/test lists, 20% of trainval (per class) becomes val.
        def read(name: str) -> list[Sample]:
            out = []
            for i, line in enumerate(_read_lines(anno / name, "oxford_pets")):
                parts = line.split()
                if len(parts) < 2:
                    raise DataError(f"oxford_pets: {anno / name} line {i + 1} is not '<image> <class id> ...'")
                breed = "_".join(parts[0].split("_")[:-1]).lower()
                out.append(Sample(str(image_dir / f"{parts[0]}.jpg"), int(parts[1]) - 1, breed))
            return out

        train, val = split_trainval(read("trainval.txt"), seed)
        return train, val, read("test.txt")
    # No annotations: the breed is the file name without its trailing number.
    files = list_images(image_dir)
    if not files:
        raise DataError(f"oxford_pets: no images in {image_dir} and no annotations/trainval.txt, test.txt")
    breeds = sorted({"_".join(Path(p).stem.split("_")[:-1]).lower() for p in files})
    lab = {b: i for i, b in enumerate(breeds)}
    samples = []
    for p in files:
        breed = "_".join(Path(p).stem.split("_")[:-1]).lower()
        samples.append(Sample(p, lab[breed], breed))
    return split_per_class(samples, seed)


def _cars_generator(dataset_dir: Path, image_dir: Path, seed: int):
    meta = _loadmat(dataset_dir / "devkit" / "cars_meta.mat", "stanford_cars")["class_names"][0]

    def read(folder: str, anno_path: Path) -> list[Sample]:
        annos = _loadmat(anno_path, "stanford_cars")["annotations"][0]
        out = []
        for a in annos:
            label = int(a["class"][0, 0]) - 1
            words = str(meta[label][0]).split(" ")
            name = " ".join([words[-1]] + words[:-1])  # CoOp puts the year first
            out.append(Sample(str(dataset_dir / folder / str(a["fname"][0])), label, name))
        return out

    trainval = read("cars_train", dataset_dir / "devkit" / "cars_train_annos.mat")
    test = read("cars_test", dataset_dir / "cars_test_annos_withlabels.mat")
    train, val = split_trainval(trainval, seed)
    return train, val, test


def _sun397_generator(dataset_dir: Path, image_dir: Path, seed: int):
    def name_of(rel: str) -> str:
        parts = rel.split("/")[1:]  # drop the first letter folder
        return " ".join(parts[::-1])  # CoOp puts words like indoor/outdoor first

    if (dataset_dir / "ClassName.txt").is_file() and (dataset_dir / "Training_01.txt").is_file():
        classes = [ln.lstrip("/") for ln in _read_lines(dataset_dir / "ClassName.txt", "sun397")]
        lab = {c: i for i, c in enumerate(classes)}

        def read(name: str) -> list[Sample]:
            out = []
            for line in _read_lines(dataset_dir / name, "sun397"):
                rel = line.lstrip("/")
                cls = os.path.dirname(rel)
                if cls not in lab:
                    raise DataError(f"sun397: {dataset_dir / name} names class {cls!r} absent from ClassName.txt")
                out.append(Sample(str(image_dir / rel), lab[cls], name_of(cls)))
            return out

        train, val = split_trainval(read("Training_01.txt"), seed)
        return train, val, read("Testing_01.txt")
    # No partition files: every folder holding images is a class (sorted), split 50/20/30.
    by_class: dict[str, list[str]] = {}
    for p in list_images(image_dir, recursive=True):
        by_class.setdefault(Path(os.path.relpath(os.path.dirname(p), image_dir)).as_posix(), []).append(p)
    if not by_class:
        raise DataError(f"sun397: no images under {image_dir}")
    samples = []
    for label, cls in enumerate(sorted(by_class)):
        name = name_of(cls) if len(cls.split("/")) > 1 else cls
        samples += [Sample(p, label, name) for p in by_class[cls]]
    return split_per_class(samples, seed)


def _ucf101_generator(dataset_dir: Path, image_dir: Path, seed: int):
    lists = dataset_dir / "ucfTrainTestlist"
    if not (lists / "classInd.txt").is_file():
        return folder_generator()(dataset_dir, image_dir, seed)
    lab = {}
    for line in _read_lines(lists / "classInd.txt", "ucf101"):
        idx, action = line.split()
        lab[action] = int(idx) - 1

    def read(name: str) -> list[Sample]:
        out = []
        for line in _read_lines(lists / name, "ucf101"):
            action, filename = line.split()[0].split("/")
            renamed = split_camel_case(action)
            out.append(Sample(str(image_dir / renamed / filename.replace(".avi", ".jpg")), lab[action], renamed))
        return out

    train, val = split_trainval(read("trainlist01.txt"), seed)
    return train, val, read("testlist01.txt")


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitFileSpec:
    """A dataset read from a CoOp split file: ``<root>/<dir_name>/<image_subdir>`` holds the images,
    ``<root>/<dir_name>/<split_file>`` the split."""

    name: str
    dir_name: str
    image_subdir: str
    split_file: str
    generator: Generator
    layout: str
    generation: str  # how a missing split is generated, in words

    @property
    def template(self) -> str:
        return template_for(self.name)


CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_NEW_CNAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NEW_CNAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}

_PER_CLASS = "50% train / 20% val / 30% test per class (class folders sorted), shuffled with split_seed"
_TRAINVAL = "the official train/test lists with 20% of each class of train moved to val (split_seed)"

SPLIT_FILE_DATASETS: dict[str, SplitFileSpec] = {s.name: s for s in [
    SplitFileSpec("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                  folder_generator(CALTECH_IGNORED, CALTECH_NEW_CNAMES),
                  "caltech-101/\n  101_ObjectCategories/<class>/*.jpg\n  split_zhou_Caltech101.json",
                  _PER_CLASS + " (BACKGROUND_Google, Faces_easy left out)"),
    SplitFileSpec("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", _pets_generator,
                  "oxford_pets/\n  images/<Breed>_<n>.jpg\n  annotations/ (trainval.txt, test.txt)\n"
                  "  split_zhou_OxfordPets.json",
                  _TRAINVAL + " (annotations/); without them, breeds from file names and 50/20/30 per class"),
    SplitFileSpec("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", _cars_generator,
                  "stanford_cars/\n  cars_train/  cars_test/  devkit/  cars_test_annos_withlabels.mat\n"
                  "  split_zhou_StanfordCars.json",
                  _TRAINVAL + " (devkit .mat files)"),
    SplitFileSpec("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", _flowers_generator,
                  "oxford_flowers/\n  jpg/image_00001.jpg ...\n  cat_to_name.json\n  imagelabels.mat\n"
                  "  split_zhou_OxfordFlowers.json",
                  "labels from imagelabels.mat, 50% train / 20% val / 30% test per class, shuffled with split_seed"),
    SplitFileSpec("food101", "food-101", "images", "split_zhou_Food101.json", folder_generator(),
                  "food-101/\n  images/<class>/*.jpg\n  split_zhou_Food101.json", _PER_CLASS),
    SplitFileSpec("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", _sun397_generator,
                  "sun397/\n  SUN397/<letter>/<class>[/<sub>]/*.jpg\n  ClassName.txt  Training_01.txt  Testing_01.txt\n"
                  "  split_zhou_SUN397.json",
                  _TRAINVAL + " (ClassName.txt, Training_01.txt, Testing_01.txt); without them, " + _PER_CLASS),
    SplitFileSpec("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", folder_generator(),
                  "dtd/\n  images/<class>/*.jpg\n  split_zhou_DescribableTextures.json", _PER_CLASS),
    SplitFileSpec("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", folder_generator((), EUROSAT_NEW_CNAMES),
                  "eurosat/\n  2750/<class>/*.jpg\n  split_zhou_EuroSAT.json",
                  _PER_CLASS + " (classes renamed as CoOp: AnnualCrop -> Annual Crop Land, ...)"),
    SplitFileSpec("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", _ucf101_generator,
                  "ucf101/\n  UCF-101-midframes/<Action_Name>/*.jpg\n  split_zhou_UCF101.json",
                  _TRAINVAL + " (ucfTrainTestlist/); without them, " + _PER_CLASS),
]}


def read_split_file_dataset(spec: SplitFileSpec, root: str | os.PathLike, *, split_file: str | os.PathLike | None = None,
                            split_seed: int = 1, check_files: bool = True) -> DatasetSplits:
    """Read one of CoOp's split-file datasets.

    ``split_file``: use this split file instead of ``<dataset dir>/<spec.split_file>`` (it must exist).
    When neither it nor the default file exists (nor a copy generated earlier into the user cache),
    a split is generated deterministically (``split_seed``) as CoOp did and saved atomically as
    ``<dataset dir>/<spec.split_file>``, or under the user cache with a warning when the dataset folder
    is not writable. ``check_files``: check that every listed image exists (DataError naming the first
    missing ones and their number).
    """
    dataset_dir = resolve_dataset_dir(root, spec.dir_name, [spec.split_file, spec.image_subdir or "devkit"],
                                      spec.name, spec.layout)
    image_dir = dataset_dir / spec.image_subdir if spec.image_subdir else dataset_dir
    extra = {"dataset_dir": str(dataset_dir), "image_dir": str(image_dir), "split_generated": False}
    if split_file is not None:
        path = Path(os.path.expanduser(os.fspath(split_file)))
        if not path.is_file():
            raise DataError(f"{spec.name}: split file {path} not found")
    else:
        path = find_split_file(dataset_dir, spec.split_file)
    if path is not None:
        if not image_dir.is_dir():
            raise DataError(f"{spec.name}: image folder {image_dir} not found. Expected layout:\n{spec.layout}")
        classnames, train, val, test, source = read_coop_split(path, image_dir, spec.name, check_files)
        extra["split_file"] = str(path)
    else:
        if not image_dir.is_dir():
            raise DataError(f"{spec.name}: neither {dataset_dir / spec.split_file} nor the image folder "
                            f"{image_dir} exists. Expected layout:\n{spec.layout}")
        tr, va, te = spec.generator(dataset_dir, image_dir, split_seed)
        written = write_coop_split(dataset_dir, spec.split_file, tr, va, te, image_dir, spec.name)
        where = f"{spec.name}: generated split (saved to {written})"
        classnames, train, val, test, source = parse_coop_split(coop_split_json(tr, va, te, image_dir), image_dir,
                                                                where, check_files)
        extra.update(split_file=str(written), split_generated=True, split_seed=split_seed)
    return DatasetSplits(name=spec.name, classnames=classnames, train=train, val=val, test=test,
                         template=spec.template, extra=with_source_names(extra, source, classnames))


# --------------------------------------------------------------------------------------------------
# FGVC Aircraft: the official variant lists, no split file.

FGVC_LAYOUT = ("fgvc_aircraft/   (the data/ folder of fgvc-aircraft-2013b)\n  images/<id>.jpg\n  variants.txt\n"
               "  images_variant_train.txt  images_variant_val.txt  images_variant_test.txt")


def read_fgvc_aircraft(root: str | os.PathLike, *, check_files: bool = True) -> DatasetSplits:
    """FGVC Aircraft at the variant level (100 classes): class order of ``variants.txt``, the official
    train / val / test lists (``<image id> <variant name>`` per line, image ``images/<id>.jpg``)."""
    name = "fgvc_aircraft"
    dataset_dir = resolve_dataset_dir(root, "fgvc_aircraft", ["variants.txt"], name, FGVC_LAYOUT)
    image_dir = dataset_dir / "images"
    variants_file = dataset_dir / "variants.txt"
    if not variants_file.is_file():
        raise DataError(f"{name}: {variants_file} not found. Expected layout:\n{FGVC_LAYOUT}")
    with open(variants_file, "r", encoding="utf-8") as f:
        classnames = [ln.strip() for ln in f if ln.strip()]
    if len(set(classnames)) != len(classnames):
        raise DataError(f"{name}: {variants_file} lists a variant twice")
    lab = {c: i for i, c in enumerate(classnames)}
    splits = {}
    for split in ("train", "val", "test"):
        list_file = dataset_dir / f"images_variant_{split}.txt"
        if not list_file.is_file():
            raise DataError(f"{name}: {list_file} not found. Expected layout:\n{FGVC_LAYOUT}")
        out = []
        with open(list_file, "r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.strip().split(" ")
                if not parts[0]:
                    continue
                variant = " ".join(parts[1:]).strip()
                if variant not in lab:
                    raise DataError(f"{name}: {list_file} line {lineno}: variant {variant!r} is not in {variants_file}")
                out.append(Sample(str(image_dir / f"{parts[0]}.jpg"), lab[variant], classnames[lab[variant]]))
        if check_files:
            check_exist(out, f"{name}: {list_file}")
        splits[split] = out
    return DatasetSplits(name=name, classnames=classnames, template=template_for(name),
                         extra={"dataset_dir": str(dataset_dir), "image_dir": str(image_dir)}, **splits)


# --------------------------------------------------------------------------------------------------
# ImageNet and its variants.

IMAGENET_LAYOUT = ("imagenet/\n  images/train/<wnid>/*.JPEG   (optional: needed only to train)\n"
                   "  images/val/<wnid>/*.JPEG     (CoOp's test set)\n  classnames.txt   (lines '<wnid> <class name>')")


def read_classnames_file(path: Path, dataset: str) -> dict[str, str]:
    """CoOp's ``classnames.txt``: ``<wnid> <class name>`` per line -> ordered ``{wnid: name}``."""
    if not path.is_file():
        raise DataError(f"{dataset}: class-name file {path} not found")
    out: dict[str, str] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{dataset}: {path} line {lineno} must be '<wnid> <class name>', got {line!r}")
            wnid, name = parts
            if wnid in out:
                raise DataError(f"{dataset}: {path} line {lineno}: wnid {wnid} listed twice")
            out[wnid] = name.strip()
    if not out:
        raise DataError(f"{dataset}: {path} lists no classes")
    return out


def _read_wnid_folders(split_dir: Path, label_of: dict[str, int], names: list[str], dataset: str,
                       classnames_file: Path) -> list[Sample]:
    samples = []
    unknown = [w for w in list_subdirs(split_dir) if w not in label_of]
    if unknown:
        raise DataError(f"{dataset}: folder(s) {unknown[:MAX_NAMED]} in {split_dir} are not listed in {classnames_file}")
    for wnid in list_subdirs(split_dir):
        label = label_of[wnid]
        samples += [Sample(p, label, names[label]) for p in list_images(split_dir / wnid)]
    return samples


def read_imagenet(root: str | os.PathLike, *, classnames: str | os.PathLike | None = None,
                  val_from_test: bool = False) -> DatasetSplits:
    """ImageNet-1k in CoOp's layout: labels are the wnids sorted, names from ``classnames.txt``.

    ``images/val`` is the test set (as in CoOp). ImageNet has no separate val set: ``val`` is empty,
    unless ``val_from_test=True`` which makes it the test set, exactly as CoOp (never select a model on
    it). ``images/train`` may be absent (evaluation only): ``train`` is then empty and
    :func:`vlprompt.data.require_split` / :func:`vlprompt.data.few_shot_split` say so when training data
    is asked for. ``classnames``: path of the class-name file (default ``imagenet/classnames.txt``).
    """
    name = "imagenet"
    dataset_dir = resolve_dataset_dir(root, "imagenet", ["classnames.txt", "images"], name, IMAGENET_LAYOUT)
    cn_file = Path(classnames) if classnames is not None else dataset_dir / "classnames.txt"
    wnid_names = read_classnames_file(cn_file, name)
    wnids = sorted(wnid_names)
    label_of = {w: i for i, w in enumerate(wnids)}
    names = [clean_classname(wnid_names[w]) for w in wnids]
    image_dir = dataset_dir / "images"
    unavailable = {}
    train: list[Sample] = []
    test: list[Sample] = []
    if (image_dir / "train").is_dir():
        train = _read_wnid_folders(image_dir / "train", label_of, names, name, cn_file)
    else:
        unavailable["train"] = (f"imagenet has no training images: folder {image_dir / 'train'} not found "
                                f"(only evaluation is possible). Expected layout:\n{IMAGENET_LAYOUT}")
    if (image_dir / "val").is_dir():
        test = _read_wnid_folders(image_dir / "val", label_of, names, name, cn_file)
    else:
        unavailable["test"] = f"imagenet has no test images: folder {image_dir / 'val'} not found"
    if not train and not test:
        raise DataError(f"{name}: no images in {image_dir / 'train'} nor {image_dir / 'val'}. "
                        f"Expected layout:\n{IMAGENET_LAYOUT}")
    val = list(test) if val_from_test else []
    if not val_from_test:
        unavailable["val"] = ("imagenet has no separate validation set (CoOp evaluates the last model); "
                              "pass val_from_test=True to use the test set as val as CoOp does")
    return DatasetSplits(name=name, classnames=names, train=train, val=val, test=test, template=template_for(name),
                         extra={"dataset_dir": str(dataset_dir), "image_dir": str(image_dir), "wnids": wnids,
                                "classnames_file": str(cn_file), "unavailable": unavailable})


@dataclass(frozen=True)
class VariantSpec:
    name: str
    dir_name: str
    image_subdir: str
    labels: str  # "index" (folders 0..999), "all" (1000 wnid folders), "present" (the wnid folders present)
    layout: str


IMAGENET_VARIANTS: dict[str, VariantSpec] = {v.name: v for v in [
    VariantSpec("imagenetv2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "index",
                "imagenetv2/\n  imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg\n  classnames.txt"),
    VariantSpec("imagenet_sketch", "imagenet-sketch", "images", "all",
                "imagenet-sketch/\n  images/<wnid>/*.JPEG   (1000 folders)\n  classnames.txt"),
    VariantSpec("imagenet_a", "imagenet-adversarial", "imagenet-a", "present",
                "imagenet-adversarial/\n  imagenet-a/<wnid>/*.jpg   (200 folders)\n  classnames.txt"),
    VariantSpec("imagenet_r", "imagenet-rendition", "imagenet-r", "present",
                "imagenet-rendition/\n  imagenet-r/<wnid>/*.jpg   (200 folders)\n  classnames.txt"),
]}


def read_imagenet_variant(spec: VariantSpec, root: str | os.PathLike, *,
                          classnames: str | os.PathLike | None = None) -> DatasetSplits:
    """An ImageNet test-only variant (train and val empty).

    Class names come from ImageNet's ``classnames.txt``: the ``classnames`` path if given, else the
    variant folder's copy (as CoOp expects), else ``<root>/imagenet/classnames.txt``. ImageNetV2 and
    ImageNet-Sketch keep the 1000 ImageNet labels (sorted wnids); ImageNet-A and -R keep only their 200
    classes (the wnid folders present), relabelled 0..199 in sorted wnid order.
    """
    layout = spec.layout
    dataset_dir = resolve_dataset_dir(root, spec.dir_name, [spec.image_subdir], spec.name, layout)
    image_dir = dataset_dir / spec.image_subdir
    if not image_dir.is_dir():
        raise DataError(f"{spec.name}: image folder {image_dir} not found. Expected layout:\n{layout}")
    if classnames is not None:
        cn_file = Path(classnames)
    else:
        tried = [dataset_dir / "classnames.txt", dataset_dir.parent / "imagenet" / "classnames.txt"]
        if Path(root).expanduser().resolve() != dataset_dir.resolve():
            tried.append(Path(os.path.abspath(os.path.expanduser(os.fspath(root)))) / "imagenet" / "classnames.txt")
        found = [p for p in tried if p.is_file()]
        if not found:
            raise DataError(f"{spec.name}: ImageNet's classnames.txt not found (looked in "
                            f"{', '.join(str(p) for p in dict.fromkeys(tried))}); copy it into {dataset_dir} "
                            f"or pass classnames=<path>")
        cn_file = found[0]
    wnid_names = read_classnames_file(cn_file, spec.name)
    all_wnids = sorted(wnid_names)
    folders = list_subdirs(image_dir)
    samples: list[Sample] = []
    if spec.labels == "index":
        bad = [f for f in folders if not (f.isdigit() and int(f) < len(all_wnids))]
        if bad:
            raise DataError(f"{spec.name}: folders in {image_dir} must be class indices 0..{len(all_wnids) - 1}; "
                            f"found {bad[:MAX_NAMED]}")
        wnids = all_wnids
        names = [clean_classname(wnid_names[w]) for w in wnids]
        for folder in sorted(folders, key=int):
            label = int(folder)
            samples += [Sample(p, label, names[label]) for p in list_images(image_dir / folder)]
    else:
        unknown = [f for f in folders if f not in wnid_names]
        if unknown:
            raise DataError(f"{spec.name}: folder(s) {unknown[:MAX_NAMED]} in {image_dir} are not wnids listed "
                            f"in {cn_file}")
        wnids = all_wnids if spec.labels == "all" else sorted(folders)
        names = [clean_classname(wnid_names[w]) for w in wnids]
        label_of = {w: i for i, w in enumerate(wnids)}
        for folder in folders:
            label = label_of[folder]
            samples += [Sample(p, label, names[label]) for p in list_images(image_dir / folder)]
    if not samples:
        raise DataError(f"{spec.name}: no images under {image_dir}")
    why = f"{spec.name} is a test-only dataset (evaluate on it after training on imagenet)"
    return DatasetSplits(name=spec.name, classnames=names, train=[], val=[], test=samples,
                         template=template_for(spec.name),
                         extra={"dataset_dir": str(dataset_dir), "image_dir": str(image_dir), "wnids": wnids,
                                "classnames_file": str(cn_file), "unavailable": {"train": why, "val": why}})
