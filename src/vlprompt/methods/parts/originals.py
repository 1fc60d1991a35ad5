"""What a method needs to import a run of its original repository (``vlprompt import --from NAME``).

The run layer reads the files (:mod:`vlprompt.runs.importer`: Dassl output folders, Lightning checkpoints, always
through the restricted unpickler) into an :class:`OriginalRun`; the method's ``import_original`` hook turns it into
an :class:`ImportedRun`: its learned tensors by vlprompt's names (mapped from the original's names), the part of
a run request the original's configuration gives, and checks against the rebuilt method. The helpers below are
the ones several Dassl-based prompt learners share (CoOp, CoCoOp, PLOT, KgCoOp, ProGrad...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from ...errors import CheckpointError

#: saved fp16 buffers vs the same embeddings rebuilt in fp32 (fp16 keeps 11 bits)
CHECK_RTOL = 2e-3


@dataclass
class OriginalRun:
    """An original run as read from its files: ``state`` the saved tensors by their original names (the state
    dict of the saved module), ``config`` the run's configuration (Dassl's yacs config, OrdinalCLIP's YAML) or
    None, ``checkpoint`` the whole saved object (``epoch``...), ``info`` what the import records (format, path,
    sha256, epoch, config file). ``state`` is a mapping (the ``tensor-files`` format reads a file when asked)."""

    path: Path
    state: Mapping[str, torch.Tensor]
    config: Optional[dict]
    checkpoint: dict
    info: dict
    config_file: Optional[Path] = None


@dataclass
class ImportedRun:
    """What a method makes of an :class:`OriginalRun`.

    ``state`` maps vlprompt learned-state keys to ``(original name, tensor as saved, vlprompt-shaped tensor)``;
    ``request`` is the part of a run request the original's configuration gives; ``checks`` run against the built
    method (saved fixed buffers vs the rebuilt ones); ``optional``: learned-state keys the method derives from its
    config (kept as built); ``required``: method options the files do not tell and the flags must; ``num_classes``:
    the classes a class-specific state was learned for; ``counts_words``: the original counts a word init in words;
    ``prepare``: called on the built method before the tensors are mapped, where the run decides the size of a state
    (Tip-Adapter's cache of its training images, sized to the run's) or only the built method tells the layout of
    the tensors (CLIP-LoRA's ``layer_<i>`` numbers the adapted attentions of the towers the backbone has): it may
    resize the method's state and may return ``state`` (then used instead of the one given)."""

    method: str
    path: Path
    state: dict[str, tuple[str, torch.Tensor, torch.Tensor]]
    request: dict
    info: dict
    checks: list[Callable[[Any], None]] = field(default_factory=list)
    optional: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    num_classes: Optional[int] = None
    counts_words: bool = False
    prepare: Optional[Callable[[Any], Optional[dict]]] = None


def config_get(cfg: Optional[dict], dotted: str, default=None):
    """``cfg["A"]["B"]`` for ``"A.B"``, or ``default`` where any level is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_known_tensors(run: OriginalRun, known: set[str], what: str) -> None:
    unexpected = sorted(set(run.state) - known)
    if unexpected:
        raise CheckpointError(f"{run.path}: unexpected tensor {unexpected[0]!r} in the {what} "
                              f"(known: {', '.join(sorted(known))})")


def check_trainer(run: OriginalRun, trainer: str, source: str) -> None:
    """The Dassl run's ``TRAINER.NAME`` (when its configuration says it) must be the original's trainer."""
    name = config_get(run.config, "TRAINER.NAME")
    if name is not None and name != trainer:
        raise CheckpointError(f"--from {source}, but {run.config_file} says the run's trainer is {name}")


def dassl_request(cfg: Optional[dict], checkpoint: dict) -> dict:
    """The request fields a Dassl configuration gives (data protocol, seed, backbone, training recipe); without
    one, the epochs the checkpoint says were run."""
    req: dict = {"data": {}, "train": {}}
    if cfg is None:
        epoch = checkpoint.get("epoch")
        if isinstance(epoch, int) and epoch > 0:
            req["train"]["epochs"] = epoch  # Dassl saves epoch + 1: the epochs done
        return req
    shots = config_get(cfg, "DATASET.NUM_SHOTS")
    if isinstance(shots, int) and shots >= 0:
        req["data"]["shots"] = shots
    classes = config_get(cfg, "DATASET.SUBSAMPLE_CLASSES")
    if classes in ("all", "base", "new"):
        req["data"]["classes"] = classes
    seed = config_get(cfg, "SEED")
    if isinstance(seed, int) and seed >= 0:  # Dassl's -1: no fixed seed
        req["seed"] = seed
    name = config_get(cfg, "MODEL.BACKBONE.NAME")
    if isinstance(name, str) and name:
        req["backbone"] = name.replace("/", "-")  # CLIP's "ViT-B/16" is open_clip's "ViT-B-16"
    train = req["train"]
    for key, dassl in (("epochs", "OPTIM.MAX_EPOCH"), ("lr", "OPTIM.LR"), ("weight_decay", "OPTIM.WEIGHT_DECAY"),
                       ("momentum", "OPTIM.MOMENTUM"), ("batch_size", "DATALOADER.TRAIN_X.BATCH_SIZE")):
        value = config_get(cfg, dassl)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            train[key] = value
    warmup = config_get(cfg, "OPTIM.WARMUP_EPOCH")
    if isinstance(warmup, int) and warmup >= 0:
        train["warmup_epochs"] = warmup
        lr = config_get(cfg, "OPTIM.WARMUP_CONS_LR")
        if isinstance(lr, float) and lr > 0:
            train["warmup_lr"] = lr
    return req


def close(saved: torch.Tensor, rebuilt: torch.Tensor) -> bool:
    a, b = saved.float(), rebuilt.detach().float().cpu()
    return a.shape == b.shape and bool(((a - b).abs() <= CHECK_RTOL * (b.abs() + 1e-3)).all())


def check_prefix(method, saved: torch.Tensor, path: Path, n_sets: int = 1) -> None:
    """A Dassl prompt learner's saved ``token_prefix`` (the start token of each prompt) against the rebuilt one."""
    sot = method.prompt.sot  # (1, D)
    k = method.num_classes * n_sets
    if saved.dim() != 3 or saved.shape[0] != k or saved.shape[1] != 1:
        raise CheckpointError(f"{path}: token_prefix has shape {shape(saved)}, expected ({k}, 1, {sot.shape[-1]}) "
                              f"for {method.num_classes} classes: the run had another number of classes (--dataset, "
                              f"--classes)")
    if not close(saved, sot[None].expand(k, 1, sot.shape[-1])):
        raise CheckpointError(f"{path}: the saved start-token embedding (token_prefix) differs from this backbone's: "
                              f"the run used other CLIP weights (--backbone / --pretrained)")


def check_suffix(method, saved: torch.Tensor, path: Path, n_sets: int = 1) -> None:
    """A Dassl prompt learner's saved ``token_suffix`` (class tokens, '.', end, padding) against the rebuilt one."""
    tail = method.prompt.tail  # (K, L-1-M, D)
    k = method.num_classes
    expected = tail.repeat(n_sets, 1, 1)  # PLOT repeats the K prompts for each of its N sets
    if shape(saved) != shape(expected):
        raise CheckpointError(f"{path}: token_suffix has shape {shape(saved)}, expected {shape(expected)} "
                              f"({k} classes x {n_sets} prompt set(s), {method.prompt.n_ctx} context vectors)")
    for i in range(saved.shape[0]):
        if not close(saved[i], expected[i]):
            name = method.classnames[i % k]
            raise CheckpointError(f"{path}: the saved class tokens of class {i % k} ({name!r}) differ from the ones "
                                  f"rebuilt for it: the run had another class list or order (--dataset, --classes), "
                                  f"another word init (--init) or other CLIP weights (--backbone / --pretrained)")


def dassl_context_import(cls, run: OriginalRun, *, ctx: torch.Tensor, mapped: torch.Tensor, section: str,
                         options: dict, extra_state: Optional[dict] = None, n_sets: int = 1,
                         class_position: bool = True, position_required: bool = True,
                         num_classes: Optional[int] = None, counts_words: bool = True) -> ImportedRun:
    """The import of a Dassl prompt learner's context (shared by CoOp, CoCoOp, PLOT and their kin): ``ctx`` as
    saved, ``mapped`` shaped as the method's ``prompt.ctx``; the word init, class-token position, protocol and
    recipe from the run's configuration (``section``: ``TRAINER.COOP``...); the saved prefix / suffix buffers
    checked against the rebuilt ones. ``class_position``: the original has the option (read from the config);
    ``position_required``: without a config it must be given (its runs use all positions)."""
    opts = dict(options)
    opts["n_ctx"] = int(ctx.shape[-2])
    init = config_get(run.config, f"{section}.CTX_INIT")
    if run.config is not None:
        opts["init"] = str(init).replace("_", " ") if init else None
        if class_position:
            opts["class_position"] = config_get(run.config, f"{section}.CLASS_TOKEN_POSITION", "end")
    state = {"prompt.ctx": ("ctx", ctx, mapped), **(extra_state or {})}
    request = dassl_request(run.config, run.checkpoint)
    request["method_options"] = opts
    # without its configuration, a run's class-token position is unknown: the tensors look the same
    imported = ImportedRun(cls.name, run.path, state, request, run.info,
                           required=("class_position",) if (class_position and position_required
                                                             and run.config is None) else (),
                           num_classes=num_classes, counts_words=counts_words)
    sd = run.state
    if "token_prefix" in sd:
        imported.checks.append(lambda m: check_prefix(m, sd["token_prefix"], run.path, n_sets))
    if "token_suffix" in sd:
        imported.checks.append(lambda m: check_suffix(m, sd["token_suffix"], run.path, n_sets))
    return imported


def check_frozen_towers(backbone, state: dict, path: Path, towers: dict, skip: Callable[[str], bool] = lambda k: False
                        ) -> None:
    """The frozen CLIP weights a run saved beside its learned tensors (the multimodal-prompt-learning trainers save
    the whole CustomCLIP, and their loaders load those weights back) against this backbone's: ``towers`` maps a
    saved prefix to the open_clip prefix it stands for (``{"text_encoder.": "", "image_encoder.": "visual."}``);
    ``skip(name)``: saved names that are learned, not frozen. A missing counterpart, another shape or other values
    (beyond the fp16 rounding the originals save in) is a CheckpointError naming the tensor: the run used other
    weights, and an import computing with this backbone's would give other numbers."""
    own = backbone.model.state_dict()
    for name, saved in state.items():
        prefix = next((p for p in towers if name.startswith(p)), None)
        if (prefix is None and name != "logit_scale") or skip(name):
            continue
        key = "logit_scale" if prefix is None else towers[prefix] + name[len(prefix):]
        mine = own.get(key)
        if mine is None or shape(mine) != shape(saved):
            raise CheckpointError(f"{path}: the saved frozen weight {name} {shape(saved)} has no counterpart of that "
                                  f"shape in the backbone {backbone.name} ({key}): the run used another architecture "
                                  f"(--backbone)")
        if not close(saved, mine):
            raise CheckpointError(f"{path}: the saved frozen weight {name} differs from this backbone's ({key}): the "
                                  f"run used other CLIP weights (--backbone / --pretrained)")


#: a saved class-feature buffer (computed by the original in fp16) vs the same rebuilt in fp32: largest relative
#: distance of a class's row (fp16 rounding gives ~1e-3; another class name, template or weights, far more)
FEATURE_RTOL = 2e-2


def check_class_features(method, saved: torch.Tensor, path: Path, name: str = "base_text_features") -> None:
    """A saved class-feature buffer (K, E) (TaskRes', CLAP's ``base_text_features``) against the ``base`` the method
    rebuilt for its classes: each row within :data:`FEATURE_RTOL` of its own, else the class names, their order or
    spelling, the templates or the weights differ from the run's."""
    rebuilt = method.base.detach().float().cpu()
    if shape(saved) != shape(rebuilt):
        raise CheckpointError(f"{path}: {name} has shape {shape(saved)}, expected {shape(rebuilt)} for "
                              f"{method.num_classes} classes of width {rebuilt.shape[-1]}")
    dist = (saved.float() - rebuilt).norm(dim=-1) / rebuilt.norm(dim=-1).clamp_min(1e-12)
    bad = (dist > FEATURE_RTOL).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise CheckpointError(f"{path}: the saved class features ({name}) of class {i} ({method.classnames[i]!r}) "
                              f"differ from the ones rebuilt for it by {float(dist[i]):.1%}: the run had another class "
                              f"list or order (--dataset, --classes), other prompts (--templates, --clean-names, "
                              f"--average) or other CLIP weights (--backbone / --pretrained)")


def class_features_import(cls, run: OriginalRun, *, learned: str, saved_name: str, options: dict) -> ImportedRun:
    """The import of a class-specific classifier over hand-crafted class features (TaskRes, CLAP): the learned
    ``saved_name`` (K, E) as ``learned`` and the saved ``base_text_features`` as ``base`` -- the originals evaluate
    with the saved one, and so does the import -- checked against the base rebuilt for the given classes; the
    protocol and recipe from the run's configuration."""
    check_known_tensors(run, {saved_name, "base_text_features", "token_prefix", "token_suffix"},
                        f"{cls.name} checkpoint")
    state = {}
    for key, orig in ((learned, saved_name), ("base", "base_text_features")):
        t = run.state.get(orig)
        if t is None or t.dim() != 2:
            raise CheckpointError(f"{run.path}: {orig} has shape {shape(t) if t is not None else None}; "
                                  f"{cls.name} saves (n_cls, dim)")
        state[key] = (orig, t, t)
    if shape(state[learned][1]) != shape(state["base"][1]):
        raise CheckpointError(f"{run.path}: {saved_name} {shape(state[learned][1])} and base_text_features "
                              f"{shape(state['base'][1])} differ in shape")
    request = dassl_request(run.config, run.checkpoint)
    request["method_options"] = dict(options)
    base = run.state["base_text_features"]
    imported = ImportedRun(cls.name, run.path, state, request, run.info, num_classes=int(base.shape[0]))
    imported.checks.append(lambda m: check_class_features(m, base, run.path))
    return imported


__all__ = ["OriginalRun", "ImportedRun", "FEATURE_RTOL", "check_class_features", "class_features_import",
           "config_get", "shape", "check_known_tensors", "check_trainer", "dassl_request", "close", "check_prefix",
           "check_suffix", "dassl_context_import", "check_frozen_towers", "CHECK_RTOL"]
