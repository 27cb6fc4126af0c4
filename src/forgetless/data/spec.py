"""``TaskSpec``: a user task from data files, with field mapping and templates (validated by pydantic).

name: fomc
data_dir: ../shared/data/trace/LLM-CL-Benchmark_500/FOMC   # train.json / eval.json / test.json
format: trace
metric: accuracy

name: obqa
train: data/openbookqa/train.json
test: data/openbookqa/test.json
fields: {prompt: instruction, answer: answer}
choices: [answer1, answer2, answer3, answer4]
metric: loglik_mc

name: arc_easy
test: arc_easy.jsonl                    # {"query", "choices", "gold"}
fields: {prompt: query, choices: choices, gold: gold}
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from forgetless.data.loaders import Record, load_records
from forgetless.data.task import Example, Task
from forgetless.errors import InputError


class FieldMap(BaseModel):
    """Which record field holds what."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(
        "prompt", description="field with the prompt text (ignored when prompt_template is set)"
    )
    answer: str = Field("answer", description="field with the answer; optional when choices + gold are given")
    choices: str | None = Field(None, description="field with the list of choices (multiple choice)")
    gold: str | None = Field(
        None, description="field with the gold choice: an index, or the correct choice text"
    )


class TaskSpec(BaseModel):
    """A task read from data files. Relative paths are resolved against the config file's folder."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="task name used in tables and results")
    data_dir: str | None = Field(
        None, description="folder holding train/test (and eval or validation) files, as TRACE ships them"
    )
    train: str | None = Field(None, description="training data file (or datasets folder)")
    test: str | None = Field(None, description="test data file (or datasets folder)")
    validation: str | None = Field(
        None, description="validation data file; else carve one with validation_fraction"
    )
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "trace", "datasets"] = Field(
        "auto", description="file format; auto = from the extension"
    )
    splits: dict[str, str] = Field(
        default_factory=dict,
        description="for a datasets DatasetDict: {train: name, test: name, validation: name}",
    )
    fields: FieldMap = Field(default_factory=FieldMap, description="record field names")
    prompt_template: str | None = Field(
        None, description="Python format string over record fields, e.g. 'Q: {question}'"
    )
    answer_template: str | None = Field(None, description="Python format string for the answer")
    choices: list[str] | None = Field(
        None, description="the same choices for every record (e.g. [answer1, answer2])"
    )
    metric: str = Field("exact_match", description="scorer name (forgetless scorers lists them)")
    max_new_tokens: int = Field(32, ge=1, description="generation budget per answer")
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="evaluation keeps at most this many prompt tokens, cutting the oldest (BOS kept), as "
        "training's max_length does; default: the model's context length",
    )
    limit_train: int | None = Field(
        None, ge=1, description="use at most this many training examples (seeded sample)"
    )
    limit_test: int | None = Field(
        None, ge=1, description="use at most this many test examples (seeded sample)"
    )
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="carve this share of train as validation"
    )
    train_from_test: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="for data sets without a training split: train on this share of the test file (seeded), "
        "test on the rest (the two never overlap)",
    )
    system_prompt: str | None = Field(None, description="system message for chat models")
    stop: list[str] = Field(default_factory=list, description="strings that end a generated answer")

    def _path(self, split: str, base_dir: Path) -> Path | None:
        value = getattr(self, split)
        if value is None and self.data_dir is not None:
            folder = (base_dir / self.data_dir).expanduser()
            names = {"train": ["train"], "test": ["test"], "validation": ["validation", "eval", "dev"]}[split]
            for name in names:
                for suffix in (".json", ".jsonl", ".csv", ".tsv"):
                    if (folder / f"{name}{suffix}").exists():
                        return folder / f"{name}{suffix}"
            return None
        return None if value is None else (base_dir / value).expanduser()

    def load(self, base_dir: str | Path = ".", seed: int = 0) -> Task:
        """Read and validate every record; the first problem raises one ``InputError`` naming file and line."""
        base_dir = Path(base_dir)
        splits: dict[str, list[Example]] = {}
        for split in ("train", "test", "validation"):
            path = self._path(split, base_dir)
            if path is None:
                splits[split] = []
                continue
            records = load_records(path, self.format, self.splits.get(split, split))
            splits[split] = [self.to_example(record, where) for where, record in records]
        if not splits["test"]:
            where = f"task '{self.name}'"
            raise InputError(f"{where}: no test data; set test (or data_dir with a test file)")
        if self.train_from_test is not None:
            if splits["train"]:
                raise InputError(f"task '{self.name}': set either train or train_from_test, not both")
            order = list(range(len(splits["test"])))
            random.Random(seed).shuffle(order)
            cut = int(round(len(order) * self.train_from_test))
            held = set(order[:cut])
            splits["train"] = [e for i, e in enumerate(splits["test"]) if i in held]
            splits["test"] = [e for i, e in enumerate(splits["test"]) if i not in held]
        task = Task(
            name=self.name,
            train=splits["train"],
            test=splits["test"],
            validation=splits["validation"],
            metric=self.metric,
            max_new_tokens=self.max_new_tokens,
            max_prompt_tokens=self.max_prompt_tokens,
            description=f"user task from {self.data_dir or self.test}",
            system_prompt=self.system_prompt,
            stop=tuple(self.stop),
        )
        if self.validation_fraction and not task.validation:
            task = task.split_validation(self.validation_fraction, seed)
        if self.limit_train or self.limit_test:
            task = task.limited(self.limit_train, self.limit_test, seed)
        return task

    def to_example(self, record: Record, where: str) -> Example:
        """One record -> ``Example``, with errors that name the record and the spec field to fix."""

        def field(name: str, spec_field: str) -> Any:
            if name not in record:
                present = ", ".join(sorted(record)) or "none"
                raise InputError(
                    f"{where}: missing field '{name}' (fields present: {present}); set {spec_field} in the task spec"
                )
            return record[name]

        def fill(template: str, spec_field: str) -> str:
            wanted = [name for _, name, _, _ in string.Formatter().parse(template) if name]
            missing = [name for name in wanted if name not in record]
            if missing:
                raise InputError(
                    f"{where}: {spec_field} uses {{{missing[0]}}} but the record has {', '.join(sorted(record))}"
                )
            return template.format_map(record)

        prompt = (
            fill(self.prompt_template, "prompt_template")
            if self.prompt_template
            else field(self.fields.prompt, "fields.prompt")
        )
        choices = self.choices
        if self.fields.choices:
            choices = field(self.fields.choices, "fields.choices")
            if not isinstance(choices, list) or not choices:
                raise InputError(
                    f"{where}: field '{self.fields.choices}' must be a non-empty list of choices"
                )
        gold = None
        if self.fields.gold:
            gold = field(self.fields.gold, "fields.gold")
        if self.answer_template:
            answer = fill(self.answer_template, "answer_template")
        elif self.fields.answer in record or choices is None:
            answer = field(self.fields.answer, "fields.answer")
        else:
            answer = None
        if choices is not None:
            choices = tuple(str(choice) for choice in choices)
            if gold is None:
                gold = answer
            if isinstance(gold, str) and not gold.lstrip("-").isdigit():
                if gold not in choices:
                    raise InputError(
                        f"{where}: the answer '{gold}' is not one of the choices {list(choices)}"
                    )
                gold = choices.index(gold)
            try:
                gold = int(gold)
            except (TypeError, ValueError):
                raise InputError(f"{where}: gold must be an index or a choice text, got {gold!r}") from None
            if not 0 <= gold < len(choices):
                raise InputError(f"{where}: gold index {gold} is out of range for {len(choices)} choices")
            if answer is None:
                answer = choices[gold]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: the prompt is empty or not text")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise InputError(f"{where}: the answer is empty")
        return Example(prompt=prompt, answer=str(answer), choices=choices, gold=gold)
