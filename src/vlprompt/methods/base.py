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

from ..errors import ConfigError


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: Optional[Sequence] = None,
        min: Optional[float] = None, max: Optional[float] = None, gt: Optional[float] = None,
        flag: Optional[str] = None, default_factory: Any = dataclasses.MISSING):
    """A config field with its help text and valid values: ``choices``, ``min`` / ``max`` (inclusive), ``gt``
    (exclusive lower bound). ``flag`` renames the generated command-line flag (default ``--field-name``)."""
    meta = {"help": help, "choices": None if choices is None else tuple(choices), "min": min, "max": max, "gt": gt,
            "flag": flag}
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


@dataclass
class Features:
    """What a method sees of a batch of images.

    ``global_``: (B, E) image features of the frozen tower; ``local``: (B, M, E) or None; ``images``: (B, 3, H, W)
    for methods that train an image encoder (their features are computed inside the method).
    """

    global_: Optional[torch.Tensor] = None
    local: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None

    def to(self, device) -> "Features":
        return Features(*(None if t is None else t.to(device, non_blocking=True)
                          for t in (self.global_, self.local, self.images)))


@dataclass
class MethodConfig:
    """Base of every method's configuration (a dataclass of :func:`opt` fields; YAML-serialisable).

    ``validate()`` checks every field's type and range (from its metadata) and then the method's own rules
    (override :meth:`check`); it runs before anything is built or written."""

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


class Method(nn.Module):
    """A prompt-learning method (or baseline) over a frozen backbone.

    Class attributes a subclass sets:

    * ``config_class``: its :class:`MethodConfig` dataclass; ``summary``: one line for ``--help``;
    * ``learns``: ``"gradient"`` (trained by the engine's loop), ``"fit"`` (fitted in closed form on the frozen
      features of the train / val splits: :meth:`fit`, e.g. the linear probe) or ``"none"`` (nothing to learn:
      zero-shot);
    * ``needs_local`` (local image features), ``trains_image_encoder`` (the engine then passes images);
    * ``head_kind``: what :meth:`export_head` returns for ``predict``: ``"linear"`` (normalised class text
      features, cosine logits), ``"affine"`` (``weight`` (K, E), ``bias`` (K,) on unnormalised image features),
      ``"prompt"`` (the learned tensors; ``predict`` rebuilds the method) or a kind of the method's own, computed
      by its :meth:`head_logits`;
    * ``uses_template``: the constructor also takes ``template=`` (the dataset's prompt template); with
      ``template_field`` (the config field of its hand-crafted prompt template(s)) and :meth:`expand_templates`,
      an evaluation on another dataset resolves the user's request again with that dataset's own prompt;

    and implements ``forward`` -> logits (B, K).
    """

    name: ClassVar[str] = "method"
    config_class: ClassVar[type] = MethodConfig
    summary: ClassVar[str] = ""
    learns: ClassVar[str] = "gradient"
    needs_local: ClassVar[bool] = False
    trains_image_encoder: ClassVar[bool] = False
    head_kind: ClassVar[str] = "linear"
    #: the constructor takes ``template=`` (the dataset's own prompt template, for hand-crafted prompts)
    uses_template: ClassVar[bool] = False
    #: the config field holding the hand-crafted prompt template(s) of a ``uses_template`` method. The value the
    #: user asked for (``template_request``, e.g. ``["dataset"]``) is kept in method.json, so that an evaluation on
    #: another dataset resolves it again with that dataset's own prompt (the papers' cross-dataset protocol)
    template_field: ClassVar[Optional[str]] = None
    #: the loss is a mean of per-sample terms, so data-parallel ranks may each take a slice of the batch (set
    #: False for a loss that couples the samples of a batch, e.g. OrdinalCLIP's text-to-image term)
    loss_is_per_sample: ClassVar[bool] = True

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
        """Defaults of data fields this method changes (e.g. zero-shot: ``{"shots": 0}``)."""
        return {}

    @classmethod
    def preset(cls, data) -> dict:
        """The paper's recipe for this data (a resolved :class:`vlprompt.runs.DataConfig`):
        ``{"train": {TrainConfig field: value}, "method_options": {config field: value}}``; the user's own
        settings override it. Name the source of each value in the code."""
        return {}

    @classmethod
    def trains_own_image_encoder(cls, config: MethodConfig) -> bool:
        """Whether this configuration trains an image encoder on the images (then no features are cached and
        ``views`` / ``online`` do not apply); decided from the config alone, before anything is built."""
        return cls.trains_image_encoder

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

    # -- hooks ---------------------------------------------------------------------------------------------
    def selection(self) -> Optional[tuple[str, str]]:
        """``(metric, "min" | "max")``: keep the epoch with the best validation metric, or None (the last)."""
        return None

    def fit(self, train: Features, labels: torch.Tensor, val: Optional[Features], val_labels: Optional[torch.Tensor],
            *, progress: bool = False) -> dict:
        """Closed-form fitting (``learns == "fit"``) on the frozen test-transform features of the train and
        val splits; returns what results.json reports of it."""
        raise NotImplementedError(f"{self.name} does not fit in closed form (learns={self.learns!r})")

    def after_training(self, run_dir, logits: Optional[torch.Tensor], samples) -> dict:
        """Run artefacts written after the test evaluation (plots...); returns entries for results.json."""
        return {}

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

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": self.trainable_parameters(), "lr": lr}]

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep (class-independent unless the method is class-specific)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        from ..errors import CheckpointError

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
