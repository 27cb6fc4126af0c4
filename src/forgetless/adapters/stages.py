"""Per-stage experts (``stage_experts: per_task``): what SLIM learned in one stage stays that stage's.

Over a task sequence a SLIM adapter is trained stage after stage. With one set of experts for all
stages, training a later task moves the experts that an earlier task's prompts are routed to; on
SmolLM2-135M, kelvar_dates fell from 44.7% after its own stage to 0% after the next
(docs/results.md, protocol C): the gate still sent kelvar prompts to the experts, the experts had
changed. The per-task gate (gate.py) already knows each prompt's *nearest* stage, so:

- when a stage continues the adapter (``open_gate_task``), every layer freezes a copy of its
  experts and router as they left the stage just trained (``StageExperts``, buffers saved with
  the adapter), beside that stage's gate statistics; the trainable experts continue from the same
  values (what was learned helps the next task);
- at inference a sequence whose nearest stage is an earlier one runs that stage's frozen experts,
  routed and merged exactly as in its own stage (same router, same dynamic-merging masks, same
  yielding shift); the current stage's sequences run the trainable experts; yielded sequences run
  neither. In training every sequence is the current stage's.

So a prompt that the gate places in stage s gets the adapter of stage s, whatever came after: the
forgetting of a learned task is then only the gate's mistakes. The cost is memory and disk: one
expert set per earlier stage (8 experts of rank 16 on every projection of SmolLM2-135M: about
39M values, 157 MB in float32, per stage), and none in compute: each sequence runs one stage's
experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StageExperts(nn.Module):
    """One earlier stage's experts of one layer: ``lora_A`` (E_l, r, d_in), ``lora_B``
    (E_l, d_out, r), ``router`` (E_l + E_id, d_in) and ``expert_scaling`` (E_l,), frozen buffers
    named as the layer's own parameters (``MixtureLinear.expert_factors`` reads either)."""

    def __init__(self, lora_A: Tensor, lora_B: Tensor, router: Tensor, expert_scaling: Tensor) -> None:  # noqa: N803
        super().__init__()
        self.register_buffer("lora_A", lora_A)
        self.register_buffer("lora_B", lora_B)
        self.register_buffer("router", router)
        self.register_buffer("expert_scaling", expert_scaling)

    @classmethod
    def snapshot(cls, layer: nn.Module) -> StageExperts:
        """A frozen copy of ``layer``'s current experts and router."""
        return cls(*(getattr(layer, name).detach().clone() for name in _NAMES))

    @classmethod
    def empty_like(cls, layer: nn.Module) -> StageExperts:
        """Zeros shaped like ``layer``'s experts (filled when a saved adapter loads)."""
        return cls(*(torch.zeros_like(getattr(layer, name).detach()) for name in _NAMES))

    def key(self) -> tuple:
        """Changes whenever a buffer is written or replaced (plan caches compare it)."""
        parts = [getattr(self, name) for name in _NAMES]
        return tuple(t._version for t in parts) + tuple(t.data_ptr() for t in parts)


_NAMES = ("lora_A", "lora_B", "router", "expert_scaling")


def split_by_stage(stage: Tensor, current: int) -> list[tuple[int, Tensor]]:
    """(T,) nearest stage of each token -> [(stage, token indices)] for every stage present,
    the current stage last."""
    present = sorted(int(s) for s in stage.unique().tolist())
    present = [s for s in present if s != current] + ([current] if current in present else [])
    return [(s, (stage == s).nonzero().flatten()) for s in present]
