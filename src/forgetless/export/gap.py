"""The gap between forgetless's own model and what a GPU engine serves from the export.

The engine side is rebuilt from the written files with stock libraries only: the base folder
through ``AutoModelForCausalLM``, the adapters through ``peft.PeftModel``, the adapter of every
sequence picked by the exported ``router.py`` (imported from the folder). For each calibration
sequence (prompt + answer, teacher-forced) both give logits over every position:

- ``max_abs_logit_diff``: the largest |difference| of a sequence, averaged over sequences
  (``max_abs_logit_diff_max``: the largest over all);
- ``token_agreement``: the share of positions where both pick the same next token (greedy);
- ``next_token_agreement``: the share of sequences whose first answer token (greedy, after the
  prompt) is the same;
- ``route_agreement``: the share of sequences the router sends where forgetless's gate sends them.

Per route (an adapter name, or ``base`` for the base model) and over all sequences.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from forgetless.export.calibration import CalibrationSequence, forgetless_logits, forgetless_route
from forgetless.export.layout import Layout

BASE_ROUTE = "base"


def import_router(folder: Path) -> ModuleType:
    """The ``router.py`` of an export folder as a module (a fresh import each call)."""
    name = f"forgetless_export_router_{abs(hash(str(folder.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, folder / "router.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _engine_model(folder: Path, adapters: Sequence[str]) -> nn.Module:
    """Stock transformers + PEFT on the written folders (every adapter loaded under its name)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    if adapters:
        with warnings.catch_warnings():  # PEFT's use of APIs transformers deprecates: not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(
                model, folder / "adapters" / adapters[0], adapter_name=adapters[0]
            )
            for name in adapters[1:]:
                model.load_adapter(folder / "adapters" / name, adapter_name=name)
        model.eval()
    return model


def _engine_logits(engine: nn.Module, adapters: bool, route: str | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the engine's model for ``route``: an adapter, or the base (PEFT's adapters off)."""
    if route is not None:
        engine.set_adapter(route)
    context = engine.disable_adapter() if adapters and route is None else nullcontext()
    with torch.no_grad(), context:
        return engine(input_ids=ids).logits[0].float()


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {"sequences": 0}
    count = len(rows)
    positions = sum(row["positions"] for row in rows)
    return {
        "sequences": count,
        "max_abs_logit_diff": sum(row["diff"] for row in rows) / count,
        "max_abs_logit_diff_max": max(row["diff"] for row in rows),
        "token_agreement": sum(row["agree"] for row in rows) / positions,
        "next_token_agreement": sum(row["next"] for row in rows) / count,
        "route_agreement": sum(row["same_route"] for row in rows) / count,
    }


def measure_gap(
    model: nn.Module, layout: Layout, folder: Path, sequences: Sequence[CalibrationSequence]
) -> dict:
    """``{"all": summary, "routes": {route: summary}}`` over ``sequences`` (see the module docstring)."""
    names = [adapter.name for adapter in layout.adapters]
    rows: dict[str, list[dict]] = {}
    engine = _engine_model(folder, names)
    plain = engine.get_base_model() if names else engine
    router = import_router(folder).Router(folder, model=plain if layout.gated else None)
    device = next(engine.parameters()).device
    for sequence in sequences:
        reference = forgetless_logits(model, sequence)
        expected = forgetless_route(model, layout)
        no_adapter = engine.disable_adapter() if names and layout.gated else nullcontext()
        with no_adapter:  # the router's base pass runs the base model
            route = router.route(sequence.prompt_ids)
        ids = torch.tensor([sequence.input_ids], device=device)
        served = _engine_logits(engine, bool(names), route, ids).to(reference.device)
        last = sequence.prompt_length - 1
        rows.setdefault(route or BASE_ROUTE, []).append(
            {
                "diff": float((served - reference).abs().max()),
                "agree": int((served.argmax(-1) == reference.argmax(-1)).sum()),
                "positions": reference.shape[0],
                "next": int(served[last].argmax() == reference[last].argmax()),
                "same_route": int(route == expected),
            }
        )
    everything = [row for group in rows.values() for row in group]
    return {"all": _summary(everything), "routes": {route: _summary(group) for route, group in rows.items()}}
