"""The ``vlprompt`` command. Each command group lives in its own module and registers its sub-commands
explicitly below; the CLI only turns arguments into configurations and calls library functions."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional, Sequence

from ..errors import ConfigError, VLPromptError

COMMAND_MODULES = ("vlprompt.cli.data", "vlprompt.cli.methods", "vlprompt.cli.baselines", "vlprompt.cli.train", "vlprompt.cli.plot",
                   "vlprompt.cli.ordinal", "vlprompt.cli.report",
                   "vlprompt.cli.importer",
                   "vlprompt.cli.grid")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too (``vlprompt: error: ...``, exit 2), like every other refusal."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser; ``argv`` lets ``train`` add the options of the method it names before parsing."""
    import importlib

    from .. import __version__

    parser = _Parser(prog="vlprompt", description="Prompt learning for CLIP-style models.")
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (with their causes) and debug logs")
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
        if name == "vlprompt.cli.train":
            from .train import prescan_method

            module.register(sub, method=prescan_method(argv))
        else:
            module.register(sub)
    for sp in sub.choices.values():  # --debug / --quiet also after the command name
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class ConsoleHandler(logging.StreamHandler):
    """The console's log lines, written through ``tqdm.write``: an open progress bar is cleared first and drawn
    again below the line, instead of the line landing on the bar's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser(argv).parse_args(argv)
    except VLPromptError as e:  # a usage error, or a method whose option names collide
        if debug:
            raise
        print(f"vlprompt: error: {e}", file=sys.stderr)
        return 2
    level = logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO)
    console = ConsoleHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    console.setLevel(level)  # --quiet quiets the console; run logs (log.txt) still get INFO
    console.addFilter(lambda r: r.name.startswith("vlprompt") or r.levelno >= logging.WARNING or args.debug)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, handlers=[console])
    logging.getLogger("vlprompt").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if not args.debug:
        logging.getLogger("root").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*QuickGELU.*")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except VLPromptError as e:
        if args.debug:
            raise  # the whole chained traceback: the cause of every error is kept (`raise ... from e`)
        print(f"vlprompt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlprompt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`vlprompt interpret RUN | head`): stop quietly, as Unix tools do; stdout is
        # pointed at devnull so that the interpreter's final flush does not raise again
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def run() -> None:  # console entry point
    sys.exit(main())
