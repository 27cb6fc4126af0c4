"""How a strategy builds, saves and reloads the model of a stage: full weights, our adapters, or PEFT DoRA.

Every engine answers the same three questions, so a strategy only picks an engine and a
*continuation* (how stage i starts from stage i-1):

- ``merge``: earlier adapters folded into the base weights, a fresh adapter on top (the paper's
  sequential LoRA; O-LoRA keeps the earlier A factors for its penalty through ``on_previous``);
- ``continue``: the previous stage's trainable weights are trained further (sequential FFT, one
  adapter kept across stages, SLIM);
- ``from_base``: every stage starts from the base model (one-round, joint).

``build`` returns the model to train; ``load`` the model *after* a stage, rebuilt only from the
saved artifacts of stages 0..i, so a finished stage is never recomputed and a resumed run sees
the same model an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgetless.errors import InputError
from forgetless.io import atomic_dir, write_json
from forgetless.models.load import quiet_transformers

Continuation = str  # "merge" | "continue" | "from_base"


class ModelSource:
    """Loads fresh copies of the base model (and full-model stage folders) with one cached tokenizer.

    Args:
        spec: anything ``forgetless.load_model`` accepts.
        dtype: weight dtype of the loaded models.
        seed: weight seed of the tiny random test models (real models ignore it).
    """

    def __init__(self, spec: str, dtype: torch.dtype | str = torch.float32, seed: int = 0) -> None:
        from forgetless.models import load_model

        self.spec = str(spec)
        self.dtype = dtype
        self.seed = seed
        self._load_model = load_model
        self._tokenizer = None

    @property
    def tokenizer(self):  # -> PreTrainedTokenizerBase
        if self._tokenizer is None:
            _, self._tokenizer = self._load_model(self.spec, dtype=self.dtype, seed=self.seed)
        return self._tokenizer

    def fresh(self) -> nn.Module:
        """A new copy of the base model (eval mode, nothing frozen)."""
        model, tokenizer = self._load_model(self.spec, dtype=self.dtype, seed=self.seed)
        if self._tokenizer is None:
            self._tokenizer = tokenizer
        return model

    def load_folder(self, folder: Path) -> nn.Module:
        """A full model saved by ``FullModelEngine.save``."""
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        dtype = getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        model.eval()
        return model


class Engine:
    """Build / save / load for one kind of trained weights. ``artifact`` names the saved folder."""

    artifact = "adapter"
    default_lr = 2e-4

    def __init__(self, continuation: Continuation) -> None:
        if continuation not in ("merge", "continue", "from_base"):
            raise ValueError(f"unknown continuation '{continuation}'")
        self.continuation = continuation

    @property
    def uses_previous(self) -> bool:
        return self.continuation != "from_base"

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        raise NotImplementedError  # every engine below implements it

    def save(self, model: nn.Module, folder: Path, source: ModelSource) -> None:
        raise NotImplementedError

    def load(self, stage: int, source: ModelSource, artifacts: list[Path]) -> nn.Module:
        raise NotImplementedError


class FullModelEngine(Engine):
    """Full fine-tuning: every weight trains; a stage saves the whole model (safetensors HF folder)."""

    artifact = "model"
    default_lr = 2e-5

    def __init__(self, continuation: Continuation) -> None:
        if continuation == "merge":
            raise ValueError("full fine-tuning has nothing to merge; use continue or from_base")
        super().__init__(continuation)

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        use_previous = self.continuation == "continue" and previous
        model = source.load_folder(previous[-1]) if use_previous else source.fresh()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path, source: ModelSource) -> None:
        quiet_transformers()
        with atomic_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            source.tokenizer.save_pretrained(tmp)

    def load(self, stage: int, source: ModelSource, artifacts: list[Path]) -> nn.Module:
        return source.load_folder(artifacts[stage])


class AdapterEngine(Engine):
    """Our adapters (``forgetless.adapters``): LoRA, MoE-LoRA, SLIM. A stage saves only its adapter.

    Args:
        kind: adapter kind (``lora``, ``moe_lora``, ``slim``).
        fields: ``AdapterConfig`` fields from the strategy's params (r, alpha, target_modules, ...).
        continuation: see the module docstring; ``merge`` needs kind lora.
        on_previous: called with (model, adapter folder) for each earlier adapter after it is loaded
            and before it is merged (O-LoRA reads its A factors there).
    """

    def __init__(
        self,
        kind: str,
        fields: dict[str, Any],
        continuation: Continuation,
        on_previous: Callable[[nn.Module, Path], None] | None = None,
        source: str = "params",
    ) -> None:
        from forgetless.adapters import AdapterConfig

        super().__init__(continuation)
        self.kind = kind
        self.fields = dict(fields)
        self.on_previous = on_previous
        AdapterConfig.from_dict({**self.fields, "kind": kind}, source=source)  # fail before compute
        from forgetless.adapters.base import ADAPTER_LAYERS

        if continuation == "merge" and not ADAPTER_LAYERS.get(kind).single_delta:
            raise InputError(f"{source}: a {kind} adapter cannot be merged stage after stage; keep it")

    def config(self, seed: int):  # -> AdapterConfig
        from forgetless.adapters import AdapterConfig

        return AdapterConfig.from_dict({**self.fields, "kind": self.kind, "seed": seed})

    def _merged_base(self, source: ModelSource, folders: list[Path], notify: bool) -> nn.Module:
        from forgetless.adapters import load_adapter, merge_adapters

        model = source.fresh()
        for folder in folders:
            load_adapter(model, folder)
            if notify and self.on_previous is not None:
                self.on_previous(model, folder)
            merge_adapters(model)
        return model

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        from forgetless.adapters import inject_adapters, load_adapter, open_gate_task

        if self.continuation == "continue" and previous:
            model = source.fresh()
            load_adapter(model, previous[-1])  # its tensors come back trainable, the base frozen
            open_gate_task(model)  # a sample gate keeps each stage's prompt statistics apart
            return model
        folders = previous if self.continuation == "merge" else []
        model = self._merged_base(source, folders, notify=True)
        inject_adapters(model, self.config(seed), tokenizer=source.tokenizer)
        return model

    def save(self, model: nn.Module, folder: Path, source: ModelSource) -> None:
        from forgetless.adapters import save_adapter

        save_adapter(model, folder, base_model=source.spec, overwrite=True)

    def load(self, stage: int, source: ModelSource, artifacts: list[Path]) -> nn.Module:
        from forgetless.adapters import load_adapter

        if self.continuation == "merge":
            model = self._merged_base(source, artifacts[: stage + 1], notify=False)
        else:
            model = load_adapter(source.fresh(), artifacts[stage])
        model.eval()
        return model


class DoraEngine(Engine):
    """PEFT DoRA (``LoraConfig(use_dora=True)``); a stage saves a PEFT adapter folder.

    The model we train and return is PEFT's underlying Hugging Face model with DoRA layers
    injected (not the ``PeftModel`` wrapper), so the loop's LM-head-at-labels path applies.
    """

    def __init__(self, fields: dict[str, Any], continuation: Continuation) -> None:
        super().__init__(continuation)
        self.fields = dict(fields)
        self._peft_models: dict[int, Any] = {}
        self.peft_config()  # fail before compute

    def peft_config(self):  # -> peft.LoraConfig
        from peft import LoraConfig

        return LoraConfig(use_dora=True, task_type="CAUSAL_LM", bias="none", **self.fields)

    def _apply(self, model: nn.Module, folder: Path, trainable: bool):  # -> PeftModel
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)

    def _merged_base(self, source: ModelSource, folders: list[Path]) -> nn.Module:
        model = source.fresh()
        for folder in folders:
            model = self._apply(model, folder, trainable=False).merge_and_unload()
        return model

    def build(self, stage: int, source: ModelSource, previous: list[Path], seed: int) -> nn.Module:
        from peft import get_peft_model

        if self.continuation == "continue" and previous:
            peft_model = self._apply(source.fresh(), previous[-1], trainable=True)
        else:
            base = self._merged_base(source, previous if self.continuation == "merge" else [])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
                peft_model = get_peft_model(base, self.peft_config())
        model = peft_model.get_base_model()
        self._peft_models[id(model)] = peft_model
        return model

    def save(self, model: nn.Module, folder: Path, source: ModelSource) -> None:
        peft_model = self._peft_models.pop(id(model), None)
        if peft_model is None:
            raise RuntimeError("DoraEngine.save: the model was not built by this engine")
        peft_model.peft_config["default"].base_model_name_or_path = source.spec
        with atomic_dir(folder, overwrite=True) as tmp:
            # save_embedding_layers=False: PEFT would otherwise look the base model up on the hub
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
            write_json(tmp / "forgetless_source.json", {"base_model": source.spec, "peft": "dora"})

    def load(self, stage: int, source: ModelSource, artifacts: list[Path]) -> nn.Module:
        if self.continuation == "merge":
            model = self._merged_base(source, artifacts[: stage + 1])
        else:
            model = self._apply(source.fresh(), artifacts[stage], trainable=False).get_base_model()
        model.eval()
        return model
