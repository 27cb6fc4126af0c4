"""Self-synthesized rehearsal (SSR): the model writes, answers and picks its own rehearsal data.

Method: Huang et al. 2024 (ACL), "Mitigating Catastrophic Forgetting in Large Language Models
with Self-Synthesized Rehearsal". Three steps make the rehearsal data of a task, then every later
stage trains on it beside its own data:

1. **Synthesis by in-context learning.** The *base* model (the run's pretrained model, not the
   tuned one) continues a few-shot prompt of the task's own training examples and writes a new
   input in their style.
2. **Refinement.** The model that has just learned the task (the "latest" model) answers each
   synthetic input, so the rehearsed answer is what the model knew, not the base model's guess.
3. **Selection.** The synthetic inputs are clustered (k-means over sentence embeddings) and the
   one nearest each centre is kept: a small, diverse memory.

How forgetless runs it (semi-cooperative: a stage never reads an earlier stage's data):
- In ``after_training`` of stage t, the task's own examples (available in that stage) serve as
  demonstrations; the memory it keeps goes to the stage's state folder (``state/state.json``:
  texts, no tensors). The paper builds the same memory at the start of stage t+1 with the same
  latest model θ(t); doing it at the end of stage t is the same computation and means no real
  example has to be kept for later.
- In ``before_training`` of stage t, the memories of stages 0..t-1 are read back and added to the
  stage's data (counted in done.json's ``trained_on`` as ``ssr``).
- Each instance is refined once, by the model of its own stage; later stages do not re-answer
  older memories (a later model would rehearse what it has already forgotten).
- Selection runs on the synthetic inputs before refinement, so only the kept inputs are answered
  (the paper refines, then selects: the same memory when selection reads the inputs, as here).

Details (all choices ours where the paper leaves them open, stated so a run can be reproduced):
- Prompt ``i`` of stage t has ``shots`` demonstrations drawn without replacement by a generator
  seeded from (seed, t, i), in the paper's ``Instruction: ...\\nOutput: ...`` text format (no chat
  template: the base model continues text), and ends with ``Instruction:``; at most
  ``context_tokens`` tokens (the oldest are cut).
- The synthetic input is sampled at ``temperature`` with a CPU generator seeded from (seed, t)
  until it writes ``Output:`` (or ``max_new_tokens``); the text before it is the input. A reply
  with no ``Output:``, an empty input, a duplicate, or a verbatim copy of a training prompt is
  dropped (a copy would put real data in the memory; ``state.json`` counts each reason).
- Embeddings: the base model's last hidden state, mean-pooled over the input's tokens and
  L2-normalised (the paper uses SimCSE, which a machine without a hub cannot download; the base
  model is at hand and sees the inputs as text). k-means: ``scipy.cluster.vq.kmeans2`` (k-means++
  start, seeded); a cluster left empty is made up by the farthest remaining input.
- Refinement: greedy, chat-formatted as training data is (``StageContext.formatter``), up to
  ``max_new_tokens``; an answer cut by the budget gets no end-of-turn token.
- ``fraction`` 0.2 keeps one instance per five real ones, as pseudo_replay (LAMOL's ratio);
  ``oversample`` 3 candidates per kept instance leaves k-means a choice.

Cost per stage: one extra copy of the base model while synthesising, ``fraction * oversample * n``
sampled inputs and ``fraction * n`` greedy answers, each up to ``max_new_tokens`` (n: the stage's
own examples); ``state.json`` records the tokens and seconds. Same seed, same memory, so a resumed
stage rehearses the same data.
"""

from __future__ import annotations

import hashlib
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from forgetless.data.batching import collate
from forgetless.data.formatting import Encoded, PromptFormatter
from forgetless.data.task import Example
from forgetless.strategies import ModelSource, ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine
from forgetless.strategies.context import StageContext
from forgetless.strategies.pseudo_replay import BATCH_SIZE, answer_greedily, encode_pseudo, sample_replies

OUTPUT_MARK = "Output:"


class SSRParams(ModeParams):
    shots: int = Field(3, ge=1, le=32, description="demonstrations per in-context prompt")
    fraction: float = Field(
        0.2, ge=0, le=10, description="rehearsal instances kept per stage, as a share of its own examples"
    )
    oversample: float = Field(3.0, ge=1, le=20, description="synthetic candidates per kept instance")
    max_new_tokens: int = Field(
        96, ge=1, le=1024, description="token budget of a synthetic input and of its answer"
    )
    temperature: float = Field(1.0, gt=0, le=5, description="sampling temperature of the synthetic inputs")
    context_tokens: int = Field(
        1024, ge=64, le=32768, description="longest in-context prompt (oldest tokens cut)"
    )


def _seed_of(*parts: object) -> int:
    """A 60-bit seed from ``parts`` (no collisions between nearby stages, prompts or seeds)."""
    return int(hashlib.sha256("|".join(["ssr", *map(str, parts)]).encode()).hexdigest()[:15], 16)


def icl_prompt(demos: list[Example]) -> str:
    """The few-shot text the base model continues: one block per demonstration, then ``Instruction:``."""
    blocks = [
        f"Instruction: {demo.prompt.strip()}\n{OUTPUT_MARK} {demo.answer.strip()}\n\n" for demo in demos
    ]
    return "".join(blocks) + "Instruction:"


def parse_input(text: str) -> str | None:
    """The synthetic input in a continuation of ``icl_prompt``: the text before ``Output:``."""
    if OUTPUT_MARK not in text:
        return None
    return text.split(OUTPUT_MARK, 1)[0].strip() or None


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """(n, d) L2-normalised mean of ``model``'s last hidden state over each text's tokens (rows
    padded on the right, so a causal model's positions and hidden states are those of the text alone)."""
    device = next(model.parameters()).device
    encoded = [
        Encoded(ids, ids) for ids in (tokenizer(text).input_ids or [tokenizer.pad_token_id] for text in texts)
    ]
    rows = []
    for start in range(0, len(encoded), BATCH_SIZE):
        batch = collate(encoded[start : start + BATCH_SIZE], tokenizer.pad_token_id)  # right padding
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden.float() * weights).sum(1) / weights.sum(1)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().double().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 1))


def select_diverse(vectors: np.ndarray, k: int, seed: int) -> list[int]:
    """Indices of ``k`` rows of ``vectors``: the row nearest each k-means centre, in row order."""
    from scipy.cluster.vq import kmeans2

    n = len(vectors)
    if n <= k:
        return list(range(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "One of the clusters is empty": made up below
        centres, labels = kmeans2(vectors, k, minit="++", rng=np.random.default_rng(seed))
    chosen: list[int] = []
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        if members.size:
            distances = ((vectors[members] - centres[cluster]) ** 2).sum(axis=1)
            chosen.append(int(members[np.argmin(distances)]))
    while len(chosen) < k:  # empty clusters: the remaining row farthest from every chosen one
        rest = [i for i in range(n) if i not in chosen]
        gaps = ((vectors[rest][:, None, :] - vectors[chosen][None, :, :]) ** 2).sum(-1).min(axis=1)
        chosen.append(rest[int(np.argmax(gaps))])
    return sorted(chosen)


@register_strategy("ssr")
class SSR(Strategy):
    """Self-synthesized rehearsal (Huang et al. 2024); params: shots, fraction, oversample,
    max_new_tokens, temperature, context_tokens, mode (lora | fft), and AdapterConfig fields."""

    Params = SSRParams
    accepts_adapter_fields = True

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        super().__init__(params, source)
        self.model_source: ModelSource | None = None

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="merge", fft="continue")

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        self.model_source = source  # the base model that writes synthetic inputs (after_training)
        return super().build(stage, source, previous, seed)

    def before_training(self, context: StageContext) -> None:
        formatter = context.formatter or PromptFormatter(context.tokenizer)
        memory = [
            record for stage in range(context.stage) for record in context.load_state(stage)[1]["examples"]
        ]
        context.examples.extend(
            encode_pseudo(formatter, r["prompt"], r["answer"], r["complete"]) for r in memory
        )
        if memory:
            context.trained_on["ssr"] = len(memory)

    def after_training(self, context: StageContext) -> None:
        if not context.main:
            return  # only the memory in the state folder is kept, and only the main process writes it
        started = time.perf_counter()
        own = [
            example
            for _, examples in self.stage_data(context.stage, context.tasks, context.seed)
            for example in examples
        ]
        kept = int(round(self.params.fraction * len(own)))
        meta: dict[str, Any] = {"stage": context.stage, "seed": context.seed, "own": len(own)}
        inputs = self._synthesise(context, own, kept, meta) if kept else []
        meta["examples"] = self._refine(context, inputs)
        meta["seconds"] = round(time.perf_counter() - started, 3)
        context.save_state({}, meta)

    def _synthesise(
        self, context: StageContext, own: list[Example], kept: int, meta: dict[str, Any]
    ) -> list[str]:
        """Steps 1 and 3: ``kept`` diverse synthetic inputs written by the base model."""
        from forgetless.evaluation.evaluate import stop_token_ids_of

        tokenizer, params = context.tokenizer, self.params
        count = int(np.ceil(params.oversample * kept))
        prompts = []
        for index in range(count):
            demos = random.Random(_seed_of(context.seed, context.stage, index)).sample(
                own, min(params.shots, len(own))
            )
            prompts.append(tokenizer(icl_prompt(demos)).input_ids[-params.context_tokens :])
        base = self._base_model(context)
        try:
            stops = stop_token_ids_of(base, tokenizer, context.formatter or PromptFormatter(tokenizer))

            def until(ids: list[int]) -> bool:
                return OUTPUT_MARK in tokenizer.decode(ids[-8:], skip_special_tokens=True)

            replies = sample_replies(
                base, prompts, pad_id=tokenizer.pad_token_id, stop_token_ids=stops,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                generator=torch.Generator().manual_seed(_seed_of(context.seed, context.stage)), until=until,
            )  # fmt: skip
            candidates, dropped = _valid_inputs(
                [tokenizer.decode(r, skip_special_tokens=True) for r in replies], own
            )
            chosen = select_diverse(
                embed(base, tokenizer, candidates), kept, _seed_of(context.seed, context.stage, "k")
            )
        finally:
            del base
        meta.update(
            candidates=count,
            sampled_tokens=sum(map(len, replies)),
            dropped=dropped,
            valid=len(candidates),
            kept=len(chosen),
        )
        return [candidates[i] for i in chosen]

    def _base_model(self, context: StageContext) -> nn.Module:
        if self.model_source is None:  # hooks called without build (unit tests): the run's base model
            raise RuntimeError("ssr: build() was not called, so the base model is unknown")
        device = next(context.model.parameters()).device
        return self.model_source.fresh().to(device).eval()

    def _refine(self, context: StageContext, inputs: list[str]) -> list[dict[str, Any]]:
        """Step 2: the stage's trained model answers every kept input greedily."""
        if not inputs:
            return []
        model, tokenizer = context.model, context.tokenizer
        formatter = context.formatter or PromptFormatter(tokenizer)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                answers = answer_greedily(model, tokenizer, formatter, inputs, self.params.max_new_tokens)
        finally:
            model.train(was_training)
        return [
            {
                "prompt": text,
                "answer": answer.text,
                "complete": len(answer.token_ids) < self.params.max_new_tokens,
            }
            for text, answer in zip(inputs, answers)
        ]


def _valid_inputs(texts: list[str], own: list[Example]) -> tuple[list[str], dict[str, int]]:
    """The parsed synthetic inputs, in order, without unparsable ones, duplicates and copies."""
    real = {example.prompt.strip() for example in own}
    dropped = {"no_output_mark": 0, "duplicate": 0, "copy_of_training_prompt": 0}
    valid: list[str] = []
    for text in texts:
        parsed = parse_input(text)
        reason = (
            "no_output_mark" if parsed is None
            else "copy_of_training_prompt" if parsed in real
            else "duplicate" if parsed in valid
            else None
        )  # fmt: skip
        if reason:
            dropped[reason] += 1
        else:
            valid.append(parsed)
    return valid, dropped
