"""Model loading: built-in aliases (embedded real models, tiny test models), GGUF, HF folders, hub ids."""

from forgetless.models.aliases import DEFAULT_MODEL, MODELS, BuiltinModel
from forgetless.models.load import load_model, model_status, resolve_model_folder, smollm2_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "BuiltinModel",
    "load_model",
    "model_status",
    "resolve_model_folder",
    "smollm2_tokenizer",
]
