"""Loading a backbone: ``load_backbone(name, pretrained)`` builds any open_clip model (by name, from a
model-config JSON, or from ``hf-hub:org/name`` / ``local-dir:/path`` as open_clip does), loads its weights (a
pretrained tag, a checkpoint file with diagnostics, OpenAI's format), resolves the pixel statistics, and returns a
:class:`~vlprompt.backbone.model.Backbone`.

Errors are one line naming the flag (``--backbone``, ``--pretrained``, ``--device``); without network a
pretrained tag that is not cached fails in seconds (a short probe, or at once with ``HF_HUB_OFFLINE=1``)
instead of after the hub client's ~50 s of retries.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import BackboneError
from .model import PIXEL_KEYS, Backbone, BackboneSpec, _model_preprocess_cfg, compute_dtype

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = {None, "", "none", "None", "random"}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device for ``--device``: ``None`` / ``auto`` -> CUDA when available, else CPU; ``cpu``,
    ``cuda``, ``cuda:N``, ``mps``. Raises BackboneError naming ``--device`` for a string that is not a device
    (``gpu0``) or a device this machine does not have."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, TypeError, ValueError) as e:
        raise BackboneError(f"--device {device}: not a device (use cpu, cuda, cuda:N, mps or auto)") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError(f"--device {device}: no CUDA GPU is available here (torch.cuda.is_available() is "
                                f"False); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BackboneError(f"--device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise BackboneError(f"--device {device}: MPS is not available here; use --device cpu")
        return dev
    raise BackboneError(f"--device {device}: unsupported device type {dev.type!r} (use cpu, cuda, cuda:N or mps)")


def _register_config(path: Path) -> str:
    """Register a model-config JSON with open_clip; the model name is the file's stem."""
    import open_clip

    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BackboneError(f"model config {path}: not a readable JSON file ({e})") from e
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise BackboneError(f"model config {path}: an open_clip config needs 'embed_dim', 'vision_cfg' and 'text_cfg'")
    open_clip.add_model_config(path)
    return path.stem


PIXEL_FLAGS = {"mean": "--image-mean", "std": "--image-std", "interpolation": "--image-interpolation",
               "resize_mode": "--image-resize-mode"}
_PIXEL_DEFAULTS = {"mean": "OpenAI's CLIP mean", "std": "OpenAI's CLIP std", "interpolation": "bicubic",
                   "resize_mode": "shortest"}  # open_clip's PreprocessCfg()


def tag_pixel_statistics(model_name: str) -> tuple[list[str], dict, dict]:
    """(tags, agreed, differing) of the open_clip pretrained tags of ``model_name`` (metadata only, nothing is
    downloaded): ``agreed`` maps each of :data:`PIXEL_KEYS` on which every tag agrees to that value, ``differing``
    each other key to the distinct values the tags give. MobileCLIP's tags all say mean 0 / std 1 and bilinear,
    SigLIP's 0.5 / 0.5 and squash, CLIPA's ImageNet statistics; ViT-L-14's tags disagree (OpenAI's and 0.5)."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tags = list(list_pretrained_tags_by_model(model_name))
    cfgs = [get_pretrained_cfg(model_name, t) for t in tags]
    agreed, differing = {}, {}
    for key in PIXEL_KEYS:
        values = [c.get(key) for c in cfgs]
        distinct = list(dict.fromkeys(json.dumps(v if not isinstance(v, tuple) else list(v)) for v in values))
        if len(distinct) == 1 and values[0] is not None:
            agreed[key] = list(values[0]) if isinstance(values[0], tuple) else values[0]
        elif distinct:
            differing[key] = [json.loads(v) for v in distinct]
    return tags, agreed, differing


def check_pixels(pixels: Optional[dict]) -> dict:
    """The pixel statistics a caller sets (``{"mean": [r, g, b], "std": [r, g, b], "interpolation": "bicubic" |
    "bilinear", "resize_mode": "shortest" | "longest" | "squash"}``, any subset, None = not set), validated;
    a BackboneError names the flag of a bad value."""
    import math

    out = {}
    for key, value in (pixels or {}).items():
        if key not in PIXEL_KEYS:
            raise BackboneError(f"pixel statistics: unknown key {key!r} (known: {', '.join(PIXEL_KEYS)})")
        if value is None:
            continue
        flag = PIXEL_FLAGS[key]
        if key in ("mean", "std"):
            if (not isinstance(value, (list, tuple)) or len(value) != 3 or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)):
                raise BackboneError(f"{flag} takes 3 numbers (red, green, blue), got {value!r}")
            if key == "std" and any(v <= 0 for v in value):
                raise BackboneError(f"{flag} must be 3 numbers > 0 (each channel is divided by it), got {value!r}")
            value = [float(v) for v in value]
        else:
            choices = ("bicubic", "bilinear") if key == "interpolation" else ("shortest", "longest", "squash")
            if value not in choices:
                raise BackboneError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        out[key] = value
    return out


def _pixel_plan(model_name: str, label: str, schema: Optional[str], tag: Optional[str], weights_file: Optional[str],
                given: dict) -> tuple[dict, str, tuple[str, ...]]:
    """(the pixel statistics to force on open_clip's preprocess config, where the statistics come from (a phrase),
    the keys of those that are open_clip's defaults for a weights file -- which may not be those it was trained
    with)."""
    rest = [k for k in PIXEL_KEYS if k not in given]
    parts = [f"{'/'.join(given)} as given"] if given else []
    forced, fallback = dict(given), ()
    if not rest:
        pass
    elif tag is not None:
        parts.append(f"{'/'.join(rest)} of the pretrained tag {tag!r}")
    elif schema is not None:
        parts.append(f"{'/'.join(rest)} of {label}'s open_clip_config.json (open_clip's defaults where it has none)")
    elif weights_file is None:
        parts.append(f"{'/'.join(rest)}: open_clip's defaults (random weights)")
    else:
        tags, agreed, differing = tag_pixel_statistics(model_name)
        taken = [k for k in rest if k in agreed]
        if taken:
            forced.update({k: agreed[k] for k in taken})
            named = ", ".join(tags[:3]) + (f" and {len(tags) - 3} more" if len(tags) > 3 else "")
            parts.append(f"{'/'.join(taken)} of {model_name}'s pretrained tags, which all agree ({named})")
        left = [k for k in rest if k not in agreed]
        if left:
            fallback = tuple(left)
            why = (f"{model_name}'s pretrained tags disagree: " + "; ".join(
                f"{k} {' / '.join(map(str, differing[k]))}" for k in left if k in differing) if tags else
                   f"{model_name} has no open_clip pretrained tag to take them from")
            defaults = ", ".join(_PIXEL_DEFAULTS[k] for k in left)
            parts.append(f"{'/'.join(left)}: open_clip's defaults ({defaults}; {why}); set "
                         f"{' / '.join(PIXEL_FLAGS[k] for k in left)} if the weights were trained with others")
    return forced, "; ".join(parts), fallback


# ------------------------------------------------------------------------------------------------------------
# fetching weights: fail in seconds when the hub cannot be reached
# ------------------------------------------------------------------------------------------------------------
HUB_PROBE_TIMEOUT_S = 5.0  # one HEAD request, no retries: huggingface_hub itself retries ~23 s per file


def _hub_unreachable(model_id: str, filenames: Sequence[str], cache_dir: Optional[str]) -> Optional[str]:
    """None when one of ``filenames`` of the hub repo ``model_id`` is in the Hugging Face cache or the hub answers
    (any HTTP status: a 404 is open_clip's to report); otherwise why it cannot be fetched (a phrase).

    Without this, an offline machine spends ~50 s in huggingface_hub's retries (1+2+4+8+8 s, for the
    safetensors file and again for the .bin) before open_clip reports the failure."""
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for filename in filenames:
        if isinstance(try_to_load_from_cache(model_id, filename, cache_dir=cache_dir), str):
            return None
    if is_offline_mode():
        return "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
    # a user who set HF's own metadata timeout keeps it; otherwise a few seconds suffice for one HEAD
    timeout = (constants.HF_HUB_ETAG_TIMEOUT if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT
               else HUB_PROBE_TIMEOUT_S)
    try:
        get_hf_file_metadata(hf_hub_url(model_id, filenames[-1]), timeout=timeout)
    except HfHubHTTPError:
        return None
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        return f"{constants.ENDPOINT} is unreachable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def _tag_files(tag_cfg: dict) -> tuple[str, list[str]]:
    """(hub repo, candidate file names, the one open_clip falls back to last) of a pretrained tag."""
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    model_id, filename = os.path.split(tag_cfg["hf_hub"])
    filename = filename or HF_WEIGHTS_NAME
    return model_id, [*_get_safe_alternatives(filename), filename]


def _fetch_hint(model_name: str, filename: str, quick_gelu: bool, model_id: str) -> str:
    import open_clip

    backbone = ""
    if quick_gelu and open_clip.get_model_config(f"{model_name}-quickgelu") is not None:
        backbone = f"--backbone {model_name}-quickgelu "  # a bare file gets no tag metadata: say QuickGELU
    return (f"download it where there is internet (`hf download {model_id} {filename}`) and pass the file: "
            f"{backbone}--pretrained /path/to/{filename}")


# ------------------------------------------------------------------------------------------------------------
# loading a checkpoint file: say what is wrong with it
# ------------------------------------------------------------------------------------------------------------
def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (the format of OpenAI's `clip` package files): a zip holding ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _describe_unreadable(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return "a text file"
    except UnicodeDecodeError:
        pass
    if head.startswith(b"PK"):
        return "a damaged or truncated zip archive"
    return "not a PyTorch or safetensors checkpoint"


def _checkpoint_shapes(path: str) -> dict[str, tuple]:
    """{key: shape} of the state dict in ``path`` (unwrapped as open_clip does); BackboneError naming
    ``--pretrained`` when it is not a readable checkpoint."""
    from safetensors import SafetensorError

    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:  # reads the header only
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if _is_torchscript(path):
            checkpoint = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise BackboneError(f"--pretrained {path}: {_describe_unreadable(path)}, not a loadable checkpoint "
                            f"({type(e).__name__}: {first})") from e
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise BackboneError(f"--pretrained {path}: not a state dict (it holds "
                            f"{'an empty dict' if checkpoint == {} else type(checkpoint).__name__})")
    bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneError(f"--pretrained {path}: not a state dict of tensors ({bad[0]!r} is a "
                            f"{type(checkpoint[bad[0]]).__name__})")
    strip = next(iter(checkpoint)).startswith("module")  # DataParallel prefix, stripped as open_clip does
    return {(k[7:] if strip else k): tuple(v.shape) for k, v in checkpoint.items()}


def _mismatch(model: nn.Module, shapes: dict[str, tuple]) -> str:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    other = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
    parts = []
    if other:
        k = other[0]
        parts.append(f"{len(other)} tensor(s) of other shapes (e.g. {k}: {shapes[k]} in the file, {want[k]} here)")
    if missing:
        parts.append(f"{len(missing)} of the model's {len(want)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unknown to it (e.g. {unexpected[0]})")
    return "; ".join(parts)


OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # in the state dict of OpenAI's archives


def openai_format(path: str, shapes: Optional[dict] = None) -> Optional[str]:
    """How the checkpoint file ``path`` shows that it holds OpenAI's CLIP weights (trained with QuickGELU), or
    None: a TorchScript archive (the files of OpenAI's ``clip`` package), or a state dict with the extra entries
    of OpenAI's (``input_resolution``, ``context_length``, ``vocab_size``). A state dict of OpenAI's CLIP class
    without them has open_clip's keys exactly: nothing tells it apart. ``shapes``: the file's
    :func:`_checkpoint_shapes`, when already read."""
    if _is_torchscript(path):
        return "a TorchScript archive, the format of OpenAI's clip package"
    keys = _checkpoint_shapes(path) if shapes is None else shapes
    extra = [k for k in OPENAI_EXTRA_KEYS if k in keys]
    return f"a state dict with OpenAI's {'/'.join(extra)} entries" if extra else None


def quick_gelu_hint(model_name: str, config_file: Optional[str] = None) -> str:
    """What to pass to load OpenAI weights (QuickGELU) with the architecture ``model_name``."""
    import open_clip

    if model_name.endswith("-quickgelu"):
        return f"--backbone {model_name}"
    if open_clip.get_model_config(f"{model_name}-quickgelu") is not None:
        return f"--backbone {model_name}-quickgelu"
    if config_file is not None:
        return f'"quick_gelu": true in the model config {config_file}'
    return 'a model config with "quick_gelu": true'


def _load_openai_state_dict(model: nn.Module, path: str) -> None:
    """A state dict saved from OpenAI's TorchScript model (its extra entries dropped, as open_clip drops them from
    the archive itself), with open_clip's position-embedding resizing."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if next(iter(state)).startswith("module"):
        state = {k[7:]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def _check_activation(path: str, label: str, *, quick_gelu: bool, model_name: str,
                      config_file: Optional[str]) -> Optional[dict]:
    """The checkpoint file's :func:`_checkpoint_shapes` (None for big_vision files), after refusing OpenAI's weights
    (:func:`openai_format`) for a GELU model: they would load without an error and silently change every number.
    Runs before the model is built."""
    if Path(path).suffix in (".npz", ".npy"):
        return None
    shapes = _checkpoint_shapes(path)
    openai = openai_format(path, shapes)
    if openai and not quick_gelu:
        raise BackboneError(f"--pretrained {path}: OpenAI-format weights ({openai}) were trained with QuickGELU, "
                            f"but {label} uses GELU, which would silently change every number: use "
                            f"{quick_gelu_hint(model_name, config_file)}")
    return shapes


def _load_weights(model: nn.Module, path: str, label: str, shapes: Optional[dict] = None) -> None:
    """Load the checkpoint file ``path`` into ``model`` through open_clip's ``load_checkpoint`` (its format
    conversions included, strict), with a one-line BackboneError naming ``--pretrained`` when it cannot.
    ``shapes``: the file's :func:`_checkpoint_shapes`, when already read."""
    import open_clip

    if Path(path).suffix in (".npz", ".npy"):  # big_vision (SigLIP) weights: open_clip's own converter
        try:
            open_clip.load_checkpoint(model, path)
        except (OSError, EOFError, KeyError, ValueError, RuntimeError) as e:
            raise BackboneError(f"--pretrained {path}: could not load these big_vision weights into {label} "
                                f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        return
    shapes = _checkpoint_shapes(path) if shapes is None else shapes
    openai = openai_format(path, shapes)
    try:
        if openai and not _is_torchscript(path):
            _load_openai_state_dict(model, path)
        else:
            # TorchScript archives (OpenAI's clip files) cannot load with weights_only; torch.load hands them to
            # torch.jit.load, which does not unpickle arbitrary objects
            open_clip.load_checkpoint(model, path, strict=True, weights_only=not _is_torchscript(path))
    except (RuntimeError, KeyError, ValueError) as e:
        own = {k: v for k, v in shapes.items() if not (openai and k in OPENAI_EXTRA_KEYS)}
        why = _mismatch(model, own) or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise BackboneError(f"--pretrained {path}: these weights do not fit {label} ({why}); is it a checkpoint "
                            f"of another architecture?") from e


# ------------------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------------------
def _read_source_config(name: str, path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackboneError(f"--backbone {name}: {path} is not a readable JSON file ({e})") from e
    model_cfg = cfg.get("model_cfg") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise BackboneError(f"--backbone {name}: {path} has no open_clip 'model_cfg' (with 'embed_dim', "
                            f"'vision_cfg' and 'text_cfg')")
    return model_cfg


def load_backbone(name: str, pretrained: Optional[str] = None, device: str | torch.device | None = None, *,
                  precision: str = "amp", quick_gelu: Optional[bool] = None,
                  cache_dir: Optional[str] = None, pixels: Optional[dict] = None) -> Backbone:
    """Build a frozen open_clip model.

    Args:
        name: an open_clip model name (``RN50``, ``ViT-B-16``...), a path to an open_clip model-config JSON, or
            ``hf-hub:org/name`` / ``local-dir:/path``: model config, weights and preprocess config from that
            hub repo / directory (its ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``, and its
            weights file, e.g. ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``).
        pretrained: an open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``...; downloaded and cached as
            open_clip does, with the tag's preprocess config), a local checkpoint file, or ``None`` /
            ``"none"`` for random weights (a loud warning: accuracy is meaningless then). With ``hf-hub:`` /
            ``local-dir:`` names, ``None`` means the source's own weights, a file replaces them, and a tag is
            refused.
        device: ``cpu``, ``cuda``, ``cuda:1``, ``mps``; default: CUDA when available.
        precision: ``amp`` (autocast on GPU; fp32 on CPU), ``fp32``, ``bf16`` or ``auto`` (:data:`PRECISIONS`).
        quick_gelu: force QuickGELU on or off; default: on for OpenAI weights (tags whose open_clip metadata
            says so), as loading them into the plain GELU config silently changes every number. A checkpoint file
            in OpenAI's format (:func:`openai_format`) with a GELU config is refused, naming the ``-quickgelu``
            model, unless ``quick_gelu=False`` says so explicitly.
        pixels: pixel statistics to use instead of the weights' (``mean``, ``std``, ``interpolation``,
            ``resize_mode``, any subset; see :func:`check_pixels`). Otherwise they are a tag's, an ``hf-hub:`` /
            ``local-dir:`` config's, and for a checkpoint file those on which every open_clip pretrained tag of
            the architecture agrees (MobileCLIP: mean 0, std 1, bilinear), else open_clip's defaults (OpenAI's),
            named in ``pixel_fallback``. ``Backbone.pixel_statistics`` says which were used and why.
    """
    import open_clip
    from open_clip.factory import _find_checkpoint_in_dir, parse_model_name
    from open_clip.pretrained import download_pretrained_from_hf, get_pretrained_cfg, list_pretrained_tags_by_model

    dev = resolve_device(device)
    given_pixels = check_pixels(pixels)
    compute_dtype(precision, dev)  # refused now, before anything is built
    model_name = str(name)
    try:
        schema, identifier = parse_model_name(model_name)
    except ValueError as e:
        raise BackboneError(f"--backbone {name}: {e}") from e

    # with hf-hub: / local-dir: names None means the source's own weights, not random ones
    random_weights = pretrained in RANDOM_WEIGHTS and not (schema is not None and pretrained is None)
    weights_file: Optional[str] = None  # a checkpoint file we load ourselves
    tag: Optional[str] = None  # a pretrained tag open_clip downloads (and whose preprocess config it merges)
    tag_cfg: dict = {}
    config_file: Optional[str] = None  # a model-config JSON given as the backbone
    if not random_weights and os.path.isfile(os.path.expanduser(str(pretrained))):
        weights_file = str(Path(str(pretrained)).expanduser().resolve())

    if schema == "local-dir":
        directory = Path(identifier).expanduser().resolve()
        if not directory.is_dir():
            raise BackboneError(f"--backbone {name}: no such directory {directory}")
        model_cfg = _read_source_config(model_name, directory / "open_clip_config.json")
        model_name = f"local-dir:{directory}"  # absolute: the same model whatever the working directory
        if pretrained is None:
            weights_file = _find_checkpoint_in_dir(directory)
            if weights_file is None:
                raise BackboneError(f"--backbone {name}: no weights file in {directory} (open_clip looks for "
                                    f"open_clip_model.safetensors, open_clip_pytorch_model.bin, *.safetensors, "
                                    f"*.bin, *.pth); add one or pass --pretrained /path/to/checkpoint")
    elif schema == "hf-hub":
        why = _hub_unreachable(identifier, ["open_clip_config.json"], cache_dir)
        if why:
            raise BackboneError(f"--backbone {name}: could not fetch open_clip_config.json of {identifier}: {why}; "
                                f"download the repo where there is internet (`hf download {identifier}`) and use "
                                f"--backbone local-dir:/path/to/it")
        try:
            config_path = download_pretrained_from_hf(identifier, filename="open_clip_config.json",
                                                      cache_dir=cache_dir)
        except FileNotFoundError as e:  # open_clip's wrapper of every hub error
            raise BackboneError(f"--backbone {name}: {e}") from e
        model_cfg = _read_source_config(model_name, Path(config_path))
        if pretrained is None:
            try:
                weights_file = download_pretrained_from_hf(identifier, cache_dir=cache_dir)
            except FileNotFoundError as e:
                raise BackboneError(f"--backbone {name}: could not fetch its weights ({e})") from e
    else:
        if model_name.endswith(".json") or Path(model_name).is_file():
            path = Path(model_name).expanduser().resolve()
            if not path.is_file():
                raise BackboneError(f"model config file not found: {path}")
            model_name = _register_config(path)
            config_file = str(path)
        if open_clip.get_model_config(model_name) is None:
            known = ", ".join(open_clip.list_models()[:12])
            raise BackboneError(f"unknown backbone {name!r}: not an open_clip model name nor a model-config JSON "
                                f"(known names include {known}...; `open_clip.list_models()` lists all; "
                                f"hf-hub:org/name and local-dir:/path load from the hub or a directory)")
        model_cfg = dict(open_clip.get_model_config(model_name))
    if schema is not None and not random_weights and weights_file is None:
        raise BackboneError(f"--pretrained {pretrained}: {name} brings its own weights and preprocessing; leave "
                            f"--pretrained unset, or pass a checkpoint file to replace its weights")
    if schema is None and not random_weights and weights_file is None:
        tag = str(pretrained)
        tag_cfg = get_pretrained_cfg(model_name, tag)
        if not tag_cfg:
            tags = list_pretrained_tags_by_model(model_name)
            raise BackboneError(f"pretrained {tag!r} is neither a file nor a known tag of {model_name} "
                                f"(tags: {', '.join(tags) if tags else 'none'})")

    force_qg = bool(tag_cfg.get("quick_gelu", False))
    if quick_gelu is not None:
        force_qg = quick_gelu
    if random_weights:
        warnings.warn(f"backbone {model_name} has RANDOM weights (pretrained=None): features and accuracy are "
                      f"meaningless except for tests", stacklevel=2)
    label = str(name)
    shapes = None
    if weights_file is not None:  # read before the model is built: a bad file or a wrong activation fails at once
        # an explicit quick_gelu=False is the caller's choice; the refusal guards the default
        openai_ok = bool(force_qg or model_cfg.get("quick_gelu", False)) or quick_gelu is False
        shapes = _check_activation(weights_file, label, quick_gelu=openai_ok, model_name=model_name,
                                   config_file=config_file)
    forced_pixels, pixel_source, pixel_fallback = _pixel_plan(model_name, label, schema, tag, weights_file,
                                                              given_pixels)

    common = dict(device="cpu", precision="fp32", force_quick_gelu=force_qg, cache_dir=cache_dir,
                  image_mean=forced_pixels.get("mean"), image_std=forced_pixels.get("std"),
                  image_interpolation=forced_pixels.get("interpolation"),
                  image_resize_mode=forced_pixels.get("resize_mode"))
    if tag is not None:
        model_id, filenames = _tag_files(tag_cfg)
        why = _hub_unreachable(model_id, filenames, cache_dir)
        if why:
            raise BackboneError(f"--pretrained {tag}: could not fetch the weights of {model_name} "
                                f"({model_id}/{filenames[-1]}): {why}; "
                                f"{_fetch_hint(model_name, filenames[-1], force_qg, model_id)}")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=tag, **common)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "download" in msg.lower():
                raise BackboneError(f"--pretrained {tag}: could not fetch the weights of {model_name} ({msg}); "
                                    f"{_fetch_hint(model_name, filenames[-1], force_qg, model_id)}") from e
            raise BackboneError(f"--pretrained {tag}: could not load the weights of {model_name} ({msg})") from e
    else:
        # the weights (if any) are loaded below by _load_weights, which says what is wrong with a bad file;
        # no tower base weights either way when a full checkpoint follows (they would be downloaded for nothing)
        full = weights_file is not None
        try:
            quiet = _without_open_clip_random_notice() if full else contextlib.nullcontext()
            with warnings.catch_warnings(), quiet:
                warnings.filterwarnings("ignore", message=".*QuickGELU mismatch.*")
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=None, load_weights=False, **common,
                    **({"pretrained_image": False, "pretrained_text": False} if full else {}))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackboneError(f"--backbone {name}: could not build the model ({type(e).__name__}: {msg})") from e
        if weights_file is not None:
            _load_weights(model, weights_file, label, shapes)

    model_cfg = dict(model_cfg)
    if force_qg:
        model_cfg["quick_gelu"] = True
    model = model.to(dev)
    tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
    spec = BackboneSpec(name=str(name), pretrained=tag or weights_file)
    return Backbone(model, tokenizer, preprocess, spec, model_cfg, dev, precision,
                    preprocess_cfg=_model_preprocess_cfg(model), pixel_source=pixel_source,
                    pixel_fallback=pixel_fallback)


class _DropRecord(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_open_clip_random_notice():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" (only that message) while a model
    is built whose weights file is loaded right after. open_clip logs it through the root logger's module-level
    ``logging.warning``, which would also install a stderr handler on an unconfigured root logger for good: Python's
    last-resort handler (stderr, warnings) holds that place meanwhile, so that other warnings still show."""
    root = logging.getLogger()
    drop = _DropRecord("No pretrained weights loaded for model")
    placeholder = (logging.lastResort or logging.NullHandler()) if not root.handlers else None
    root.addFilter(drop)
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if placeholder is not None:
            root.removeHandler(placeholder)
