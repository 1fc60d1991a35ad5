"""Image transforms that follow the weights' pixel statistics, and a stable id of a transform for cache keys.

:func:`build_transforms` is the one entry point: ``build_transforms(backbone.preprocess_cfg, policy)`` gives the
(train, test) pair for every method and baseline. ``preprocess_cfg`` is what open_clip resolved for the weights
(size, mean, std, interpolation, resize_mode, fill_color: from the pretrained tag, an ``hf-hub:`` or
``local-dir:`` ``open_clip_config.json``, or open_clip's defaults), so SigLIP / MobileCLIP / CLIPA weights get
their own normalisation instead of CLIP's.

Policy ``coop`` (CoOp's geometry with the weights' mean, std and interpolation):

- train: ``RandomResizedCrop(size, scale=(0.08, 1.0), bicubic)`` + ``RandomHorizontalFlip`` +
  ``ToTensor`` + ``Normalize(CLIP mean, std)`` (CoOp's ``random_resized_crop, random_flip, normalize``);
- test: ``Resize(size, bicubic)`` of the short side + ``CenterCrop(size)`` + ``ToTensor`` + ``Normalize``.

Both take an RGB ``PIL.Image`` (see :func:`vlprompt.data.images.load_image`) and return a float tensor
of shape ``(3, size, size)``. With CLIP's own config the test transform is exactly
:func:`build_test_transform` (same :func:`transform_id`, same tensors). The train transform is a
:class:`SeededCompose`: ``train_tf(img, generator=g)`` draws the crop and the flip from ``g`` (the feature
cache passes one generator per (image, view)), ``train_tf(img)`` from torch's global RNG exactly as torchvision
does.

Policy ``model``: open_clip's own ``image_transform_v2(PreprocessCfg(**cfg), is_train=...)`` for train and test
(its train augmentation is open_clip's: RandomResizedCrop scale 0.9-1, no flip; it draws from the global RNG).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import types
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

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
        raise DataError(f"unknown interpolation {name!r}: use one of {', '.join(_INTERPOLATIONS)}")


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


class SeededCompose(T.Compose):
    """A ``Compose`` whose random steps draw from an explicit ``torch.Generator``.

    ``tf(img, generator=g)`` draws every random parameter from ``g`` (so concurrent callers, each with its own
    generator, cannot mix up each other's augmentations); ``tf(img)`` draws from torch's global RNG. Either way
    the draws are exactly torchvision's (same calls, same order): ``RandomResizedCrop.get_params``'s rule, then
    ``torch.rand(1) < p`` for the flip. So for a given seed the output equals that of the plain
    ``T.Compose(self.transforms)`` run under the global RNG seeded alike (tested), and the transform is
    described (:func:`transform_id`) as that Compose: caches keyed on the plain Compose stay valid.

    Steps: ``RandomResizedCrop``, ``RandomHorizontalFlip`` and deterministic ones (``Resize``, ``CenterCrop``,
    ``ToTensor``, ``Normalize``); any other step is refused, since its randomness would escape the generator.
    """

    takes_generator = True  # the feature cache passes one generator per (image, view) to such transforms
    describe_as = "torchvision.transforms.transforms.Compose"

    _RANDOM = (T.RandomResizedCrop, T.RandomHorizontalFlip)
    _DETERMINISTIC = (T.Resize, T.CenterCrop, T.ToTensor, T.Normalize)

    def __init__(self, transforms: Sequence[Callable]):
        for step in transforms:
            if type(step) not in self._RANDOM + self._DETERMINISTIC:
                raise DataError(f"SeededCompose supports RandomResizedCrop, RandomHorizontalFlip, Resize, "
                                f"CenterCrop, ToTensor and Normalize steps, got {type(step).__name__}")
        super().__init__(list(transforms))

    def __call__(self, img, generator: Optional[torch.Generator] = None):
        for step in self.transforms:
            if type(step) is T.RandomResizedCrop:
                i, j, h, w = random_resized_crop_params(img, step.scale, step.ratio, generator)
                img = TF.resized_crop(img, i, j, h, w, step.size, step.interpolation, antialias=step.antialias)
            elif type(step) is T.RandomHorizontalFlip:
                if torch.rand(1, generator=generator) < step.p:
                    img = TF.hflip(img)
            else:
                img = step(img)
        return img


def random_resized_crop_params(img, scale: Sequence[float], ratio: Sequence[float],
                               generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """``T.RandomResizedCrop.get_params(img, scale, ratio)`` with its draws taken from ``generator`` (torch's
    global RNG when None): the same rule, the same calls in the same order, so a generator seeded with ``s``
    gives the crop the global RNG seeded with ``s`` gives. Returns ``(top, left, height, width)``."""
    _, height, width = TF.get_dimensions(img)
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    # fallback to a central crop, as torchvision does
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
POLICIES = ("coop", "model")


def check_preprocess_cfg(preprocess_cfg: Mapping[str, Any]) -> dict:
    """A validated, JSON-able copy of an open_clip preprocess config (the fields of ``open_clip.PreprocessCfg``).

    ``size``, ``mean`` and ``std`` are required (a default there would silently feed other weights CLIP's
    statistics); ``mode``, ``interpolation``, ``resize_mode`` and ``fill_color`` default as in open_clip.
    Unknown keys are refused. Tuples become lists."""
    if not isinstance(preprocess_cfg, Mapping):
        raise DataError(f"preprocess_cfg must be a dict, got {type(preprocess_cfg).__name__}")
    unknown = sorted(set(preprocess_cfg) - set(PREPROCESS_KEYS))
    if unknown:
        raise DataError(f"preprocess_cfg: unknown key(s) {', '.join(map(str, unknown))} "
                        f"(open_clip's are {', '.join(PREPROCESS_KEYS)})")
    missing = [k for k in ("size", "mean", "std") if k not in preprocess_cfg]
    if missing:
        raise DataError(f"preprocess_cfg: missing {', '.join(missing)} (take it from the weights: "
                        f"backbone.preprocess_cfg)")
    cfg = {"mode": "RGB", "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
           **dict(preprocess_cfg)}
    size = cfg["size"]
    if isinstance(size, (list, tuple)):
        size = list(size)
        if len(size) == 1:
            size = size[0]
    sizes = size if isinstance(size, list) else [size]
    if len(sizes) != 2 and isinstance(size, list) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise DataError(f"preprocess_cfg: size must be a positive integer or [height, width], got {cfg['size']!r}")
    cfg["size"] = size
    for key in ("mean", "std"):
        v = cfg[key]
        v = list(v) if isinstance(v, (list, tuple)) else [v] * 3
        if len(v) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v):
            raise DataError(f"preprocess_cfg: {key} must be 3 numbers, got {cfg[key]!r}")
        cfg[key] = [float(x) for x in v]
    if any(x <= 0 for x in cfg["std"]):
        raise DataError(f"preprocess_cfg: std must be positive, got {cfg['std']!r}")
    if cfg["mode"] != "RGB":
        raise DataError(f"preprocess_cfg: mode must be 'RGB' (open_clip supports only RGB), got {cfg['mode']!r}")
    if cfg["interpolation"] not in ("bicubic", "bilinear", "random"):
        raise DataError(f"preprocess_cfg: interpolation must be bicubic, bilinear or random, "
                        f"got {cfg['interpolation']!r}")
    if cfg["resize_mode"] not in ("shortest", "longest", "squash"):
        raise DataError(f"preprocess_cfg: resize_mode must be shortest, longest or squash, "
                        f"got {cfg['resize_mode']!r}")
    if isinstance(cfg["fill_color"], bool) or not isinstance(cfg["fill_color"], int):
        raise DataError(f"preprocess_cfg: fill_color must be an integer, got {cfg['fill_color']!r}")
    return {k: cfg[k] for k in PREPROCESS_KEYS}


def build_transforms(preprocess_cfg: Mapping[str, Any], policy: str = "coop",
                     crop_scale: Optional[Sequence[float]] = None) -> tuple[Callable, Callable]:
    """The (train, test) transforms for weights whose open_clip preprocess config is ``preprocess_cfg``
    (``backbone.preprocess_cfg``). PIL RGB image -> ``(3, H, W)`` float tensor.

    ``policy="coop"``: CoOp's RandomResizedCrop(size, scale 0.08-1) + horizontal flip for train (a
    :class:`SeededCompose`: pass ``generator=`` for reproducible views), resize of the short side + center crop
    for test, with the weights' mean, std and interpolation (``random`` interpolation is bicubic, as open_clip
    does at inference). CoOp's geometry is the policy, so ``resize_mode`` and ``fill_color`` do not apply; the
    size must be square. ``crop_scale`` (min, max): the area range of the train crop instead of CoOp's (0.08, 1)
    (Tip-Adapter's recipe: (0.5, 1)); the transform's id (:func:`transform_id`), hence its cached views, follows it.
    ``policy="model"``: open_clip's ``image_transform_v2`` with ``is_train`` True / False.
    """
    cfg = check_preprocess_cfg(preprocess_cfg)
    if crop_scale is not None:
        crop_scale = tuple(float(x) for x in crop_scale)
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise DataError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {crop_scale!r}")
        if policy == "model":
            raise DataError("crop_scale sets the crop of CoOp's train augmentation (policy coop); policy model uses "
                            "open_clip's own pipeline")
    if policy == "model":
        from open_clip.transform import PreprocessCfg, image_transform_v2

        pp = PreprocessCfg(**{**cfg, "size": tuple(cfg["size"]) if isinstance(cfg["size"], list) else cfg["size"]})
        return image_transform_v2(pp, is_train=True), image_transform_v2(pp, is_train=False)
    if policy != "coop":
        raise DataError(f"preprocess policy must be one of {', '.join(POLICIES)} (--preprocess), got {policy!r}")
    size = cfg["size"]
    if isinstance(size, list):
        if size[0] != size[1]:
            raise DataError(f"--preprocess coop makes square crops; these weights expect {size[0]}x{size[1]} "
                            f"images: use --preprocess model")
        size = size[0]
    interpolation = "bilinear" if cfg["interpolation"] == "bilinear" else "bicubic"
    kw = dict(interpolation=interpolation, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    train = SeededCompose(build_train_transform(size, scale=crop_scale or (0.08, 1.0), **kw).transforms)
    return train, build_test_transform(size, **kw)


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
    # a class that behaves exactly as another (SeededCompose as Compose) may say so, to share its cache keys
    name = getattr(cls, "describe_as", None) or f"{cls.__module__}.{cls.__qualname__}"
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
