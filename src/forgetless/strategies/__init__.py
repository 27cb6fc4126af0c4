"""Continual-learning strategies, one file each, registered by name (paper 2 and SLIM).

    from forgetless.strategies import STRATEGIES, make_strategy
    STRATEGIES.names()   # dora, joint, moe_lora, olora, one_round, replay, sequential_fft, ...
    strategy = make_strategy("olora", {"lambda": 0.5, "r": 8})

Each strategy picks how a stage's model is built from the earlier stages (``_engines.py``), which
data a stage trains on, and any extra loss term; the training loop (``forgetless.training``)
owns the order of work. ``forgetless.training.run_strategy`` runs one over a task sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forgetless.errors import InputError
from forgetless.registry import Registry
from forgetless.strategies._base import ModeParams, Strategy, StrategyParams
from forgetless.strategies._engines import ModelSource

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", package="forgetless.strategies")

SETTINGS = ("semi_cooperative", "fully_cooperative")


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: register under ``name`` and record the name on the class (for messages)."""

    def add(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        STRATEGIES.register(name, cls)
        return cls

    return add


def check_setting(name: str, setting: str) -> None:
    """An ``InputError`` when strategy ``name`` cannot run in ``setting`` (replay/joint need old data)."""
    if setting not in SETTINGS:
        raise InputError(f"setting '{setting}' is unknown; use semi_cooperative or fully_cooperative")
    required = STRATEGIES.get(name).setting_required
    if required == "fully_cooperative" and setting != "fully_cooperative":
        raise InputError(
            f"strategy '{name}' needs setting fully_cooperative (old data is gone in {setting}); "
            "set setting: fully_cooperative or choose another strategy"
        )


def make_strategy(name: str, params: dict[str, Any] | None = None, source: str = "params") -> Strategy:
    """Construct the strategy ``name`` with validated ``params`` (one ``InputError`` on any problem)."""
    return STRATEGIES.get(name)(params, source=source)


__all__ = [
    "SETTINGS",
    "STRATEGIES",
    "ModeParams",
    "ModelSource",
    "Strategy",
    "StrategyParams",
    "check_setting",
    "make_strategy",
    "register_strategy",
]
