"""``forgetless`` command line: thin commands over the library, one module per group of commands
(each registers its commands with ``command`` on import).

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback), 1 a failed write or another
error outside the user's input (one line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from forgetless.cli import experiment, info, merging, serving, single  # noqa: F401  (they register)
from forgetless.cli._base import _COMMANDS, command
from forgetless.cli.merging import _run_lm_eval
from forgetless.errors import InputError

#: the order of ``forgetless --help``: the main job first, single steps next, listings last
ORDER = ("demo", "run", "plan", "report", "inspect", "train", "eval", "serve", "export", "merge", "mix",
         "lm-eval", "ask", "models", "tasks")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    # command modules register themselves on import (kept lazy: heavy imports happen inside commands)
    names = sorted(_COMMANDS, key=lambda name: ORDER.index(name) if name in ORDER else len(ORDER))
    parser = argparse.ArgumentParser(
        prog="forgetless",
        description="Add new knowledge to a language model task after task without losing what it knew.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in names:
        func, configure, help_text, epilog = _COMMANDS[name]
        child = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        configure(child)
        child.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["lm-eval"] and not {"-h", "--help"} & set(arguments[1:2]):
        try:  # every argument is lm_eval's: argparse here would read its options as ours
            return _run_lm_eval(arguments[1:])
        except InputError as error:
            print(f"forgetless: error: {error}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as error:
        if args.debug or os.environ.get("FORGETLESS_DEBUG"):
            raise
        print(f"forgetless: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`forgetless tasks | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:  # a full disk, a vanished folder: one line, and what was written stays
        if args.debug or os.environ.get("FORGETLESS_DEBUG"):
            raise
        print(f"forgetless: error: {error}; every file written before it is intact: free the space or "
              "fix the path, then re-run the same command to resume", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print("forgetless: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


__all__ = ["build_parser", "command", "main"]
