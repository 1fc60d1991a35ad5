"""Import runs of the original repositories into ordinary vlprompt run directories.

Sources (``--from``):

* ``coop``, ``cocoop``, ``plot``: a Dassl output folder (``<output>/prompt_learner/model.pth.tar-<epoch>``,
  ``model-best.pth.tar``) or one of those files. The checkpoint is Dassl's ``save_checkpoint`` dict
  (``state_dict``, ``epoch``, ``optimizer``, ``scheduler``...); only the prompt learner's tensors are used:
  ``ctx`` -- (M, D) unified, (K, M, D) class-specific (CoOp), (N, M, D) PLOT's N prompt sets --, CoCoOp's
  ``meta_net.linear{1,2}.{weight,bias}``; the fixed ``token_prefix`` / ``token_suffix`` buffers are rebuilt from
  the class names and, as a check, compared with the saved ones (another backbone, class list, class order or
  init shows there). The run's configuration (class-token position, word init, shots, seed, epochs) comes from
  the Dassl config printed in ``<output>/log.txt`` (or a ``config.yaml`` there); flags override it, except the
  shots, which the record keeps as the run had them (without the configuration, ``--shots`` must say them).
* ``ordinalclip``: a Lightning ``.ckpt`` of xk-huang/OrdinalCLIP (``state_dict`` with ``module.`` keys: the
  prompt learner's ``context_embeds`` and ``rank_embeds``, the image encoder, the frozen CLIP text tower,
  ``logit_scale``) and its ``config.yaml`` (beside it or in a parent folder, or ``--source-config``).

Files are read with :mod:`vlprompt.safe_pickle` (no code from them runs). Word inits follow the original
CoOp's and CoCoOp's word count (``init_length: words``, logged or given by ``--init``; ``--init-length tokens``
overrides it). Tensors keep their saved dtype in the source and are used in fp32. An import evaluates on the test
split only: data without training images (a test-only folder) is fine.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from ..errors import CheckpointError, ConfigError
from ..safe_pickle import load_checkpoint
from . import directory

log = logging.getLogger("vlprompt")

SOURCES = ("coop", "cocoop", "plot", "ordinalclip")
_DASSL_TRAINERS = {"coop": "CoOp", "cocoop": "CoCoOp", "plot": "PLOT"}
_CHECK_RTOL = 2e-3  # saved fp16 buffers vs the same embeddings rebuilt in fp32 (fp16 keeps 11 bits)


@dataclass
class Source:
    """What an original run holds, in vlprompt's terms (before a backbone is loaded).

    ``state`` maps vlprompt learned-state keys to ``(source name, tensor as saved, vlprompt-shaped tensor)``;
    ``request`` is the part of a run request the source's configuration gives; ``checks`` run against the
    built method (saved fixed buffers vs the rebuilt ones)."""

    method: str
    path: Path
    state: dict[str, tuple[str, torch.Tensor, torch.Tensor]]
    request: dict
    info: dict
    checks: list[Callable[[Any], None]] = field(default_factory=list)
    optional: tuple[str, ...] = ()  # learned-state keys the method derives from its config (kept as built)
    required: tuple[str, ...] = ()  # method options the files do not tell and the flags must
    num_classes: Optional[int] = None  # the classes a class-specific context was learned for
    counts_words: bool = False  # the original counts a word init in words (CoOp's and CoCoOp's n_ctx)


# -- reading the files ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dassl_checkpoint_file(path: Path, epoch: Optional[int] = None) -> Path:
    """The prompt-learner checkpoint of a Dassl output folder (or the file given): ``--epoch N`` picks
    ``model.pth.tar-N``; else ``model-best.pth.tar`` when present (what the original's ``load_model`` loads),
    else the last epoch's file."""
    path = Path(path)
    if path.is_file():
        if epoch is not None:
            raise ConfigError(f"--epoch picks a file of a Dassl output folder; {path} is already a file")
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    folder = path / "prompt_learner" if (path / "prompt_learner").is_dir() else path
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
        raise CheckpointError(f"{path}: no Dassl checkpoint (prompt_learner/model.pth.tar-<epoch> or "
                              f"model-best.pth.tar)")
    return numbered[-1][1]


def _run_folder(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "prompt_learner" else ckpt.parent


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


def _get(cfg: Optional[dict], dotted: str, default=None):
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _state_dict(ckpt: Any, path: Path) -> dict:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Dassl / Lightning checkpoint (no 'state_dict' dict)")
    sd = ckpt["state_dict"]
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entry {bad[0]!r} is not a tensor")
    return sd


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def read_dassl(kind: str, path: Path, epoch: Optional[int] = None) -> Source:
    """A CoOp / CoCoOp / PLOT run of KaiyangZhou/CoOp or CHENGY12/PLOT (see the module doc)."""
    ckpt_path = dassl_checkpoint_file(path, epoch)
    ckpt = load_checkpoint(ckpt_path)
    sd = _state_dict(ckpt, ckpt_path)
    cfg, cfg_file = read_dassl_config(_run_folder(ckpt_path))
    trainer = _get(cfg, "TRAINER.NAME")
    if trainer is not None and trainer != _DASSL_TRAINERS[kind]:
        raise ConfigError(f"--from {kind}, but {cfg_file} says the run's trainer is {trainer}")
    known = {"ctx", "token_prefix", "token_suffix"}
    if kind == "cocoop":
        known |= {f"meta_net.linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    unexpected = sorted(set(sd) - known)
    if unexpected:
        raise CheckpointError(f"{ckpt_path}: unexpected tensor {unexpected[0]!r} in the {kind} prompt learner "
                              f"(known: {', '.join(sorted(known))})")
    if "ctx" not in sd:
        raise CheckpointError(f"{ckpt_path}: no 'ctx' tensor in state_dict")
    ctx = sd["ctx"]
    section = "TRAINER.COCOOP" if kind == "cocoop" else "TRAINER.COOP"
    opts: dict = {}
    if kind == "coop":
        if ctx.dim() not in (2, 3):
            raise CheckpointError(f"{ckpt_path}: ctx has shape {_shape(ctx)}; CoOp saves (n_ctx, dim) or, "
                                  f"class-specific, (n_cls, n_ctx, dim)")
        opts["csc"] = ctx.dim() == 3  # the original ignores CSC with a word init: the shape says what was learned
        mapped = ctx[None, None] if ctx.dim() == 2 else ctx[None]
    elif kind == "cocoop":
        if ctx.dim() != 2:
            raise CheckpointError(f"{ckpt_path}: ctx has shape {_shape(ctx)}; CoCoOp saves (n_ctx, dim)")
        mapped = ctx[None, None]
    else:  # PLOT: (N, n_ctx, dim); its class-specific and word-init paths crash in the original
        if ctx.dim() != 3:
            raise CheckpointError(f"{ckpt_path}: ctx has shape {_shape(ctx)}; PLOT saves its N prompt sets as "
                                  f"(N, n_ctx, dim)")
        opts["n_prompts"] = int(ctx.shape[0])
        mapped = ctx[:, None]
    opts["n_ctx"] = int(ctx.shape[-2])
    init = _get(cfg, f"{section}.CTX_INIT")
    if cfg is not None:
        opts["init"] = str(init).replace("_", " ") if init else None
        if kind != "cocoop":
            opts["class_position"] = _get(cfg, f"{section}.CLASS_TOKEN_POSITION", "end")
    state = {"prompt.ctx": ("ctx", ctx, mapped)}
    for i in (1, 2):
        for p in ("weight", "bias"):
            key = f"meta_net.linear{i}.{p}"
            if key in sd:
                state[key] = (key, sd[key], sd[key])
    request = _dassl_request(cfg, ckpt)
    request["method_options"] = opts
    info = {"format": "dassl", "from": kind, "path": str(ckpt_path.resolve()), "sha256": _sha256(ckpt_path),
            "epoch": ckpt.get("epoch"), "config_file": str(cfg_file.resolve()) if cfg_file else None,
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sd.items()}}
    # without its configuration, a CoOp run's class-token position is unknown: the tensors look the same
    src = Source(kind, ckpt_path, state, request, info, required=("class_position",) if kind == "coop" and
                 cfg is None else (), num_classes=int(ctx.shape[0]) if kind == "coop" and ctx.dim() == 3 else None,
                 # the original's count (a method without the option, PLOT, counts tokens: the same prompt where
                 # every word of the init is one token, else the saved token_suffix check names the difference)
                 counts_words=_has_option(kind, "init_length"))
    n_sets = opts.get("n_prompts", 1)
    if "token_prefix" in sd:
        src.checks.append(lambda m: _check_prefix(m, sd["token_prefix"], ckpt_path, n_sets))
    if "token_suffix" in sd:
        src.checks.append(lambda m: _check_suffix(m, sd["token_suffix"], ckpt_path, n_sets))
    return src


def _has_option(method: str, name: str) -> bool:
    from ..methods import method_class

    return name in {f.name for f in dataclasses.fields(method_class(method).config_class)}


def _dassl_request(cfg: Optional[dict], ckpt: dict) -> dict:
    """The request fields a Dassl configuration gives (data protocol, seed, backbone, training recipe)."""
    req: dict = {"data": {}, "train": {}}
    if cfg is None:
        epoch = ckpt.get("epoch")
        if isinstance(epoch, int) and epoch > 0:
            req["train"]["epochs"] = epoch  # Dassl saves epoch + 1: the epochs done
        return req
    shots = _get(cfg, "DATASET.NUM_SHOTS")
    if isinstance(shots, int) and shots >= 0:
        req["data"]["shots"] = shots
    classes = _get(cfg, "DATASET.SUBSAMPLE_CLASSES")
    if classes in ("all", "base", "new"):
        req["data"]["classes"] = classes
    seed = _get(cfg, "SEED")
    if isinstance(seed, int) and seed >= 0:  # Dassl's -1: no fixed seed
        req["seed"] = seed
    name = _get(cfg, "MODEL.BACKBONE.NAME")
    if isinstance(name, str) and name:
        req["backbone"] = name.replace("/", "-")  # CLIP's "ViT-B/16" is open_clip's "ViT-B-16"
    train = req["train"]
    for key, dassl in (("epochs", "OPTIM.MAX_EPOCH"), ("lr", "OPTIM.LR"), ("weight_decay", "OPTIM.WEIGHT_DECAY"),
                       ("momentum", "OPTIM.MOMENTUM"), ("batch_size", "DATALOADER.TRAIN_X.BATCH_SIZE")):
        value = _get(cfg, dassl)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            train[key] = value
    warmup = _get(cfg, "OPTIM.WARMUP_EPOCH")
    if isinstance(warmup, int) and warmup >= 0:
        train["warmup_epochs"] = warmup
        lr = _get(cfg, "OPTIM.WARMUP_CONS_LR")
        if isinstance(lr, float) and lr > 0:
            train["warmup_lr"] = lr
    return req


def _close(saved: torch.Tensor, rebuilt: torch.Tensor) -> bool:
    a, b = saved.float(), rebuilt.detach().float().cpu()
    return a.shape == b.shape and bool(((a - b).abs() <= _CHECK_RTOL * (b.abs() + 1e-3)).all())


def _check_prefix(method, saved: torch.Tensor, path: Path, n_sets: int) -> None:
    sot = method.prompt.sot  # (1, D)
    k = method.num_classes * n_sets
    if saved.dim() != 3 or saved.shape[0] != k or saved.shape[1] != 1:
        raise CheckpointError(f"{path}: token_prefix has shape {_shape(saved)}, expected ({k}, 1, {sot.shape[-1]}) "
                              f"for {method.num_classes} classes: the run had another number of classes (--dataset, "
                              f"--classes)")
    if not _close(saved, sot[None].expand(k, 1, sot.shape[-1])):
        raise CheckpointError(f"{path}: the saved start-token embedding (token_prefix) differs from this backbone's: "
                              f"the run used other CLIP weights (--backbone / --pretrained)")


def _check_suffix(method, saved: torch.Tensor, path: Path, n_sets: int) -> None:
    tail = method.prompt.tail  # (K, L-1-M, D)
    k = method.num_classes
    expected = tail.repeat(n_sets, 1, 1)  # PLOT repeats the K prompts for each of its N sets
    if _shape(saved) != _shape(expected):
        raise CheckpointError(f"{path}: token_suffix has shape {_shape(saved)}, expected {_shape(expected)} "
                              f"({k} classes x {n_sets} prompt set(s), {method.prompt.n_ctx} context vectors)")
    for i in range(saved.shape[0]):
        if not _close(saved[i], expected[i]):
            name = method.classnames[i % k]
            raise CheckpointError(f"{path}: the saved class tokens of class {i % k} ({name!r}) differ from the ones "
                                  f"rebuilt for it: the run had another class list or order (--dataset, --classes), "
                                  f"another word init (--init) or other CLIP weights (--backbone / --pretrained)")


# -- OrdinalCLIP ------------------------------------------------------------------------------------------
def find_ordinalclip_config(ckpt_path: Path, given: Optional[Path]) -> Optional[Path]:
    if given is not None:
        if not Path(given).is_file():
            raise ConfigError(f"--source-config {given}: no such file")
        return Path(given)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent, ckpt_path.parent.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def read_ordinalclip(path: Path, source_config: Optional[Path] = None) -> Source:
    """An xk-huang/OrdinalCLIP Lightning checkpoint (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        ckpts = sorted(path.rglob("*.ckpt"))
        if len(ckpts) != 1:
            raise CheckpointError(f"{path}: {'no' if not ckpts else len(ckpts)} Lightning .ckpt files; give the one "
                                  f"to import")
        path = ckpts[0]
    ckpt = load_checkpoint(path)
    sd = _state_dict(ckpt, path)
    cfg_file = find_ordinalclip_config(path, source_config)
    cfg = _yaml_mapping(cfg_file.read_text(errors="replace"), cfg_file) if cfg_file else None
    pl = _get(cfg, "runner_cfg.model_cfg.prompt_learner_cfg", {}) or {}
    model_cfg = _get(cfg, "runner_cfg.model_cfg", {}) or {}
    if pl.get("rank_specific_context"):
        raise CheckpointError(f"{cfg_file}: rank_specific_context is true; vlprompt's OrdinalCLIP shares one context "
                              f"across ranks")
    if pl.get("rank_tokens_position", "tail") != "tail":
        raise CheckpointError(f"{cfg_file}: rank_tokens_position {pl['rank_tokens_position']!r}; vlprompt's OrdinalCLIP "
                              f"puts the rank tokens after the context (tail)")
    pre = "module."
    ctx_key, rank_key = pre + "prompt_learner.context_embeds", pre + "prompt_learner.rank_embeds"
    for key in (ctx_key, rank_key):
        if key not in sd:
            raise CheckpointError(f"{path}: no {key!r} in state_dict (not an OrdinalCLIP checkpoint?)")
    ctx, ranks = sd[ctx_key], sd[rank_key]
    if ctx.dim() != 2:
        raise CheckpointError(f"{path}: {ctx_key} has shape {_shape(ctx)}; a context shared by the ranks is "
                              f"(n_ctx, dim) (rank-specific contexts are not supported)")
    if ranks.dim() != 3:
        raise CheckpointError(f"{path}: {rank_key} has shape {_shape(ranks)}, expected (ranks, tokens, dim)")
    opts: dict = {"n_ctx": int(ctx.shape[0]), "tokens_per_rank": int(ranks.shape[1]), "init": None,
                  "rank_init": None}
    kind = pl.get("type")
    if kind == "RankPromptLearner":
        opts["num_base"] = int(ranks.shape[0])
    elif kind == "PlainPromptLearner":
        opts["num_base"] = 0
    elif kind is not None:
        raise CheckpointError(f"{cfg_file}: prompt learner {kind!r}; known: RankPromptLearner, PlainPromptLearner")
    if pl.get("interpolation_type"):
        opts["interpolation"] = pl["interpolation_type"]
    state = {"prompts.ctx": (ctx_key, ctx, ctx)}
    rank_dst = "prompts.rank_embeddings.embeds" if opts.get("num_base") == 0 else "prompts.rank_embeddings.base"
    state[rank_dst] = (rank_key, ranks, ranks)
    enc_keys = {k[len(pre + "image_encoder."):]: v for k, v in sd.items() if k.startswith(pre + "image_encoder.")}
    image_name = model_cfg.get("image_encoder_name")
    text_name = model_cfg.get("text_encoder_name")
    if image_name is None:  # no config: what the tensors are
        image_name = "vgg16" if "features.0.weight" in enc_keys else ("clip" if "conv1.weight" in enc_keys else None)
    elif image_name == text_name:
        image_name = "clip"
    if image_name == "clip":
        opts.update(image_encoder="clip", image_encoder_weights="auto")
        prefix = "image_encoder.visual."
    elif image_name == "vgg16":
        # the reference normalises every encoder's input with ImageNet's statistics (its data_cfg)
        opts.update(image_encoder="vgg16", image_encoder_weights="none", image_encoder_input_norm="imagenet")
        prefix = "image_encoder.net."
    else:
        raise CheckpointError(f"{path}: image encoder {image_name!r}; the importer knows CLIP's and vgg16")
    for k, v in enc_keys.items():
        state[prefix + k] = (pre + "image_encoder." + k, v, v)
    request: dict = {"data": {}, "train": {}, "method_options": opts}
    seed = _get(cfg, "runner_cfg.seed")
    if isinstance(seed, int) and seed >= 0:
        request["seed"] = seed
    train = request["train"]
    oc = _get(cfg, "runner_cfg.optimizer_and_scheduler_cfg.optimizer_cfg", {}) or {}
    if oc.get("optimizer_name") in ("sgd", "adam", "adamw", "radam"):
        train["optimizer"] = oc["optimizer_name"]
    for key in ("lr", "weight_decay"):
        if isinstance(oc.get(key), (int, float)):
            train[key] = oc[key]
    epochs = _get(cfg, "trainer_cfg.max_epochs")
    if isinstance(epochs, int) and epochs > 0:
        train["epochs"] = epochs
    batch = _get(cfg, "data_cfg.train_dataloder_cfg.batch_size")
    if isinstance(batch, int) and batch > 0:
        train["batch_size"] = batch
    lw = _get(cfg, "runner_cfg.loss_weights", {}) or {}
    for key, ours in (("ce_loss", "ce_weight"), ("kl_loss", "kl_weight")):
        if isinstance(lw.get(key), (int, float)):
            opts[ours] = lw[key]
    info = {"format": "lightning", "from": "ordinalclip", "path": str(path.resolve()), "sha256": _sha256(path),
            "epoch": ckpt.get("epoch"), "config_file": str(cfg_file.resolve()) if cfg_file else None,
            "init_context": pl.get("init_context"), "num_ranks": pl.get("num_ranks"),
            "dtypes": {k: str(v.dtype).replace("torch.", "") for k, v in sd.items() if not
                       k.startswith(pre + "text_encoder.")}}
    text = {k[len(pre + "text_encoder."):]: v for k, v in sd.items() if k.startswith(pre + "text_encoder.")}
    scale = sd.get(pre + "logit_scale")
    src = Source("ordinalclip", path, state, request, info, optional=("image_encoder.input_scale",
                                                                      "image_encoder.input_shift"))
    src.checks.append(lambda m: _check_text_tower(m, text, scale, path))
    unknown = sorted(k for k in sd if not k.startswith((pre + "image_encoder.", pre + "text_encoder.",
                                                        pre + "prompt_learner.")) and k != pre + "logit_scale")
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor {unknown[0]!r} in the OrdinalCLIP state_dict")
    return src


def _check_text_tower(method, text: dict, scale: Optional[torch.Tensor], path: Path) -> None:
    """The checkpoint's frozen CLIP text tower and logit scale must be the backbone's (else its prompts were
    learned for another text tower and the numbers would be wrong)."""
    own = method.backbone.model.state_dict()
    for k, v in text.items():
        if k in own and not _close(v, own[k].to(v.dtype)):
            raise CheckpointError(f"{path}: the checkpoint's text tower differs from this backbone's at {k!r} "
                                  f"(other CLIP weights, or a text tower trained with lr_text_encoder > 0): give "
                                  f"the --backbone / --pretrained the run used")
    if scale is not None and abs(float(scale.float().exp()) - method.logit_scale) > 1e-3 * method.logit_scale:
        raise CheckpointError(f"{path}: the checkpoint's logit scale exp({float(scale):.4f}) = "
                              f"{float(scale.float().exp()):.3f} differs from this backbone's {method.logit_scale:.3f} "
                              f"(a run with lr_logit_scale > 0 is not supported)")


def read_source(kind: str, path: str | Path, *, epoch: Optional[int] = None,
                source_config: Optional[str | Path] = None) -> Source:
    if kind not in SOURCES:
        raise ConfigError(f"--from must be one of {', '.join(SOURCES)}, got {kind!r}")
    if kind == "ordinalclip":
        if epoch is not None:
            raise ConfigError("--epoch picks a Dassl checkpoint; give OrdinalCLIP's .ckpt file itself")
        return read_ordinalclip(Path(path), Path(source_config) if source_config else None)
    if source_config is not None:
        raise ConfigError("--source-config is OrdinalCLIP's config.yaml; Dassl runs are read from their log.txt")
    return read_dassl(kind, Path(path), epoch)


# -- the state onto the method ------------------------------------------------------------------------------
def map_state(src: Source, method) -> dict[str, torch.Tensor]:
    """The learned state of ``method`` with the source's tensors (shape-checked, naming the tensor)."""
    own = method.learned_state()
    out = {}
    for dst, (name, saved, mapped) in src.state.items():
        if dst not in own:
            raise CheckpointError(f"{src.path}: tensor {name} {_shape(saved)} has no place in the configured "
                                  f"{src.method} (no {dst!r}; check its options)")
        if _shape(mapped) != _shape(own[dst]):
            raise CheckpointError(f"{src.path}: tensor {name} has shape {_shape(saved)} (as {dst}: {_shape(mapped)}), "
                                  f"but the configured {src.method} expects {_shape(own[dst])}: the options or the "
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
        what = ("no Dassl configuration beside it (log.txt, config.yaml)" if src.info.get("format") == "dassl" else
                "no configuration of it")
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
    from ..cache import FeatureCache
    from ..methods import build_method, method_class
    from .config import config_hash, resolve
    from .execute import (evaluate, finish_run, log_pixel_statistics, needed_splits, prepare_data, run_directory,
                          save_method, transforms_for)

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
        splits, skipped = prepare_data(cfg.data, cfg.seed, needed_splits(cls))
    if not splits.test:
        raise ConfigError(f"{cfg.data.dataset}: no test images to evaluate the imported run on")
    if src.num_classes is not None and src.num_classes != splits.num_classes:
        raise CheckpointError(f"{src.path}: a class-specific context learned for {src.num_classes} classes, but "
                              f"{cfg.data.dataset} (--classes {cfg.data.classes}) has {splits.num_classes}: import it "
                              f"onto the classes it was trained on (the run's --dataset, --root and --classes)")
    backbone = load_backbone(cfg.backbone, cfg.pretrained, cfg.device, precision=cfg.precision, pixels=cfg.pixels())
    _, test_tf = transforms_for(cfg.preprocess, backbone)
    method = build_method(cfg.method, cls.config_for_loading(dict(cfg.method_options)), backbone, splits.classnames,
                          template=splits.template)
    cfg = dataclasses.replace(cfg, method_options=method.config.to_dict())
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


__all__ = ["SOURCES", "Source", "read_source", "read_dassl", "read_ordinalclip", "read_dassl_config",
           "dassl_checkpoint_file", "map_state", "import_request", "import_run"]
