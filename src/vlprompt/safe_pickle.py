"""Read pickles and ``torch.save`` checkpoints written by other code without running code from the file.

Use::

    from vlprompt.safe_pickle import load_checkpoint, load_pickle, Placeholder

    ckpt = load_checkpoint("output/prompt_learner/model.pth.tar-50")   # torch.save files (zip or legacy)
    ckpt["state_dict"]["ctx"]                                            # a real tensor, on the CPU
    ckpt["scheduler"]["successor"]                                       # a Placeholder (a torch scheduler)

    data = load_pickle("split_fewshot/shot_4-seed_1.pkl", error=DataError)   # plain pickle files
    datum = data["train"][0]              # Placeholder for dassl.data.datasets.base_dataset.Datum
    datum.global_name                     # "dassl.data.datasets.base_dataset.Datum"
    datum.attrs["_impath"], datum.attrs["_label"], datum.attrs["_classname"]

What is rebuilt: numbers, strings, bytes, containers (dict, list, tuple, set, ``collections.OrderedDict`` and
``defaultdict``), tensors (the rebuild functions ``torch.save`` writes, storages read by torch's own zip reader),
``torch.Size``, ``torch.device`` and dtypes. Objects of the known foreign classes (``KNOWN_FOREIGN``: Dassl's
schedulers and ``Datum``, torch's optimizers and LR schedulers, which Dassl's checkpoints hold inside their
scheduler state) become inert :class:`Placeholder` objects that record what the pickle gave them (constructor
arguments, ``__setstate__`` state, appended items) and never call anything. Any other global (``os.system``,
``builtins.eval``, ``io.open``, ``subprocess``..., an unknown module) is refused with ``error`` (default
:class:`CheckpointError`) naming the global and the file, before anything is called with it.

Why not ``torch.load(weights_only=True)`` with ``torch.serialization.safe_globals`` placeholders: torch's
weights-only unpickler only lets SETITEMS target plain dict / OrderedDict / Counter, and a real CoOp checkpoint
holds the SGD optimizer object inside its scheduler's successor, whose ``state`` is a ``defaultdict`` filled
by SETITEMS, so such a file cannot load that way whatever is allowlisted; it also supports only pickle protocol
2 (no STACK_GLOBAL / FRAME), so Dassl's ``split_fewshot`` pickles (``pickle.HIGHEST_PROTOCOL``) cannot be read
with it. Instead this module gives a restricted ``pickle.Unpickler`` (the stdlib's documented "restricting
globals" hook: ``find_class`` is the only way a pickle obtains a callable) and, for checkpoints, hands it to
``torch.load`` as its ``pickle_module``, so torch's own code still reads the zip or legacy container, the storages,
byte order and devices. TorchScript archives are refused first, because ``torch.load`` would pass them to
``torch.jit.load``.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import CheckpointError, VLPromptError

# Classes of other projects (or torch objects we never want alive: optimizers and schedulers hold hooks and
# references to parameters) that may appear in files users bring; each becomes a Placeholder. A module name
# maps to None (every name in that module) or to the set of names allowed.
KNOWN_FOREIGN: dict[str, frozenset[str] | None] = {
    "dassl.optim.lr_scheduler": None,
    "dassl.data.datasets.base_dataset": frozenset({"Datum"}),
    "torch.optim.lr_scheduler": None,
    "torch.optim.optimizer": None,
    "torch.optim.sgd": None,
    "torch.optim.adam": None,
    "torch.optim.adamw": None,
    "torch.optim.radam": None,
    "torch.optim.rmsprop": None,
    "torch.optim.adagrad": None,
}


def _rebuilders() -> dict[str, Any]:
    """The globals rebuilt for real: containers and torch's tensor rebuild functions (no file or code access)."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "collections.Counter": collections.Counter,
        "builtins.dict": dict,
        "builtins.list": list,
        "builtins.tuple": tuple,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "builtins.slice": slice,
        "_codecs.encode": _latin1_encode,  # protocol 2 writes bytes as _codecs.encode(str, "latin1")
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
    }
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            allowed[f"torch.{name}"] = value
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Only the two encodings pickle itself writes; others could reach codecs we have no reason to run.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


_REBUILDERS = _rebuilders()


class Placeholder:
    """An inert stand-in for an object of a class that is not imported (and whose code never runs).

    ``global_name`` is the class's ``module.name`` as the pickle names it; ``args`` / ``kwargs`` what the pickle
    passed to the class; ``state`` what it passed to ``__setstate__`` (None if nothing); ``items`` / ``entries``
    what it appended or set as items (list and dict subclasses). ``attrs`` is the state as a dict (the object's
    ``__dict__`` for ordinary classes, merged with slot state).
    """

    global_name: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = object.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "kwargs", kwargs)
        object.__setattr__(obj, "state", None)
        object.__setattr__(obj, "items", [])
        object.__setattr__(obj, "entries", {})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls the class: nothing more to do
        pass

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "state", state)

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    @property
    def attrs(self) -> dict:
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            return merged
        return dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<Placeholder {self.global_name}>"


_placeholder_classes: dict[str, type] = {}


def placeholder_class(global_name: str) -> type:
    """The Placeholder subclass standing for ``global_name`` (one per name, so objects can be told apart)."""
    cls = _placeholder_classes.get(global_name)
    if cls is None:
        module, _, name = global_name.rpartition(".")
        cls = type(name, (Placeholder,), {"global_name": global_name, "__module__": f"placeholder:{module}"})
        _placeholder_classes[global_name] = cls
    return cls


def _is_known_foreign(module: str, name: str, foreign: dict[str, frozenset[str] | None]) -> bool:
    if module not in foreign:
        return False
    names = foreign[module]
    return names is None or name in names


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` returns only rebuilders and placeholders, refusing the rest."""

    source: str = "<pickle>"
    foreign: dict[str, frozenset[str] | None] = KNOWN_FOREIGN
    error: type[VLPromptError] = CheckpointError

    def find_class(self, module: str, name: str) -> Any:
        # The stdlib's own find_class maps Python 2 names (protocol 2, which torch.save writes, spells dict as
        # __builtin__.dict); overriding it loses that, so map here (no Python 3 module has those names).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in _REBUILDERS:
            return _REBUILDERS[full]
        if _is_known_foreign(module, name, self.foreign):
            return placeholder_class(full)
        raise self.error(
            f"{self.source}: refusing to load: the pickle names the global {full}, which vlprompt does not "
            "rebuild (loading it could run code from the file); only tensors, containers and known classes "
            "(as inert placeholders) are read"
        )

    # No persistent_load here: plain pickles have none (the stdlib refuses them), and torch.load sets its own
    # storage reader on the instance, which a method defined here would shadow.


def _restricted_module(source: str, foreign: dict[str, frozenset[str] | None],
                       error: type[VLPromptError]) -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load``: its ``Unpickler`` and ``load`` are the restricted ones."""
    cls = type("RestrictedUnpickler", (RestrictedUnpickler,), {"source": source, "foreign": foreign,
                                                               "error": error})

    def load(file: Any, **kwargs: Any) -> Any:
        return cls(file, **kwargs).load()

    return types.SimpleNamespace(__name__=__name__, Unpickler=cls, load=load)


def _merged(extra: dict[str, frozenset[str] | None] | None) -> dict[str, frozenset[str] | None]:
    foreign = dict(KNOWN_FOREIGN)
    for module, names in (extra or {}).items():
        old = foreign.get(module, frozenset())
        foreign[module] = None if names is None or old is None else frozenset(old) | frozenset(names)
    return foreign


def load_pickle(path: str | os.PathLike, *, extra_foreign: dict[str, frozenset[str] | None] | None = None,
                error: type[VLPromptError] = CheckpointError) -> Any:
    """Unpickle a plain pickle file (any protocol) with the restricted unpickler; errors are ``error``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read: {e}") from e
    module = _restricted_module(str(path), _merged(extra_foreign), error)
    try:
        return module.load(io.BytesIO(data), encoding="utf-8")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError) as e:
        # Structural problems of the byte stream (truncated, a class used as a list...), not refusals.
        raise error(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from e


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def load_checkpoint(path: str | os.PathLike, *,
                    extra_foreign: dict[str, frozenset[str] | None] | None = None,
                    error: type[VLPromptError] = CheckpointError) -> Any:
    """Load a ``torch.save`` file (zip or legacy format) onto the CPU without running code from it.

    Tensors keep their saved dtype (fp16 stays fp16). ``extra_foreign`` adds known classes (module -> names or
    None for all) that become placeholders. Raises ``error`` naming the file for a refused global, a TorchScript
    archive, or an unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        raise error(f"{path}: a safetensors file, not a torch.save checkpoint")
    if _is_torchscript(path):
        raise error(f"{path}: a TorchScript archive (its code would run on load), not a torch.save checkpoint")
    module = _restricted_module(str(path), _merged(extra_foreign), error)
    try:
        # weights_only=False only because a pickle_module is given: find_class above is the restriction.
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=module, mmap=False)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError) as e:
        raise error(f"{path}: not a readable torch checkpoint: {type(e).__name__}: {e}") from e
    except RuntimeError as e:  # torch's zip reader: "PytorchStreamReader failed reading zip archive..."
        raise error(f"{path}: not a readable torch checkpoint: {e}") from e
