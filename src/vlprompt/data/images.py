"""Robust image loading, a start-of-run check of image files, and the torch Dataset over samples.

Every image becomes 8-bit RGB whatever its mode (L, P with transparency, CMYK, 16-bit, alpha), with
its EXIF orientation applied. A missing, unreadable or truncated file raises :class:`DataError` naming
the file: pixels are decoded eagerly and PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (True is
refused), so a cut-off JPEG fails here instead of silently coming out grey at the bottom.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Literal, Optional, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import DataError
from ._util import MAX_NAMED
from .base import Sample

# Composite colour for transparent pixels (CLIP's preprocessing has no alpha; white is what a viewer shows).
BACKGROUND = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open ``path`` and return a fully decoded 8-bit RGB ``PIL.Image``.

    Grayscale, palette (transparency included), CMYK, 16/32-bit integer and float images are
    converted; alpha is composited on white; the EXIF orientation is applied. Raises DataError
    naming the file when it is missing, not an image, truncated or otherwise undecodable.
    """
    path = os.fspath(path)
    try:
        return _decode_rgb(path)
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot use image {path}: {_reason(e)}") from e


# What PIL raises for a missing, foreign, cut-off or corrupted file (truncation is OSError("image file is
# truncated ..."), bad data OSError/SyntaxError); anything else is a bug and propagates as itself.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError, Image.DecompressionBombError)


def _decode_rgb(path: str) -> Image.Image:
    """``path`` decoded to RGB; raises PIL's own exceptions (see :data:`_DECODE_ERRORS`)."""
    _refuse_truncated_loading()
    with Image.open(path) as img:
        img.load()
        img = _exif_transpose(img)
        rgb = to_rgb(img)
        rgb.load()
        return rgb


def _refuse_truncated_loading() -> None:
    # With this switch PIL pads a cut-off file with grey instead of failing: a wrong image that trains and
    # evaluates without a sign. It is process-wide, so some other code set it; we refuse rather than warn.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in this process): "
                        "truncated images would be silently padded; set it back to False")


def _reason(e: BaseException) -> str:
    """One line saying why a file cannot be used (without its path)."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(e, UnidentifiedImageError):
        return "not a readable image (unknown or corrupted format)"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large to decode safely ({e})"
    return f"cannot decode: {e}"


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block must not make a good image unusable
        return img
    return img if out is None else out


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, high bit depths scaled down)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        if "transparency" in img.info:
            img = img.convert("RGBA")
            mode = "RGBA"
        else:
            return img.convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(img)
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, LAB, HSV


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        gray = (arr.astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit -> top 8 bits
    elif img.mode == "I":
        a = arr.astype(np.int64)
        hi = int(a.max()) if a.size else 0
        lo = int(a.min()) if a.size else 0
        if lo >= 0 and hi <= 255:
            gray = a.astype(np.uint8)
        elif lo >= 0 and hi <= 65535:  # 16-bit data stored as 32-bit (PIL opens 16-bit PNGs as "I")
            gray = (a >> 8).astype(np.uint8)
        else:
            gray = _rescale(a.astype(np.float64))
    else:  # "F"
        a = arr.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            gray = np.round(a * 255.0).astype(np.uint8)
        else:
            gray = _rescale(a)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _rescale(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def verify_image(path: str | os.PathLike, decode: bool = True) -> Optional[str]:
    """None when ``path`` is a usable image, else the reason it is not (one line, without the path).

    ``decode=True`` decodes it exactly as :func:`load_image` does, so a file passes if and only if the loader
    will accept it (a truncated JPEG has a valid header and fails only here). ``decode=False`` checks the
    header only (``Image.open(...).verify()``: missing files, non-images, corrupted PNG chunks).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return "file not found"
    if os.path.isdir(path):
        return "is a folder, not a file"
    try:
        if decode:
            _decode_rgb(path)
        else:
            with Image.open(path) as img:
                img.verify()
    except _DECODE_ERRORS as e:
        return _reason(e)
    return None


def check_samples(samples: Sequence[Sample], mode: Literal["error", "skip"] = "error", *, decode: bool = True,
                  workers: Optional[int] = None, source: str = "dataset"
                  ) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Check that every sample's image exists and decodes, before a run starts rather than hours in.

    Returns ``(ok_samples, problems)`` with ``problems`` a list of ``(path, reason)``, one per bad file. In
    ``"error"`` mode any problem raises DataError naming the first bad files, the decoder's message and how
    many there are; in ``"skip"`` mode the bad samples are left out of ``ok_samples`` and listed in
    ``problems``. Each file is decoded fully (``decode=True``, as :func:`load_image` will): about 0.3-0.8 ms
    per image here, far below the cost of encoding it, and the only way to catch a truncated JPEG up front.
    ``decode=False`` checks headers only. Files are checked on a thread pool (``workers``, default
    ``min(32, 4 * cpu count)``; PIL decodes without holding the GIL).
    """
    _refuse_truncated_loading()
    if mode not in ("error", "skip"):
        raise DataError(f"check_samples: mode must be 'error' or 'skip', got {mode!r}")
    samples = list(samples)
    paths = sorted({s.path for s in samples})
    if workers is None:
        workers = min(32, 4 * (os.cpu_count() or 1))
    workers = max(1, min(workers, len(paths) or 1))
    if workers == 1 or len(paths) < 64:
        reasons = [verify_image(p, decode) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reasons = list(pool.map(lambda p: verify_image(p, decode), paths, chunksize=64))
    bad = {p: r for p, r in zip(paths, reasons) if r is not None}
    problems = [(p, bad[p]) for p in paths if p in bad]
    if problems and mode == "error":
        named = "; ".join(f"{p}: {r}" for p, r in problems[:MAX_NAMED])
        more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
        raise DataError(f"{source}: {len(problems)} of {len(paths)} image file(s) cannot be used: {named}{more}")
    ok = [s for s in samples if s.path not in bad]
    return ok, problems


class ImageDataset(Dataset):
    """A map-style torch Dataset over samples: ``dataset[i] == (transform(image), label, i)``.

    ``transform`` maps an RGB ``PIL.Image`` to a tensor (see :mod:`vlprompt.data.transforms`); with
    ``None`` the PIL image itself is returned. Images are read with :func:`load_image`, so a bad file
    raises DataError naming it.
    """

    def __init__(self, samples: Sequence[Sample], transform: Optional[Callable] = None,
                 loader: Callable[[str], Image.Image] = load_image) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = self.loader(sample.path)
        if self.transform is not None:
            image = self.transform(image)
        return image, sample.label, index

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

