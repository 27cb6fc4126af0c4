"""Evaluation: scorers, batched inference, the continual-protocol metrics, the lm-eval bridge.

    from forgetless.evaluation import evaluate_task, evaluate_tasks, continual_metrics
    scores = evaluate_tasks(model, tokenizer, ["general", "zorbian_topics"], limit=50)
    scores["zorbian_topics"].score          # in [0, 1]

The lm-eval bridge lives in ``forgetless.evaluation.lm_eval_bridge`` (imported on demand: it
needs the optional ``lm-eval`` package).
"""

from forgetless.evaluation.evaluate import TaskScore, evaluate_task, evaluate_tasks
from forgetless.evaluation.inference import Generation, choice_loglikelihoods, generate_greedy
from forgetless.evaluation.metrics import (
    acquisition,
    bwt,
    bwt_per_task,
    continual_metrics,
    final_average,
    fwt,
    fwt_per_task,
    gain_from_base,
    retention,
    row_averages,
)
from forgetless.evaluation.run import general_by_family, resolve_tasks, run_eval
from forgetless.evaluation.scorers import SCORERS, Scorer, get_scorer, register_scorer

__all__ = [
    "SCORERS",
    "Generation",
    "Scorer",
    "TaskScore",
    "acquisition",
    "bwt",
    "bwt_per_task",
    "choice_loglikelihoods",
    "continual_metrics",
    "evaluate_task",
    "evaluate_tasks",
    "final_average",
    "fwt",
    "fwt_per_task",
    "gain_from_base",
    "general_by_family",
    "generate_greedy",
    "get_scorer",
    "register_scorer",
    "resolve_tasks",
    "retention",
    "row_averages",
    "run_eval",
]
