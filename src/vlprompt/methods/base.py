"""The interface every method implements; the engine, the runner and the CLI know methods only through it.

A method is one file: a config dataclass (its fields, with their help text, defaults and valid ranges, are the
method's options everywhere: CLI flags, config files, the Python API, grid cells) and a :class:`Method`
subclass that names its config (``config_class``), its paper recipe (:meth:`Method.preset`), its head kind for
export / predict, and overrides the hooks it needs. Registering it is one line (:mod:`vlprompt.methods`).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError, VLPromptError


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: Optional[Sequence] = None,
        min: Optional[float] = None, max: Optional[float] = None, gt: Optional[float] = None,
        flag: Optional[str] = None, default_factory: Any = dataclasses.MISSING, since: Optional[str] = None):
    """A config field with its help text and valid values: ``choices``, ``min`` / ``max`` (inclusive), ``gt``
    (exclusive lower bound). ``flag`` renames the generated command-line flag (default ``--field-name``).
    ``since``: the version that added the field; at its default it is left out of a run's identity, so runs made
    before it existed keep their identity (their directories resume, their tables join)."""
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "min": min, "max": max, "gt": gt,
            "flag": flag, "since": since}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted) for the field types configs use: bool, int, float, str, list, dict, Optional[...]."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is Any:
        return True, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, value
        args = typing.get_args(tp)
        if args:  # list[float], list[str]: every item
            items = [_type_ok(v, args[0]) for v in value]
            if not all(ok for ok, _ in items):
                return False, value
            value = [v for _, v in items]
        return True, value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


def check_fields(obj: Any, where: str) -> None:
    """Check (and normalise in place: ints to floats for float fields, tuples to lists) every field of a config
    dataclass against its type and its ``opt`` metadata; a ConfigError names the field, its command-line flag
    and the value."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        m = f.metadata
        name = f"{where}.{f.name} (--{(m.get('flag') or f.name).replace('_', '-')})"
        ok, value = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r}")
        object.__setattr__(obj, f.name, value)
        if value is None:
            continue
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, m['choices']))}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            if m.get("min") is not None and value < m["min"]:
                raise ConfigError(f"{name} must be >= {m['min']}, got {value!r}")
            if m.get("max") is not None and value > m["max"]:
                raise ConfigError(f"{name} must be <= {m['max']}, got {value!r}")
            if m.get("gt") is not None and value <= m["gt"]:
                raise ConfigError(f"{name} must be > {m['gt']}, got {value!r}")


#: what a method reads of an image, at every step and in evaluation (:attr:`Method.inputs`)
INPUT_KINDS = ("global", "local", "images")


@dataclass
class Features:
    """What a method sees of a batch of images.

    ``global_``: (B, E) image features of the frozen tower; ``local``: (B, M, E) or None; ``images``: (B, 3, H, W)
    for methods that run an image tower themselves (a trained image encoder, prompts inside the tower).
    """

    global_: Optional[torch.Tensor] = None
    local: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None

    def to(self, device) -> "Features":
        return Features(*(None if t is None else t.to(device, non_blocking=True)
                          for t in (self.global_, self.local, self.images)))

    def rows(self, sl) -> "Features":
        """Rows ``sl`` (a slice or an index tensor) of every tensor."""
        return Features(*(None if t is None else t[sl] for t in (self.global_, self.local, self.images)))


@dataclass
class Batch:
    """One training step's data: ``feats`` (B rows), ``labels`` (B,), ``targets`` (B,) float values of ordinal
    data or None, ``index`` (B,) the images' positions in the training split."""

    feats: Features
    labels: torch.Tensor
    targets: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None


@dataclass
class StepOutput:
    """What :meth:`Method.training_step` returns.

    ``loss``: the scalar the optimiser minimises; ``logits`` (B, K) (training accuracy); ``parts``: named loss
    terms logged per epoch (detached scalars); ``gradient_only``: named scalar losses whose gradients with respect
    to the trainable parameters the trainer computes too -- they never enter the update themselves, they reach
    :meth:`Method.on_before_optimizer_step` (ProGrad's zero-shot KL). The trainer treats them as it treats
    ``loss``: scaled under fp16 autocast and unscaled, weighted by a rank's share of the batch and summed over the
    ranks under torchrun."""

    loss: torch.Tensor
    logits: torch.Tensor
    parts: dict = dataclasses.field(default_factory=dict)
    gradient_only: dict = dataclasses.field(default_factory=dict)


class SplitData(typing.Protocol):
    """A split of the run's data as :meth:`Method.setup` and :meth:`Method.after_training` see it (the engine
    provides it; the features come from the feature cache, computed once)."""

    labels: torch.Tensor  #: (N,)
    targets: Optional[torch.Tensor]  #: (N,) or None

    def __len__(self) -> int: ...

    def features(self) -> Features:
        """The frozen tower's features of the un-augmented images (the test transform): (N, E) / (N, M, E)."""

    def views(self) -> Features:
        """Every cached augmented view of the images: global (V, N, E), local (V, N, M, E) or None."""


@dataclass
class MethodConfig:
    """Base of every method's configuration (a dataclass of :func:`opt` fields; YAML-serialisable).

    ``validate()`` checks every field's type and range (from its metadata) and then the method's own rules
    (override :meth:`check`); it runs when a config is constructed, so an invalid config never exists."""

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown option(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d).validate()

    def validate(self) -> "MethodConfig":
        check_fields(self, type(self).__name__)
        self.check()
        return self

    def check(self) -> None:
        """Rules between fields (a ConfigError naming them); the field types and ranges are checked before."""


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(Method, name)


class Method(nn.Module):
    """A prompt-learning method (or baseline) over a frozen backbone.

    Class attributes a subclass sets:

    * ``name`` (its registry name), ``family`` (``baselines``, ``prompts``, ``adapters``, ``towers``,
      ``ordinal``...: how ``vlprompt methods`` groups it), ``summary`` (one line for ``--help``), ``config_class``
      (its :class:`MethodConfig` dataclass);
    * ``inputs``: what it reads of an image at every step and in evaluation, a subset of :data:`INPUT_KINDS`:
      ``global`` / ``local`` features of the frozen tower (cached), or ``images`` (it runs an image tower
      itself), or ``images`` with ``global``: the images and the frozen tower's features of the same augmented view
      (the features from the cache); config-dependent through :meth:`input_kinds`; ``eval_inputs`` when
      evaluation reads less;
    * ``batch_coupled``: its loss couples the images of a batch (not a mean of per-image terms), so data-parallel
      ranks may not each take a slice;
    * ``head_kind``: what :meth:`export_head` returns for ``predict``: ``"linear"`` (normalised class text
      features, cosine logits), ``"affine"`` (``weight`` (K, E), ``bias`` (K,) on unnormalised image features),
      ``"prompt"`` (the learned tensors; ``predict`` rebuilds the method) or a kind of the method's own, computed
      by its :meth:`head_logits`;
    * ``uses_template``: the constructor also takes ``template=`` (the dataset's prompt template); with
      ``template_field`` (the config field of its hand-crafted prompt template(s)) and :meth:`expand_templates`,
      an evaluation on another dataset resolves the user's request again with that dataset's own prompt.

    The lifecycle of a run (Lightning's hooks are the model; every hook is optional):

    1. ``__init__(config, backbone, classnames)``: the method on the training classes;
    2. :meth:`setup` (train, val): state built from the training features before any step (class means, caches,
       data-derived step sizes, multipliers) -- also a whole closed-form fit (the linear probe);
    3. when :meth:`trains` (its trainable parameters, ``train.epochs`` epochs): per step :meth:`training_step`,
       :meth:`on_before_optimizer_step`; per epoch :meth:`on_train_epoch_end`;
    4. :meth:`after_training` (val): searches on the validation split (hyper-parameters), final state;
    5. the test evaluation (``forward`` -> logits (B, K)), then :meth:`on_test_end` (plots, run artefacts).

    Whether a run reads training data follows from these declarations (:meth:`needs_training_data`): zero-shot
    overrides none of them and only evaluates; the linear probe only sets itself up.
    """

    name: ClassVar[str] = "method"
    family: ClassVar[str] = "other"
    config_class: ClassVar[type] = MethodConfig
    summary: ClassVar[str] = ""
    inputs: ClassVar[frozenset] = frozenset({"global"})
    #: what it reads in evaluation when that differs from training (None: ``inputs``); e.g. PromptSRC trains on
    #: images together with the frozen tower's cached features of the same augmented view, and evaluates on images
    eval_inputs: ClassVar[Optional[frozenset]] = None
    batch_coupled: ClassVar[bool] = False
    head_kind: ClassVar[str] = "linear"
    #: the constructor takes ``template=`` (the dataset's own prompt template, for hand-crafted prompts)
    uses_template: ClassVar[bool] = False
    #: the config field holding the hand-crafted prompt template(s) of a ``uses_template`` method. The value the
    #: user asked for (``template_request``, e.g. ``["dataset"]``) is kept in method.json, so that an evaluation on
    #: another dataset resolves it again with that dataset's own prompt (the papers' cross-dataset protocol)
    template_field: ClassVar[Optional[str]] = None
    #: the constructor also takes ``source_names=``: the class names as the dataset's files spell them (underscores
    #: kept: ``vlprompt.data.source_classnames``), for a method whose original prompts with them; None where they are
    #: not known (a method rebuilt from its run directory, which keeps what it built from them)
    uses_source_names: ClassVar[bool] = False
    #: the format of the original repository's saved runs that ``vlprompt import --from NAME`` reads (``dassl``:
    #: a Dassl output folder; ``lightning``: a Lightning checkpoint), or None: see :meth:`import_original`
    original_format: ClassVar[Optional[str]] = None
    #: the name under which the original's Dassl trainer registers its model: its checkpoints are
    #: ``<output>/<original_module>/model.pth.tar-<epoch>``
    original_module: ClassVar[str] = "prompt_learner"
    #: what :meth:`setup` / :meth:`after_training` read: ``train`` / ``val`` (un-augmented features of the split),
    #: ``train_views`` (every cached augmented view of the training images, :meth:`setup_views` of them)
    setup_reads: ClassVar[frozenset] = frozenset()

    def __init__(self, config: MethodConfig, backbone, classnames: Sequence[str]):
        super().__init__()
        self.config = config
        self.backbone = backbone  # frozen; its parameters are not part of this module's state
        self.classnames = list(classnames)
        self._eval_cache: Any = None
        self._eval_key: Any = None
        #: the ``template_field`` value the user asked for, before :meth:`expand_templates` (set by the subclass)
        self.template_request: Any = None

    # nn.Module would register the backbone as a submodule; keep it out of state_dict / parameters
    def __setattr__(self, key, value):
        if key == "backbone":
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    # -- the recipe -----------------------------------------------------------------------------------
    @classmethod
    def data_defaults(cls) -> dict:
        """Defaults of data fields this method changes (e.g. zero-shot: ``{"shots": 0}``; Tip-Adapter's crop
        scale)."""
        return {}

    @classmethod
    def preset(cls, data) -> dict:
        """The paper's recipe for this data (a resolved :class:`vlprompt.runs.DataConfig`):
        ``{"train": {TrainConfig field: value}, "method_options": {config field: value}}``; the user's own
        settings override it. Name the source of each value in the code."""
        return {}

    @classmethod
    def expand_templates(cls, request: Any, dataset_template: Optional[str]) -> Any:
        """The ``template_field`` value a request stands for on a dataset whose own prompt is ``dataset_template``
        (what the constructor uses: e.g. ``["dataset"]`` -> ``[dataset_template]``). Default: the request."""
        return request

    @classmethod
    def template_follows_dataset(cls, request: Any) -> bool:
        """Whether a ``template_field`` request depends on the dataset's own prompt (``dataset``, ``ensemble``, a
        default of None), rather than naming its templates outright (a custom string, ``imagenet80``)."""
        return (cls.template_field is not None
                and cls.expand_templates(request, "{} (1).") != cls.expand_templates(request, "{} (2)."))

    @classmethod
    def config_for_loading(cls, options: dict) -> dict:
        """The options that rebuild a saved method whose learned state is then loaded over it (e.g. no download
        of pre-trained image-encoder weights that the saved state replaces anyway). Default: as saved."""
        return options

    # -- what a run of this method reads (decided from the config alone, before anything is built) ----------
    @classmethod
    def trains(cls, config: MethodConfig) -> bool:
        """Whether the method learns by gradient (then ``train`` options apply and the engine's loop runs)."""
        return True

    @classmethod
    def input_kinds(cls, config: MethodConfig) -> frozenset:
        """What it reads of an image for this config (default: :attr:`inputs`)."""
        return frozenset(cls.inputs)

    @classmethod
    def eval_input_kinds(cls, config: MethodConfig) -> frozenset:
        """What it reads of an image in evaluation (default: :attr:`eval_inputs`, else :meth:`input_kinds`)."""
        return frozenset(cls.eval_inputs) if cls.eval_inputs is not None else cls.input_kinds(config)

    @classmethod
    def setup_views(cls, config: MethodConfig, train) -> int:
        """How many cached augmented views of the training images :meth:`setup` reads (``train_views``): by
        default the training views (``train.views``)."""
        return int(train.views or 0) if train is not None else 0

    @classmethod
    def check_recipe(cls, config: MethodConfig, train) -> None:
        """Rules between the method's options and the training recipe (``train``: the resolved
        :class:`vlprompt.engine.trainer.TrainConfig`, None when it learns nothing by gradient): a ConfigError naming
        the flags. Runs when a request is resolved, before anything is read or written."""

    @classmethod
    def needs_training_data(cls, config: MethodConfig) -> bool:
        """Whether a run reads the train / val splits: it trains, or its setup / after-training hooks read them."""
        return cls.trains(config) or bool(cls.setup_reads)

    @classmethod
    def import_original(cls, run):
        """An original run (:class:`.parts.originals.OriginalRun`: its saved tensors by their original names, its
        configuration) as an :class:`.parts.originals.ImportedRun`: the learned tensors by this method's names,
        the run request the configuration gives, checks against the rebuilt method. Methods that declare an
        :attr:`original_format` implement it."""
        raise NotImplementedError(f"{cls.name} cannot import runs of its original repository")

    # -- hooks ---------------------------------------------------------------------------------------------
    def setup(self, train: SplitData, val: Optional[SplitData]) -> dict:
        """State built from the training data before any training step (caches, class means, step sizes...), or a
        closed-form fit; returns what results.json reports of it. Reads only what :attr:`setup_reads` declares."""
        return {}

    def training_step(self, batch: Batch) -> StepOutput:
        """One step's loss: by default ``forward`` then :meth:`loss` (cross-entropy)."""
        logits = self(batch.feats)
        loss, parts = self.loss(logits.float(), batch.labels, batch.targets)
        return StepOutput(loss, logits, parts)

    def on_before_optimizer_step(self, params: list[torch.Tensor],
                                 gradients: dict[str, list[Optional[torch.Tensor]]]) -> None:
        """After backward, the sum over ranks and the fp16 unscaling, before gradient clipping and the optimiser
        step: ``params`` are the trainable parameters (their ``.grad`` may be changed in place), ``gradients`` the
        gradients of the step's ``gradient_only`` losses, one per parameter (None where a parameter has none)."""

    def on_train_epoch_end(self, epoch: int, epochs: int) -> None:
        """After epoch ``epoch`` (1-based) of ``epochs``, before the validation evaluation and the epoch's
        checkpoint; state it keeps between epochs goes in :meth:`training_state`."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors the hooks keep between steps / epochs (not learned tensors): saved in every checkpoint, so a
        resumed run continues exactly."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise CheckpointError(f"{self.name} keeps no training state, the checkpoint has {sorted(state)}")

    def after_training(self, val: Optional[SplitData]) -> dict:
        """After training (or setup), before the test evaluation: searches on the validation split; returns what
        results.json reports of it. Never sees the test split."""
        return {}

    def on_test_end(self, run_dir, logits: Optional[torch.Tensor], samples) -> dict:
        """Run artefacts written after the test evaluation (plots...); returns entries for results.json."""
        return {}

    def selection(self) -> Optional[tuple]:
        """``(metric, "min" | "max")`` or ``(metric, mode, "first" | "last")`` (which of equal epochs wins,
        default the first): keep the epoch with the best validation metric, or None (the last)."""
        return None

    def interpretable_vectors(self) -> list[tuple[dict, torch.Tensor]]:
        """Learned vectors in the token-embedding space, ``(label dict, (M, D) tensor)`` each, for
        ``vlprompt interpret`` (context vectors, rank embeddings)."""
        return []

    @classmethod
    def head_logits(cls, tensors: dict, info: dict, backbone, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of an exported head of this method's own kind on preprocessed images (B, 3, H, W)."""
        raise NotImplementedError(f"{cls.name} exports heads of kind {cls.head_kind!r} only")

    @classmethod
    def head_values(cls, logits: torch.Tensor, tensors: dict, info: dict) -> Optional[torch.Tensor]:
        """(B,) values an exported head predicts besides its classes (ordinal heads: the expected rank value),
        or None."""
        return None

    def describe(self) -> dict:
        """What results.json and log.txt should say about how this method was set up (resolved choices)."""
        return {}

    # -- classes ------------------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        return self.backbone.logit_scale

    def set_classnames(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self._eval_cache = None

    def require_trained_classes(self, classnames: Sequence[str], what: str, hint: str = "") -> None:
        """Refuse a class list other than the one the method was trained on (a class-specific state: CoOp's CSC
        context, a linear probe, TaskRes' residuals, Tip-Adapter's cache), naming the first difference; ``what``
        says what is class-specific, ``hint`` what to do instead."""
        trained, given = [str(c) for c in self.classnames], [str(c) for c in classnames]
        if given != trained:
            raise _class_specific(what, trained, given, hint)

    def trained_class_rows(self, classnames: Sequence[str], what: str, hint: str = "",
                           trained: Optional[Sequence[str]] = None) -> Optional[list[int]]:
        """For a class-specific state that can be restricted to some of its classes (``trained``: the classes of its
        rows, by default the current class list): None for the trained class list itself; for a sub-list of it in
        any order (ImageNet-A / -R: 200 of ImageNet's 1000 classes), the position of each of its classes in the
        trained list -- the state's rows for them classify among those classes exactly as the whole state does, as
        the original TaskRes and CLAP re-index theirs; any other list is refused as :meth:`require_trained_classes`
        refuses it (a name the trained list holds twice is ambiguous, hence refused too)."""
        trained = [str(c) for c in (self.classnames if trained is None else trained)]
        given = [str(c) for c in classnames]
        if given == trained:
            return None
        where = {}
        for i, c in enumerate(trained):
            where.setdefault(c, []).append(i)
        if given and len(set(given)) == len(given) and all(len(where.get(c, ())) == 1 for c in given):
            return [where[c][0] for c in given]
        missing = [c for c in given if c not in where]
        if missing and given:
            raise VLPromptError(f"{what} is class-specific: it belongs to the {len(trained)} classes it was trained "
                                f"on, and class {given.index(missing[0])} {missing[0]!r} is not one of them (a "
                                f"sub-list of them is evaluated on their own rows)" + (f"; {hint}" if hint else ""))
        raise _class_specific(what, trained, given, hint)

    def forward(self, feats: Features) -> torch.Tensor:  # (B, K)
        raise NotImplementedError  # abstract

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """(loss, parts) for a batch; cross-entropy by default."""
        loss = F.cross_entropy(logits, labels)
        return loss, {"ce": loss.detach()}

    # evaluation: class text features computed once per evaluation, not per batch
    def begin_eval(self) -> None:
        self._eval_cache = None

    def end_eval(self) -> None:
        self._eval_cache = None

    def _state_key(self) -> tuple:
        # in-place updates (optimizer steps, load_state_dict) bump a tensor's version counter: a cached result
        # is only reused while every parameter and buffer is the very same tensor at the same version
        return (tuple(self.classnames),) + tuple((id(t), t._version) for t in self.state_dict(keep_vars=True).values())

    def once_per_eval(self, compute) -> Any:
        """``compute()`` during training; in evaluation (eval mode, no grad) computed once and reused while no
        parameter, buffer or class name changed -- the class text features do not change between test batches,
        and a stale result can never be served."""
        if self.training or torch.is_grad_enabled():
            return compute()
        key = self._state_key()
        if self._eval_cache is None or self._eval_key != key:
            self._eval_cache = compute()
            self._eval_key = key
        return self._eval_cache

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def learned_tensor(self, name: str) -> torch.Tensor:
        """One learned tensor by its name in :meth:`learned_state` (e.g. ``"prompt.ctx"``)."""
        state = self.learned_state()
        if name not in state:
            raise KeyError(f"{self.name} has no learned tensor {name!r}; it has {sorted(state)}")
        return state[name]

    @torch.no_grad()
    def set_learned_tensor(self, name: str, value: torch.Tensor) -> None:
        """Overwrite one learned tensor in place (same shape; converted to its dtype and device)."""
        target = self.state_dict(keep_vars=True).get(name)
        if target is None or name not in self.learned_state():
            raise KeyError(f"{self.name} has no learned tensor {name!r}; it has {sorted(self.learned_state())}")
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"learned tensor {name!r} has shape {tuple(target.shape)}, got {tuple(value.shape)}")
        target.copy_(value.to(target.device, target.dtype))

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": self.trainable_parameters(), "lr": lr}]

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep (class-independent unless the method is class-specific)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"learned tensors do not match {self.name}: missing {missing}, unexpected {unexpected}")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"learned tensor {k!r} has shape {tuple(v.shape)}, this {self.name} expects "
                                      f"{tuple(own[k].shape)} (a class-specific context trained on another class "
                                      f"list, or another context length?)")
        self.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})

    def export_head(self) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
        """A deployable head: tensors and JSON metadata (``kind`` tells ``predict`` how to use them), or None
        when the method cannot be reduced to fixed class features (kind ``prompt``: ``predict`` rebuilds it)."""
        return None

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor, targets: Optional[torch.Tensor] = None) -> dict:
        """Evaluation metrics of logits (N, K): top-1 and mean per-class accuracy, in percent."""
        return classification_metrics(logits, labels, self.num_classes)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def cosine_logits(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(image (B, E), text (K, E)) -> (B, K)."""
    return scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy and mean per-class accuracy (percent) of logits (N, K) against labels (N,), from the integer
    counts of correct predictions, exactly (1 of 10 is 10.0, not float32's 10.000000149011612)."""
    from fractions import Fraction

    pred = logits.argmax(dim=-1).cpu()
    labels = labels.cpu()
    correct = pred == labels
    n = int(labels.numel())
    per_class = [Fraction(int(correct[labels == c].sum()), int((labels == c).sum()))
                 for c in range(num_classes) if (labels == c).any()]
    return {"accuracy": float(Fraction(100 * int(correct.sum()), max(n, 1))),
            "mean_per_class_accuracy": float(100 * sum(per_class, Fraction(0)) / max(len(per_class), 1)),
            "num_samples": n}


def _class_specific(what: str, trained: list[str], given: list[str], hint: str) -> VLPromptError:
    return VLPromptError(f"{what} is class-specific: it belongs to the {len(trained)} classes it was trained on and "
                         f"cannot be used for another class list ({first_difference(trained, given)})"
                         + (f"; {hint}" if hint else ""))


def first_difference(trained: Sequence[str], given: Sequence[str]) -> str:
    """Where two class lists first differ, in words."""
    for i, (a, b) in enumerate(zip(trained, given)):
        if a != b:
            return f"class {i} is {b!r} here but {a!r} in the trained list"
    if len(given) > len(trained):
        return f"class {len(trained)} {given[len(trained)]!r} is not in the trained list"
    return f"the trained class {len(given)} {trained[len(given)]!r} is missing"


def added_fields_at_default(obj: Any) -> list[str]:
    """The fields of a config dataclass declared with ``since`` (added after runs were made) whose value is their
    default: left out of a run's identity."""
    out = []
    for f in dataclasses.fields(obj):
        if not f.metadata.get("since"):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(obj, f.name) == default:
            out.append(f.name)
    return out
