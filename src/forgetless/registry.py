"""One generic name -> object registry, used by every pluggable part of forgetless.

Tasks, data loaders, scorers, strategies, merge methods and mixing routers each own one
``Registry``. Entries register themselves with a decorator in the module that defines them; the
registry imports every module of its package the first time it is asked for a name, so there is
no hand-kept list of methods anywhere (the mergekit / lm-eval pattern, without the second list).

    STRATEGIES = Registry("strategy", package="forgetless.strategies")

    @STRATEGIES.register("sequential_lora")
    class SequentialLoRA: ...

    STRATEGIES.get("sequentail_lora")
    # UnknownNameError: unknown strategy 'sequentail_lora'. Did you mean 'sequential_lora'?
    #   Valid names: joint, olora, one_round, replay, sequential_fft, sequential_lora, slim
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from forgetless.errors import InputError

T = TypeVar("T")


class UnknownNameError(InputError, KeyError):
    """A name that is not in a registry. Subclass of ``InputError`` (a user mistake)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, valid: list[str]) -> str:
    """' Did you mean 'x'?' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A named collection of objects of one kind, filled by decorators.

    Args:
        kind: what the entries are, used in error messages ("strategy", "merge method").
        package: dotted name of the package whose modules register entries; they are imported
            lazily on first lookup so that importing forgetless stays cheap.
    """

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator."""

        def add(item: T) -> T:
            if name in self._entries and self._entries[name] is not item:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = item
            return item

        return add(obj) if obj is not None else add

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")

    def get(self, name: str) -> T:
        """The entry called ``name``; an ``UnknownNameError`` naming the valid names otherwise."""
        self._discover()
        if name not in self._entries:
            valid = self.names()
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'.{did_you_mean(name, valid)} Valid names: {', '.join(valid)}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        self._discover()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: Any) -> bool:
        self._discover()
        return name in self._entries

    def __len__(self) -> int:
        self._discover()
        return len(self._entries)
