"""Per-stage or shared experts? SLIM's ``stage_experts`` chosen on validation data of protocol C.

    python benchmarks/stage_experts.py RUN [--per-task slim_stage_experts] [--shared slim] [--out FILE]

RUN is a finished ``forgetless run examples/slim_gate_study.yaml`` folder holding both SLIM
methods. Every stage of each is rebuilt (``load_stage``) and scored on *validation* data only:

- each sequence task's validation prompts: its training items that the run did not train on
  (``limits.train`` draws 96 of them with the run's seed; the rest, 64 / 54 / 74 for zorbian /
  kelvar / glorp, are never seen), scored after every stage on the tasks learned so far;
- the general suite's validation items (every third item, 200; ``general_probe``) after the last
  stage.

The rule was written here before this ran, and decides the default of ``stage_experts`` for SLIM
(``adapters/config.py``): take ``per_task`` if, after the last stage, on the validation data above,
(a) its final average over the three tasks is at least ``shared``'s, (b) its BWT (mean over the
first two tasks of the final minus the own-stage score) is at least ``shared``'s, and (c) its
general validation score is at most 1 point below ``shared``'s. Otherwise keep ``shared``.

JSON (default ``benchmarks/results/stage_experts.json``): per method the score table
``{stage: {task: score}}``, final average, BWT, general validation score, and the decision.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from forgetless.data.task import Task
from forgetless.evaluation import evaluate_tasks
from forgetless.io import write_json
from forgetless.tasks import get_task, suites
from forgetless.training import load_stage

ROOT = Path(__file__).resolve().parent


def validation_tasks(config: dict) -> tuple[list[Task], list[Task]]:
    """The sequence tasks' untrained training items, and the general suite's validation items."""
    limit, seed = config["limits"]["train"], config["seed"]
    sequence = []
    for name in config["tasks"]:
        task = get_task(name)
        used = set(task.limited(limit, None, seed).train)
        held_out = [example for example in task.train if example not in used]
        sequence.append(replace(task, test=held_out, train=[]))
    general = [replace(get_task(name), test=get_task(name).validation) for name in suites()["general"]]
    return sequence, general


def score_method(folder: Path, sequence: list[Task], general: list[Task]) -> dict:
    stages = sorted(
        (p for p in folder.iterdir() if p.name.startswith("stage-")), key=lambda p: int(p.name.split("-")[1])
    )
    table: dict[int, dict[str, float]] = {}
    general_score = None
    for stage, stage_folder in enumerate(stages):
        print(f"{folder.name} stage {stage} ...", flush=True)
        model, tokenizer = load_stage(stage_folder)
        scores = evaluate_tasks(model, tokenizer, sequence[: stage + 1], batch_size=16)
        table[stage] = {name: result.score for name, result in scores.items()}
        if stage == len(stages) - 1:
            results = evaluate_tasks(model, tokenizer, general, batch_size=16)
            counts = {name: len(task.test) for name, task in zip(results, general)}
            general_score = sum(results[n].score * counts[n] for n in results) / sum(counts.values())
    last = len(stages) - 1
    names = [task.name for task in sequence]
    final = sum(table[last][n] for n in names) / len(names)
    bwt = sum(table[last][n] - table[i][n] for i, n in enumerate(names[:-1])) / (len(names) - 1)
    return {"table": table, "final_average": final, "bwt": bwt, "general_validation": general_score}


def decide(per_task: dict, shared: dict) -> dict:
    rule = {
        "final_average": per_task["final_average"] >= shared["final_average"],
        "bwt": per_task["bwt"] >= shared["bwt"],
        "general": per_task["general_validation"] >= shared["general_validation"] - 1.0,
    }
    return {"checks": rule, "default": "per_task" if all(rule.values()) else "shared"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--per-task", default="slim_stage_experts")
    parser.add_argument("--shared", default="slim")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "stage_experts.json")
    args = parser.parse_args(argv)
    config = json.loads((args.run / "config.json").read_text(encoding="utf-8"))
    sequence, general = validation_tasks(config)
    print(
        "validation items:",
        {t.name: len(t.test) for t in sequence},
        "general",
        sum(len(t.test) for t in general),
    )
    results = {
        name: score_method(args.run / "methods" / name, sequence, general)
        for name in (args.per_task, args.shared)
    }
    results["decision"] = decide(results[args.per_task], results[args.shared])
    print(json.dumps(results, indent=1))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
