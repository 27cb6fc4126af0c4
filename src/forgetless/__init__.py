"""forgetless: add new knowledge to a language model task after task without losing what it knew."""

from forgetless.errors import InputError, MissingDependencyError
from forgetless.models import DEFAULT_MODEL, load_model
from forgetless.registry import Registry, UnknownNameError

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODEL",
    "InputError",
    "MissingDependencyError",
    "Registry",
    "UnknownNameError",
    "load_model",
]
