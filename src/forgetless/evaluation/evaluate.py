"""``evaluate_task``: score one model on one task's test split, by generation or by log-likelihood.

Every tokenisation goes through ``PromptFormatter`` (the same tokens training sees, BOS included
where the tokenizer defines it). The task's scorer decides the route: a ``loglik`` scorer scores
the choices of multiple-choice examples, a ``generation`` scorer judges greedy replies.
Evaluation is deterministic: ``torch.manual_seed(seed)`` runs first (SLIM's dynamic-merge masks
draw from it), the model is put in eval mode and its previous mode restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from forgetless.data.formatting import PromptFormatter, Style
from forgetless.data.task import Task
from forgetless.errors import InputError
from forgetless.evaluation.inference import choice_loglikelihoods, generate_greedy
from forgetless.evaluation.scorers import get_scorer


@dataclass
class TaskScore:
    """One task's result.

    Attributes:
        task: task name.
        metric: scorer name.
        score: mean of the scorer's primary measure over the examples, in [0, 1].
        n: number of examples scored.
        measures: every measure's mean (``{"acc": .., "acc_norm": ..}`` for ``loglik_mc``;
            ``{metric: score}`` for generation scorers).
        details: per example: ``prompt``, ``reference``, ``score`` and either ``prediction``
            (generation) or ``loglikelihoods`` + ``predicted`` choice index (log-likelihood).
        seconds: wall time of the evaluation.
        generated_tokens: tokens generated (0 for log-likelihood scoring).
    """

    task: str
    metric: str
    score: float
    n: int
    measures: dict[str, float] = field(default_factory=dict)
    details: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    generated_tokens: int = 0

    def to_dict(self, details: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not details:
            out.pop("details")
        return out


def stop_token_ids_of(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, formatter: PromptFormatter
) -> set[int]:
    """EOS ids of tokenizer and generation config, plus the end-of-turn token that closes an answer."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, (list, tuple)):
        ids.update(int(i) for i in config_eos)
    special = set(tokenizer.all_special_ids)
    ids.update(token for token in formatter.end_ids if token in special)
    return ids


def context_length(model: nn.Module) -> int | None:
    """The model's maximum sequence length (``max_position_embeddings``), if its config says."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def fit_prompt(ids: list[int], budget: int | None, bos_id: int | None) -> list[int]:
    """Drop the oldest prompt tokens so that ``len(ids) <= budget`` (the BOS token stays first).

    The end of a prompt holds the question, so it is what must survive (lm-eval truncates the
    same side); a model never sees positions it was not trained for.
    """
    if budget is None or len(ids) <= budget:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return [bos_id, *ids[len(ids) - budget + 1 :]] if budget > 1 else ids[-budget:]
    return ids[len(ids) - budget :]


def _prompt_budget(model: nn.Module, task: Task, room: int) -> int | None:
    """Prompt tokens allowed: the model's context minus ``room`` for the answer, and at most the
    task's ``max_prompt_tokens``."""
    limit = context_length(model)
    budgets = [b for b in (None if limit is None else limit - room, task.max_prompt_tokens) if b is not None]
    return min(budgets) if budgets else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def evaluate_task(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    style: Style = "auto",
    system_prompt: str | None = None,
    seed: int = 0,
) -> TaskScore:
    """Score ``model`` on ``task.test`` with the task's scorer.

    Args:
        model: a causal LM (plain, PEFT, with forgetless adapters, merged or MoE).
        tokenizer: its tokenizer (with a pad token).
        task: the task; ``task.metric`` names the scorer.
        batch_size: prompts (generation) or questions (log-likelihood) per forward pass.
        limit: score at most this many test examples (a seeded sample, the same for every model).
        style: prompt style (``auto``: the chat template when the tokenizer has one).
        system_prompt: system message; None uses the task's own.
        seed: torch seed set before evaluating (adapters that draw random masks are reproducible).

    Raises:
        InputError: unknown scorer, a log-likelihood scorer on a task without choices, or an
            empty test split.
    """
    scorer = get_scorer(task.metric)
    if limit is not None:
        if limit < 1:
            raise InputError(f"limit must be >= 1, got {limit}")
        task = task.limited(test=limit, seed=seed)
    if not task.test:
        raise InputError(f"task '{task.name}' has no test examples to evaluate")
    if scorer.kind == "loglik" and not task.is_multiple_choice:
        raise InputError(
            f"task '{task.name}': metric '{task.metric}' needs choices on every test example; "
            "give choices (fields.choices or choices) or use a generation metric such as exact_match"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    formatter = PromptFormatter(
        tokenizer, style, system_prompt if system_prompt is not None else task.system_prompt
    )
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        if scorer.kind == "loglik":
            result = _score_loglik(model, tokenizer, task, formatter, scorer, batch_size)
        else:
            result = _score_generation(model, tokenizer, task, formatter, scorer, batch_size)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def _score_loglik(model, tokenizer, task, formatter, scorer, batch_size) -> TaskScore:  # noqa: ANN001
    choices = [
        [formatter.answer_ids(example.prompt, choice) for choice in example.choices] for example in task.test
    ]
    prompts = [
        fit_prompt(
            formatter.prompt_ids(example.prompt),
            _prompt_budget(model, task, max(map(len, options), default=0)),
            tokenizer.bos_token_id,
        )
        for example, options in zip(task.test, choices)
    ]
    loglikelihoods = choice_loglikelihoods(
        model, prompts, choices, pad_id=tokenizer.pad_token_id, batch_size=batch_size
    )
    per_example = [scorer.score(lls, example) for lls, example in zip(loglikelihoods, task.test)]
    details = [
        {
            "prompt": example.prompt,
            "reference": example.choices[example.gold],
            "gold": example.gold,
            "predicted": max(range(len(lls)), key=lambda i: (lls[i], -i)),
            "loglikelihoods": lls,
            "score": measures[scorer.primary],
        }
        for example, lls, measures in zip(task.test, loglikelihoods, per_example)
    ]
    measures = {name: _mean([m[name] for m in per_example]) for name in per_example[0]}
    return TaskScore(task.name, task.metric, measures[scorer.primary], len(task.test), measures, details)


def _score_generation(model, tokenizer, task, formatter, scorer, batch_size) -> TaskScore:  # noqa: ANN001
    budget = _prompt_budget(model, task, task.max_new_tokens)
    prompts = [fit_prompt(formatter.prompt_ids(e.prompt), budget, tokenizer.bos_token_id) for e in task.test]
    generations = generate_greedy(
        model,
        prompts,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        max_new_tokens=task.max_new_tokens,
        pad_id=tokenizer.pad_token_id,
        stop_token_ids=stop_token_ids_of(model, tokenizer, formatter),
        stop=task.stop,
        batch_size=batch_size,
    )
    scores = [float(scorer.score(g.text, example)) for g, example in zip(generations, task.test)]
    details = [
        {"prompt": example.prompt, "reference": example.answer, "prediction": g.text, "score": s}
        for example, g, s in zip(task.test, generations, scores)
    ]
    score = _mean(scores)
    return TaskScore(
        task.name,
        task.metric,
        score,
        len(task.test),
        {task.metric: score},
        details,
        generated_tokens=sum(len(g.token_ids) for g in generations),
    )


def evaluate_tasks(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: Iterable[Task | str], **kwargs: Any
) -> dict[str, TaskScore]:
    """``evaluate_task`` for each task (Task objects or built-in task / suite names), keyed by name."""
    from forgetless.tasks import expand_task_names, get_task

    resolved: list[Task] = []
    for task in tasks:
        if isinstance(task, Task):
            resolved.append(task)
        else:
            resolved.extend(get_task(name, kwargs.get("seed", 0)) for name in expand_task_names([task]))
    return {task.name: evaluate_task(model, tokenizer, task, **kwargs) for task in resolved}
