"""``run_mix``: validate the experts, compute the router, write the MoE atomically.

Full-model experts -> a Mixtral folder, streamed tensor by tensor (the router rows are computed
first; ``router: trained`` loads the written folder, trains its gates and rewrites them in place
before the folder is renamed into place). LoRA adapters -> the adapters package's mixture layer
on the base model, saved with ``save_adapter``. Every input problem is one ``InputError`` before
the output folder exists.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from forgetless.data import Example, PromptFormatter, Task
from forgetless.data.spec import TaskSpec
from forgetless.errors import InputError
from forgetless.io import atomic_dir, write_json
from forgetless.merging.run import _copy_side_files
from forgetless.merging.sources import (
    FullModel,
    LoraAdapter,
    check_lora_shapes,
    check_same_architecture,
    check_same_tensors,
    check_same_tokenizer,
    open_source,
)
from forgetless.merging.streaming import ShardedWriter, parse_size, peak_rss_bytes, reuse_freed_memory
from forgetless.mixing import fft_moe, lora_moe
from forgetless.mixing.config import MixConfig, check_mix_config
from forgetless.mixing.hidden_states import mean_module_inputs
from forgetless.mixing.routers import ROUTERS, RouterContext
from forgetless.mixing.train import rows_of, train_router


def _load_task(task: str | TaskSpec | None, config: MixConfig) -> Task | None:
    from forgetless.tasks import get_task

    if task is None:
        return None
    if isinstance(task, str):
        return get_task(task, config.seed)
    return task.load(config.base_dir, config.seed)


def _sample(examples: list[Example], count: int, seed: int) -> list[Example]:
    if len(examples) <= count:
        return list(examples)
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), count))]


class _Mix:
    """Opened and checked inputs of one mix, and the pieces every router may need."""

    def __init__(self, config: MixConfig, scratch: Path, tasks: list[Task | None]) -> None:
        self.config, self.tasks = config, tasks
        self.base_spec = config.resolve(config.base_model)
        base = open_source(self.base_spec, scratch)
        if not isinstance(base, FullModel):
            raise InputError(
                f"base_model {config.base_model} is a LoRA adapter; give the full model it adapts"
            )
        self.base = base
        self.experts = [open_source(config.resolve(expert.model), scratch) for expert in config.experts]
        kinds = {type(expert) for expert in self.experts}
        if len(kinds) > 1:
            raise InputError("experts mixes full models and LoRA adapters; mix one kind at a time")
        self.lora = kinds == {LoraAdapter}
        pairs = [(expert.spec, expert.folder) for expert in self.experts]
        check_same_tokenizer((self.base.spec, self.base.folder), pairs)
        if self.lora:
            if config.dtype is not None:
                raise InputError(
                    "dtype applies to FFT-MoE (Mixtral) outputs; LoRA-MoE adapters are saved in float32"
                )
            check_lora_shapes(self.experts, self.base)  # type: ignore[arg-type]
            self.factors = lora_moe.expert_factors(self.experts)  # type: ignore[arg-type]
            self.points = lora_moe.router_points(self.factors)
        else:
            if config.num_identity_experts:
                raise InputError("num_identity_experts: identity experts exist only in LoRA-MoE; set it to 0")
            fft_moe.check_llama_family(self.base)
            check_same_architecture(self.base, self.experts)  # type: ignore[arg-type]
            check_same_tensors(self.base, self.experts)  # type: ignore[arg-type]
            self.points = fft_moe.router_points(self.base)
        self._model: Any = None

    def base_model(self) -> tuple[Any, Any]:
        """The base model (float32) and tokenizer, loaded once when a router needs them."""
        if self._model is None:
            from forgetless.models import load_model

            self._model = load_model(str(self.base.folder), dtype=torch.float32)
        return self._model

    def prompts(self) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
        """Per expert: token ids of its inline prompts plus a sample of its task's prompts; and negatives."""
        _, tokenizer = self.base_model()
        formatter = PromptFormatter(tokenizer)
        positives, negatives = [], []
        for index, (expert, task) in enumerate(zip(self.config.experts, self.tasks)):
            ids = [tokenizer(text, add_special_tokens=True).input_ids for text in expert.prompts]
            if task is not None:
                sample = _sample(
                    task.train or task.test, self.config.prompts_per_expert, self.config.seed + index
                )
                ids += [formatter.prompt_ids(example.prompt) for example in sample]
            positives.append(ids)
            negatives.append(
                [tokenizer(text, add_special_tokens=True).input_ids for text in expert.negative_prompts]
            )
        return positives, negatives

    def training_examples(self) -> list[Example]:
        settings = self.config.router_training
        examples: list[Example] = []
        for index, task in enumerate(self.tasks):
            if task is not None:
                examples += _sample(
                    task.train or task.test, settings.examples_per_expert, self.config.seed + index
                )
        return examples

    def context(self, trainer: Any) -> RouterContext:
        needs_model = self.config.router in ("hidden", "trained")
        positives, negatives = self.prompts() if needs_model else ([], [])

        def mean_inputs(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
            model, tokenizer = self.base_model()
            return mean_module_inputs(model, list(self.points), prompts, tokenizer.pad_token_id)

        return RouterContext(
            points=self.points,
            num_experts=len(self.experts),
            num_identity=self.config.num_identity_experts,
            seed=self.config.seed,
            center=self.config.router_center,
            prompts=positives,
            negative_prompts=negatives,
            mean_inputs=mean_inputs,
            train=trainer if self.training_examples() else None,
        )

    def _train(self, model: Any, tokenizer: Any, weights: dict[str, torch.nn.Parameter]) -> list[float]:
        settings = self.config.router_training
        return train_router(
            model, tokenizer, weights, self.training_examples(), settings.steps, settings.lr,
            settings.batch_size, settings.max_length, self.config.seed,
        )  # fmt: skip

    # ------------------------------------------------------------------------------ FFT-MoE

    def write_mixtral(self, folder: Path) -> dict:
        config, experts = self.config, self.experts
        dtype = None if config.dtype is None else getattr(torch, config.dtype)
        plan = fft_moe.plan(self.base, len(experts), dtype)
        summary: dict[str, Any] = {}
        state: dict[str, Any] = {}

        def trainer(start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            # the folder is complete with the starting rows; load it, train its gates, rewrite them
            state["train_from"] = start
            return start

        rows = ROUTERS.get(config.router)(self.context(trainer))
        writer = ShardedWriter(folder, plan, parse_size(config.max_shard_size))
        summary["tensors_written"] = fft_moe.write_tensors(writer, self.base, experts, rows)  # type: ignore[arg-type]
        files = writer.close()
        _copy_side_files(self.base.folder, folder, dtype)
        fft_moe.mixtral_config(self.base, len(experts), config.top_k, dtype).save_pretrained(folder)
        if "train_from" in state:
            model, tokenizer = fft_moe.load_mixtral(folder)
            weights = fft_moe.gate_parameters(model)
            losses = self._train(model, tokenizer, weights)
            for point, trained in rows_of(weights).items():
                writer.write(fft_moe.gate_name(point), trained, replace=True)
            writer.close()
            summary.update(router_loss_first=losses[0], router_loss_last=losses[-1], router_steps=len(losses))
        summary["shards"] = len(files)
        return summary

    # ------------------------------------------------------------------------------ LoRA-MoE

    def write_lora_moe(self, folder: Path) -> dict:
        from forgetless.adapters import build_lora_moe, save_adapter

        config = self.config
        model, tokenizer = self.base_model()
        summary: dict[str, Any] = {}

        def build(rows: dict[str, torch.Tensor]) -> list[str]:
            return build_lora_moe(
                model, self.factors, config.top_k, config.num_identity_experts, router_init=rows
            )

        def trainer(start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            from forgetless.adapters import adapter_layers

            names = build(start)
            layers = adapter_layers(model)
            weights = {name: layers[name].router for name in names}
            losses = self._train(model, tokenizer, weights)
            summary.update(router_loss_first=losses[0], router_loss_last=losses[-1], router_steps=len(losses))
            return rows_of(weights)

        rows = ROUTERS.get(config.router)(self.context(trainer))
        if "router_steps" not in summary:  # trained routers built the layer already
            build(rows)
        model.eval()
        save_adapter(model, folder, base_model=config.base_model, overwrite=True)
        summary["modules"] = len(self.points)
        # build_lora_moe wraps the modules every adapter adapted; say what the others lose
        dropped = sorted({name for factors in self.factors for name in factors} - set(self.points))
        summary["modules_not_in_every_expert"] = dropped
        return summary


def _run(config: MixConfig, out_dir: str | Path, overwrite: bool, tasks: list[Task | None]) -> dict:
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another output folder or pass --overwrite")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="forgetless-mix-") as scratch:
        mix = _Mix(config, Path(scratch), tasks)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp, reuse_freed_memory():
            summary: dict[str, Any] = {
                "kind": "lora_moe" if mix.lora else "fft_moe",
                "router": config.router,
                "top_k": config.top_k,
                "num_experts": len(mix.experts),
                "num_identity_experts": config.num_identity_experts,
                **(mix.write_lora_moe(tmp) if mix.lora else mix.write_mixtral(tmp)),
            }
            summary["seconds"] = round(time.perf_counter() - started, 3)
            summary["peak_rss_bytes"] = peak_rss_bytes()
            dump = config.model_dump(mode="json", exclude={"base_dir"})
            (tmp / "mix_config.yaml").write_text(yaml.safe_dump(dump, sort_keys=False), encoding="utf-8")
            write_json(tmp / "forgetless_mix.json", summary)
    summary["out_dir"] = str(out_dir)
    return summary


def run_mix(config: MixConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Build the MoE of ``config`` in ``out_dir``: a Mixtral folder (full-model experts) or a
    forgetless adapter folder (LoRA experts, load with ``forgetless.adapters.load_adapter``).

    Returns a summary (also ``forgetless_mix.json`` in the folder): kind, router, top_k, expert
    counts, seconds, peak RSS, and the first / last router loss for ``router: trained``.
    """
    check_mix_config(config)
    return _run(config, out_dir, overwrite, [_load_task(expert.task, config) for expert in config.experts])


def mix_of_outputs(
    base_model: str, inputs: list[str], router: str, top_k: int, seed: int, **parameters: Any
) -> dict[str, Any]:
    """The mix config (unvalidated) of ``run_mix_outputs``: ``top_k`` capped at the number of
    experts, every expert for the uniform router. The experiment config checks its mixes with
    the same function, on placeholder inputs, before any training."""
    total = len(inputs) + int(parameters.get("num_identity_experts", 0) or 0)
    return {
        "base_model": base_model,
        "experts": [{"model": str(path)} for path in inputs],
        "router": router,
        "top_k": total if router == "uniform" else min(top_k, total),
        "seed": seed,
        **parameters,
    }


def run_mix_outputs(
    base_model: str,
    inputs: list[str],
    out_dir: str | Path,
    router: str = "hidden",
    top_k: int = 2,
    tasks: list[Task] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    **parameters: Any,
) -> dict:
    """Mix trained outputs (one per task: model folders or adapter folders) from Python.

    ``tasks[i]`` (a ``Task``) feeds expert ``i``'s prompts and router-training examples.
    ``top_k`` is capped at the number of experts (stage 1 of a sequence has one), and the uniform
    router always uses every expert. ``parameters`` are further ``MixConfig`` fields
    (``num_identity_experts``, ``router_training``, ``prompts_per_expert`` ...).
    """
    from forgetless.mixing.config import validate_mix_config

    tasks = list(tasks or [])
    if tasks and len(tasks) != len(inputs):
        raise InputError(
            f"tasks has {len(tasks)} entries for {len(inputs)} experts; give one task per expert"
        )
    given = [True] * len(inputs) if tasks else None
    data = mix_of_outputs(base_model, inputs, router, top_k, seed, **parameters)
    config = validate_mix_config(data, "mix parameters", tasks_given=given)
    return _run(config, out_dir, overwrite, list(tasks) if tasks else [None] * len(inputs))


__all__ = ["mix_of_outputs", "run_mix", "run_mix_outputs"]
