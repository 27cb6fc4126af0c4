"""Which route each served sequence took, read once its prompt has been prefilled.

A SLIM model with the sample-level gate (adapters/gate.py) decides per sequence from its prompt:
a sequence whose gate score reaches the layers' ``yield_threshold`` yields and runs the base
model's path with no expert work (``base``); the others run the experts (``experts``), and with
per-stage experts (``stage_experts: per_task``) the experts of their nearest training stage
(``experts:stage=N``, N counted from 0 like the run's ``stage-N-task`` folders). The prefill
leaves the scores and stages of the batch's rows on the gate (``gate.scores``, ``gate.stages``);
nothing is recomputed here. Models without the gate take one route for every request: ``adapter``
when adapter layers are injected, else ``base`` (a plain, merged or mixed model).
"""

from __future__ import annotations

from torch import nn

from forgetless.adapters import adapter_layers


class RouteReader:
    """Reads the routes of the rows of the batch whose prefill just ran on ``model``."""

    def __init__(self, model: nn.Module) -> None:
        layers = list(adapter_layers(model).values())
        self.gated = [layer for layer in layers if layer.context.gate is not None]
        self.fixed = None if self.gated else ("adapter" if layers else "base")

    def summary(self) -> str:
        """The routes requests can take, for the server's start-up line."""
        return self.fixed or "per request: base (yielded) or experts (SLIM sample-level gate)"

    def read(self, rows: int) -> list[str]:
        """The route of each of the ``rows`` sequences of the last prefill, in row order."""
        if self.fixed is not None:
            return [self.fixed] * rows
        layer = self.gated[0]  # options such as yield_threshold are read now: they can be changed
        gate, threshold = layer.context.gate, layer.config.yield_threshold
        scores, stages = gate.row_scores(rows).tolist(), gate.row_stages(rows)
        per_stage = any(len(getattr(gated, "earlier_experts", ())) for gated in self.gated)
        routes = []
        for row, score in enumerate(scores):
            if score >= threshold:
                routes.append("base")
            elif per_stage and stages is not None:
                routes.append(f"experts:stage={int(stages[row])}")
            else:
                routes.append("experts")
        return routes
