"""Task data: examples and tasks, file loaders, user task specs, prompt formatting, batching."""

from forgetless.data.batching import collate, length_bucketed_batches
from forgetless.data.formatting import IGNORE_INDEX, Encoded, PromptFormatter
from forgetless.data.loaders import LOADERS, load_records
from forgetless.data.spec import FieldMap, TaskSpec
from forgetless.data.task import Example, Task

__all__ = [
    "IGNORE_INDEX",
    "LOADERS",
    "Encoded",
    "Example",
    "FieldMap",
    "PromptFormatter",
    "Task",
    "TaskSpec",
    "collate",
    "length_bucketed_batches",
    "load_records",
]
