"""lm-evaluation-harness bridge: the ``forgetless`` model type, and lm-eval results -> our matrix.

Importing this module registers the model type ``forgetless`` with lm-eval. It loads any model
spec ``forgetless.load_model`` accepts (built-in alias, GGUF file, HF folder, hub id) and, with
``adapter=DIR``, a forgetless or PEFT adapter folder (SLIM included) on top; everything else is
lm-eval's Hugging Face backend (``HFLM``), so every lm-eval task type works.

lm-eval has no plug-in discovery for model types, so run its command line through forgetless:

    forgetless lm-eval --model forgetless \\
        --model_args pretrained=smollm2-135m-instruct,adapter=runs/x/adapter --tasks arc_easy

(``python -m forgetless.evaluation.lm_eval_bridge ...`` is the same)

or from Python: ``import forgetless.evaluation.lm_eval_bridge`` then
``lm_eval.simple_evaluate(model="forgetless", model_args=...)``. Needs ``pip install lm-eval``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from forgetless.errors import MissingDependencyError

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:  # pragma: no cover - exercised only without lm-eval installed
    raise MissingDependencyError(
        "the lm-eval bridge needs lm-evaluation-harness: pip install 'forgetless[lmeval]' (or lm-eval)"
    ) from error

from forgetless.models import DEFAULT_MODEL, load_model

logger = logging.getLogger(__name__)


@register_model("forgetless")
class ForgetlessLM(HFLM):
    """lm-eval model type ``forgetless``: ``pretrained=SPEC`` (+ ``adapter=DIR``) loaded by forgetless.

    Args:
        pretrained: anything ``forgetless.load_model`` accepts (default: the embedded model).
        adapter: a forgetless adapter folder or PEFT LoRA folder to load on top (optional).
        dtype: weight dtype (``float32`` default; ``bfloat16`` / ``float16``).
        seed: torch seed set after loading (SLIM dynamic-merge masks are seeded by it).
        device: ``cpu``, ``cuda``, ``cuda:1`` ...; cuda falls back to cpu when CUDA is unavailable.
        trust_remote_code: passed to model loading (off unless asked).
        **kwargs: every other ``HFLM`` argument (``batch_size``, ``max_length``, ``add_bos_token`` ...).
    """

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        adapter: str | None = None,
        dtype: str = "float32",
        seed: int = 0,
        device: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        model, tokenizer = load_model(
            str(pretrained), dtype=dtype, trust_remote_code=trust_remote_code, seed=int(seed)
        )
        if adapter:
            from forgetless.adapters import load_adapter  # lazy: adapters are optional here

            load_adapter(model, adapter)
        target = device or "cuda"
        if target.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda by default; a CPU-only machine still evaluates
            logger.warning("CUDA is not available: evaluating the forgetless model on cpu")
            target = "cpu"
        model.to(target).eval()
        torch.manual_seed(int(seed))
        self.forgetless_spec = {"pretrained": str(pretrained), "adapter": adapter, "seed": int(seed)}
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)

    def get_model_info(self) -> dict:
        return {"forgetless": self.forgetless_spec, "model_num_parameters": self.model.num_parameters()}


PREFERRED_MEASURES = ("acc", "exact_match", "acc_norm", "f1", "rougeL", "bleu")


def scores_from_lm_eval(
    results: dict[str, Any], measure: str | None = None, rename: dict[str, str] | None = None
) -> dict[str, float]:
    """lm-eval's output (``simple_evaluate`` result or its ``results.json``) -> ``{task: score}``.

    Args:
        results: the dict lm-eval returns / writes (with a ``results`` section).
        measure: the measure to read (``acc``, ``acc_norm``, ``exact_match`` ...); by default
            the first of ``PREFERRED_MEASURES`` that the task reports.
        rename: lm-eval task name -> our column name (e.g. ``{"arc_easy": "arc_e"}``).

    Returns:
        One score per task in [0, 1], ready to be a cell of the accuracy matrix.
    """
    from forgetless.errors import InputError

    section = results.get("results")
    if not isinstance(section, dict):
        raise InputError("lm-eval results need a 'results' section; pass what simple_evaluate returned")
    rename = rename or {}
    scores: dict[str, float] = {}
    for task, values in section.items():
        by_measure: dict[str, float] = {}
        for key, value in values.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and name not in by_measure:
                by_measure[name] = float(value)
        wanted = [measure] if measure else [m for m in PREFERRED_MEASURES if m in by_measure]
        if not wanted or wanted[0] not in by_measure:
            raise InputError(
                f"lm-eval task '{task}' reports {', '.join(sorted(by_measure)) or 'no measure'}; "
                f"choose one of them as measure"
            )
        scores[rename.get(task, task)] = by_measure[wanted[0]]
    return scores


def main() -> None:
    """``python -m forgetless.evaluation.lm_eval_bridge ...``: lm-eval's CLI with ``forgetless`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
