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

``config.yaml`` holds the resolved configuration; ``results.json`` carries it with its identity (the part that
decides the numbers) and the identity's hash.
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
from typing import Any, Optional

from ..data.protocol import SAMPLER_HELP, SAMPLERS
from ..engine.sources import uses_cached_features
from ..engine.trainer import TrainConfig
from ..errors import ConfigError
from ..methods import build_config, method_class
from ..methods.base import check_fields, opt

CONFIG_VERSION = 2
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
        for k in ("cache_dir", "device", "tensorboard", "threads", "version"):
            d.pop(k)
        for k in PIXEL_FIELDS.values():  # unset: the weights' own (the identity of runs made before these fields)
            if d[k] is None:
                d.pop(k)
        if d["train"] is not None:
            for k in TrainConfig.NOT_IDENTITY:
                d["train"].pop(k)
            for k, default in TrainConfig.IDENTITY_UNLESS_SET.items():
                if d["train"][k] == default:
                    d["train"].pop(k)
        return d

    def identity_hash(self) -> str:
        return config_hash(self.identity())

    def pixels(self) -> dict:
        """The pixel statistics set for this run (``load_backbone(..., pixels=)``), by open_clip's names."""
        return pixel_overrides(self.to_dict())


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
    request = copy.deepcopy(request)
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
        train = TrainConfig(**{**preset.get("train", {}), **train_req}).validate()
        if train.epochs is None:
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
    tensorboard = request.get("tensorboard", False)
    if not isinstance(tensorboard, bool):
        raise ConfigError(f"tensorboard must be true or false, got {tensorboard!r}")
    if tensorboard and train is None:
        raise ConfigError(f"--tensorboard logs training epochs; {name} has none")
    cache_dir = request.get("cache_dir") or default_cache_dir()
    threads = request.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1, got {threads!r}")
    return RunConfig(method=name, data=data, seed=seed, method_options=mcfg.to_dict(), train=train,
                     cache_dir=_abs(cache_dir), tensorboard=tensorboard, threads=threads, **model)


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
    if precision not in ("amp", "fp32"):
        raise ConfigError(f"--precision must be amp or fp32, got {precision!r}")
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


def request_of(cfg: RunConfig) -> dict:
    """The request that resolves to ``cfg`` again (its every field, as config.yaml holds them)."""
    d = cfg.to_dict()
    d.pop("version")
    if d["train"] is None:
        d.pop("train")
    if d["seed"] is None:
        d.pop("seed")
    return d


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
    """A request from a YAML file with the keys of config.yaml (e.g. a run's own config.yaml)."""
    obj = read_yaml_mapping(path, "--config")
    obj.pop("version", None)
    if obj.get("train") is None:
        obj.pop("train", None)
    if obj.get("seed") is None:
        obj.pop("seed", None)
    return obj


def dump_config(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


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
