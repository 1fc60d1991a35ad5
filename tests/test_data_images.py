"""Image loading (every PIL mode to RGB, EXIF orientation, bad files), the start-of-run check,
ImageDataset and the CoOp transforms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vlprompt.data import (CLIP_MEAN, CLIP_STD, ImageDataset, Sample, build_test_transform, build_train_transform,
                           check_samples, describe_transform, load_image, transform_id, verify_image)
from vlprompt.errors import DataError


def _info(path) -> tuple[str, tuple[int, int]]:
    """(mode, size) of an image file, closing it."""
    with Image.open(path) as im:
        return im.mode, im.size


def _rgb(path: Path) -> np.ndarray:
    img = load_image(path)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_grayscale_becomes_rgb_with_equal_channels(tmp_path):
    p = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L").save(p)
    arr = _rgb(p)
    assert arr.shape == (2, 2, 3)
    assert arr[1, 0].tolist() == [200, 200, 200] and arr[0, 1].tolist() == [100, 100, 100]


def test_palette_with_transparency_composites_on_white(tmp_path):
    p = tmp_path / "p.png"
    img = Image.new("P", (4, 2), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.putpixel((0, 0), 1)  # blue, opaque
    img.info["transparency"] = 0  # red index is transparent
    img.save(p, transparency=0)
    assert _info(p)[0] == "P"
    arr = _rgb(p)
    assert arr[0, 0].tolist() == [0, 0, 255]
    assert arr[1, 1].tolist() == [255, 255, 255]  # transparent red -> white background, not red


def test_palette_without_transparency(tmp_path):
    p = tmp_path / "p2.gif"
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    img.save(p)
    assert _rgb(p)[1, 1].tolist() == [10, 200, 30]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    assert _info(p)[0] == "CMYK"
    r, g, b = _rgb(p)[8, 8].tolist()
    assert r > 200 and g < 60 and b < 60


def test_16bit_grayscale_scaled_not_clipped(tmp_path):
    p = tmp_path / "i16.png"
    data = np.array([[0, 32768], [65535, 4096]], dtype=np.uint16)
    Image.fromarray(data).save(p)
    mode = _info(p)[0]
    assert mode in ("I;16", "I")
    arr = _rgb(p)
    # 16-bit values map to their top 8 bits: a plain convert("L") would clip 32768 to 255.
    assert arr[0, 1, 0] == 128 and arr[1, 0, 0] == 255 and arr[1, 1, 0] == 16 and arr[0, 0, 0] == 0


def test_32bit_int_image(tmp_path):
    p = tmp_path / "i.tif"
    Image.fromarray(np.array([[0, 1000], [70000, 140000]], dtype=np.int32), mode="I").save(p)
    assert _info(p)[0] == "I"
    arr = _rgb(p)
    assert arr[0, 0, 0] == 0 and arr[1, 1, 0] == 255  # out of 16-bit range: rescaled min..max


def test_rgba_and_la_alpha_on_white(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(np.array([[[255, 0, 0, 0], [0, 255, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA").save(p)
    arr = _rgb(p)
    assert arr[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert arr[0, 1].tolist() == [0, 255, 0]
    assert 120 <= arr[0, 2, 0] <= 135  # half-transparent black over white -> mid grey
    q = tmp_path / "la.png"
    Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), "LA").save(q)
    arr = _rgb(q)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 1].tolist() == [50, 50, 50]


def test_exif_orientation_is_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(p, exif=exif.tobytes(), quality=95)
    assert _info(p)[1] == (40, 20)
    out = load_image(p)
    assert out.size == (20, 40)  # width and height transposed
    arr = np.asarray(out)
    assert arr[2, 10, 2] > 200 and arr[2, 10, 0] < 60  # the left strip is now at the top


def test_missing_file_names_it(tmp_path):
    p = tmp_path / "nope.jpg"
    with pytest.raises(DataError, match="nope.jpg"):
        load_image(p)


def test_not_an_image_names_it(tmp_path):
    p = tmp_path / "fake.jpg"
    p.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(DataError, match="fake.jpg"):
        load_image(p)


def _big_jpeg(path: Path) -> bytes:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


def test_truncated_jpeg_is_an_error_not_grey_pixels(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    good = tmp_path / "good.jpg"
    data = _big_jpeg(good)
    assert load_image(good).size == (128, 96)
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(bad)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_an_error(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / "cut.png"
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match="cut.png"):
        load_image(bad)


def test_check_samples_error_and_skip_modes(tmp_path):
    good = tmp_path / "good.jpg"
    data = _big_jpeg(good)
    png = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(png)
    cut_png = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(cut_png)
    cut_png.write_bytes(cut_png.read_bytes()[:300])
    cut_jpg = tmp_path / "cut.jpg"
    cut_jpg.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.jpg"
    junk.write_text("hello")
    samples = [Sample(str(good), 0, "a"), Sample(str(png), 1, "b"), Sample(str(tmp_path / "missing.jpg"), 0, "a"),
               Sample(str(junk), 1, "b"), Sample(str(cut_png), 0, "a"), Sample(str(cut_jpg), 1, "b")]

    with pytest.raises(DataError, match=r"missing\.jpg") as ei:
        check_samples(samples)
    assert "junk.jpg" in str(ei.value)

    ok, problems = check_samples(samples, mode="skip", decode=False)
    bad_paths = {Path(p).name: r for p, r in problems}
    # header-level check only: a truncated JPEG still has a valid header, the others do not
    assert set(bad_paths) == {"missing.jpg", "junk.jpg", "cut.png"}
    assert bad_paths["missing.jpg"] == "file not found"
    assert [Path(s.path).name for s in ok] == ["good.jpg", "ok.png", "cut.jpg"]

    ok, problems = check_samples(samples, mode="skip", workers=4)  # decodes by default
    assert {Path(p).name for p, _ in problems} == {"missing.jpg", "junk.jpg", "cut.png", "cut.jpg"}
    assert [Path(s.path).name for s in ok] == ["good.jpg", "ok.png"]
    assert verify_image(good, decode=True) is None

    with pytest.raises(DataError):
        check_samples(samples, mode="ignore")


def test_check_samples_thread_pool_on_many_files(tmp_path):
    samples = []
    for i in range(80):
        p = tmp_path / f"{i}.png"
        Image.new("L", (4, 4), i).save(p)
        samples.append(Sample(str(p), i % 3, str(i % 3)))
    (tmp_path / "13.png").write_bytes(b"broken")
    ok, problems = check_samples(samples, mode="skip", workers=8)
    assert len(ok) == 79 and [Path(p).name for p, _ in problems] == ["13.png"]


def test_image_dataset_returns_tensor_label_index(tmp_path):
    paths = []
    for i, mode in enumerate(["L", "RGBA", "RGB"]):
        p = tmp_path / f"{i}.png"
        Image.new(mode, (50, 30)).save(p)
        paths.append(p)
    ds = ImageDataset([Sample(str(p), i + 5, "x") for i, p in enumerate(paths)], build_test_transform(32))
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 3
    img, label, index = ds[1]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 6 and index == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    x, y, idx = next(iter(loader))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [5, 6, 7] and idx.tolist() == [0, 1, 2]
    raw = ImageDataset([Sample(str(paths[0]), 0, "x")])[0][0]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB"


def test_test_transform_resizes_short_side_then_center_crops(tmp_path):
    img = Image.new("RGB", (300, 150), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 60, 150))  # black left fifth: cut away by the center crop
    t = build_test_transform(224)
    x = t(img)
    assert x.shape == (3, 224, 224)
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    # resized to 448x224 (short side 224), crop columns 112..335 of 448: the black part (0..89) is gone
    assert torch.allclose(x[:, :, 2], white[:, None].expand(3, 224), atol=1e-4)
    assert torch.allclose(x[:, :, -1], white[:, None].expand(3, 224), atol=1e-4)
    squashed = build_test_transform(224)(img.resize((150, 150)))  # a square input keeps everything
    assert squashed[0, 100, 0] < 0
    assert [type(s).__name__ for s in t.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert t.transforms[0].interpolation.value == "bicubic" and t.transforms[0].size == 224


def test_train_transform_is_coop_augmentation():
    t = build_train_transform(64)
    names = [type(s).__name__ for s in t.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    rrc = t.transforms[0]
    assert rrc.size == (64, 64) and rrc.scale == (0.08, 1.0) and rrc.interpolation.value == "bicubic"
    assert tuple(t.transforms[3].mean) == CLIP_MEAN and tuple(t.transforms[3].std) == CLIP_STD
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 120, 3), dtype=np.uint8))
    a, b = t(img), t(img)
    assert a.shape == (3, 64, 64) and not torch.equal(a, b)  # random crops differ


def test_transform_id_stable_and_sensitive_to_every_parameter():
    base = transform_id(build_train_transform(224))
    assert base == transform_id(build_train_transform(224))
    variants = [
        build_train_transform(336), build_train_transform(224, scale=(0.5, 1.0)),
        build_train_transform(224, interpolation="bilinear"), build_train_transform(224, hflip=0.0),
        build_train_transform(224, mean=(0.5, 0.5, 0.5)), build_test_transform(224),
    ]
    ids = {transform_id(v) for v in variants}
    assert base not in ids and len(ids) == len(variants)
    assert transform_id(build_test_transform(224)) != transform_id(build_test_transform(224, std=(0.2, 0.2, 0.2)))
    desc = describe_transform(build_test_transform(224))
    assert "0.26862954" in str(desc) and "BICUBIC" in str(desc)


def test_transform_id_refuses_lambdas():
    from torchvision import transforms as T

    with pytest.raises(DataError, match="lambda"):
        transform_id(T.Compose([T.Lambda(lambda x: x), T.ToTensor()]))


def test_bad_image_size():
    with pytest.raises(DataError):
        build_test_transform(0)
