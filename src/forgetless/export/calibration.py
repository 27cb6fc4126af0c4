"""Calibration sequences, and the mean routing weights that turn an expert mixture into one LoRA.

A calibration sequence is a task example formatted as in training (prompt + answer); the prompt
part drives the sample-level gate, every token drives the routing. For the adapter of expert set
``s`` the weight of LoRA expert ``e`` in one module is

    w_e = mean over the tokens of the chosen sequences of w_e(x)      (experts.py)

measured by forgetless's own forward (the layers' routing recorder), with the experts of set ``s``
running on every token (the gate's stage choice set to ``s``, its yield switch off, the prompt's
own gate score still shifting the identity logits). The chosen sequences are those of the set's
calibration tasks that the gate itself sends to stage ``s`` without yielding; when there are none,
all of the set's calibration sequences.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from forgetless.adapters import set_inference_options
from forgetless.adapters.gate import prompt_boundary
from forgetless.data.formatting import IGNORE_INDEX, PromptFormatter
from forgetless.data.task import Task
from forgetless.export.layout import Layout


@dataclass(frozen=True)
class CalibrationSequence:
    """One calibration sequence: its task, token ids (prompt + answer) and prompt length."""

    task: str
    input_ids: list[int]
    prompt_length: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_length]


def calibration_sequences(
    tasks: Sequence[Task], tokenizer: PreTrainedTokenizerBase, limit: int, seed: int
) -> list[CalibrationSequence]:
    """Up to ``limit`` examples per task (train split; tasks without one: validation + test),
    sampled by ``seed``, formatted with the task's system prompt as training formats them."""
    sequences = []
    for task in tasks:
        examples = list(task.train) or list(task.validation) + list(task.test)
        if len(examples) > limit:
            examples = [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), limit))]
        formatter = PromptFormatter(tokenizer, system_prompt=task.system_prompt, max_length=512)
        for example in examples:
            encoded = formatter.encode(example)
            prompt_length = next(
                (i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX), len(encoded)
            )
            sequences.append(CalibrationSequence(task.name, encoded.input_ids, prompt_length))
    return sequences


def forgetless_logits(model: nn.Module, sequence: CalibrationSequence) -> Tensor:
    """(L, V) logits of forgetless's own forward, the prompt marked for the sample-level gate."""
    ids = torch.tensor([sequence.input_ids], device=next(model.parameters()).device)
    boundary = torch.zeros_like(ids, dtype=torch.bool)
    boundary[0, : sequence.prompt_length] = True
    with torch.no_grad(), prompt_boundary(model, boundary):
        return model(input_ids=ids).logits[0].float()


def forgetless_route(model: nn.Module, layout: Layout) -> str | None:
    """After a one-sequence forward: the adapter forgetless ran (None: the prompt yielded)."""
    if not layout.adapters:
        return None
    if not layout.gated:
        return layout.adapters[0].name
    first = next(iter(layout.layers.values()))
    gate = first.context.gate
    if float(gate.scores[0]) >= first.config.yield_threshold:
        return None
    return layout.stage_adapters[int(gate.stages[0])]


def _routed_to(model: nn.Module, layout: Layout, sequence: CalibrationSequence) -> str | None:
    """The adapter forgetless runs for ``sequence`` (without the gate: the one adapter)."""
    if not layout.gated:
        return layout.adapters[0].name
    forgetless_logits(model, sequence)
    return forgetless_route(model, layout)


class _Tally:
    """A layer's routing recorder: sums the LoRA experts' weights over the tokens it routes."""

    def __init__(self, num_lora: int) -> None:
        self.num_lora = num_lora
        self.sums = torch.zeros(num_lora, dtype=torch.float64)
        self.tokens = 0

    def __call__(self, layer, weights: Tensor, chosen, distance, mask) -> None:  # noqa: ANN001
        if mask is not None:
            weights = weights[mask]
        self.sums += weights[:, : self.num_lora].detach().double().sum(dim=0).cpu()
        self.tokens += weights.shape[0]


@contextmanager
def _experts_of_stage(model: nn.Module, layout: Layout, stage: int | None) -> Iterator[None]:
    """Every sequence runs the experts of ``stage`` (None: the model's one set), none yields."""
    if not layout.gated:
        yield
        return
    gate = next(iter(layout.layers.values())).context.gate

    def choose_stage(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # runs after forgetless's own pre-hook (registered first), which just set the stages
        if stage is not None and gate.stages is not None:
            gate.stages = torch.full_like(gate.stages, stage)

    handle = model.register_forward_pre_hook(choose_stage, with_kwargs=True)
    previous = set_inference_options(model, yield_threshold=math.inf)
    try:
        yield
    finally:
        handle.remove()
        set_inference_options(model, **previous)


def mean_routing_weights(
    model: nn.Module, layout: Layout, stage: int | None, sequences: Sequence[CalibrationSequence]
) -> dict[str, Tensor]:
    """module name -> (E_l,) mean routing weight of each LoRA expert of expert set ``stage`` over
    the tokens of ``sequences`` (see the module docstring)."""
    layers = {name: layer for name, layer in layout.layers.items() if layer.routed}
    tallies = {name: _Tally(layer.config.num_experts) for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer.recorder = tallies[name]
        with _experts_of_stage(model, layout, stage):
            for sequence in sequences:
                forgetless_logits(model, sequence)
    finally:
        for layer in layers.values():
            layer.recorder = None
    return {name: (tally.sums / max(tally.tokens, 1)).float() for name, tally in tallies.items()}


def measure_weights(
    model: nn.Module, layout: Layout, sequences: dict[str, list[CalibrationSequence]]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict]]:
    """Mean routing weights of every approximate adapter.

    Args:
        sequences: adapter name -> its calibration sequences.

    Returns:
        adapter name -> module name -> (E_l,) weights, and adapter name -> a summary for the
        manifest (sequences used, whether the gate chose them, the mean LoRA share).
    """
    weights, summaries = {}, {}
    for adapter in layout.adapters:
        if adapter.exact:
            continue
        own = sequences[adapter.name]
        routed = [sequence for sequence in own if _routed_to(model, layout, sequence) == adapter.name]
        chosen = routed or own
        weights[adapter.name] = mean_routing_weights(model, layout, adapter.stage, chosen)
        shares = [float(w.sum()) for w in weights[adapter.name].values()]
        summaries[adapter.name] = {
            "sequences": len(chosen),
            "chosen_by_gate": bool(routed) if layout.gated else None,
            "lora_share": sum(shares) / len(shares),
        }
    return weights, summaries
