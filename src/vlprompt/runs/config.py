"""A run's configuration and the one ``resolve`` step every entry point goes through.

The CLI, the Python API, a YAML config file and a grid cell all describe a run by a *request*: a nested dict
with the keys of ``config.yaml`` (``method``, ``backbone``, ``pretrained``, ``seed``, ``data: {...}``,
``method_options: {...}``, ``train: {...}``, ``device``, ``precision``, ``preprocess``, ``image_mean``,
``image_std``, ``image_interpolation``, ``image_resize_mode``, ``cache_dir``, ``tensorboard``) holding only what the
user set. :func:`resolve` turns it into a :class:`RunConfig`:

1. the method's data defaults (zero-shot: no shots), then the user's data fields;
2. the method's preset for that data (the paper's recipe, owned by the method: :meth:`Method.preset`);
3. the user's method options and training fields over the preset;
4. validation of every field (types, ranges, choices) and of combinations that would silently be ignored
   (an option that does not apply to the method, ``views`` with ``online``...), before anything is read or
   written.

``config.yaml`` holds the resolved configuration, and in ``user_set`` the fields the request set with their
values (the others came from the method's recipe or the defaults). Read back as a request (``--config``,
:func:`request_of`), it gives what the user set, plus any field whose value differs from what those derive now
(edited by hand, given over it, or fixed when the method was built): flags given over it derive the recipe again
(``--shots 1`` gets the 1-shot epochs), and the file alone resolves to the very same run. A configuration
without ``user_set`` (written by hand, or by an earlier version) is all user-set. ``results.json`` carries the
configuration with its identity (the part that decides the numbers) and the identity's hash.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from ..data.protocol import SAMPLER_HELP, SAMPLERS
from ..engine.sources import reads_val, uses_cached_features, uses_train_augmentation
from ..engine.trainer import TrainConfig
from ..errors import ConfigError
from ..methods import build_config, method_class
from ..methods.base import added_fields_at_default, check_fields, opt

CONFIG_VERSION = 3
RANDOM_WEIGHTS = ("none", "None", "random", "")


def default_cache_dir() -> str:
    return os.environ.get("VLPROMPT_CACHE", str(Path.home() / ".cache" / "vlprompt" / "features"))


@dataclass
class DataConfig:
    """The data of a run: a dataset reader and its root, and the protocol applied to it."""

    dataset: str = opt(None, "a standard name (see `vlprompt datasets`), folder, csv, or torchvision:<Name>")
    root: str = opt(None, "data root (folder / CSV file / download dir)")
    options: dict = opt(default_factory=dict, help="reader options, e.g. split_file=..., target_column=age")
    shots: int = opt(16, "training images per class (0: all)", min=0)
    classes: str = opt("all", "base-to-new protocol: the first ceil(n/2) sorted labels are base",
                       choices=("all", "base", "new"))
    allow_fewer: bool = opt(False, "take all images of classes with fewer than --shots")
    on_bad_image: str = opt("error", "unreadable images stop the run (error) or are skipped and counted (skip)",
                            choices=("error", "skip"))
    sampler: str = opt("dassl", SAMPLER_HELP, choices=SAMPLERS)
    fewshot_file: Optional[str] = opt(None, "a Dassl few-shot cache (CoOp's split_fewshot/shot_K-seed_S.pkl): train "
                                      "and val are exactly its images, found under --root")
    val_shots: Optional[int] = opt(None, "val images per class (default min(shots, 4), CoOp's protocol; 0: the whole "
                                   "val split, as Tip-Adapter's code)", min=0, since="0.2")
    crop_scale: Optional[list[float]] = opt(None, "area range [min, max] of the train augmentation's random resized "
                                            "crop (default CoOp's 0.08-1; Tip-Adapter's and LP++'s recipes 0.5-1)",
                                            since="0.2")


    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunConfig:
    """A fully resolved run (see the module doc). ``train`` is None for methods that learn nothing by
    gradient (zero-shot, the linear probe); ``seed`` is None when nothing random happens (zero-shot, a linear
    probe on all images)."""

    method: str
    data: DataConfig
    backbone: str = "RN50"
    pretrained: Optional[str] = "openai"
    seed: Optional[int] = 1
    method_options: dict = field(default_factory=dict)
    train: Optional[TrainConfig] = None
    device: Optional[str] = None
    precision: str = "amp"
    preprocess: str = "coop"
    # pixel statistics instead of the weights' own (None: the weights', see vlprompt.backbone.load_backbone)
    image_mean: Optional[list] = None
    image_std: Optional[list] = None
    image_interpolation: Optional[str] = None
    image_resize_mode: Optional[str] = None
    cache_dir: str = field(default_factory=default_cache_dir)
    tensorboard: bool = False
    threads: Optional[int] = None  # CPU threads of torch (None: torch's default); where the numbers come from, not what
    # the fields the request set and their resolved values, by dotted path ({"data.shots": 16, "method": "coop"});
    # None: not recorded (every field counts as the user's)
    user_set: Optional[dict] = None
    # the method options the method itself fixed when it was built (a word init's n_ctx, zero-shot's expanded
    # templates), with the value they had before ({"method_options.templates": ["dataset"]}): not the user's, so
    # a run's config.yaml used as --config derives them again (on another dataset, with another init)
    built_from: Optional[dict] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """A resolved configuration as written to config.yaml (no resolution, no defaults filled)."""
        d = {k: v for k, v in d.items() if k != "version"}
        d["data"] = DataConfig(**d["data"])
        d["train"] = None if d.get("train") is None else TrainConfig(**d["train"])
        return cls(**d)

    def identity(self) -> dict:
        """What decides the numbers: everything but where the cache lives, the device, logging and the fields
        of the training loop that do not change results (checkpoint interval, loader threads, feature batch)."""
        d = self.to_dict()
        for k in ("cache_dir", "device", "tensorboard", "threads", "version", "user_set", "built_from"):
            d.pop(k)
        for k in PIXEL_FIELDS.values():  # unset: the weights' own (the identity of runs made before these fields)
            if d[k] is None:
                d.pop(k)
        # fields added after runs were made (opt(since=...)) are left out at their default: earlier runs keep theirs
        for k in added_fields_at_default(self.data):
            d["data"].pop(k)
        if d["train"] is not None:
            for k in TrainConfig.NOT_IDENTITY:
                d["train"].pop(k)
            for k in added_fields_at_default(self.train):
                d["train"].pop(k)
        for k in _added_at_default(self.method, d["method_options"]):
            d["method_options"].pop(k)
        return d

    def identity_hash(self) -> str:
        return config_hash(self.identity())

    def pixels(self) -> dict:
        """The pixel statistics set for this run (``load_backbone(..., pixels=)``), by open_clip's names."""
        return pixel_overrides(self.to_dict())


def _added_at_default(method: str, options: dict) -> list[str]:
    """Method options added after runs were made (``opt(since=...)``) and at their default in ``options``."""
    try:
        config = method_class(method).config_class(**options)
    except (ConfigError, TypeError):  # options of another version: compared as they are
        return []
    return added_fields_at_default(config)


#: open_clip's name of each pixel statistic -> the field of a run configuration (and its flag, with dashes)
PIXEL_FIELDS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                "resize_mode": "image_resize_mode"}


def pixel_overrides(fields: dict) -> dict:
    """``{mean, std, interpolation, resize_mode}`` of the pixel fields set in ``fields`` (a resolved configuration
    or :func:`resolve_model`'s output)."""
    return {k: fields[f] for k, f in PIXEL_FIELDS.items() if fields.get(f) is not None}


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- resolution ---------------------------------------------------------------------------------------
TOP_KEYS = {f.name for f in dataclasses.fields(RunConfig)} | {"version"}
SECTIONS = ("data", "train", "method_options")  # the request's mappings of fields (data.options is one field)
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")


def _section(request: dict, key: str) -> dict:
    value = request.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a mapping of options, got {value!r}")
    return dict(value)


def _known(where: str, given: dict, cls) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(names)}")


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def check_device(device: Optional[str]) -> Optional[str]:
    """``None``/``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``; a device this machine
    does not have is an error now, not a traceback later."""
    if device in (None, "auto"):
        return None
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"--device {device!r}: use cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("--device mps: MPS is not available on this machine")
    return device


def resolve(request: dict | RunConfig) -> RunConfig:
    """The resolved, validated :class:`RunConfig` of a request (see the module doc). Reads no data and no
    weights; a ConfigError names the first field that is wrong."""
    if isinstance(request, RunConfig):
        request = request_of(request)
    if not isinstance(request, dict):
        raise ConfigError(f"a run request is a mapping of options, got {type(request).__name__}")
    if "user_set" in request:  # a resolved configuration (config.yaml): what its user set
        request = request_of(request)
    request = copy.deepcopy(request)
    request.pop("version", None)
    user_paths = field_paths(request)
    unknown = sorted(set(request) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(TOP_KEYS - {'version'})}")
    if not request.get("method"):
        raise ConfigError("method is required (--method)")
    name = request["method"]
    cls = method_class(name)
    from ..methods import ALIASES
    name = ALIASES.get(name, name)

    # 1. data
    data = resolve_data({**cls.data_defaults(), **_section(request, "data")})

    # 2.-3. preset, then the user's method options and training fields
    preset = cls.preset(data) or {}
    unknown = sorted(set(preset) - {"train", "method_options"})
    if unknown:
        raise ConfigError(f"{name}.preset() returned unknown section(s) {unknown}")
    opts_req = _section(request, "method_options")
    mcfg = build_config(name, {**preset.get("method_options", {}), **opts_req})
    train_req = _section(request, "train")
    _known("train", train_req, TrainConfig)

    train: Optional[TrainConfig] = None
    if cls.trains(mcfg):
        recipe = dict(preset.get("train", {}))
        # how long to train is one choice, in epochs or in steps: the user's replaces the recipe's
        if train_req.get("epochs") is not None or train_req.get("iterations"):
            for k in ("epochs", "iterations"):
                if k not in train_req:
                    recipe.pop(k, None)
        train = TrainConfig(**{**recipe, **train_req}).validate()
        if train.epochs is None and not train.iterations:
            raise ConfigError(f"{name}: train.epochs is not set by the method's preset; give --epochs")
        own_images = not uses_cached_features(cls, mcfg)
        # options that do not apply are refused when given a value other than the one the run will use (a
        # resolved config.yaml, which holds every field, resolves to itself)
        views = None if (own_images or train.online) else (1 if not train.augment else train.views)
        if train_req.get("views") not in (None, views):
            why = ("--online encodes every step" if train.online else f"{name} trains its own image encoder on "
                   f"the images" if own_images else "--no-augment has a single view")
            raise ConfigError(f"--views {train_req['views']} does not apply: {why}")
        train.views = views
        if train.sampling == "pool" and (views or 1) < 2:
            why = ("--online encodes every step" if train.online else f"{name} trains its own image encoder on the "
                   f"images" if own_images else "--no-augment has a single view" if not train.augment else "--views 1")
            raise ConfigError(f"--sampling pool draws batches from all cached views of the images: {why}")
        if train_req.get("online") and own_images:
            raise ConfigError(f"--online does not apply: {name} trains its own image encoder on the images")
        if train.cache_dtype != "float32" and (train.online or own_images):
            why = "--online encodes every step" if train.online else f"{name} trains its own image encoder"
            raise ConfigError(f"--cache-dtype {train.cache_dtype} does not apply: {why} (no cached views)")
    elif train_req:
        raise ConfigError(f"{name} learns nothing by gradient: training option(s) "
                          f"{', '.join('--' + k.replace('_', '-') for k in sorted(train_req))} do not apply")
    cls.check_recipe(mcfg, train)

    # the seed drives few-shot sampling and training; where neither happens it does not apply
    seed_applies = cls.trains(mcfg) or data.shots > 0
    seed = request.get("seed", 1 if seed_applies else None)
    if not seed_applies:
        if request.get("seed") is not None:
            raise ConfigError(f"--seed does not apply to {name} with shots 0 (nothing is sampled or trained)")
        seed = None
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {seed!r}")
    if not cls.needs_training_data(mcfg) and data.shots:
        raise ConfigError(f"{name} uses no training images: --shots must be 0, got {data.shots}")
    if data.shots == 0 and data.allow_fewer:
        raise ConfigError("--allow-fewer applies to few-shot sampling (--shots > 0)")
    if data.shots == 0 and data.sampler != "dassl":
        raise ConfigError(f"--sampler {data.sampler} applies to few-shot sampling (--shots > 0)")
    if data.fewshot_file:
        if data.shots == 0:
            raise ConfigError("--fewshot-file is a few-shot sample: give its number of shots (--shots > 0)")
        for flag, given in ((f"--sampler {data.sampler}", data.sampler != "dassl"),
                            ("--allow-fewer", data.allow_fewer)):
            if given:
                raise ConfigError(f"{flag} does not apply with --fewshot-file: its images (Dassl's sample) are used "
                                  f"as they are")

    model = resolve_model(request)
    if data.val_shots is not None and not reads_val(cls, mcfg, train):
        raise ConfigError(f"--val-shots does not apply: {name} reads no val image here"
                          + (" (--eval-every N evaluates val while training)" if train is not None else ""))
    if data.crop_scale is not None:
        if not uses_train_augmentation(cls, mcfg, train):
            raise ConfigError(f"--crop-scale does not apply: {name} reads no augmented training image here "
                              f"({'--no-augment' if train is not None and not train.augment else 'no training views'})")
        if model["preprocess"] != "coop":
            raise ConfigError("--crop-scale sets the crop of CoOp's train augmentation (--preprocess coop); "
                              "--preprocess model uses open_clip's own pipeline")
    tensorboard = request.get("tensorboard", False)
    if not isinstance(tensorboard, bool):
        raise ConfigError(f"tensorboard must be true or false, got {tensorboard!r}")
    if tensorboard and train is None:
        raise ConfigError(f"--tensorboard logs training epochs; {name} has none")
    cache_dir = request.get("cache_dir") or default_cache_dir()
    threads = request.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1, got {threads!r}")
    cfg = RunConfig(method=name, data=data, seed=seed, method_options=mcfg.to_dict(), train=train,
                    cache_dir=_abs(cache_dir), tensorboard=tensorboard, threads=threads, **model)
    resolved = cfg.to_dict()
    cfg.user_set = {p: _get(resolved, p) for p in user_paths if _get(resolved, p) is not _ABSENT}
    return cfg


def resolve_data(data_req: dict) -> DataConfig:
    """The validated data section of a request (the dataset's root made absolute: it is the dataset's
    identity)."""
    _known("data", data_req, DataConfig)
    data = DataConfig(**data_req)
    for key in ("dataset", "root"):
        if not getattr(data, key):
            raise ConfigError(f"data.{key} is required (--{key})")
    check_fields(data, "data")
    from ..data import get_dataset_info

    get_dataset_info(data.dataset)  # an unknown dataset fails here, naming the known ones
    if data.crop_scale is not None and not (len(data.crop_scale) == 2
                                            and 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1):
        raise ConfigError(f"data.crop_scale (--crop-scale) must be two numbers 0 < min <= max <= 1, got "
                          f"{data.crop_scale!r}")
    if data.val_shots is not None and (data.shots == 0 or data.fewshot_file):
        why = "the val split is used whole with --shots 0" if data.shots == 0 else \
            "--fewshot-file gives the val images"
        raise ConfigError(f"--val-shots {data.val_shots} applies to few-shot sampling: {why}")
    data.root = _abs(data.root)
    if data.fewshot_file:
        data.fewshot_file = _abs(data.fewshot_file)
    return data


def resolve_model(request: dict) -> dict:
    """The validated model fields of a request: backbone, pretrained, device, precision, preprocess and the pixel
    statistics set instead of the weights' (``image_mean``, ``image_std``, ``image_interpolation``,
    ``image_resize_mode``)."""
    backbone = request.get("backbone", "RN50")
    # hf-hub: and local-dir: backbones bring their own weights; plain names default to OpenAI's
    own_weights = isinstance(backbone, str) and backbone.startswith(("hf-hub:", "local-dir:"))
    pretrained = request.get("pretrained", None if own_weights else "openai")
    if pretrained is None or pretrained in RANDOM_WEIGHTS:
        pretrained = None
    elif not isinstance(pretrained, str):
        raise ConfigError(f"--pretrained must be a tag, a file or 'none', got {pretrained!r}")
    elif os.path.exists(os.path.expanduser(pretrained)):
        pretrained = _abs(pretrained)
    if not isinstance(backbone, str) or not backbone:
        raise ConfigError(f"--backbone must be an open_clip model name or a model-config JSON, got {backbone!r}")
    if backbone.endswith(".json") or os.path.isfile(os.path.expanduser(backbone)):
        backbone = _abs(backbone)
    precision = request.get("precision", "amp")
    from ..backbone.model import PRECISIONS

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    preprocess = request.get("preprocess", "coop")
    if preprocess not in ("coop", "model"):
        raise ConfigError(f"--preprocess must be coop or model, got {preprocess!r}")
    from ..backbone import check_pixels
    from ..errors import BackboneError

    try:
        pixels = check_pixels({k: request.get(f) for k, f in PIXEL_FIELDS.items()})
    except BackboneError as e:
        raise ConfigError(str(e)) from e
    if "resize_mode" in pixels and preprocess == "coop":
        raise ConfigError(f"--image-resize-mode {pixels['resize_mode']} does not apply to --preprocess coop (CoOp's "
                          f"policy resizes the short side and crops the center); use it with --preprocess model")
    return {"backbone": backbone, "pretrained": pretrained, "device": check_device(request.get("device")),
            "precision": precision, "preprocess": preprocess,
            **{f: pixels.get(k) for k, f in PIXEL_FIELDS.items()}}


def field_paths(d: dict) -> list[str]:
    """The fields of a request or configuration as dotted paths (``method``, ``data.shots``, ``train.epochs``);
    a section's value that is not a mapping (``train: null``) is one field."""
    out = []
    for key, value in d.items():
        if key in ("version", "user_set", "built_from"):
            continue
        if key in SECTIONS and isinstance(value, dict):
            out += [f"{key}.{k}" for k in value]
        else:
            out.append(key)
    return sorted(out)


_ABSENT = object()


def _get(d: dict, path: str):
    key, _, sub = path.partition(".")
    value = d.get(key, _ABSENT)
    if sub:
        return value.get(sub, _ABSENT) if isinstance(value, dict) else _ABSENT
    return value


def _put(d: dict, path: str, value) -> None:
    key, _, sub = path.partition(".")
    if sub:
        d.setdefault(key, {})[sub] = copy.deepcopy(value)
    else:
        d[key] = copy.deepcopy(value)


def request_of(cfg: RunConfig | dict) -> dict:
    """The request a configuration stands for (a RunConfig, or a config.yaml mapping, possibly with other values
    merged over it): the fields its ``user_set`` records, plus every field whose value differs from what those
    derive now (a value edited by hand or given over it, one the method fixed when it was built, a recipe since
    changed). It resolves to the same configuration, and flags merged over it derive the recipe again. Without
    ``user_set`` (a hand-written file, an earlier version's config.yaml) every field is the user's."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else copy.deepcopy(cfg)
    d.pop("version", None)
    user_set = d.pop("user_set", None)
    built_from = d.pop("built_from", None) or {}
    for key in ("train", "seed"):  # null where it does not apply
        if key in d and d[key] is None:
            d.pop(key)
    if user_set is None:
        return d
    if not isinstance(user_set, dict) or not all(isinstance(p, str) for p in user_set):
        raise ConfigError(f"user_set must map the fields the user set (data.shots, train.epochs...) to their values, "
                          f"got {user_set!r}")
    request: dict = {}
    for path, value in user_set.items():
        _put(request, path, value)
    # what the user's fields derive here and now (the device aside: the only field checked against this machine)
    derived = resolve({k: v for k, v in request.items() if k != "device"}).to_dict()
    derived["device"] = request.get("device")
    for path in field_paths(d):
        # a value the method fixed when it was built is compared (and kept) as it was before the build
        value = built_from[path] if path in built_from and path not in user_set else _get(d, path)
        if _get(derived, path) != value:
            _put(request, path, value)
    return request


def merge_requests(base: dict, override: dict) -> dict:
    """``override`` over ``base``, section by section (``data``, ``train``, ``method_options`` merge key by key;
    ``data.options`` too)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_requests(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    """A YAML file holding a mapping (a run config, a grid spec); ``what`` names it in errors (``--config``)."""
    import yaml

    p = Path(path).expanduser()
    try:
        obj = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {p}: no such file") from e
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{what} {p}: not a readable YAML file ({e})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{what} {p}: expected a mapping of options at the top level")
    return obj


def load_request(path: str | os.PathLike) -> dict:
    """A request from a YAML file with the keys of config.yaml (e.g. a run's own config.yaml: what its user set,
    see :func:`request_of`)."""
    obj = read_yaml_mapping(path, "--config")
    try:
        return request_of(obj)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from e


def origins(cfg: RunConfig) -> Optional[dict]:
    """Where each field's value came from (dotted path -> ``user`` | ``recipe`` | ``default``): the request, the
    method's preset for these data (and its data defaults), or the defaults; None when ``cfg`` does not record
    what the user set."""
    if cfg.user_set is None:
        return None
    cls = method_class(cfg.method)
    preset = cls.preset(cfg.data) or {}
    recipe = {f"data.{k}" for k in cls.data_defaults()}
    recipe |= {f"{section}.{k}" for section in ("train", "method_options") for k in (preset.get(section) or {})}
    return {path: "user" if path in cfg.user_set else "recipe" if path in recipe else "default"
            for path in field_paths(cfg.to_dict())}


def dump_config(cfg: RunConfig, annotate: bool = False) -> str:
    """config.yaml's text; ``annotate``: each field followed by a comment saying where its value came from
    (:func:`origins`; the same YAML once loaded)."""
    import yaml

    def dump(key, value, indent: str, origin: Optional[str]) -> list[str]:
        lines = yaml.safe_dump({key: value}, sort_keys=False, width=float("inf")).splitlines()
        lines = [indent + line for line in lines]
        if origin is None:
            return lines
        if len(lines) == 1 or lines[0].endswith(":"):  # a scalar, or a block mapping / sequence that follows
            return [f"{lines[0]}  # {origin}", *lines[1:]]
        return [f"{indent}# {origin}", *lines]  # a scalar over several lines

    d = cfg.to_dict()
    where = origins(cfg) if annotate else None
    header = ("# a vlprompt run configuration; user_set: the values set by the user. Used as --config, this file "
              "keeps\n# those; flags given over it derive the others again (the method's recipe, the defaults)\n")
    if where is None:
        return (header if cfg.user_set is not None else "") + yaml.safe_dump(d, sort_keys=False)
    out = [f"# where each value comes from: user = set by you (flags, --config, request); recipe = {cfg.method}'s "
           f"preset for these\n# data (the paper's recipe); default = vlprompt's default. Used as --config, your "
           f"values (user_set) are kept\n# and flags given over it derive the others again"]
    for key, value in d.items():
        if key in SECTIONS and isinstance(value, dict) and value:
            out.append(f"{key}:")
            for sub, v in value.items():
                out += dump(sub, v, "  ", where.get(f"{key}.{sub}"))
        else:
            out += dump(key, value, "", where.get(key))
    return "\n".join(out) + "\n"


def as_dict(obj: Any) -> Any:
    return asdict(obj) if dataclasses.is_dataclass(obj) else obj


def upgrade_request(old: dict) -> dict:
    """The request of a configuration written by an earlier version of vlprompt, in today's keys: the layout
    of the first release (``data.seed`` / ``train.seed``, the baselines' ``templates`` / ``probe`` /
    ``batch_size`` / ``resolved`` sections, ``linear_probe``), and fields added since with the value those
    versions used (``data.sampler``: ``sorted``, the rule they sampled with). Used to recognise, and resume on
    its own images, a run directory an earlier version wrote."""
    d = copy.deepcopy(old)
    d.pop("version", None)
    d.pop("user_set", None)  # the run's identity is its every field
    d.pop("built_from", None)
    data = dict(d.get("data") or {})
    train = d.get("train")
    train = dict(train) if isinstance(train, dict) else None
    if "seed" in data:  # the first layout: the seed in data and in train
        seed = data.pop("seed")
        if train is not None:
            train.pop("seed", None)
        d.setdefault("seed", seed)
    if d.get("method") == "linear_probe":
        d["method"] = "linear-probe"
    opts = dict(d.get("method_options") or {})
    if "templates" in d:
        opts.setdefault("templates", d.pop("templates"))
    if isinstance(d.get("probe"), dict):
        opts.update(d.pop("probe"))
    for key in ("resolved", "batch_size"):
        d.pop(key, None)
    if opts:
        d["method_options"] = opts
    data.setdefault("sampler", "sorted")
    d["data"] = data
    if train is not None:
        if train.get("online") or not train.get("augment", True):
            train.pop("views", None)  # recorded then, meaningless (and refused) now
        d["train"] = train
    else:
        d.pop("train", None)
    if d.get("seed") is None:
        d.pop("seed", None)
    return d


def with_built_options(cfg: RunConfig, method) -> RunConfig:
    """``cfg`` recording the method options as the built method fixed them (what was actually used: e.g. the
    number of context vectors a word init gives), and in ``built_from`` what they were before (so that they stay
    derived, not the user's, when the run's config.yaml is used again)."""
    built = method.config.to_dict()
    changed = {f"method_options.{k}": cfg.method_options.get(k) for k in built if built[k] != cfg.method_options.get(k)}
    return dataclasses.replace(cfg, method_options=built, built_from=changed or None)
