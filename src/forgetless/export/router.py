"""Pick the LoRA adapter (or the base model) for a prompt, as forgetless's SLIM gate does.

Written by ``forgetless export --for vllm`` into its output folder, next to:

    base/            the base model, a standard Hugging Face folder
    adapters/NAME/   one PEFT LoRA adapter per name (adapter_config.json + adapter_model.safetensors)
    router.json      what this router reads: adapter names and the gate's statistics
    export.json      what was exported, which adapters are exact or approximate, the measured gap

This file needs only torch and transformers (no forgetless). Serve the folder with vLLM (SGLang and
TGI load the same base folder and PEFT adapters); ``export.json``'s ``serve_command`` is the exact
command of this export, for example:

    cd OUT
    vllm serve base --served-model-name base --enable-lora \\
        --lora-modules stage0=adapters/stage0 stage1=adapters/stage1 --max-lora-rank 32

and let the router pick the model of every request from its prompt:

    import openai
    from router import Router          # run from OUT, or put OUT on sys.path

    router = Router()                   # loads base/ (the gate runs the base model over the prompt)
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")
    messages = [{"role": "user", "content": "What does kelvar 12 mean?"}]
    model = router.route(messages) or "base"   # an adapter name, or None: the base model
    reply = client.chat.completions.create(model=model, messages=messages)

``route`` takes chat messages (tokenised with the chat template and the generation prompt, as the
engines' chat API does), raw text (tokenised as the completions API does) or token ids.

How it decides (forgetless's sample-level gate, reproduced number for number): one base-model pass
over the prompt; at every adapted module the input of each *content* token (the prompt without the
chat template's fixed prefix and suffix, ``template_prefix_ids`` / ``template_suffix_ids``) gets its
calibrated distance to the nearest centre of each training stage's sliding clusters,

    r(x) = max_c |x_c - mu_kc| * sqrt(inv_kc)       (k = argmin_k sum_c (x_c - mu_kc)^2 inv_kc)
    d(x) = r(x) * calibration_scale + calibration_offset

(``reduction`` mean or quantile in place of max where the adapter used them); the mean of ``d`` over
the content tokens is z-scored against the stage's moments of training prompts, averaged over the
modules, and the prompt's score is that of its nearest stage (the smallest). A prompt whose score
reaches ``yield_threshold`` yields: the base model answers; otherwise the adapter of the nearest
stage does. Adapters without the gate are always used; an export without adapters always answers
with the base model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FORMAT = "forgetless-router"
VERSION = 1
_MOMENT_EPS = 1e-6  # the z-score's floor on the variance of the training prompts' pooled distance


class _Stage:
    """One training stage's gate statistics in one module (centres (N_c, d), floored inverse
    variances (N_c, d), the distance calibration and the moments of training prompts)."""

    def __init__(self, entry: dict) -> None:
        self.centres = torch.tensor(entry["centres"], dtype=torch.float32)
        self.inverse = torch.tensor(entry["inverse_variances"], dtype=torch.float32)
        self.inverse_sigma = self.inverse.sqrt()
        self.cross = -2 * self.centres * self.inverse
        self.offset = (self.centres * self.centres * self.inverse).sum(dim=1)
        self.scale = float(entry["calibration_scale"])
        self.shift = float(entry["calibration_offset"])
        self.mean = torch.tensor(entry["moments"]["mean"], dtype=torch.float32)
        self.square = torch.tensor(entry["moments"]["square"], dtype=torch.float32)
        self.empty = int(entry["moments"]["batches"]) == 0

    def pooled_distance(self, tokens: torch.Tensor, reduction: str, quantile: float) -> torch.Tensor:
        """The mean calibrated distance of ``tokens`` (C, d) to the nearest centres, a scalar."""
        scores = torch.addmm(self.offset, tokens * tokens, self.inverse.T) + tokens @ self.cross.T
        nearest = scores.argmin(dim=1)
        z = ((tokens - self.centres[nearest]) * self.inverse_sigma[nearest]).abs()
        if reduction == "max":
            raw = z.amax(dim=1)
        elif reduction == "mean":
            raw = z.mean(dim=1)
        else:
            k = min(max(math.ceil(quantile * z.shape[1]), 1), z.shape[1])
            raw = z.kthvalue(k, dim=1).values
        calibrated = raw * self.scale + self.shift
        return calibrated.sum() / max(tokens.shape[0], 1)

    def z_score(self, pooled: torch.Tensor) -> torch.Tensor:
        sigma = (self.square - self.mean**2).clamp_min(_MOMENT_EPS).sqrt()
        return (pooled - self.mean) / sigma


def _common_prefix(ids: list[int], template: list[int]) -> int:
    length = 0
    while length < min(len(ids), len(template)) and ids[length] == template[length]:
        length += 1
    return length


def content_span(ids: list[int], prefix: list[int], suffix: list[int]) -> tuple[int, int]:
    """[start, end) of the prompt's content: without the leading tokens that match the template's
    prefix and the closing ones that match its suffix; the whole prompt if nothing would be left."""
    head = _common_prefix(ids, prefix)
    tail = _common_prefix(list(reversed(ids[head:])), list(reversed(suffix)))
    return (head, len(ids) - tail) if head + tail < len(ids) else (0, len(ids))


class Router:
    """The router of one export folder.

    Args:
        folder: the export folder (default: the folder this file is in).
        model: the base model to run the gate on (default: loaded from ``folder/base``); any
            module with the base model's module names works (e.g. PEFT's base model with its
            adapters disabled).
        tokenizer: default loaded from ``folder/base``.
    """

    def __init__(self, folder: str | Path | None = None, model=None, tokenizer=None) -> None:  # noqa: ANN001
        self.folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
        spec = json.loads((self.folder / "router.json").read_text(encoding="utf-8"))
        if spec.get("format") != FORMAT or spec.get("version") != VERSION:
            raise ValueError(f"{self.folder / 'router.json'} is not a {FORMAT} v{VERSION} file; export again")
        self.spec = spec
        self.adapters: list[str] = spec["adapters"]
        self.gated: bool = spec["gated"]
        self.serve_command: str = spec.get("serve_command", "")
        base = self.folder / spec["base"]
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(base)
        if self.gated and model is None:
            model = AutoModelForCausalLM.from_pretrained(base).eval()
        self.model = model
        gate = spec.get("gate") or {}
        self.threshold = float(gate.get("yield_threshold", math.inf))
        self.stage_adapters: list[str] = gate.get("stage_adapters", [])
        self.prefix: list[int] = gate.get("template_prefix_ids", [])
        self.suffix: list[int] = gate.get("template_suffix_ids", [])
        self.reduction: str = gate.get("reduction", "max")
        self.quantile = float(gate.get("quantile", 0.9))
        self.modules = [
            (entry["module"], [_Stage(s) for s in entry["stages"]]) for entry in gate.get("modules", [])
        ]

    def prompt_ids(self, prompt: str | list) -> list[int]:  # noqa: ANN001
        """Chat messages (list of dicts), raw text or token ids -> token ids as an engine sees them."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        if prompt and isinstance(prompt[0], dict):
            ids = self.tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return [int(token) for token in prompt]

    @torch.no_grad()
    def gate(self, prompt: str | list) -> tuple[float, int] | None:
        """(score, nearest stage) of the prompt; None for an export without the gate."""
        if not self.gated:
            return None
        ids = self.prompt_ids(prompt)
        start, end = content_span(ids, self.prefix, self.suffix)
        inputs: dict[str, torch.Tensor] = {}
        hooks = [
            self.model.get_submodule(name).register_forward_pre_hook(
                lambda module, args, name=name: inputs.setdefault(name, args[0])
            )
            for name, _ in self.modules
        ]
        try:  # the transformer body only: the gate reads module inputs, not logits
            body = getattr(self.model, "base_model", self.model)
            device = next(self.model.parameters()).device
            body(input_ids=torch.tensor([ids[: max(end, 1)]], device=device), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        per_module = []
        for name, stages in self.modules:
            tokens = inputs[name][0, start:end].to(torch.float32).cpu()
            scores = [
                stage.z_score(stage.pooled_distance(tokens, self.reduction, self.quantile))
                for stage in stages
            ]
            if len(stages) > 1:  # a stage without statistics is no evidence
                scores = [torch.tensor(math.inf) if s.empty else z for s, z in zip(stages, scores)]
            per_module.append(torch.stack(scores))
        per_stage = torch.stack(per_module).mean(dim=0)
        score, stage = per_stage.min(dim=0)
        if math.isinf(float(score)):
            return 0.0, len(per_stage) - 1
        return float(score), int(stage)

    def route(self, prompt: str | list) -> str | None:
        """The adapter to serve ``prompt`` with, or None for the base model."""
        if not self.adapters:
            return None
        if not self.gated:
            return self.adapters[0]
        score, stage = self.gate(prompt)
        return None if score >= self.threshold else self.stage_adapters[stage]


_DEFAULT: Router | None = None


def route(prompt: str | list) -> str | None:
    """``Router().route(prompt)`` with one router per process for the folder of this file."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Router()
    return _DEFAULT.route(prompt)
