"""CoOp's image transforms (CLIP's preprocessing) and a stable id of a transform for cache keys.

- train: ``RandomResizedCrop(size, scale=(0.08, 1.0), bicubic)`` + ``RandomHorizontalFlip`` +
  ``ToTensor`` + ``Normalize(CLIP mean, std)`` (CoOp's ``random_resized_crop, random_flip, normalize``);
- test: ``Resize(size, bicubic)`` of the short side + ``CenterCrop(size)`` + ``ToTensor`` + ``Normalize``.

Both take an RGB ``PIL.Image`` (see :func:`vlprompt.data.images.load_image`) and return a float tensor
of shape ``(3, size, size)``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import types
from typing import Any, Callable, Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


def _interpolation(name: str | InterpolationMode) -> InterpolationMode:
    if isinstance(name, InterpolationMode):
        return name
    try:
        return _INTERPOLATIONS[str(name).lower()]
    except KeyError:
        raise DataError(f"unknown interpolation {name!r}: use one of {', '.join(_INTERPOLATIONS)}") from None


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def build_train_transform(image_size: int = 224, *, scale: tuple[float, float] = (0.08, 1.0),
                          hflip: float = 0.5, interpolation: str | InterpolationMode = "bicubic",
                          mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> T.Compose:
    """CoOp's training augmentation: random resized crop (scale 0.08-1, bicubic), horizontal flip,
    CLIP normalisation. PIL RGB image -> ``(3, image_size, image_size)`` float tensor."""
    size = _check_size(image_size)
    steps: list[Callable] = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=_interpolation(interpolation))]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(p=hflip))
    steps += [T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]
    return T.Compose(steps)


def build_test_transform(image_size: int = 224, *, interpolation: str | InterpolationMode = "bicubic",
                         mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> T.Compose:
    """CoOp's / CLIP's test transform: resize the short side to ``image_size`` (bicubic), center crop,
    CLIP normalisation. PIL RGB image -> ``(3, image_size, image_size)`` float tensor."""
    size = _check_size(image_size)
    return T.Compose([
        T.Resize(size, interpolation=_interpolation(interpolation)),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean=tuple(mean), std=tuple(std)),
    ])


def build_transform(train: bool, image_size: int = 224, **kwargs: Any) -> T.Compose:
    """``build_train_transform`` when ``train`` else ``build_test_transform``."""
    return build_train_transform(image_size, **kwargs) if train else build_test_transform(image_size, **kwargs)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SKIP_ATTRS = {"training"}


def describe_transform(transform: Any) -> Any:
    """A JSON-able description of a transform: its class and every public attribute, recursively
    through ``Compose``-like containers (``.transforms``). Raises DataError when a part has no stable
    description (e.g. a lambda or an object whose repr carries a memory address)."""
    return _describe(transform, depth=0)


def _describe(obj: Any, depth: int) -> Any:
    if depth > 20:
        raise DataError("transform nests too deeply to describe")
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)  # full precision, stable
    if isinstance(obj, InterpolationMode):
        return f"InterpolationMode.{obj.name}"
    if isinstance(obj, (list, tuple)):
        return [_describe(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    cls = type(obj)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if hasattr(obj, "tolist") and callable(obj.tolist):  # tensors, numpy arrays
        return {"type": name, "value": _describe(obj.tolist(), depth + 1)}
    if isinstance(obj, functools.partial):
        return {"type": name, "func": _describe(obj.func, depth + 1), "args": _describe(list(obj.args), depth + 1),
                "kwargs": _describe(dict(obj.keywords), depth + 1)}
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        qualname = getattr(obj, "__qualname__", "")
        if "<lambda>" in qualname or "<locals>" in qualname:
            raise DataError(f"transform part {obj!r} has no stable description: use a module-level function "
                            f"or a transform class with its parameters as attributes, not a lambda or closure")
        return {"function": f"{getattr(obj, '__module__', '')}.{qualname}"}
    attrs = getattr(obj, "__dict__", None)
    if attrs is None:
        text = repr(obj)
        if _ADDRESS.search(text):
            raise DataError(f"transform part {text} has no stable description (its repr holds a memory address)")
        return {"type": name, "repr": text}
    fields = {k: v for k, v in attrs.items() if not k.startswith("_") and k not in _SKIP_ATTRS}
    return {"type": name, "attrs": _describe(fields, depth + 1)}


def transform_id(transform: Any) -> str:
    """A stable short id of a transform (cache key): a hash of :func:`describe_transform`. It changes
    when any parameter changes (size, scale, ratio, interpolation, antialias, mean, std, order)."""
    text = json.dumps(describe_transform(transform), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
