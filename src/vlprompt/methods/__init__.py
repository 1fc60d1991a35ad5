"""Methods: each one is a config dataclass + a :class:`Method` subclass in its own file, and one line below.

The registry maps a name to ``"module:Class"`` (imported on first use, so it does not depend on import side
effects and importing ``vlprompt.methods`` stays cheap) or to a class itself (:func:`register_method`, e.g. a
method defined in a user's own module or a test). Everything a name needs -- its config class and options, its
preset, its head kind, its hooks -- is on the class (:class:`vlprompt.methods.base.Method`).
"""
from __future__ import annotations

import importlib
from typing import Union

from ..errors import ConfigError, VLPromptError
from .base import Batch, Features, Method, MethodConfig, StepOutput, opt

_REGISTRY: dict[str, Union[str, type]] = {}
_COMMANDS: dict[str, str] = {}


def register_method(name: str, target: Union[str, type], *, replace: bool = False,
                    command: str | None = None) -> None:
    """Register a method under ``name``: ``"package.module:Class"`` or a :class:`Method` subclass. A name
    registered twice is an error unless ``replace``. ``command``: also a top-level command of ``vlprompt``
    (``vlprompt zeroshot ...`` = ``vlprompt train --method zeroshot ...``)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise VLPromptError(f"a method name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise VLPromptError(f"method {name!r} is already registered ({_REGISTRY[name]!r})")
    if isinstance(target, type):
        _check_class(name, target, target.__qualname__)
    if command is not None:
        if _COMMANDS.get(command, name) != name:
            raise VLPromptError(f"command {command!r} is already the command of method {_COMMANDS[command]!r}")
        _COMMANDS[command] = name
    _REGISTRY[name] = target


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)
    for command in [c for c, n in _COMMANDS.items() if n == name]:
        del _COMMANDS[command]


def method_commands() -> dict[str, str]:
    """``{command: method}`` of the methods that are also top-level commands."""
    return dict(_COMMANDS)


register_method("zeroshot", "vlprompt.methods.baselines.zeroshot:ZeroShot", command="zeroshot")
register_method("linear-probe", "vlprompt.methods.baselines.linear_probe:LinearProbe", command="linear-probe")
register_method("coop", "vlprompt.methods.prompts.coop:CoOp")
register_method("cocoop", "vlprompt.methods.prompts.cocoop:CoCoOp")
register_method("plot", "vlprompt.methods.prompts.plot:PLOT")
register_method("kgcoop", "vlprompt.methods.prompts.kgcoop:KgCoOp")
register_method("prograd", "vlprompt.methods.prompts.prograd:ProGrad")
register_method("ordinalclip", "vlprompt.methods.ordinal.ordinalclip:OrdinalCLIP")
register_method("rank-linear", "vlprompt.methods.ordinal.baselines:RankLinear")
register_method("rank-regression", "vlprompt.methods.ordinal.baselines:RankRegression")
register_method("rank-zeroshot", "vlprompt.methods.ordinal.baselines:RankZeroShot")
register_method("rank-coop", "vlprompt.methods.ordinal.baselines:RankCoOp")
register_method("finetune-image", "vlprompt.methods.baselines.finetune_image:FinetuneImage")
register_method("text-transform", "vlprompt.methods.baselines.text_transform:TextTransform")
register_method("text-bias", "vlprompt.methods.baselines.text_bias:TextBias")
register_method("maple", "vlprompt.methods.towers.maple:MaPLe")
register_method("clip-lora", "vlprompt.methods.towers.clip_lora:CLIPLoRA")
register_method("ivlp", "vlprompt.methods.towers.ivlp:IVLP")
register_method("deep-language", "vlprompt.methods.towers.deep_language:DeepLanguage")
register_method("vpt", "vlprompt.methods.towers.vpt:VPT")
register_method("promptsrc", "vlprompt.methods.towers.promptsrc:PromptSRC")
register_method("tip-adapter", "vlprompt.methods.adapters.tip_adapter:TipAdapter")
register_method("tip-adapter-f", "vlprompt.methods.adapters.tip_adapter:TipAdapterF")
register_method("lpp", "vlprompt.methods.adapters.lpp:LPP")
register_method("taskres", "vlprompt.methods.adapters.taskres:TaskRes")
register_method("clip-adapter", "vlprompt.methods.adapters.clip_adapter:CLIPAdapter")
register_method("clap", "vlprompt.methods.adapters.clap:CLAP")

#: names results written by earlier versions used
ALIASES = {"linear_probe": "linear-probe"}


#: the entry-point group of methods shipped by other packages: ``[project.entry-points."vlprompt.methods"]``
#: ``my-method = "my_package.module:MyMethod"`` makes ``--method my-method`` work once the package is installed
ENTRY_POINT_GROUP = "vlprompt.methods"
_entry_points_loaded = False


def _load_entry_points() -> None:
    """Register the methods other installed packages declare (lazily: imported on first use, as ours)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY and ep.name not in ALIASES:
            register_method(ep.name, ep.value)


def method_names() -> list[str]:
    _load_entry_points()
    return list(_REGISTRY)


def _check_class(name: str, cls: type, where: str) -> None:
    """A registered class is a Method named as registered, with a config dataclass, declaring what it reads."""
    import dataclasses

    from .base import INPUT_KINDS, MethodConfig

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise VLPromptError(f"registry entry {name!r} -> {where} is not a Method subclass")
    if cls.name != name:
        raise VLPromptError(f"registry entry {name!r} -> {where}: the class is named {cls.name!r} (its `name`)")
    if not (isinstance(cls.config_class, type) and issubclass(cls.config_class, MethodConfig)
            and dataclasses.is_dataclass(cls.config_class)):
        raise VLPromptError(f"method {name!r}: config_class must be a MethodConfig dataclass")
    if not set(cls.inputs) or not set(cls.inputs) <= set(INPUT_KINDS):
        raise VLPromptError(f"method {name!r}: inputs must be a non-empty subset of {INPUT_KINDS}")
    if not set(cls.setup_reads) <= {"train", "val", "train_views"}:
        raise VLPromptError(f"method {name!r}: setup_reads must be a subset of train, val, train_views")
    if cls.setup is not Method.setup and not cls.setup_reads:
        raise VLPromptError(f"method {name!r} overrides setup() but declares no setup_reads: it would get no data")


def method_class(name: str) -> type:
    """The :class:`Method` subclass registered as ``name``."""
    name = ALIASES.get(name, name)
    if name not in _REGISTRY:
        _load_entry_points()
    target = _REGISTRY.get(name)
    if target is None:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(_REGISTRY)}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr, None)
        _check_class(name, cls, repr(target))
        _REGISTRY[name] = cls
        target = cls
    return target


def method_families() -> dict[str, list[str]]:
    """``{family: [method names]}`` of every registered method (``vlprompt methods``), in registration order."""
    out: dict[str, list[str]] = {}
    for name in method_names():
        out.setdefault(method_class(name).family, []).append(name)
    return out


def get_method(name: str):
    """(Method class, config class) of a registered method."""
    cls = method_class(name)
    return cls, cls.config_class


def build_config(name: str, options: dict | MethodConfig | None) -> MethodConfig:
    """The method's validated config from a dict of options (unknown ones are an error)."""
    cls = method_class(name)
    if isinstance(options, MethodConfig):
        return options.validate()
    return cls.config_class.from_dict(dict(options or {}))


def build_method(name: str, config: dict | MethodConfig, backbone, classnames, *, template=None,
                 source_names=None) -> Method:
    """The method ``name`` on a backbone and a class list; ``template``: the dataset's own prompt template (for
    methods that use it), ``source_names``: the class names as the dataset's files spell them (for methods whose
    original prompts with them, :attr:`Method.uses_source_names`)."""
    cls = method_class(name)
    kwargs = {}
    if cls.uses_template:
        kwargs["template"] = template
    if cls.uses_source_names:
        kwargs["source_names"] = source_names
    return cls(build_config(name, config), backbone, classnames, **kwargs)


__all__ = ["Method", "MethodConfig", "Features", "Batch", "StepOutput", "opt", "register_method",
           "unregister_method", "method_names", "method_commands", "method_families",
           "method_class", "get_method", "build_config", "build_method"]
