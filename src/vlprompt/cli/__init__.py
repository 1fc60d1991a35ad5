"""The ``vlprompt`` command. Each command group lives in its own module and registers its sub-commands
explicitly below; the CLI only turns arguments into configurations and calls library functions."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional, Sequence

from ..errors import VLPromptError

COMMAND_MODULES = ("vlprompt.cli.data", "vlprompt.cli.baselines", "vlprompt.cli.train", "vlprompt.cli.plot",
                   "vlprompt.cli.ordinal", "vlprompt.cli.report")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="vlprompt", description="Prompt learning for CLIP-style models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    for sp in sub.choices.values():  # --debug / --quiet also after the command name
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(level)  # --quiet quiets the console; run logs (log.txt) still get INFO
    console.addFilter(lambda r: r.name.startswith("vlprompt") or r.levelno >= logging.WARNING or args.debug)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[console])
    logging.getLogger("vlprompt").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if not args.debug:
        logging.getLogger("root").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*QuickGELU.*")
    try:
        return int(args.func(args) or 0)
    except VLPromptError as e:
        if args.debug:
            raise
        print(f"vlprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlprompt: interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as e:
        if args.debug:
            raise
        print(f"vlprompt: error: file not found: {e.filename or e}", file=sys.stderr)
        return 2


def run() -> None:  # console entry point
    sys.exit(main())
