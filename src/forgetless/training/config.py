"""``TrainConfig``: the settings of one training stage, validated before any compute.

    train: {lr: 2.0e-4, epochs: 2, batch_size: 8, grad_accum: 2, mixed_precision: bf16}

``batch_size`` is the *global* number of examples per micro-batch: under ``accelerate launch``
each of the N processes takes every N-th example of it, so a run gives the same optimizer steps
(and, up to float summation order, the same numbers) on one process or on eight.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from forgetless.errors import InputError
from forgetless.validation import explain


class TrainConfig(BaseModel):
    """Optimiser, schedule, batching, prompt formatting and logging of one training stage."""

    model_config = ConfigDict(extra="forbid")

    lr: float | None = Field(
        None,
        gt=0,
        description="peak learning rate; None takes the strategy's default (2e-4 for adapters, "
        "2e-5 for full fine-tuning)",
    )
    epochs: int = Field(1, ge=1, description="passes over the stage's training examples")
    max_steps: int | None = Field(
        None, ge=1, description="optimizer steps per stage; overrides epochs when set"
    )
    batch_size: int = Field(8, ge=1, description="examples per micro-batch, over all processes together")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated into one optimizer step")
    warmup_ratio: float = Field(
        0.05, ge=0, le=1, description="share of the steps with a linear learning-rate warm-up"
    )
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (not applied to biases and norm weights)"
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the gradient to this global L2 norm; None: no clipping"
    )
    max_length: int = Field(512, ge=8, description="longest tokenised example; prompts are cut from the left")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate decay after the warm-up (to 0 for linear and cosine)"
    )
    seed: int = Field(0, description="seed of the data order, adapter initialisation and dropout")
    log_every: int = Field(10, ge=1, description="optimizer steps between metrics lines")
    checkpoint_every: int = Field(
        50, ge=0, description="optimizer steps between resumable checkpoints; 0: none"
    )
    prompt_style: Literal["auto", "chat", "plain"] = Field(
        "auto", description="chat template (instruct models), plain text, or auto (chat when defined)"
    )
    system_prompt: str | None = Field(
        None, description="system message for chat models; None: the task's, else the template's default"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="autocast precision; fp16 needs a GPU, bf16 works on recent CPUs and GPUs"
    )
    share_prompt_prefix: bool = Field(
        True,
        description="compute the prompt prefix that every example of a micro-batch shares (the chat "
        "template's system prompt) once; exact for LoRA, DoRA and full fine-tuning, off for routed "
        "adapters and dropout",
    )
    progress: bool = Field(True, description="show a progress bar with loss, tokens/s and ETA")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "train", at: tuple = ()) -> TrainConfig:
        """Validate ``data``; the first problem becomes one ``InputError`` line (``validation.explain``:
        ``SOURCE: field: message``, ``at`` the section's place in ``source``, e.g. ``("train",)``)."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as error:
            raise InputError(explain(error, source, cls, at=at)) from None

    @classmethod
    def coerce(
        cls, value: TrainConfig | dict[str, Any] | None, source: str = "train", at: tuple = ()
    ) -> TrainConfig:
        """A ``TrainConfig`` from itself, a mapping or None (all defaults)."""
        return value if isinstance(value, TrainConfig) else cls.from_dict(value, source, at)

    def fingerprint(self) -> str:
        """Hash of the fields that change the trained numbers (not logging or the progress bar)."""
        cosmetic = {"log_every", "progress", "checkpoint_every"}
        data = {key: value for key, value in self.model_dump().items() if key not in cosmetic}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
