"""``run_experiment``: task sequence x methods -> accuracy matrices, metrics, report.

Order of work (data flows one way):

1. validate the config, load every task (fails before any compute);
2. evaluate the base model once: row 0 of every method's matrix;
3. for each strategy method, train stage after stage (``strategies.run_strategy``) and evaluate
   after every stage through its callback;
4. for each merge / mix method, combine the first i per-task outputs of its ``one_round`` source
   for stage i, then evaluate;
5. write ``results.json`` and the report.

Resume: training stages resume inside ``run_strategy`` (finished stages are loaded, a killed
stage restarts from its checkpoint); evaluations are cached per (method, stage) by a key of
everything that decides them (``experiment/cache.py``); merge / mix outputs are folders written
atomically and reused when present. Re-running the same command therefore continues where a killed
run stopped and ends with the same numbers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from forgetless.config import ExperimentConfig, MethodSpec
from forgetless.data.task import Task
from forgetless.errors import InputError
from forgetless.experiment.cache import EvalCache
from forgetless.experiment.lock import claim_run_folder, run_lock
from forgetless.io import content_key, write_json, write_text

Log = Callable[[str], None]


def load_tasks(config: ExperimentConfig) -> tuple[list[Task], list[Task]]:
    """The task sequence (limits applied) and the general-ability tasks."""
    from forgetless.tasks import expand_task_names, get_task

    sequence = []
    for task in config.tasks:
        if isinstance(task, str):
            loaded = get_task(task, seed=config.seed)
        else:
            loaded = task.load(config.data_root(), seed=config.seed)
        sequence.append(
            loaded.limited(config.limits.train, config.evaluation.limit or config.limits.test, config.seed)
        )
    general = []
    entries = config.evaluation.general
    if config.evaluation.split == "validation" and config.evaluation.validation_general is not None:
        entries = config.evaluation.validation_general
    limit = config.evaluation.general_limit
    for entry in entries:
        if isinstance(entry, str):
            tasks = [get_task(name, seed=config.seed) for name in expand_task_names([entry])]
            if config.evaluation.split == "validation":  # built-in probes hold their validation items
                tasks = [replace(task, test=task.validation) if task.validation else task for task in tasks]
            general += [task.limited(None, limit, config.seed) for task in tasks]
        else:  # a data-file task used as a general-ability probe (never trained on); its own
            # limit_test, when set, wins over general_limit
            task = replace(entry.load(config.data_root(), seed=config.seed), kind="general")
            general.append(task if entry.limit_test else task.limited(None, limit, config.seed))
    return sequence, general


def scored_tasks(tasks: list[Task], config: ExperimentConfig) -> list[Task]:
    """The sequence tasks as evaluation sees them: their test split, or (``evaluation.split:
    validation``) their validation split in its place, limited like the test split."""
    if config.evaluation.split == "test":
        return tasks
    out = []
    for task in tasks:
        if not task.validation:
            raise InputError(
                f"evaluation.split: task '{task.name}' has no validation split; give it validation: FILE "
                "or validation_fraction: 0.1 (carved from its training data)"
            )
        limit = config.evaluation.limit or config.limits.test
        out.append(replace(task, test=task.validation).limited(None, limit, config.seed))
    return out


def results_folder(config: ExperimentConfig, out_dir: str | Path) -> Path:
    """Where results.json and the report go: ``OUT`` for the test split, ``OUT/validation`` else."""
    out = Path(out_dir)
    return out if config.evaluation.split == "test" else out / "validation"


def combine_tasks(tasks: list[Task], seed: int) -> Task:
    """One training task holding every task's training examples, shuffled (the multi-dataset setting)."""
    import random

    train = [example for task in tasks for example in task.train]
    random.Random(seed).shuffle(train)
    return Task(
        name="+".join(task.name for task in tasks), train=train, test=[], description="multi-task mixture"
    )


def item_outcomes(score: Any) -> dict[str, list[Any]]:
    """One task's per-item outcomes, in the order of its scored items (limits applied): each
    item's ``score`` and ``prediction`` (the generated text, or the chosen option's index for
    log-likelihood tasks), so any statistic can be recomputed without rerunning a model."""
    return {
        "score": [detail["score"] for detail in score.details],
        "prediction": [detail.get("prediction", detail.get("predicted")) for detail in score.details],
    }


class Runner:
    """Runs one experiment config into ``out_dir``; ``run()`` returns the results dict."""

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, log: Log | None = None) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.log = log or (lambda message: None)
        self.tasks, self.general = load_tasks(config)
        # what is trained, stage by stage: each task, or (multi_task) one stage on all of them
        self.stages = (
            self.tasks if config.schedule == "sequential" else [combine_tasks(self.tasks, config.seed)]
        )
        self.scored = scored_tasks(self.tasks, config)  # what evaluation scores: test or validation
        self.timings: dict[str, float] = {}
        self.produced_variants: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(
        self,
        folder: Path,
        identity: Any,
        load: Callable[[], tuple[torch.nn.Module, Any]],
        what: str = "",
        stage: int | None = None,
    ) -> dict[str, Any]:
        """Scores of the sequence tasks and general tasks for one model state (cached): after
        ``stage`` (0-based), those ``evaluation.unseen_tasks`` and ``general_stages`` ask for; for
        the base model (``stage`` None), all of them.

        ``load()`` gives ``(model, tokenizer)``; it is called only when the scores are not cached.
        """
        from forgetless.evaluation import evaluate_tasks

        sequence, general = self.scored_after(stage)
        cache = EvalCache(folder)
        # the two scope fields enter the key through the tasks they select, so a run with the
        # default scope keeps the keys (and cached scores) of runs made before they existed
        settings = self.config.evaluation.model_dump(exclude={"unseen_tasks", "general_stages"})
        keys = [task.fingerprint() for task in sequence + general]
        key = content_key(identity, keys, settings, self.config.seed)
        row = cache.get(key)
        if row is not None and "items" in row:  # rows cached before items were kept: score again
            return row
        if what:
            self.log(f"evaluating {what}")
        model, tokenizer = load()
        start = time.perf_counter()
        scores = evaluate_tasks(
            model,
            tokenizer,
            sequence + general,
            batch_size=self.config.evaluation.batch_size,
            seed=self.config.seed,
        )
        row = {
            "tasks": {task.name: scores[task.name].score for task in sequence},
            "general": {task.name: scores[task.name].score for task in general},
            "seconds": round(time.perf_counter() - start, 2),
            "items": {task.name: item_outcomes(scores[task.name]) for task in sequence + general},
        }
        cache.put(key, row)
        return row

    def scored_after(self, stage: int | None) -> tuple[list[Task], list[Task]]:
        """The sequence tasks and general tasks scored after ``stage`` (None: the base model)."""
        spec = self.config.evaluation
        if stage is None:
            return self.scored, self.general
        last = len(self.stages) - 1
        seen = len(self.scored) if len(self.stages) == 1 else stage + 1  # one stage trains them all
        sequence = self.scored if spec.unseen_tasks else self.scored[:seen]
        general = self.general if spec.general_stages == "every" or stage == last else []
        return sequence, general

    def base_row(self) -> dict[str, Any]:
        """Row 0 of every matrix: the base model, evaluated once per run."""
        from forgetless.models import load_model

        load = lambda: load_model(self.config.model, seed=self.config.seed)  # noqa: E731
        return self.evaluate(
            self.out / "base", ["base", self.config.model], load, f"the base model {self.config.model}"
        )

    # ----------------------------------------------------------------------------- methods
    def train_config(self, method: MethodSpec) -> Any:
        from forgetless.training import TrainConfig

        return TrainConfig(**{"seed": self.config.seed, **self.config.train, **method.train})

    def run_strategy_method(self, method: MethodSpec) -> dict[str, Any]:
        from forgetless.training import run_strategy, stage_folder
        from forgetless.training.runner import applied_options

        folder = self.out / "methods" / method.name
        rows: dict[int, dict[str, Any]] = {}
        identity = [
            method.model_dump(),
            self.config.train,
            self.config.model,
            [t.fingerprint() for t in self.stages],
        ]

        variants = [m for m in self.config.methods if m.variant is not None and m.variant.of == method.name]
        variant_rows: dict[str, dict[int, dict[str, Any]]] = {v.name: {} for v in variants}

        def on_stage_end(stage: int, model: torch.nn.Module, tokenizer: Any) -> None:
            when = f"after stage {stage + 1}/{len(self.stages)} ({self.stages[stage].name})"
            target = stage_folder(folder, stage, self.stages[stage].name)
            # reused stages saved under older inference-time defaults are scored with today's
            # values: cached scores of the old values must not be taken for them (a variant that
            # sets a value itself is not affected by it)
            reapplied = applied_options(model, target)

            def key(overrides: dict[str, Any]) -> list[Any]:
                stale = {k: v for k, v in reapplied.items() if k not in overrides}
                return [identity, stage] + ([{"reapplied": stale}] if stale else [])

            if method.evaluate:
                what = f"{method.name} {when}"
                rows[stage] = self.evaluate(target, key({}), lambda: (model, tokenizer), what, stage)
            for variant in variants:
                variant_rows[variant.name][stage] = self.evaluate_variant(
                    variant, target.name, key(variant.variant.adapter), model, tokenizer, when, stage
                )

        start = time.perf_counter()
        results = run_strategy(
            method.strategy,
            method.params,
            self.config.model,
            self.stages,
            self.train_config(method),
            folder,
            self.config.setting,
            on_stage_end=on_stage_end,
            label=method.name,
        )
        self.timings[method.name] = round(time.perf_counter() - start, 1)
        stages = [task.name for task in self.stages]
        for variant in variants:
            self.produced_variants[variant.name] = {
                "stages": stages,
                "rows": [variant_rows[variant.name].get(i) for i in range(len(self.stages))],
            }
        return {"stages": stages, "rows": [rows.get(i) for i in range(len(self.stages))],
                "artifacts": [str(getattr(r, "artifact", "")) for r in results]}  # fmt: skip

    def evaluate_variant(
        self, variant: MethodSpec, stage_name: str, identity: Any, model: torch.nn.Module, tokenizer: Any,
        when: str, stage: int,
    ) -> dict[str, Any]:  # fmt: skip
        """Score one stage of the variant's source with the variant's inference settings, then
        put the source's settings back (the model is the source's, shared)."""
        from forgetless.adapters import set_inference_options

        previous: dict[str, Any] = {}

        def load() -> tuple[torch.nn.Module, Any]:
            previous.update(set_inference_options(model, **variant.variant.adapter))
            return model, tokenizer

        folder = self.out / "methods" / variant.name / stage_name
        try:
            return self.evaluate(
                folder, [identity, variant.model_dump()], load, f"{variant.name} {when}", stage
            )
        finally:
            if previous:
                set_inference_options(model, **previous)

    def run_combine_method(self, method: MethodSpec, source: dict[str, Any]) -> dict[str, Any]:
        """Merge or mix the first i per-task outputs of a one_round method, for every stage i."""
        from forgetless.models import load_model
        from forgetless.training import stage_folder

        folder = self.out / "methods" / method.name
        artifacts = source["artifacts"]
        rows = []
        start = time.perf_counter()
        for stage in range(len(self.stages)):
            inputs = artifacts[: stage + 1]
            target = stage_folder(folder, stage, self.stages[stage].name) / "model"
            if method.merge is not None:
                self._merge(method, inputs, target)
            else:
                self._mix(method, inputs, target)
            # the inputs by their place in the run folder, so a moved run keeps its cached scores
            placed = [
                Path(os.path.relpath(Path(path).resolve(), self.out.resolve())).as_posix() for path in inputs
            ]
            identity = [method.model_dump(), placed, self.config.model]
            what = f"{method.name} at stage {stage + 1}/{len(self.stages)}"
            load = lambda target=target: self._load_combined(target, load_model)  # noqa: E731
            rows.append(self.evaluate(target.parent, [identity, stage], load, what, stage))
        self.timings[method.name] = round(time.perf_counter() - start, 1)
        return {"stages": [task.name for task in self.stages], "rows": rows}

    def _merge(self, method: MethodSpec, inputs: list[str], target: Path) -> None:
        from forgetless.config_checks import merge_of_outputs
        from forgetless.merging import MergeConfig, run_merge

        if (target / "config.json").exists() or (target / "adapter_config.json").exists():
            return
        spec = method.merge
        config = MergeConfig(**merge_of_outputs(spec, self.config.model, inputs, self.config.seed))
        self.log(f"{method.name}: {spec.method} merge of {len(inputs)} task output(s)")
        run_merge(config, target, overwrite=True)

    def _mix(self, method: MethodSpec, inputs: list[str], target: Path) -> None:
        from forgetless.mixing import run_mix_outputs

        if (target / "forgetless_adapter.json").exists() or (target / "config.json").exists():
            return
        spec = method.mix
        self.log(f"{method.name}: {spec.router} router over {len(inputs)} expert(s)")
        run_mix_outputs(self.config.model, inputs, target, router=spec.router, top_k=spec.top_k,
                        tasks=self.stages[: len(inputs)], seed=self.config.seed, **spec.parameters)  # fmt: skip

    def _load_combined(self, target: Path, load_model: Callable) -> tuple[torch.nn.Module, Any]:
        if (target / "config.json").exists():
            return load_model(str(target))
        from forgetless.adapters import load_adapter

        model, tokenizer = load_model(self.config.model, seed=self.config.seed)
        return load_adapter(model, target), tokenizer

    # ----------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        from forgetless.evaluation.metrics import continual_metrics

        claim_run_folder(self.out)
        with run_lock(self.out):
            config_text = json.dumps(self.config.model_dump(mode="json"), indent=2) + "\n"
            if not (
                self.out / "config.json"
            ).exists():  # a changed config replaces it only once the run succeeded
                write_text(self.out / "config.json", config_text)
            base = self.base_row()
            produced: dict[str, dict[str, Any]] = {}
            ordered = [m for m in self.config.methods if m.strategy] + [
                m for m in self.config.methods if m.merge or m.mix
            ]
            for method in ordered:
                if method.strategy:
                    produced[method.name] = self.run_strategy_method(method)
                else:
                    source = (method.merge or method.mix).source
                    produced[method.name] = self.run_combine_method(method, produced[source])
            produced.update(self.produced_variants)  # scored while their source's stages were loaded
            results = self.results(base, produced, continual_metrics)
            write_json(results_folder(self.config, self.out) / "results.json", results)
            write_text(self.out / "config.json", config_text)
        return results

    def results(
        self, base: dict[str, Any], produced: dict[str, dict[str, Any]], metrics: Callable
    ) -> dict[str, Any]:
        task_names = [task.name for task in self.tasks]
        general_names = [task.name for task in self.general]
        methods = {}
        for method in self.config.methods:
            if not method.evaluate:
                continue
            entry = produced[method.name]
            rows = [base] + entry["rows"]
            # a cell the evaluation scope left out (evaluation.unseen_tasks, general_stages) is None
            matrix = [[row["tasks"].get(name) for name in task_names] for row in rows]
            general = [[row["general"].get(name) for name in general_names] for row in rows]
            methods[method.name] = {
                "kind": method.kind,
                "stages": ["base"] + entry["stages"],
                "matrix": matrix,
                "general": general,
                "metrics": metrics(matrix, general),
                "seconds": self.timings.get(method.name),
                # per stage (base first), per task: item outcomes; None for rows cached before
                # forgetless kept them
                "items": [row.get("items") for row in rows],
            }
        return {
            "run": self.config.model_dump(mode="json"),
            "tasks": task_names,
            "general": general_names,
            "methods": methods,
        }


def run_experiment(config: ExperimentConfig, out_dir: str | Path, log: Log | None = None) -> dict[str, Any]:
    """Run (or resume) ``config`` into ``out_dir`` and write results.json; returns the results."""
    return Runner(config, out_dir, log).run()
