"""Pseudo replay: the model rehearses data it writes itself (semi-cooperative: no old data is read).

Method: LAMOL (Sun et al. 2020, "LAMOL: LAnguage MOdeling for Lifelong Language Learning") trains
a model to also generate pseudo samples of earlier tasks and mixes them into each new task's
data; SSR (Huang et al. 2024, "Mitigating Catastrophic Forgetting in Large Language Models with
Self-Synthesized Rehearsal") lets the LLM synthesise instances and *refines* their outputs with
the model itself before rehearsing them. This strategy is the simple, old-data-free core of both
(``source: outputs``, SSR's refinement step without in-context demonstrations): the stage's
starting model (for stage 0 the base model, later the model after stage t-1) writes questions and
answers them, and those pairs are trained on with the stage's own examples, so the behaviour the
model had before the stage is pulled back while it learns the new task.

What is generated, in ``before_training`` of stage t with training seed s, for
``k = round(fraction * n)`` pseudo examples (n: the stage's own examples):

1. Pseudo example i asks the model, as a user turn formatted as the run formats training data
   (``StageContext.formatter``: prompt style, system prompt or the template's default), one fixed
   instruction ``INSTRUCTIONS[(i + t) % 6]`` (a question for an
   assistant, science or nature, history or geography, arithmetic, advice, language).
2. The reply is *sampled* at ``temperature`` (stop tokens masked on the first step, so it is not
   empty) with a CPU ``torch.Generator`` seeded from (s, t), for up to ``max_new_tokens`` tokens:
   the question (the instruction itself when the reply decodes to blank text).
3. The model answers each question *greedily* (``generate_greedy``, up to ``max_new_tokens``).
4. Each (question, answer) is encoded with the same formatter, and counted in done.json's
   ``trained_on`` as ``pseudo_replay``; an answer cut by the budget gets no end-of-turn token, so
   the model rehearses its answer's start without learning to stop early.

The same seed, stage and starting model give the same pseudo examples, so a resumed stage (whose
``before_training`` runs again before the checkpoint is read) trains on the same data. After
training the generated texts go to the stage's state folder (``state/state.json``, no tensors) for
inspection; later stages never read them. The model is used in eval mode without gradients and
put back in the mode it was in.

Cost: at most ``2 * k * max_new_tokens`` decoded tokens per stage (question + answer), in
batches of 16 on a KV cache: 1000 training examples at the defaults give 200 pseudo examples,
<= 19 200 tokens, 26 batches of <= 48 decode steps each; on CPU that is roughly a minute for a
~135M model and several minutes or more for 1-2B models (a GPU: seconds). An estimate, not a
measurement: ``state.json`` records each stage's ``generated_tokens`` and ``seconds``.

Defaults: ``fraction`` 0.2 is LAMOL's pseudo-sample ratio gamma = 0.2 (its best setting; one
pseudo example per five real ones keeps generation cheap), ``max_new_tokens`` 48 fits a short
question and the start of its answer, ``temperature`` 1 samples the model's own distribution.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from forgetless.data.formatting import IGNORE_INDEX, Encoded, PromptFormatter
from forgetless.strategies import ModeParams, Strategy, register_strategy
from forgetless.strategies._base import mode_engine
from forgetless.strategies._engines import Engine
from forgetless.strategies.context import StageContext

INSTRUCTIONS = (
    "Write one short question a user might ask an assistant. Reply with the question only.",
    "Write one short question about science or nature. Reply with the question only.",
    "Write one short question about history or geography. Reply with the question only.",
    "Write one short arithmetic word problem. Reply with the problem only.",
    "Write one short question asking for practical advice. Reply with the question only.",
    "Write one short question about words, language or writing. Reply with the question only.",
)
BATCH_SIZE = 16


class PseudoReplayParams(ModeParams):
    source: Literal["outputs"] = Field(
        "outputs", description="outputs: the starting model's own questions and greedy answers"
    )
    fraction: float = Field(
        0.2, ge=0, le=10, description="pseudo examples as a share of the stage's own examples"
    )
    max_new_tokens: int = Field(48, ge=1, le=1024, description="token budget of each question and answer")
    temperature: float = Field(1.0, gt=0, le=5, description="sampling temperature of the questions")


def stage_generator(seed: int, stage: int) -> torch.Generator:
    """A CPU generator seeded from (seed, stage) only (no collisions between nearby pairs)."""
    digest = hashlib.sha256(f"pseudo_replay|{seed}|{stage}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


@torch.no_grad()
def sample_replies(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_token_ids: set[int],
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    until: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """Sampled replies (token ids, stop token excluded) to tokenised prompts, in input order.

    Batches of ``BATCH_SIZE`` in input order on the project's KV-cache batch (``CachedBatch``);
    every step draws one token per running row from ``generator`` (on CPU, so the draws do not
    depend on the device). Stop tokens cannot be drawn first, so no reply is empty. A row also
    stops once ``until(reply so far)`` is true (its last token kept).
    """
    from forgetless.evaluation.inference import CachedBatch

    stops = sorted(stop_token_ids)
    replies: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(prompts), BATCH_SIZE):
        rows = CachedBatch(model, prompts[start : start + BATCH_SIZE], pad_id)
        active = list(range(start, start + len(rows)))
        logits = rows.logits
        for step in range(max_new_tokens):
            scores = logits.float().cpu() / temperature
            if step == 0 and stops:
                scores[:, stops] = float("-inf")
            tokens = torch.multinomial(torch.softmax(scores, -1), 1, generator=generator)[:, 0]
            running = []
            for row, index in enumerate(active):
                token = int(tokens[row])
                if token in stop_token_ids:
                    continue
                replies[index].append(token)
                if step + 1 < max_new_tokens and not (until is not None and until(replies[index])):
                    running.append(row)
            if not running:
                break
            rows.keep(running)
            active = [active[row] for row in running]
            logits = rows.step(tokens[running].to(rows.device))
    return replies


def answer_greedily(
    model: nn.Module, tokenizer: Any, formatter: PromptFormatter, texts: Sequence[str], max_new_tokens: int
) -> list[Any]:
    """``model``'s greedy replies (``Generation``s) to ``texts`` as user turns formatted by
    ``formatter``, in batches of ``BATCH_SIZE``; the caller holds the model in eval mode."""
    from forgetless.evaluation.evaluate import stop_token_ids_of
    from forgetless.evaluation.inference import generate_greedy

    return generate_greedy(
        model, [formatter.prompt_ids(text) for text in texts],
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_token_id,
        stop_token_ids=stop_token_ids_of(model, tokenizer, formatter), batch_size=BATCH_SIZE,
    )  # fmt: skip


def encode_pseudo(formatter: PromptFormatter, prompt: str, answer: str, complete: bool) -> Encoded:
    """As ``PromptFormatter.encode``, but an incomplete (budget-cut) answer gets no end token."""
    prompt_ids = formatter.prompt_ids(prompt)
    answer_ids = formatter.answer_ids(prompt, answer) + (formatter.end_ids if complete else [])
    answer_ids = answer_ids[: formatter.max_length - 1]
    prompt_ids = prompt_ids[-(formatter.max_length - len(answer_ids)) :]
    return Encoded(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def generate_pseudo_examples(
    model: nn.Module,
    tokenizer: Any,
    count: int,
    seed: int,
    stage: int,
    params: PseudoReplayParams,
    formatter: PromptFormatter | None = None,
) -> list[dict[str, Any]]:
    """``count`` records {instruction, prompt, answer, complete, tokens} written by ``model``
    (see the module docstring); the model is used in eval mode and restored to its mode."""
    from forgetless.evaluation.evaluate import stop_token_ids_of

    if count <= 0:
        return []
    formatter = formatter if formatter is not None else PromptFormatter(tokenizer)
    stops = stop_token_ids_of(model, tokenizer, formatter)
    instructions = [INSTRUCTIONS[(i + stage) % len(INSTRUCTIONS)] for i in range(count)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            question_ids = sample_replies(
                model, [formatter.prompt_ids(text) for text in instructions],
                pad_id=tokenizer.pad_token_id, stop_token_ids=stops,
                max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                generator=stage_generator(seed, stage),
            )  # fmt: skip
            questions = [
                tokenizer.decode(ids, skip_special_tokens=True).strip() or instruction
                for ids, instruction in zip(question_ids, instructions)
            ]
            answers = answer_greedily(model, tokenizer, formatter, questions, params.max_new_tokens)
    finally:
        model.train(was_training)
    return [
        {
            "instruction": instruction,
            "prompt": question,
            "answer": answer.text,
            "complete": len(answer.token_ids) < params.max_new_tokens,
            "tokens": len(ids) + len(answer.token_ids),
        }
        for instruction, question, ids, answer in zip(instructions, questions, question_ids, answers)
    ]


@register_strategy("pseudo_replay")
class PseudoReplay(Strategy):
    """Self-generated rehearsal (LAMOL / SSR); params: source, fraction, max_new_tokens,
    temperature, mode (lora | fft), and AdapterConfig fields for mode lora."""

    Params = PseudoReplayParams
    accepts_adapter_fields = True

    def __init__(self, params: dict[str, Any] | None = None, source: str = "params") -> None:
        super().__init__(params, source)
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0

    def make_engine(self) -> Engine:
        return mode_engine(self, lora="merge", fft="continue")

    def pseudo_count(self, own: int) -> int:
        return int(round(self.params.fraction * own))

    def before_training(self, context: StageContext) -> None:
        started = time.perf_counter()
        count = self.pseudo_count(len(context.examples))
        formatter = context.formatter or PromptFormatter(context.tokenizer)
        self.records = generate_pseudo_examples(
            context.model, context.tokenizer, count, context.seed, context.stage, self.params, formatter
        )
        context.trained_on["pseudo_replay"] = len(self.records)
        context.examples.extend(
            encode_pseudo(formatter, r["prompt"], r["answer"], r["complete"]) for r in self.records
        )
        self.seconds = time.perf_counter() - started

    def after_training(self, context: StageContext) -> None:
        meta = {
            "stage": context.stage,
            "seed": context.seed,
            "source": self.params.source,
            "count": len(self.records),
            "generated_tokens": sum(r["tokens"] for r in self.records),
            "seconds": round(self.seconds, 3),
            "examples": self.records,
        }
        context.save_state({}, meta)
