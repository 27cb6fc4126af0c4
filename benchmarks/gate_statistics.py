"""Shared or per-task gate statistics? SLIM's sample-level gate over a task sequence, without training.

    python benchmarks/gate_statistics.py [--out FILE]

The gate depends on the prompt and the base model only (gate.py), so what it does over a task
sequence can be measured without training any expert: the gate passes of training (train mode,
no gradients) over each task's first 96 training prompts, two epochs in shuffled batches of 8, as
examples/slim_gate_study.yaml trains them, then every prompt group scored in eval mode:

- ``shared``: one SLIM adapter whose gate statistics every stage updates in turn
  (``gate_statistics: shared``);
- ``per_task``: one adapter per stage, each fitted on its own task; a prompt's score is the
  minimum over the stages learned so far of its layer-mean z-score (``gate_statistics:
  per_task``, what ``open_gate_task`` builds inside one adapter).

The choice between them was fixed before this ran: take ``per_task`` as the default if, after
the last stage, it yields (score >= 3) a larger share of the general suite's *validation* items
than ``shared`` while the test prompts of every learned task yield at most 2%. Reported per stage
and group: mean score, share yielding at 3 and at 2. Groups: the general suite's validation and
reported items, each sequence task's test prompts and their paraphrases.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from forgetless.adapters import AdapterConfig, adapter_layers, inject_adapters
from forgetless.experiment.inspect import prompt_batches
from forgetless.io import write_json
from forgetless.strategies._engines import ModelSource
from forgetless.tasks import get_task, suites

ROOT = Path(__file__).resolve().parent
SEQUENCE = ["zorbian_topics", "kelvar_dates", "glorp_arithmetic"]


def fresh(source: ModelSource) -> torch.nn.Module:
    model = source.fresh()
    config = AdapterConfig.from_dict({"kind": "slim", "r": 16, "alpha": 32, "seed": 0})
    inject_adapters(model, config, tokenizer=source.tokenizer)
    return model


def fit(model: torch.nn.Module, tokenizer, task: str) -> None:  # noqa: ANN001
    """The gate passes of one training stage: 2 epochs over 96 prompts, batches of 8."""
    prompts = [e.prompt for e in get_task(task).train][:96]
    model.train()
    for epoch in range(2):
        order = prompts[:]
        random.Random(epoch).shuffle(order)
        for batch in prompt_batches(tokenizer, order, 8):
            with torch.no_grad():
                model(**batch)
    model.eval()


def scores(model: torch.nn.Module, tokenizer, prompts: list[str]) -> torch.Tensor:  # noqa: ANN001
    gate = next(iter(adapter_layers(model).values())).context.gate
    out = []
    for batch in prompt_batches(tokenizer, prompts, 16):
        with torch.no_grad():
            model(**batch)
        out.append(gate.scores.float().clone())
    return torch.cat(out)


def summary(groups: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    return {
        name: {
            "mean_score": round(float(v.mean()), 3),
            "yielded_at_3": round(float((v >= 3).float().mean()), 4),
            "yielded_at_2": round(float((v >= 2).float().mean()), 4),
        }
        for name, v in groups.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gate_statistics.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    source = ModelSource("smollm2-135m-instruct")
    tokenizer = source.tokenizer
    groups = {
        "general_validation": [e.prompt for n in suites()["general"] for e in get_task(n).validation],
        "general_reported": [e.prompt for n in suites()["general"] for e in get_task(n).test],
    }
    for name in SEQUENCE:
        groups[name] = [e.prompt for e in get_task(name).test]
        groups[f"{name}_paraphrase"] = [e.prompt for e in get_task(f"{name}_paraphrase").test]
    results: dict = {"shared": {}, "per_task": {}}
    shared, stages = fresh(source), []
    for stage, task in enumerate(SEQUENCE):
        fit(shared, tokenizer, task)
        results["shared"][stage] = summary({g: scores(shared, tokenizer, p) for g, p in groups.items()})
        own = fresh(source)
        fit(own, tokenizer, task)
        stages.append({g: scores(own, tokenizer, p) for g, p in groups.items()})
        nearest = {g: torch.stack([s[g] for s in stages]).min(dim=0).values for g in groups}
        results["per_task"][stage] = summary(nearest)
        print(stage, json.dumps({k: results[k][stage] for k in results}), flush=True)
    last = len(SEQUENCE) - 1
    learned_ok = all(results["per_task"][last][t]["yielded_at_3"] <= 0.02 for t in SEQUENCE)
    more = (
        results["per_task"][last]["general_validation"]["yielded_at_3"]
        > results["shared"][last]["general_validation"]["yielded_at_3"]
    )
    results["rule"] = {
        "per_task_yields_more_general_validation": more,
        "learned_tasks_yield_at_most_2pct": learned_ok,
    }
    results["choice"] = "per_task" if more and learned_ok else "shared"
    write_json(args.out, results)
    print(f"choice: {results['choice']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
