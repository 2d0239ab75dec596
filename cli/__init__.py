"""The `covidseg` console script (also `python -m cli`).

Commands live in modules listed in `COMMAND_MODULES`; each exposes `register(subparsers)` and adds its
sub-commands with `subparsers.add_parser(...)` + `set_defaults(func=handler)`, where `handler(args) -> int`.
To add a concern, append its module name to the list. A module that fails to import does not break the others
(its commands are just missing; the reason is shown with the usage error or `covidseg --help`).

Error convention for every command: bad input (missing file, unreadable image, wrong weights file, bad option)
-> `error: <message>` on stderr and exit code 2, never a traceback. Raise `CLIError` (or let `ImageDecodeError` /
`WeightsError` propagate). Unexpected failures -> `error: ...` and exit code 1 (traceback with COVIDSEG_DEBUG=1).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

#: Modules registering sub-commands, in help order. Other concerns append theirs (e.g. "cli.service").
COMMAND_MODULES: list[str] = [
    "cli.model",
    "cli.service",
    "cli.admin",
    "cli.bulk",
    "cli.study",
]


class CLIError(Exception):
    """A user-facing error: printed as `error: <message>`, exit code `code` (default 2)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def int_at_least(minimum: int, what: str):
    """argparse type: an integer >= minimum, with a message naming what was expected."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error convention (raises CLIError instead of printing and exiting)."""

    def error(self, message):  # noqa: D102 - argparse API
        unavailable = getattr(self, "unavailable", None)
        if unavailable and "invalid choice" in message:
            message += "; unavailable command modules: " + ", ".join(
                f"{m} ({type(e).__name__}: {e})" for m, e in unavailable.items())
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def _user_error_types() -> tuple[type, ...]:
    types: list[type] = [CLIError]
    for mod, name in (("shared.core.imageio", "ImageDecodeError"), ("shared.core.inference", "WeightsError")):
        m = sys.modules.get(mod)
        if m is not None:
            types.append(getattr(m, name))
    return tuple(types)


def build_parser(modules=None) -> ArgumentParser:
    parser = ArgumentParser(prog="covidseg", description="COVID-19 infection segmentation in lung CT slices.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    unavailable: dict[str, BaseException] = {}
    for name in dict.fromkeys(COMMAND_MODULES if modules is None else modules):  # dedupe, keep order
        try:
            importlib.import_module(name).register(sub)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # optional module not present in this installation: silently absent
                continue
            unavailable[name] = exc
        except Exception as exc:  # noqa: BLE001 - one broken concern must not break the others
            unavailable[name] = exc
    parser.unavailable = unavailable
    if unavailable:
        parser.epilog = "unavailable command modules: " + "; ".join(
            f"{m} ({type(e).__name__}: {e})" for m, e in unavailable.items())
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr, flush=True)


def main(argv=None) -> int:
    """Entry point; returns the exit code (the console-script wrapper passes it to sys.exit)."""
    warnings.showwarning = _show_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return 2
        return int(func(args) or 0)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return getattr(exc, "code", 2)
    except Exception as exc:  # noqa: BLE001 - never a traceback for users
        if os.environ.get("COVIDSEG_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (set COVIDSEG_DEBUG=1 for the traceback)",
              file=sys.stderr, flush=True)
        return 1
