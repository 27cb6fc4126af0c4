"""``run_merge``: validate every input, then stream the merge tensor by tensor into an atomic folder.

Order of work: open every input (headers only) -> check architecture, tensor names, shapes and
tokenizers -> plan the output shards -> for each tensor read the inputs, merge, write at its
offset -> write config, tokenizer and a summary -> rename the folder into place. Any mistake in
the inputs is one ``InputError`` before the output folder exists; a crash leaves no half folder.

Peak memory is about (number of inputs + a few) x the largest tensor, whatever the model size.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from torch import Tensor

from forgetless.errors import InputError
from forgetless.io import atomic_dir, write_json
from forgetless.merging.base import MergeMethod
from forgetless.merging.config import MergeConfig, check_merge_config
from forgetless.merging.lora import adapter_config, lora_keys, svd_factorize
from forgetless.merging.sources import (
    FullModel,
    LoraAdapter,
    cast,
    check_lora_shapes,
    check_same_architecture,
    check_same_tensors,
    check_same_tokenizer,
    open_source,
    tensor_seed,
)
from forgetless.merging.streaming import (
    SafetensorsReader,
    ShardedWriter,
    parse_size,
    peak_rss_bytes,
    read_header,
    reuse_freed_memory,
)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_SKIP_FILES = {
    "forgetless_source.json",
    "forgetless_merge.json",
    "forgetless_mix.json",
    "adapter_config.json",
}


class LazyInputs(Sequence[Tensor]):
    """One tensor name across the input models, read from disk on each access.

    Merge methods consume their inputs one at a time (``base.each_input``), so at most one raw
    input tensor is alive beside what the method keeps: peak memory does not grow with a second
    full copy of every input.
    """

    def __init__(self, readers: Sequence[SafetensorsReader], name: str) -> None:
        self.readers, self.name = readers, name

    def __len__(self) -> int:
        return len(self.readers)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        return self.readers[index].read(self.name)


def merge_tensor(
    method: MergeMethod,
    name: str,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    per_model: dict[str, list[float]],
    shared: dict,
    seed: int,
) -> Tensor:
    """Merge one named tensor (the seed of random methods is derived from ``seed`` and ``name``)."""
    extra = {"seed": tensor_seed(seed, name)} if method.random else {}
    return method.function(base, tensors, **per_model, **shared, **extra)


def merge_state_dicts(
    config: MergeConfig, base: dict[str, Tensor] | None, models: Sequence[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """In-memory merge of full-model state dicts with ``config``'s method and parameters.

    ``models`` are the state dicts of ``config.input_entries()`` in order. The result equals the
    streamed ``run_merge`` output tensor for tensor, bit for bit.
    """
    method = config.method
    if method.inputs != "tensors":
        raise InputError(
            f"merge method {method.name} works on LoRA factors; use run_merge with LoRA adapters"
        )
    reference = base if base is not None else models[0]
    per_model, shared = config.per_model_values(), config.shared_values()
    merged = {}
    for name, tensor in reference.items():
        if not tensor.is_floating_point():  # integer buffers are copied from the reference
            merged[name] = tensor.clone()
            continue
        inputs = [model[name] for model in models]
        out = merge_tensor(method, name, base[name] if base else None, inputs, per_model, shared, config.seed)
        merged[name] = cast(out, config.torch_dtype() or tensor.dtype)
    return merged


def _copy_side_files(source: Path, target: Path, dtype: torch.dtype | None) -> None:
    """Config, tokenizer and generation files of the reference model (not its weights)."""
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name in _SKIP_FILES:
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, target / path.name)
    if dtype is not None and (target / "config.json").exists():
        import json

        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
        name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = name
        config.setdefault("dtype", name)
        write_json(target / "config.json", config)


class _Plan:
    """Opened, validated inputs of one merge."""

    def __init__(self, config: MergeConfig, scratch: Path) -> None:
        self.config = config
        self.method = config.method
        self.per_model = config.per_model_values()
        self.shared = config.shared_values()
        self.dtype = config.torch_dtype()
        specs = [config.resolve(entry.model) for entry in config.input_entries()]
        self.sources = [open_source(spec, scratch) for spec in specs]
        self.base: FullModel | None = None
        if config.base_model is not None:
            base = open_source(config.resolve(config.base_model), scratch)
            if not isinstance(base, FullModel):
                raise InputError(
                    f"base_model {config.base_model} is a LoRA adapter; give the full model it adapts"
                )
            self.base = base
        kinds = {type(source) for source in self.sources}
        if len(kinds) > 1:
            raise InputError("models mixes full models and LoRA adapters; merge one kind at a time")
        self.lora = kinds == {LoraAdapter}
        if self.lora:
            self._check_lora(scratch)
        else:
            self._check_full()

    def _check_full(self) -> None:
        sources: list[FullModel] = self.sources  # type: ignore[assignment]
        if self.method.inputs == "lora_factors":
            raise InputError(
                f"merge_method {self.method.name} averages LoRA factors; its models must be LoRA adapters"
            )
        if self.config.output == "lora":
            raise InputError("output: lora needs LoRA adapter inputs; for full models use output: model")
        self.reference = self.base or sources[0]
        others = [source for source in sources if source is not self.reference]
        check_same_architecture(self.reference, others)
        check_same_tensors(self.reference, others)
        check_same_tokenizer(
            (self.reference.spec, self.reference.folder), [(source.spec, source.folder) for source in others]
        )

    def _check_lora(self, scratch: Path) -> None:
        adapters: list[LoraAdapter] = self.sources  # type: ignore[assignment]
        if self.base is None:
            names = {adapter.config.get("base_model_name_or_path") for adapter in adapters}
            if self.config.output == "model":
                if len(names) != 1 or None in names:
                    raise InputError(
                        "base_model: the adapters do not name one common base model; set base_model to write a full model"
                    )
                base = open_source(self.config.resolve(str(next(iter(names)))), scratch)
                if not isinstance(base, FullModel):
                    raise InputError(
                        f"the adapters' base {next(iter(names))} is not a full model; set base_model"
                    )
                self.base = base
        check_lora_shapes(adapters, self.base)
        if self.base is not None:
            check_same_tokenizer((self.base.spec, self.base.folder), [(a.spec, a.folder) for a in adapters])
        self.modules = sorted({module for adapter in adapters for module in adapter.modules})
        if self.method.inputs == "lora_factors":
            for module in self.modules:
                ranks = {adapter.modules[module].rank for adapter in adapters if module in adapter.modules}
                if len(ranks) > 1:
                    raise InputError(
                        f"lora_average averages factors and needs one rank per module; {module} has ranks "
                        f"{sorted(ranks)}; use merge_method average (dense deltas) instead"
                    )
        self.fan_in_fan_out = any(module.fan_in_fan_out for a in adapters for module in a.modules.values())

    # ---------------------------------------------------------------------------- LoRA maths

    def _module_inputs(self, module: str) -> tuple[tuple[int, int], list[Tensor | None]]:
        adapters: list[LoraAdapter] = self.sources  # type: ignore[assignment]
        shape = next(a.delta_shape(module) for a in adapters if module in a.modules)
        return shape, [a.modules[module].delta(a.reader) if module in a.modules else None for a in adapters]

    def merged_delta(self, module: str) -> Tensor:
        """The merged dense delta of one module (``d_out x d_in``, base weight layout), float32."""
        if self.method.inputs == "lora_factors":
            a, b = self.averaged_factors(module)
            delta = b @ a
            return delta.T.contiguous() if self.fan_in_fan_out else delta
        shape, deltas = self._module_inputs(module)
        filled = [delta if delta is not None else torch.zeros(shape) for delta in deltas]
        base = torch.zeros(shape) if self.method.needs_base else None
        return merge_tensor(self.method, module, base, filled, self.per_model, self.shared, self.config.seed)

    def averaged_factors(self, module: str) -> tuple[Tensor, Tensor]:
        adapters: list[LoraAdapter] = self.sources  # type: ignore[assignment]
        present = next(a for a in adapters if module in a.modules)
        a_shape = present.reader.shape(present.modules[module].a_key)
        b_shape = present.reader.shape(present.modules[module].b_key)
        factors = []
        for adapter in adapters:
            if module in adapter.modules:
                info = adapter.modules[module]
                factors.append((*info.factors(adapter.reader), info.scaling))
            else:  # an adapter that did not touch this module contributes zero factors
                factors.append((torch.zeros(a_shape), torch.zeros(b_shape), 1.0))
        return self.method.function(factors, **self.per_model)

    # ---------------------------------------------------------------------------- writing

    def write(self, folder: Path) -> dict:
        max_bytes = parse_size(self.config.max_shard_size)
        if self.lora and self.config.output == "lora":
            return self._write_lora(folder)
        if self.lora:
            return self._write_model_from_lora(folder, max_bytes)
        return self._write_full(folder, max_bytes)

    def _write_full(self, folder: Path, max_bytes: int) -> dict:
        reader = self.reference.reader
        names = reader.keys()
        plan = [(name, self._out_dtype(reader.dtype(name)), reader.shape(name)) for name in names]
        writer = ShardedWriter(folder, plan, max_bytes)
        merged = 0
        readers = [source.reader for source in self.sources]
        for name in names:
            if reader.dtype(name).is_floating_point:
                base = self.base.reader.read(name) if self.base is not None else None
                inputs = LazyInputs(readers, name)
                out = merge_tensor(
                    self.method, name, base, inputs, self.per_model, self.shared, self.config.seed
                )
                merged += 1
                del base
            else:  # integer buffers (position ids ...) are copied from the reference
                out = reader.read(name)
            writer.write(name, out)
            del out
        files = writer.close()
        _copy_side_files(self.reference.folder, folder, self.dtype)
        return {"tensors_written": len(names), "merged_tensors": merged, "shards": len(files)}

    def _write_model_from_lora(self, folder: Path, max_bytes: int) -> dict:
        assert self.base is not None
        reader = self.base.reader
        names = reader.keys()
        plan = [(name, self._out_dtype(reader.dtype(name)), reader.shape(name)) for name in names]
        writer = ShardedWriter(folder, plan, max_bytes)
        modules = set(self.modules)
        merged = 0
        for name in names:
            tensor = reader.read(name)
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in modules:
                tensor = tensor.float().add_(self.merged_delta(module))
                merged += 1
            writer.write(name, tensor)
        files = writer.close()
        _copy_side_files(self.base.folder, folder, self.dtype)
        return {"tensors_written": len(names), "merged_tensors": merged, "shards": len(files)}

    def _write_lora(self, folder: Path) -> dict:
        adapters: list[LoraAdapter] = self.sources  # type: ignore[assignment]
        averaged = self.method.inputs == "lora_factors"
        dtype = self.dtype or torch.float32
        plan, ranks = [], {}
        for module in self.modules:
            present = next(a for a in adapters if module in a.modules)
            rank = present.modules[module].rank if averaged else self.config.out_rank
            d_out, d_in = present.delta_shape(module)
            if self.fan_in_fan_out:
                d_out, d_in = d_in, d_out
            key_a, key_b = lora_keys(module)
            plan += [(key_a, dtype, (rank, d_in)), (key_b, dtype, (d_out, rank))]
            ranks[module] = rank
        if len(set(ranks.values())) > 1:
            raise InputError(
                "lora_average: the modules have different ranks; use merge_method average with output lora"
            )
        writer = ShardedWriter(folder, plan, max_shard_bytes=1 << 62, prefix="adapter_model")
        residual, norm, errors = 0.0, 0.0, []
        for module in self.modules:
            key_a, key_b = lora_keys(module)
            if averaged:
                a, b = self.averaged_factors(module)
            else:
                delta = self.merged_delta(module)
                factors = svd_factorize(delta.T if self.fan_in_fan_out else delta, self.config.out_rank)
                a, b = factors.a, factors.b
                residual += factors.residual_sq
                norm += factors.norm_sq
                errors.append(factors.relative_error)
            writer.write(key_a, a)
            writer.write(key_b, b)
        writer.close()
        rank = next(iter(ranks.values()))
        base_name = self.config.base_model or adapters[0].config.get("base_model_name_or_path")
        config = adapter_config(self.modules, rank, base_name, adapters[0].config, self.fan_in_fan_out)
        write_json(folder / "adapter_config.json", config)
        summary: dict = {
            "tensors_written": len(plan),
            "merged_tensors": len(self.modules),
            "shards": 1,
            "rank": rank,
        }
        if not averaged:
            summary["svd_relative_error"] = (residual / norm) ** 0.5 if norm > 0 else 0.0
            summary["svd_relative_error_max"] = max(errors)
            summary["svd_relative_error_mean"] = sum(errors) / len(errors)
        return summary

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and dtype.is_floating_point else dtype


def run_merge(config: MergeConfig, out_dir: str | Path, overwrite: bool = False) -> dict:
    """Merge ``config``'s models or adapters into ``out_dir`` (an HF model or PEFT LoRA folder).

    Everything about the inputs is checked before the folder is created; the folder appears whole
    (atomic rename) or not at all. Returns a summary (also written to ``forgetless_merge.json``):
    method, counts, shards, bytes, seconds, peak RSS and, for ``output: lora`` from dense deltas,
    ``svd_relative_error`` = ``||D - B A||_F / ||D||_F`` over all modules (and its max / mean).
    """
    check_merge_config(config)  # configs built in code skip load_merge_config's checks
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"{out_dir} already exists; choose another output folder or pass --overwrite")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="forgetless-merge-") as scratch:
        plan = _Plan(config, Path(scratch))
        with atomic_dir(out_dir, overwrite=overwrite) as tmp, reuse_freed_memory():
            summary = {
                "merge_method": config.merge_method,
                "inputs": "lora" if plan.lora else "models",
                "output": config.output,
                "num_models": len(plan.sources),
                **plan.write(tmp),
            }
            summary["output_bytes"] = sum(
                info.end - info.start
                for path in tmp.glob("*.safetensors")
                for info in read_header(path).values()
            )
            summary["seconds"] = round(time.perf_counter() - started, 3)
            summary["peak_rss_bytes"] = peak_rss_bytes()
            (tmp / "merge_config.yaml").write_text(
                yaml.safe_dump(config.model_dump(exclude={"base_dir"}), sort_keys=False), encoding="utf-8"
            )
            write_json(tmp / "forgetless_merge.json", summary)
    summary["out_dir"] = str(out_dir)
    return summary


__all__ = ["merge_state_dicts", "merge_tensor", "run_merge"]
