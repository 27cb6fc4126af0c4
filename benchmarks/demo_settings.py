"""The demo's training settings (batch, learning rate, items, epochs), chosen on validation data by rules written before they ran.

    python benchmarks/demo_settings.py [--out FILE]

Issue 15 asks that the demo teach every task: acquisition (the score on a task right after its own
stage) of at least 80% for seq_lora and SLIM, within the demo's time budget. The demo's training
data is fixed by that budget (48 items per task, 2 epochs), so what is left to choose is how that
data is cut into optimizer steps (the batch size) and the learning rate of the LoRA-based methods
(seq_fft keeps its own, 5e-5; it has no acquisition target).

For each candidate, seq_lora (r 16, alpha 32) and SLIM (its defaults) are trained over the demo's
sequence (zorbian_topics, kelvar_dates, glorp_arithmetic) exactly as the demo trains them, and
after each stage the task just learned is scored on *validation* items only: the task's training
items that the demo never trains on (``limits.train`` draws 48 of each task's 150 with seed 0; 60
of the other 102, a seeded draw, are scored). No test item is looked at.

The rule, fixed before the run: candidates are tried from the cheapest (largest batch, then
smallest learning rate): batch 4 at lr 2e-3, batch 4 at 4e-3, batch 2 at 2e-3. The first at which
both methods score at least 85% on every task's validation items (a margin over the 80% target
for the gap between validation and test items) is taken, and the rest are not run. If none
passes, the one with the highest minimum over (method, task) is taken and the target is reported
as not met.

How the candidates came about (a first rule, recorded here because it failed): at batch 8 (12
steps a stage), learning rates 2e-3 and 4e-3 left zorbian_topics at chance on validation items
(seq_lora 22% / 18%, SLIM 28% / 18%; kelvar_dates 15-32%), and the demo's earlier 1e-3 taught
zorbian 26-30% on the test items of a timing run. The same data in more, smaller steps was then
tried on zorbian's validation items alone: seq_lora at lr 2e-3 reached 92% at batch 4 and 100% at
batch 2 (SLIM 100% at batch 2), so the second rule searches the batch size.

That second rule (its JSON is ``benchmarks/results/demo_settings_rule2.json``) found no
candidate at 85%: batch 2 at lr 2e-3 had the highest minimum, seq_lora 62% on kelvar_dates, and
the demo took it. On its test items every kelvar error of seq_lora (19) and SLIM (22) was the month
name alone (day and year always right), and the 48 training items show each of the 12 invented
months 2-7 times. So the third rule, written down before it ran (2026-12-07), keeps the demo's
cost (48 optimizer steps a stage at batch 2, lr 2e-3) and spends it on more distinct items instead
of a second pass over the same ones:

- candidate A, the incumbent: 48 items, 2 epochs; candidate B: 96 items, 1 epoch; candidate C,
  run only if B's minimum is below 85%: 96 items, 1 epoch, lr 3e-3;
- all are scored on the same validation items: each task's training items that neither draw uses
  (the 96-item draw holds the 48-item one, so 54 items per task);
- the candidate with the highest minimum over (method, task) is taken, the incumbent on a tie; the
  target counts as met when that minimum is at least 85%.

A fourth rule, written down (2026-12-07) after B's seq_lora scored 22% on kelvar_dates and before
C's scores: more passes, not more items. Candidate D, 48 items, 3 epochs (batch 2, lr 2e-3), runs
only when A, B and C all miss 85% (``--only D``, its own JSON); it costs 1.5x the LoRA methods'
training. D replaces the demo's setting when its minimum over (method, task) on the same
validation items is at least 85% and above A's, *and* a demo on a fresh clone with it still ends
in under 10 minutes; otherwise A stays and the target is reported as not met.

JSON (default ``benchmarks/results/demo_settings.json``): per candidate and method, the
validation score of every task after its stage and the seconds; then the decision.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from forgetless.data.task import Task
from forgetless.evaluation import evaluate_tasks
from forgetless.io import write_json
from forgetless.tasks import get_task
from forgetless.training import run_strategy
from stage_experts import validation_tasks

ROOT = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
TASKS = ["zorbian_topics", "kelvar_dates", "glorp_arithmetic"]
SEED = 0
TRAIN = {"max_length": 96, "seed": SEED, "progress": False, "batch_size": 2}
# (training items per task, epochs, learning rate); "C" runs only when "B" misses the target
CANDIDATES = {"A": (48, 2, 2e-3), "B": (96, 1, 2e-3), "C": (96, 1, 3e-3), "D": (48, 3, 2e-3)}
RULE_THREE = ("A", "B", "C")
METHODS = {"seq_lora": ("sequential_lora", {"r": 16, "alpha": 32}), "slim": ("slim", {})}
TARGET = 0.85


def held_out_tasks() -> list[Task]:
    """Each task's training items that no candidate trains on (``stage_experts.validation_tasks``
    for the largest draw, which holds the smaller ones), as test sets."""
    largest = max(items for items, _, _ in CANDIDATES.values())
    for items, _, _ in CANDIDATES.values():
        for name in TASKS:
            task = get_task(name)
            small, large = task.limited(items, None, SEED).train, task.limited(largest, None, SEED).train
            assert set(small) <= set(large), (
                f"the {items}-item draw of {name} is not in the {largest}-item one"
            )
    unused, _ = validation_tasks({"tasks": TASKS, "limits": {"train": largest}, "seed": SEED})
    return unused


def score_method(strategy: str, params: dict, candidate: tuple, held: list[Task]) -> dict:
    items, epochs, lr = candidate
    train = [get_task(name).limited(items, None, SEED) for name in TASKS]
    scores: dict[str, float] = {}

    def on_stage_end(stage: int, model, tokenizer) -> None:  # noqa: ANN001
        result = evaluate_tasks(model, tokenizer, [held[stage]], batch_size=32, seed=SEED)
        scores[held[stage].name] = result[held[stage].name].score
        print(
            f"  {strategy} {items} items x {epochs} epochs, lr {lr:g}: {held[stage].name} "
            f"{scores[held[stage].name]:.3f}",
            flush=True,
        )

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        settings = {**TRAIN, "epochs": epochs, "lr": lr}
        run_strategy(strategy, params, MODEL, train, settings, folder, on_stage_end=on_stage_end)
    return {"validation": scores, "seconds": round(time.perf_counter() - start, 1)}


def lowest(by_method: dict[str, dict]) -> float:
    return min(score for method in by_method.values() for score in method["validation"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "demo_settings.json")
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="run these candidates alone")
    args = parser.parse_args(argv)
    held = held_out_tasks()
    print("validation items:", {t.name: len(t.test) for t in held}, flush=True)
    results: dict[str, dict] = {}
    for key in args.only or RULE_THREE:
        if not args.only and key == "C" and lowest(results["B"]) >= TARGET:
            break
        candidate = CANDIDATES[key]
        results[key] = {name: score_method(s, p, candidate, held) for name, (s, p) in METHODS.items()}
    minimum = {key: lowest(by_method) for key, by_method in results.items()}
    chosen = max(minimum, key=minimum.get)  # the first of equals: the incumbent A on a tie
    decision = {
        "candidates": {key: dict(zip(("items", "epochs", "lr"), c)) for key, c in CANDIDATES.items()},
        "minimum": minimum,
        "chosen": chosen,
        "target_met": minimum[chosen] >= TARGET,
        "rule": f"the highest minimum over (method, task), A on a tie; met when >= {TARGET}"
        if not args.only
        else "the fourth rule in the docstring (needs the third rule's A and a demo timing)",
    }
    out = {"results": results, "decision": decision}
    print(json.dumps(out, indent=1))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
