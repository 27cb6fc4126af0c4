"""What every ``forgetless`` command shares: the command registry and the output helpers."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str, str]] = {}


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None], epilog: str = ""
) -> Callable[[Command], Command]:
    """Register ``func(args) -> exit code`` as a subcommand; ``arguments(parser)`` adds its options."""

    def register(func: Command) -> Command:
        _COMMANDS[name] = (func, arguments, help, epilog)
        return func

    return register


def _table(rows: list[dict], columns: list[str], title: str) -> None:
    """A table on a terminal; plain tab-separated lines when stdout is a file or a pipe (nothing
    is ever cut: the names printed are the names a user must type)."""
    from rich.console import Console
    from rich.table import Table

    if not sys.stdout.isatty():
        print(title)
        print("\t".join(columns))
        for row in rows:
            print("\t".join(str(row[column]) for column in columns))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[str(row[column]) for column in columns])
    Console().print(table)


def _log(message: str) -> None:

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _key_values(items: list[str], what: str) -> dict:
    from forgetless.config import apply_overrides

    return apply_overrides({}, [f"{what}.{item}" for item in items]).get(what, {})
