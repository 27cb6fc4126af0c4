"""Adapter speed vs PEFT, and how well SLIM's identity routing separates in-task from general inputs.

    python benchmarks/adapters.py [--out FILE] [--data-dir DIR] [--repeats 5] [--threads 1]

On SmolLM2-135M-Instruct, batch 8 x 64 tokens, all in one process and interleaved round by round
(the machine is shared, so medians over rounds, and ratios rather than absolute times):

1. forward+backward time of PEFT LoRA r16 on gate/up/down (the peer), our LoRA, MoE-LoRA 8 x r16
   top-2, SLIM 8+2 experts r16 top-2 (its default sample-level gate, the first half of each row
   marked as prompt, as in a training batch) and SLIM with token-level yielding;
2. greedy generation tokens/s of the base model, a merged LoRA, SLIM with its sample-level gate on
   a request that yields (a general prompt: base path, no expert work) and on one that does not (an
   in-domain prompt: one extra base prefill, then the experts), SLIM with token-level and with
   prompt-level yielding (batch 1 and batch 8);
3. for each distance reduction (max / quantile / mean): a short SLIM training run on a built-in
   task (answer-only loss), then the identity share on held-out in-task prompts vs the general
   suite's prompts (routing_diagnostics), and a token-level AUC of the calibrated distance.

JSON keys: lora_step_vs_peft_lora, moe_lora_step_vs_peft_lora, slim_step_vs_peft_lora,
slim_token_step_vs_peft_lora (time ratios, lower is faster; SLIM's step as our loop runs it, without
the gate's base pass, which ``gate_measure_seconds_slim`` times once per batch of new prompts:
``slim_first_epoch_step_vs_peft_lora`` adds it), slim_yielded_generation_vs_base,
slim_in_domain_generation_vs_base, slim_token_generation_vs_base, slim_prompt_generation_vs_base,
merged_lora_generation_vs_base (throughput ratios, batch 1; *_batch8 likewise), identity_share_{task,general}_{reduction},
identity_gap_{reduction}, distance_auc_{reduction}, best_reduction, plus absolute times as context.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_layers,
    adapter_regularization,
    inject_adapters,
    merge_adapters,
    routing_diagnostics,
    separation_auc,
    trainable_parameters,
)
from forgetless.adapters.gate import fitted_gate, prompt_boundary
from forgetless.data.formatting import PromptFormatter
from forgetless.io import write_json
from forgetless.tasks import get_task, suites

ROOT = Path(__file__).resolve().parent
REDUCTIONS = ["max", "quantile", "mean"]


# ---- 1. training step ---------------------------------------------------------------------------


def _variant(base, kind: str):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    if kind == "peft_lora":
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=["gate_proj", "up_proj", "down_proj"])
        )
    elif kind == "slim_token":
        inject_adapters(model, AdapterConfig.slim(r=16, yield_pooling="token"))
    else:
        preset = {"lora": AdapterConfig.lora, "moe_lora": AdapterConfig.moe_lora, "slim": AdapterConfig.slim}[
            kind
        ]
        inject_adapters(model, preset(r=16))
    model.train()
    return model


def _prompt(batch) -> torch.Tensor:
    """The first half of each row is its prompt (SLIM's gate pools over it; a no-op for the others)."""
    prompt = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    prompt[:, : prompt.shape[1] // 2] = True
    return prompt


def _step(model, batch, ours: bool) -> float:
    """One forward+backward as our training loop runs it: a sample gate measured its prompts
    before the loop (``fitted_gate``), so the step runs no base pass."""
    start = time.perf_counter()
    with fitted_gate(model, [], measure=False), prompt_boundary(model, _prompt(batch)):
        loss = model(**batch, labels=batch["input_ids"]).loss
    if ours:
        loss = loss + adapter_regularization(model)
    loss.backward()
    elapsed = time.perf_counter() - start
    for parameter in model.parameters():
        parameter.grad = None
    return elapsed


def bench_steps(base, repeats: int, batch_size: int, seq_len: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, 40000, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    kinds = ["peft_lora", "lora", "moe_lora", "slim", "slim_token"]
    models = {kind: _variant(base, kind) for kind in kinds}
    for kind in kinds:  # warm-up: allocator (SLIM's clusters initialise in the first _measure)
        _step(models[kind], batch, kind != "peft_lora")
    times: dict[str, list[float]] = {kind: [] for kind in [*kinds, "slim_measure"]}
    for round_index in range(repeats):
        order = kinds[round_index % len(kinds) :] + kinds[: round_index % len(kinds)]
        for kind in order:
            times[kind].append(_step(models[kind], batch, kind != "peft_lora"))
        times["slim_measure"].append(_measure(models["slim"], batch))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    del models
    result = {f"step_seconds_{kind}": medians[kind] for kind in kinds}
    for kind in ("lora", "moe_lora", "slim", "slim_token"):
        result[f"{kind}_step_vs_peft_lora"] = medians[kind] / medians["peft_lora"]
    # the gate's base pass over a batch's prompts, once per training item and stage
    result["gate_measure_seconds_slim"] = medians["slim_measure"]
    result["slim_first_epoch_step_vs_peft_lora"] = (medians["slim"] + medians["slim_measure"]) / medians[
        "peft_lora"
    ]
    return result


def _measure(model, batch) -> float:
    labels = batch["input_ids"].masked_fill(_prompt(batch), -100)
    start = time.perf_counter()
    with fitted_gate(model, [{**batch, "labels": labels}]):
        pass
    return time.perf_counter() - start


# ---- 2. generation --------------------------------------------------------------------------------


def _generation_models(base, tokenizer):
    merged = copy.deepcopy(base)
    inject_adapters(merged, AdapterConfig.lora(r=16))
    _perturb(merged)
    merge_adapters(merged)
    models = {"base": base, "merged_lora": merged}
    # SLIM's default gate, forced to each of its two routes: every request yields (what a general
    # prompt costs) or none does (what an in-domain prompt costs: a base prefill, then the experts)
    for name, threshold in (("slim_yielded", -1e9), ("slim_in_domain", 1e9)):
        models[name] = copy.deepcopy(base)
        inject_adapters(
            models[name], AdapterConfig.slim(r=16, yield_threshold=threshold), tokenizer=tokenizer
        )
        _perturb(models[name])
    models["slim_token"] = copy.deepcopy(base)
    inject_adapters(models["slim_token"], AdapterConfig.slim(r=16, yield_pooling="token"))
    _perturb(models["slim_token"])
    # prompt pooling cannot take the folded few-token inference path (each token's shift depends
    # on the row's earlier tokens): its decoding cost is measured separately
    models["slim_prompt"] = copy.deepcopy(base)
    inject_adapters(models["slim_prompt"], AdapterConfig.slim(r=16, yield_pooling="prompt", yield_skip=24))
    _perturb(models["slim_prompt"])
    for model in models.values():
        model.eval()
    return models


def _perturb(model) -> None:
    """Non-zero experts and router, as after training (fresh B = 0 would hide nothing, but be honest)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trainable_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)


def _generate(model, input_ids, attention_mask, new_tokens: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - start
    return input_ids.shape[0] * new_tokens / elapsed


def bench_generation(base, tokenizer, repeats: int, new_tokens: int) -> dict[str, float]:
    models = _generation_models(base, tokenizer)
    prompts = [example.prompt for example in get_task("general_capitals").test[:8]]
    formatter = PromptFormatter(tokenizer)
    result: dict[str, float] = {}
    for batch_size, suffix in ((1, ""), (8, "_batch8")):
        encoded = [formatter.prompt_ids(prompt) for prompt in prompts[:batch_size]]
        width = max(len(ids) for ids in encoded)
        # left padding, as generation needs
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in encoded])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        for model in models.values():
            _generate(model, input_ids, attention_mask, 4)
        rates: dict[str, list[float]] = {name: [] for name in models}
        for round_index in range(repeats):
            names = list(models)
            shift = round_index % len(names)
            order = names[shift:] + names[:shift]
            for name in order:
                rates[name].append(_generate(models[name], input_ids, attention_mask, new_tokens))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        for name in models:
            result[f"generation_tokens_per_s_{name}{suffix}"] = medians[name]
        for name in models:
            if name != "base":
                result[f"{name}_generation_vs_base{suffix}"] = medians[name] / medians["base"]
    return result


# ---- 3. identity share after a short training run -------------------------------------------------


def _encode_batches(formatter, examples, batch_size: int, with_answers: bool, skip_prefix: int = 0):
    """Right-padded batches: input_ids, attention_mask, (with answers) answer-only labels, and a
    statistics_mask that leaves out the first ``skip_prefix`` tokens (the chat template's shared
    system prompt: identical hidden states in every group, so they only dilute a comparison)."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if with_answers:
            encoded = [formatter.encode(example) for example in chunk]
            rows = [(item.input_ids, item.labels) for item in encoded]
        else:
            rows = [(ids, [-100] * len(ids)) for ids in (formatter.prompt_ids(e.prompt) for e in chunk)]
        width = max(len(ids) for ids, _ in rows)
        batches.append(
            {
                "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows]),
                "attention_mask": torch.tensor(
                    [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
                ),
                "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
                "statistics_mask": torch.tensor(
                    [[i >= skip_prefix and i < len(ids) for i in range(width)] for ids, _ in rows]
                ),
            }
        )
    return batches


def _answer_loss(model, batch) -> torch.Tensor:
    """Cross-entropy on answer tokens only; the LM head runs only where a label is (49k vocabulary)."""
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    positions = labels != -100
    logits = model.lm_head(hidden[:, :-1][positions])
    return torch.nn.functional.cross_entropy(logits.float(), labels[positions])


def _distances(model, batches) -> torch.Tensor:
    """Per-token calibrated distances averaged over layers, for the tokens in statistics_mask."""
    collected: list[list[torch.Tensor]] = []
    layers = adapter_layers(model)

    for batch in batches:
        per_layer: list[torch.Tensor] = []

        def record(
            layer, weights, chosen, distance, mask, sink=per_layer, keep=batch["statistics_mask"]
        ) -> None:
            keep = keep.reshape(-1)
            sink.append(distance[keep if mask is None else mask & keep])

        for layer in layers.values():
            layer.recorder = record
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for layer in layers.values():
            layer.recorder = None
        collected.append(per_layer)
    return torch.cat([torch.stack(per_layer).mean(dim=0) for per_layer in collected]).float()


def measure_identity(base, tokenizer, task_name: str, steps: int, lr: float, seed: int) -> dict[str, float]:
    task = get_task(task_name, seed=seed)
    formatter = PromptFormatter(tokenizer, system_prompt=task.system_prompt)
    train = _encode_batches(formatter, task.train, 8, with_answers=True)
    prefix = formatter.template_prefix_length()
    in_task = _encode_batches(formatter, task.test[:48], 16, with_answers=False, skip_prefix=prefix)
    general_examples = []
    for name in suites()["general"]:
        general_examples.extend(get_task(name).test[:12])
    general = _encode_batches(formatter, general_examples, 16, with_answers=False, skip_prefix=prefix)
    result: dict[str, float] = {}
    for reduction in REDUCTIONS:
        model = copy.deepcopy(base)
        # this part studies the token-level distance (yield_pooling token), reduction by reduction
        config = AdapterConfig.slim(r=16, distance_reduction=reduction, seed=seed, yield_pooling="token")
        inject_adapters(model, config)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)
        model.train()
        losses = []
        for step in range(steps):
            batch = train[step % len(train)]
            loss = _answer_loss(model, batch)
            (loss + adapter_regularization(model)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        model.eval()
        near = routing_diagnostics(model, in_task)
        far = routing_diagnostics(model, general)
        result[f"identity_share_task_{reduction}"] = near["identity_share"]
        result[f"identity_share_general_{reduction}"] = far["identity_share"]
        result[f"identity_gap_{reduction}"] = far["identity_share"] - near["identity_share"]
        result[f"distance_auc_{reduction}"] = separation_auc(
            _distances(model, in_task), _distances(model, general)
        )
        result[f"final_train_loss_{reduction}"] = statistics.mean(losses[-5:])
        print(
            f"  {reduction:8s} identity share task {near['identity_share']:.3f} general {far['identity_share']:.3f} "
            f"gap {result[f'identity_gap_{reduction}']:+.3f} distance AUC {result[f'distance_auc_{reduction}']:.3f} "
            f"loss {result[f'final_train_loss_{reduction}']:.3f}",
            flush=True,
        )
        del model, optimizer
    result["best_reduction"] = max(REDUCTIONS, key=lambda r: result[f"identity_gap_{r}"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "adapters.json")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=ROOT.parent.parent / "shared" / "data",
        help="unused: this benchmark uses built-in tasks (kept for the common interface)",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per timing")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable ratios on a shared machine)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--task", default="fictional_facts", help="built-in task for the identity measurement"
    )
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["steps", "generation", "identity"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_model(args.model)
    results: dict[str, object] = {}
    if args.out.exists() and args.skip:  # a partial run updates the figures it measured
        results.update(json.loads(args.out.read_text(encoding="utf-8")))
    results.update({"model": args.model, "threads": args.threads, "repeats": args.repeats})
    if "steps" not in args.skip:
        print("forward+backward, batch 8 x 64 ...", flush=True)
        results.update(bench_steps(base, args.repeats, 8, 64))
    if "generation" not in args.skip:
        print("greedy generation ...", flush=True)
        results.update(bench_generation(base, tokenizer, args.repeats, args.new_tokens))
    if "identity" not in args.skip:
        print(f"identity share after {args.train_steps} SLIM steps on {args.task} ...", flush=True)
        results["identity_task"] = args.task
        results["identity_train_steps"] = args.train_steps
        results.update(measure_identity(base, tokenizer, args.task, args.train_steps, args.lr, seed=0))
    print()
    print(f"{'figure':42s} value")
    for key, value in results.items():
        print(f"{key:42s} {value:.4f}" if isinstance(value, float) else f"{key:42s} {value}")
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
