"""Command-line options generated from config dataclasses (a method's config, the training recipe).

Each field of a config declared with :func:`vlprompt.methods.base.opt` becomes ``--field-name`` (or its
``flag``) with the field's help text, default and choices; booleans get ``--x`` / ``--no-x``. Every generated
option defaults to "not given" (``argparse.SUPPRESS``), so only what the user typed reaches the request and the
method's preset fills the rest -- the help shows the config's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, Optional

from ..errors import ConfigError


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type, optional) of an annotation."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), True
    return tp, False


def _parser_for(tp: Any, optional: bool, flag: str):
    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null"):
            return None
        if tp is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} expects an integer, got {text!r}")
        if tp is float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} expects a number, got {text!r}")
        if tp is list or typing.get_origin(tp) is list:  # one item per argument
            item = (typing.get_args(tp) or (Any,))[0]
            if text.lstrip().startswith("["):  # the whole list as JSON
                try:
                    return json.loads(text)
                except json.JSONDecodeError as e:
                    raise argparse.ArgumentTypeError(f"{flag}: not a JSON list: {text!r}") from e
            if item is str:
                return text  # verbatim: a template such as "{}" stays a string
            if item in (int, float):
                return _parser_for(item, False, flag)(text)
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return text
        if tp is dict or typing.get_origin(tp) is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"{flag} expects a JSON object, got {text!r}") from e
            return value
        return text
    return parse


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "" if f.default is None else f" (default {f.default})"
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f" (default {f.default_factory()})"  # type: ignore[misc]
    return ""


def add_config_options(parser: argparse.ArgumentParser, config_cls, title: str, dest_prefix: str,
                       skip: tuple[str, ...] = (), taken: Optional[set] = None,
                       recipe: Optional[dict] = None, recipe_name: str = "") -> list[str]:
    """Add one option per field of ``config_cls`` to a new group; ``dest`` is ``<dest_prefix>.<field>``.
    Returns the flags added. A flag already used by another group (``taken``) is an error: each option must
    mean one thing."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config_cls)
    flags = []
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = flag_of(f)
        if taken is not None:
            if flag in taken:
                raise ConfigError(f"{config_cls.__name__}.{f.name}: the option {flag} is already taken by another "
                                  f"option group; rename the field or give it opt(flag=...)")
            taken.add(flag)
        tp, optional = _base_type(hints.get(f.name, str))
        m = f.metadata
        if recipe and f.name in recipe:  # the method's preset sets it: that is the default the user gets
            help_text = (m.get("help") or "") + f" (default: {recipe[f.name]}, {recipe_name})"
        else:
            help_text = (m.get("help") or "") + _default_text(f)
        dest = f"{dest_prefix}.{f.name}"
        if tp is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            kw = {}
            if m.get("choices") is not None:
                kw["choices"] = list(m["choices"]) + ([None] if optional else [])
            metavar = {int: "N", float: "X", str: "TEXT"}.get(tp, "VALUE")
            if kw.get("choices"):
                metavar = "{" + ",".join(str(c) for c in m["choices"]) + "}"
            if tp is list or typing.get_origin(tp) is list:
                kw["nargs"] = "+"
                help_text += " (one value per argument, or a JSON list)"
            group.add_argument(flag, dest=dest, type=_parser_for(tp, optional, flag), default=argparse.SUPPRESS,
                               metavar=metavar, help=help_text, **kw)
        flags.append(flag)
    return flags


def given_sections(args: argparse.Namespace, prefixes: tuple[str, ...]) -> dict[str, dict]:
    """``{prefix: {field: value}}`` of the generated options the user gave."""
    out: dict[str, dict] = {p: {} for p in prefixes}
    for key, value in vars(args).items():
        head, _, name = key.partition(".")
        if name and head in out:
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
                value = value[0]  # a single JSON list given for a list option
            out[head][name] = value
    return out
