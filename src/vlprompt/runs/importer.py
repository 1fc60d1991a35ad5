"""Import runs of the original repositories into ordinary vlprompt run directories (``vlprompt import --from M``).

The files are read here, by format, always through the restricted unpickler (:mod:`vlprompt.safe_pickle`: no code
from them runs): ``dassl`` -- a Dassl output folder (``<output>/<module>/model.pth.tar-<epoch>``,
``model-best.pth.tar``; the module folder is ``prompt_learner`` or the one that holds checkpoints, e.g.
``VLPromptLearner``) or one of those files, with the configuration Dassl prints into ``<output>/log.txt`` (or a
``config.yaml`` there); ``lightning`` -- a Lightning ``.ckpt`` and its ``config.yaml`` (beside it or in a parent
folder, or ``--source-config``); ``clip-lora`` -- MaxZanella/CLIP-LoRA's ``lora_weights.pt`` (its LoRA factors and the
options they were trained with); ``tensor-files`` -- a folder of ``torch.save``d tensors, one per file, named by
the file (Tip-Adapter's ``caches/<dataset>/``: ``keys_16shots.pt``...), read when the method asks for them. What
the tensors mean is the method's business: its ``import_original`` hook
(:meth:`vlprompt.methods.base.Method.import_original`) maps them by their original names onto its learned state,
reads the run's options from the configuration and adds checks against the rebuilt method (the saved fixed
buffers of a prompt learner against the rebuilt ones: another backbone, class list, class order or init shows
there). Flags override the configuration, except the shots, which the record keeps as the run had them (without
the configuration, ``--shots`` must say them). Word inits follow the original CoOp's word count (``init_length:
words``; ``--init-length tokens`` overrides it). Tensors keep their saved dtype in the source and are used in fp32.
An import evaluates on the test split only: data without training images (a test-only folder) is fine.
The run directory holds what :func:`vlprompt.runs.execute.run` writes (``run.json``, ``config.yaml``,
``split.json``, ``method.json`` + ``prompt.safetensors``, ``log.txt``, ``results.json`` from a test evaluation),
with ``"imported_from"`` in ``results.json`` and ``run.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Optional

import torch
import yaml

from ..errors import CheckpointError, ConfigError
from ..methods.parts.originals import ImportedRun, OriginalRun, shape
from ..safe_pickle import load_checkpoint
from . import directory

log = logging.getLogger("vlprompt")

#: the record of an import (what a method's import_original hook returns)
Source = ImportedRun


def importable_methods() -> list[str]:
    """The registered methods that import runs of their original repository (``--from``)."""
    from ..methods import method_class, method_names

    return [name for name in method_names() if method_class(name).original_format is not None]


# -- reading the files ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _has_checkpoints(folder: Path) -> bool:
    return (folder / "model-best.pth.tar").is_file() or any(folder.glob("model.pth.tar-*"))


def _module_folder(path: Path, module: str = "prompt_learner") -> Path:
    """The folder of a Dassl output folder's saved module: ``<module>/`` (the method's registered name:
    ``prompt_learner`` for CoOp, CoCoOp and PLOT, ``adapter`` for CLAP...), else the one subfolder holding
    checkpoints (Dassl names it after the registered model: ``MultiModalPromptLearner/`` for MaPLe,
    ``VLPromptLearner/``...), else the folder itself."""
    if (path / module).is_dir():
        return path / module
    if _has_checkpoints(path):
        return path
    found = sorted(d for d in path.iterdir() if d.is_dir() and _has_checkpoints(d))
    if len(found) > 1:
        raise CheckpointError(f"{path}: checkpoints of several modules ({', '.join(d.name for d in found)}); give "
                              f"the folder or the file to import")
    return found[0] if found else path


def dassl_checkpoint_file(path: Path, epoch: Optional[int] = None, module: str = "prompt_learner") -> Path:
    """The checkpoint of a Dassl output folder's saved module (:func:`_module_folder`; or the file given):
    ``--epoch N`` picks ``model.pth.tar-N``; else ``model-best.pth.tar`` when present (what the original's
    ``load_model`` loads), else the last epoch's file."""
    path = Path(path)
    if path.is_file():
        if epoch is not None:
            raise ConfigError(f"--epoch picks a file of a Dassl output folder; {path} is already a file")
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    folder = _module_folder(path, module)
    if epoch is not None:
        f = folder / f"model.pth.tar-{epoch}"
        if not f.is_file():
            raise CheckpointError(f"{f}: no checkpoint of epoch {epoch} (--epoch)")
        return f
    if (folder / "model-best.pth.tar").is_file():
        return folder / "model-best.pth.tar"
    numbered = sorted((int(m.group(1)), p) for p in folder.glob("model.pth.tar-*")
                      if (m := re.fullmatch(r"model\.pth\.tar-(\d+)", p.name)))
    if not numbered:
        raise CheckpointError(f"{path}: no Dassl checkpoint (<module>/model.pth.tar-<epoch> or model-best.pth.tar, "
                              f"<module> e.g. prompt_learner)")
    return numbered[-1][1]


def _has_config(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / "log.txt").is_file()


def _run_folder(ckpt: Path, module: str = "prompt_learner") -> Path:
    """The output folder of a checkpoint: above its module folder (``prompt_learner/``...), where log.txt is."""
    folder = ckpt.parent
    if folder.name == module or (not _has_config(folder) and _has_config(folder.parent)):
        return folder.parent
    return folder


def read_dassl_config(folder: Path) -> tuple[Optional[dict], Optional[Path]]:
    """Dassl's configuration of a run: ``config.yaml`` in the output folder, else the ``** Config **`` block
    that Dassl's ``train.py`` prints into ``log.txt`` (yacs prints YAML). (None, None) when neither is there."""
    cfg_file = folder / "config.yaml"
    if cfg_file.is_file():
        return _yaml_mapping(cfg_file.read_text(errors="replace"), cfg_file), cfg_file
    log_file = folder / "log.txt"
    if not log_file.is_file():
        return None, None
    lines = log_file.read_text(errors="replace").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "** Config **")
    except StopIteration:
        return None, None
    block = []
    for line in lines[start + 1:]:
        if set(line.strip()) == {"*"} and not block:
            continue  # the banner under the title
        if line.startswith(("Collecting env info", "** System info", "*****")) or (block and not line.strip()):
            break
        block.append(line)
    return _yaml_mapping("\n".join(block), log_file), log_file


def _yaml_mapping(text: str, where: Path) -> dict:
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CheckpointError(f"{where}: cannot read the run's configuration ({e}); give the options as flags "
                              f"and move the file away") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: the run's configuration is not a mapping")
    return obj


def _state_dict(ckpt: Any, path: Path) -> dict:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Dassl / Lightning checkpoint (no 'state_dict' dict)")
    sd = ckpt["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    return sd


# -- the formats ------------------------------------------------------------------------------------------
def read_dassl_run(path: Path, epoch: Optional[int] = None, module: str = "prompt_learner") -> OriginalRun:
    """A Dassl output folder (or one of its checkpoint files): the saved ``module``'s ``state_dict``, Dassl's
    configuration from the folder's log.txt / config.yaml."""
    ckpt_path = dassl_checkpoint_file(path, epoch, module)
    ckpt = load_checkpoint(ckpt_path)
    sd = _state_dict(ckpt, ckpt_path)
    cfg, cfg_file = read_dassl_config(_run_folder(ckpt_path, module))
    info = {"format": "dassl", "path": str(ckpt_path.resolve()), "sha256": _sha256(ckpt_path),
            "epoch": ckpt.get("epoch"), "config_file": str(cfg_file.resolve()) if cfg_file else None,
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()}}
    return OriginalRun(ckpt_path, sd, cfg, ckpt, info, cfg_file)


def find_lightning_config(ckpt_path: Path, given: Optional[Path]) -> Optional[Path]:
    """The run's ``config.yaml``: ``--source-config``, else beside the checkpoint or up to two folders above."""
    if given is not None:
        if not Path(given).is_file():
            raise ConfigError(f"--source-config {given}: no such file")
        return Path(given)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent, ckpt_path.parent.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def read_lightning_run(path: Path, source_config: Optional[Path] = None) -> OriginalRun:
    """A Lightning ``.ckpt`` (or a folder holding exactly one) and its ``config.yaml``."""
    path = Path(path)
    if path.is_dir():
        ckpts = sorted(path.rglob("*.ckpt"))
        if len(ckpts) != 1:
            raise CheckpointError(f"{path}: {'no' if not ckpts else len(ckpts)} Lightning .ckpt files; give the one "
                                  f"to import")
        path = ckpts[0]
    ckpt = load_checkpoint(path)
    sd = _state_dict(ckpt, path)
    cfg_file = find_lightning_config(path, source_config)
    cfg = _yaml_mapping(cfg_file.read_text(errors="replace"), cfg_file) if cfg_file else None
    info = {"format": "lightning", "path": str(path.resolve()), "sha256": _sha256(path), "epoch": ckpt.get("epoch"),
            "config_file": str(cfg_file.resolve()) if cfg_file else None}
    return OriginalRun(path, sd, cfg, ckpt, info, cfg_file)


def read_clip_lora_run(path: Path) -> OriginalRun:
    """MaxZanella/CLIP-LoRA's saved file (``save_lora``, ``loralib/utils.py`` l.137-184): ``torch.save({"weights":
    {"layer_<i>": {"q_proj" | "k_proj" | "v_proj" | "proj": {"w_lora_A", "w_lora_B"}}}, "metadata": {"r", "alpha",
    "encoder", "params", "position"}})`` (or a folder holding exactly one such ``.pt``): the tensors by their
    dotted names (``layer_0.q_proj.w_lora_A``), the metadata as the configuration."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.pt"))
        if len(files) != 1:
            raise CheckpointError(f"{path}: {'no' if not files else len(files)} .pt files; give the lora_weights.pt "
                                  f"to import")
        path = files[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    obj = load_checkpoint(path)
    if not (isinstance(obj, dict) and isinstance(obj.get("weights"), dict) and isinstance(obj.get("metadata"), dict)):
        raise CheckpointError(f"{path}: not a CLIP-LoRA file (a dict of 'weights' and 'metadata', as save_lora writes)")
    state = {}
    for layer, projections in obj["weights"].items():
        for proj, factors in (projections.items() if isinstance(projections, dict) else [(None, None)]):
            if not isinstance(factors, dict):
                raise CheckpointError(f"{path}: weights[{layer!r}] is not a dict of projections of factors")
            for part, t in factors.items():
                if not isinstance(t, torch.Tensor):
                    raise CheckpointError(f"{path}: weights[{layer!r}][{proj!r}][{part!r}] is not a tensor")
                state[f"{layer}.{proj}.{part}"] = t
    info = {"format": "clip-lora", "path": str(path.resolve()), "sha256": _sha256(path), "epoch": None,
            "config_file": None, "metadata": obj["metadata"],
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}}
    return OriginalRun(path, state, dict(obj["metadata"]), obj, info, None)


class TensorFiles(Mapping):
    """The ``*.pt`` files of a folder as ``{file stem: tensor}``, each read (through the restricted unpickler) when
    first asked for, so that files the method does not use (a run's cached test features) are never opened."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = {p.stem: p for p in sorted(self.folder.glob("*.pt")) if p.is_file()}
        self._loaded: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._loaded:
            path = self.files[name]  # KeyError for a file that is not there, as a dict
            obj = load_checkpoint(path)
            if not isinstance(obj, torch.Tensor):
                raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a tensor")
            self._loaded[name] = obj.detach()
        return self._loaded[name]

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def provenance(self) -> dict:
        """The files read, each with its sha256, and one sha256 of them all (what ``import`` records)."""
        files = {self.files[n].name: _sha256(self.files[n]) for n in sorted(self._loaded)}
        whole = hashlib.sha256("".join(f"{name}:{sha}\n" for name, sha in files.items()).encode()).hexdigest()
        return {"files": files, "sha256": whole}


def read_tensor_files(path: Path) -> OriginalRun:
    """A folder of ``torch.save``d tensors (or one of its files: ``run.path`` then names it, e.g. to pick the
    shots of a run among several in one folder)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    state = TensorFiles(folder)
    if not state.files:
        raise CheckpointError(f"{folder}: no .pt files (the original's saved tensors)")
    info = {"format": "tensor-files", "path": str(path.resolve()), "epoch": None, "config_file": None}
    return OriginalRun(path, state, None, {}, info)


def read_source(kind: str, path: str | Path, *, epoch: Optional[int] = None,
                source_config: Optional[str | Path] = None) -> ImportedRun:
    """The original run at ``path`` as method ``kind`` imports it (its :meth:`Method.import_original`)."""
    from ..methods import method_class

    names = importable_methods()
    if kind not in names:
        raise ConfigError(f"--from must be one of {', '.join(names)}, got {kind!r}")
    cls = method_class(kind)
    if cls.original_format == "lightning":
        if epoch is not None:
            raise ConfigError(f"--epoch picks a Dassl checkpoint; give {kind}'s .ckpt file itself")
        run = read_lightning_run(Path(path), Path(source_config) if source_config else None)
    elif cls.original_format == "clip-lora":
        if epoch is not None or source_config is not None:
            raise ConfigError(f"--{'epoch' if epoch is not None else 'source-config'} does not apply to {kind}: its "
                              f"run is one lora_weights.pt holding its own options")
        run = read_clip_lora_run(Path(path))
    elif cls.original_format == "dassl":
        if source_config is not None:
            raise ConfigError(f"--source-config is a Lightning run's config.yaml; {kind}'s Dassl runs are read from "
                              f"their log.txt")
        run = read_dassl_run(Path(path), epoch, cls.original_module)
    elif cls.original_format == "tensor-files":
        if epoch is not None or source_config is not None:
            raise ConfigError(f"--{'epoch' if epoch is not None else 'source-config'} does not apply: {kind}'s "
                              f"original saves tensor files, without epochs or a configuration file")
        run = read_tensor_files(Path(path))
    else:
        raise ConfigError(f"{kind}: unknown original format {cls.original_format!r}")
    run.info["from"] = kind
    imported = cls.import_original(run)
    if isinstance(run.state, TensorFiles):  # the files the method read, now that it has read them
        run.info.update(run.state.provenance())
    return imported


# -- the state onto the method ------------------------------------------------------------------------------
def map_state(src: Source, method) -> dict[str, torch.Tensor]:
    """The learned state of ``method`` with the source's tensors (shape-checked, naming the tensor)."""
    own = method.learned_state()
    out = {}
    for dst, (name, saved, mapped) in src.state.items():
        if dst not in own:
            raise CheckpointError(f"{src.path}: tensor {name} {shape(saved)} has no place in the configured "
                                  f"{src.method} (no {dst!r}; check its options)")
        if shape(mapped) != shape(own[dst]):
            raise CheckpointError(f"{src.path}: tensor {name} has shape {shape(saved)} (as {dst}: {shape(mapped)}), "
                                  f"but the configured {src.method} expects {shape(own[dst])}: the options or the "
                                  f"backbone differ from the run's")
        out[dst] = mapped.detach().float().clone()  # used in fp32; the source file keeps its dtype
    missing = sorted(set(own) - set(out) - set(src.optional))
    if missing:
        raise CheckpointError(f"{src.path}: the configured {src.method} learns {missing[0]!r}, which the checkpoint "
                              f"does not hold")
    for key in src.optional:
        if key in own and key not in out:
            out[key] = own[key]
    return out


# -- a run directory ---------------------------------------------------------------------------------------
def import_request(src: Source, request: dict) -> dict:
    """The run request of an import: the source's configuration, then the user's flags over it; the shots are
    the run's own (a contradicting ``--shots`` is refused; unknown ones must be given)."""
    from .config import merge_requests

    base = {k: v for k, v in src.request.items() if v != {}}
    user_method = request.get("method")
    if user_method not in (None, src.method):
        raise ConfigError(f"--method {user_method} contradicts --from {src.method}")
    where = src.info.get("config_file") or "its configuration"
    shots, given = (src.request.get("data") or {}).get("shots"), (request.get("data") or {}).get("shots")
    if shots is not None and given is not None and given != shots:
        raise ConfigError(f"--shots {given} contradicts the imported run, trained on {shots} shots per class "
                          f"({where}): the import records it as it was trained; drop --shots (an import evaluates "
                          f"on the test split only: data without training images is fine)")
    merged = merge_requests({**base, "method": src.method}, request)
    opts = merged.setdefault("method_options", {})
    if src.counts_words and opts.get("init") and "init_length" not in (request.get("method_options") or {}):
        opts["init_length"] = "words"
    missing = [name for name in src.required if name not in opts]
    if shots is None and given is None:
        missing.append("shots")
    if missing:
        what = {"dassl": "no Dassl configuration beside it (log.txt, config.yaml)",
                "tensor-files": "the original saves no configuration with its tensors (it only prints it): nothing"
                }.get(src.info.get("format"), "no configuration of it")
        flags = " and ".join("--" + name.replace("_", "-") for name in missing)
        raise ConfigError(f"{src.path}: {what} says the run's {', '.join(missing)}: give {flags}"
                          + (" (the training images per class it was trained on; 0: all)" if "shots" in missing
                             else ""))
    return merged


def _test_only(data) -> bool:
    """Whether the data has no training images at all (a test-only folder); an import needs only its test split."""
    import os

    from ..data import load_dataset

    if not data.dataset.startswith("torchvision:") and not os.path.exists(data.root):
        return False  # prepare_data says so, naming the root
    return not load_dataset(data.dataset, data.root, **data.options).train


def import_run(kind: str, path: str | Path, request: dict, output: str | Path, *, epoch: Optional[int] = None,
               source_config: Optional[str | Path] = None, force: bool = False, progress: bool = True) -> dict:
    """Import an original run into ``output`` (see the module doc); returns its results (``results.json``)."""
    from ..backbone import load_backbone
    from ..backbone.cache import FeatureCache
    from ..data import source_classnames
    from ..methods import build_config, build_method, method_class
    from .config import config_hash, resolve, with_built_options
    from .assembly import log_pixel_statistics, needed_splits, prepare_data, save_method, transforms_for
    from .evaluate import evaluate
    from .execute import finish_run, run_directory

    t_start = time.perf_counter()
    src = read_source(kind, path, epoch=epoch, source_config=source_config)
    cfg = resolve(import_request(src, request))
    run_dir = Path(output)
    directory.refuse_foreign(run_dir)
    directory.check_not_busy(run_dir)  # run_directory() takes the directory's lock before writing
    directory.check_writable(run_dir)
    cls = method_class(cfg.method)
    test_only = _test_only(cfg.data)
    if test_only:  # nothing to sample the run's training images from: its test split alone (its shots recorded)
        data = dataclasses.replace(cfg.data, shots=0, allow_fewer=False, sampler="dassl", fewshot_file=None)
        splits, skipped = prepare_data(data, None, ("test",))
    else:
        splits, skipped = prepare_data(cfg.data, cfg.seed,
                                       needed_splits(cls, build_config(cfg.method, cfg.method_options)))
    if not splits.test:
        raise ConfigError(f"{cfg.data.dataset}: no test images to evaluate the imported run on")
    if src.num_classes is not None and src.num_classes != splits.num_classes:
        raise CheckpointError(f"{src.path}: a class-specific context learned for {src.num_classes} classes, but "
                              f"{cfg.data.dataset} (--classes {cfg.data.classes}) has {splits.num_classes}: import it "
                              f"onto the classes it was trained on (the run's --dataset, --root and --classes)")
    backbone = load_backbone(cfg.backbone, cfg.pretrained, cfg.device, precision=cfg.precision, pixels=cfg.pixels())
    _, test_tf = transforms_for(cfg.preprocess, backbone)
    method = build_method(cfg.method, cls.config_for_loading(dict(cfg.method_options)), backbone, splits.classnames,
                          template=splits.template, source_names=source_classnames(splits))
    cfg = with_built_options(cfg, method)
    if src.prepare is not None:  # a state sized to the run (a cache), or a layout only the built method tells
        state = src.prepare(method)
        if state is not None:
            src.state = state
    learned = map_state(src, method)  # first: a shape mismatch names the learned tensor
    for check in src.checks:
        check(method)
    method.load_learned_state({k: v.to(backbone.device) for k, v in learned.items()})
    identity = cfg.identity()
    state = directory.inspect(run_dir, config_hash(identity), resume=False, force=force)
    if state.action == "done":
        import json

        held = json.loads((run_dir / "results.json").read_text())
        if held.get("imported_from", {}).get("sha256") == src.info["sha256"]:
            log.info("%s already holds this import (pass --force to import again)", run_dir)
            return held
        raise ConfigError(f"{run_dir} holds a finished run of this configuration; choose another --output or pass "
                          f"--force to replace it")
    # an unfinished run of this configuration is replaced too: an import has nothing to resume
    action = "replace" if state.action in ("replace", "restart", "resume") else state.action
    with run_directory(run_dir, cfg, identity, request_hash=cfg.identity_hash(), splits=splits, action=action,
                       imported_from=src.info["path"]):
        log.info("imported %s run %s (epoch %s) as %s", kind, src.info["path"], src.info.get("epoch"), cfg.method)
        if test_only:
            log.info("%s has no training images: the import is evaluated on its test split; the run's training "
                     "images (%s per class) are not in split.json", cfg.data.root, cfg.data.shots or "all")
        log_pixel_statistics(backbone, cfg.preprocess)
        described = method.describe()
        save_method(run_dir, cfg, method, splits)
        cache = FeatureCache(cfg.cache_dir, progress=progress)
        t0 = time.perf_counter()
        metrics, _ = evaluate(method, backbone, splits.test, test_tf, cache, progress=progress)
        results = {"method": cfg.method, "dataset": cfg.data.dataset, "classes": cfg.data.classes,
                   "num_classes": splits.num_classes, "backbone": cfg.backbone, "pretrained": cfg.pretrained,
                   "shots": cfg.data.shots, "seed": cfg.seed, "metrics": metrics, "method_info": described,
                   "timings": {"eval_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t_start},
                   "imported_from": src.info, "skipped_images": skipped,
                   "pixel_statistics": backbone.pixel_statistics}
        return finish_run(run_dir, cfg, identity, results)


__all__ = ["importable_methods", "Source", "read_source", "read_dassl_run", "read_lightning_run", "read_clip_lora_run",
           "read_tensor_files", "TensorFiles", "read_dassl_config", "dassl_checkpoint_file", "map_state",
           "import_request", "import_run"]
