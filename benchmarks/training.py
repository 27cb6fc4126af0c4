"""Training benchmark: our loop vs PEFT + ``transformers.Trainer``, same model, data and settings, same run.

Both train a LoRA (rank 16, alpha 32, on gate/up/down projections) on SmolLM2-135M-Instruct for one
epoch over the same 256 tokenised examples of the built-in new-knowledge tasks (batch 8, AdamW,
lr 2e-4, linear schedule with 5 % warm-up, clipping at 1.0, fp32). Runs alternate ours / peer
(``--repeats`` pairs, the order flipping every pair) with an fp32 2048^2 matmul peak measured
before each pair; we report medians. Tokens are the real (non-padding) tokens of the 256 examples,
the same count for both, so tokens/s ratios are wall-time ratios. Where our loop is faster: the LM
head only at answer positions, length-bucketed batches (less padding), and the prompt prefix that
every example of a micro-batch shares (the chat template's system prompt) computed once
(``shared_prefix_saved_share``; loss and gradients equal the unshared ones, tests/training/test_loss.py).

    python benchmarks/training.py [--out FILE] [--data-dir DIR] [--repeats 3] [--threads 1]

JSON keys: ``tokens_per_s_vs_peft_trainer`` (ours / peer tokens per second), ``matmul_peak_share``
(our step's model FLOP/s over the matmul peak measured just before and after that step, median
over ``--interleaved-steps`` steps; the counting rule is in ``flop_formula``),
absolute times, losses of both, and where the step's time goes (``profile_*``: shares of our step's
CPU time by operator family, and the LM head's share in our step and in the peer's).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["fictional_facts", "glorp_arithmetic", "kelvar_dates", "zorbian_topics"]
TARGETS = ["gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR, BATCH, WARMUP = 16, 32.0, 2e-4, 8, 0.05
FLOP_FORMULA = (
    "per micro-batch with t computed tokens (real tokens, padding not counted, the prompt prefix "
    "shared by all rows counted once) and a answer-token targets: 2*t*(P_body+P_lora) forward linear "
    "+ 2*t*(P_body+P_lora) input-gradient backward (frozen and adapter weights) + 2*t*P_lora adapter "
    "weight gradients + 3*4*L*d_attn*(p^2 + sum_rows(n^2 - p^2)) attention scores and values "
    "(forward + 2x backward; n row length, p shared prefix) + 2*2*a*d*V LM head at labelled positions "
    "only (forward + input-gradient backward); P_body = sum of d_in*d_out over the decoder layers' "
    "linear layers, P_lora = sum of r*(d_in+d_out) over adapted layers; 2 FLOPs per multiply-add; "
    "divided by the loop's step seconds (forward, backward, clip, optimizer)"
)


def examples(tokenizer, count: int, seed: int):
    from forgetless.data import PromptFormatter
    from forgetless.tasks import get_task

    pool = [example for name in TASKS for example in get_task(name).train]
    picked = random.Random(seed).sample(pool, count)
    formatter = PromptFormatter(tokenizer, max_length=512)
    return [formatter.encode(example) for example in picked]


def matmul_peak(repeats: int = 5, size: int = 2048) -> float:
    """Median fp32 FLOP/s of ``size^2 @ size^2`` over ``repeats`` bursts of 5 (after a warm-up)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        rates.append(5 * 2 * size**3 / (time.perf_counter() - started))
    return statistics.median(rates)


def model_flops(model, encoded, batches, pad_id: int, share_prefix: bool) -> tuple[float, int]:
    """Training FLOPs and computed tokens of ``batches`` by FLOP_FORMULA (model with LoRA injected)."""
    from forgetless.adapters import adapter_layers
    from forgetless.data import collate
    from forgetless.training.loss import MIN_SHARED_PREFIX, label_positions, shared_prefix_length

    config = model.config
    body = sum(
        module.in_features * module.out_features
        for module in model.model.layers.modules()
        if isinstance(module, torch.nn.Linear)
    )
    lora = sum(RANK * (layer.in_features + layer.out_features) for layer in adapter_layers(model).values())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 3 * 4 * config.num_hidden_layers * config.num_attention_heads * head_dim
    total, computed = 0.0, 0
    for batch in batches:
        rows = [encoded[i] for i in batch]
        collated = collate(rows, pad_id)
        keep, targets = label_positions(collated["labels"])
        prefix = (
            shared_prefix_length(collated["input_ids"], collated["attention_mask"], keep)
            if share_prefix
            else 0
        )
        prefix = prefix if prefix >= MIN_SHARED_PREFIX else 0
        tokens = prefix + sum(len(row) - prefix for row in rows)
        computed += tokens
        total += 2 * tokens * (body + lora) * 2 + 2 * tokens * lora
        total += attention * (prefix**2 + sum(len(row) ** 2 - prefix**2 for row in rows))
        total += 2 * 2 * targets.numel() * config.hidden_size * config.vocab_size
    return total, computed


def run_ours(encoded, tokenizer) -> dict:
    from forgetless import load_model
    from forgetless.adapters import AdapterConfig, inject_adapters
    from forgetless.training import TrainConfig, train_model
    from forgetless.training.loop import epoch_batches

    model, _ = load_model("smollm2-135m-instruct")
    inject_adapters(model, AdapterConfig.lora(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    config = TrainConfig(
        batch_size=BATCH, epochs=1, warmup_ratio=WARMUP, checkpoint_every=0, progress=False, log_every=10_000
    )
    started = time.perf_counter()
    summary = train_model(model, encoded, config, lr=LR, pad_id=tokenizer.pad_token_id)
    wall = time.perf_counter() - started
    batches = epoch_batches([len(e) for e in encoded], config, epoch=0)
    flops, computed = model_flops(model, encoded, batches, tokenizer.pad_token_id, config.share_prompt_prefix)
    return {
        "wall_s": wall,
        "step_s": summary.seconds,
        "steps": summary.steps,
        "mean_loss": summary.final_loss,  # one epoch: the mean over every step
        "flops": flops,
        "computed_tokens": computed,
    }


def interleaved_peak_share(encoded, tokenizer, steps: int) -> dict:
    """Our step's FLOP/s over the matmul peak measured right before and right after that step.

    The shared machine's per-core speed drifts by 2-3x within minutes (other jobs on the sibling
    hyper-thread), so the peak is measured adjacent to each step: peak, step, peak, step, ...; each
    step is one ``train_model`` call of one optimizer step (its ``seconds`` exclude set-up) on the
    next length-bucketed batch, continuing the same adapter. Median over ``steps`` steps.
    """
    from forgetless import load_model
    from forgetless.adapters import AdapterConfig, inject_adapters
    from forgetless.data import length_bucketed_batches
    from forgetless.training import TrainConfig, train_model

    model, _ = load_model("smollm2-135m-instruct")
    inject_adapters(model, AdapterConfig.lora(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    config = TrainConfig(batch_size=BATCH, max_steps=1, warmup_ratio=0.0, checkpoint_every=0, progress=False)
    batches = length_bucketed_batches([len(e) for e in encoded], BATCH, seed=0)[: steps + 1]
    train_model(
        model, [encoded[i] for i in batches[0]], config, lr=LR, pad_id=tokenizer.pad_token_id
    )  # warm-up
    peaks, shares, achieved = [matmul_peak(repeats=3)], [], []
    for batch in batches[1:]:
        chunk = [encoded[i] for i in batch]
        summary = train_model(model, chunk, config, lr=LR, pad_id=tokenizer.pad_token_id)
        peaks.append(matmul_peak(repeats=3))
        flops, _ = model_flops(model, chunk, [list(range(len(chunk)))], tokenizer.pad_token_id, True)
        rate = flops / summary.seconds
        achieved.append(rate)
        shares.append(rate / ((peaks[-2] + peaks[-1]) / 2))
    return {
        "matmul_peak_share": round(statistics.median(shares), 3),
        "interleaved_steps": steps,
        "interleaved_shares": ",".join(f"{share:.3f}" for share in shares),
        "interleaved_achieved_gflop_per_s": round(statistics.median(achieved) / 1e9, 2),
        "interleaved_peak_gflop_per_s": round(statistics.median(peaks) / 1e9, 2),
    }


def peft_model():
    from peft import LoraConfig, get_peft_model

    from forgetless import load_model

    model, _ = load_model("smollm2-135m-instruct")
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def run_peer(encoded, tokenizer, work: Path) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = peft_model()
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in encoded]
    arguments = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(WARMUP * math.ceil(len(encoded) / BATCH)),
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(
        model=model, args=arguments, train_dataset=Dataset.from_list(rows), data_collator=collator
    )
    started = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - started
    return {"wall_s": wall, "steps": result.global_step, "mean_loss": result.training_loss}


def _family(name: str) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "matmul"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if "softmax" in name or "nll" in name or "cross_entropy" in name:
        return "loss"
    if name.startswith("Optimizer") or "adam" in name.lower() or "foreach" in name:
        return "optimizer"
    return "elementwise_and_other"


def profile_steps(step, head_width: int) -> dict:
    """Shares of one step's self CPU time by family, and of the LM head's matmuls (by input shape)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(event.self_cpu_time_total for event in events)
    families: dict[str, float] = {}
    head = 0.0
    for event in events:
        families[_family(event.key)] = families.get(_family(event.key), 0.0) + event.self_cpu_time_total
        shapes = str(event.input_shapes)
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm") and str(head_width) in shapes:
            head += event.self_cpu_time_total
    shares = {f"profile_{key}_share": round(value / total, 4) for key, value in sorted(families.items())}
    shares["profile_lm_head_matmul_share"] = round(head / total, 4)
    shares["profile_step_s"] = round(total / 1e6, 3)
    return shares


def profiles(encoded, tokenizer) -> dict:
    """Profile one step of ours and one of the peer's model (forward with labels, backward, AdamW)."""
    from forgetless import load_model
    from forgetless.adapters import AdapterConfig, inject_adapters
    from forgetless.data import collate
    from forgetless.training import AnswerOnlyLoss

    batch = collate(encoded[:BATCH], tokenizer.pad_token_id)
    ours, _ = load_model("smollm2-135m-instruct")
    inject_adapters(ours, AdapterConfig.lora(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    wrapped = AnswerOnlyLoss(ours).train()
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=LR)

    def our_step():
        loss_sum, count = wrapped(**batch)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()

    peer = peft_model().train()
    peer_optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=LR)

    def peer_step():
        peer(**batch).loss.backward()
        peer_optimizer.step()
        peer_optimizer.zero_grad()

    vocab = ours.config.vocab_size
    result = profile_steps(our_step, vocab)
    result.update(
        {key.replace("profile_", "profile_peer_"): v for key, v in profile_steps(peer_step, vocab).items()}
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    parser.add_argument(
        "--data-dir", default=str(ROOT.parent / "shared" / "data"), help="unused: built-in tasks"
    )
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="ours/peer pairs")
    parser.add_argument("--interleaved-steps", type=int, default=8, help="steps for matmul_peak_share")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both (1: on a shared 2-core machine two OpenMP threads thrash under load)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    from forgetless.models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    encoded = examples(tokenizer, args.examples, seed=0)
    real_tokens = sum(len(e) for e in encoded)
    ours_runs, peer_runs, peaks = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            peaks.append(matmul_peak())
            order = ["ours", "peer"] if repeat % 2 == 0 else ["peer", "ours"]
            for tool in order:
                if tool == "ours":
                    ours_runs.append(run_ours(encoded, tokenizer))
                else:
                    peer_runs.append(run_peer(encoded, tokenizer, Path(work)))
                print(
                    f"repeat {repeat} {tool}: {(ours_runs if tool == 'ours' else peer_runs)[-1]}", flush=True
                )
        peaks.append(matmul_peak())
    profile = profiles(encoded, tokenizer)
    interleaved = interleaved_peak_share(encoded, tokenizer, args.interleaved_steps)
    ours_wall = statistics.median(run["wall_s"] for run in ours_runs)
    peer_wall = statistics.median(run["wall_s"] for run in peer_runs)
    ours_step = statistics.median(run["step_s"] for run in ours_runs)
    peak = statistics.median(peaks)
    flops = ours_runs[0]["flops"]
    results = {
        "tokens_per_s_vs_peft_trainer": round(peer_wall / ours_wall, 3),
        "matmul_peak_share": interleaved["matmul_peak_share"],
        "matmul_peak_share_epoch_vs_median_peak": round(flops / ours_step / peak, 3),
        "ours_tokens_per_s": round(real_tokens / ours_wall, 1),
        "peer_tokens_per_s": round(real_tokens / peer_wall, 1),
        "ours_wall_s": round(ours_wall, 2),
        "peer_wall_s": round(peer_wall, 2),
        "ours_step_s_total": round(ours_step, 2),
        "ours_achieved_gflop_per_s": round(flops / ours_step / 1e9, 2),
        "matmul_peak_gflop_per_s": round(peak / 1e9, 2),
        "matmul_peak_min_gflop_per_s": round(min(peaks) / 1e9, 2),
        "matmul_peak_max_gflop_per_s": round(max(peaks) / 1e9, 2),
        "epoch_model_tflop": round(flops / 1e12, 4),
        "flop_formula": FLOP_FORMULA,
        "ours_mean_loss": round(statistics.median(run["mean_loss"] for run in ours_runs), 4),
        "peer_mean_loss": round(statistics.median(run["mean_loss"] for run in peer_runs), 4),
        "steps": ours_runs[0]["steps"],
        "peer_steps": peer_runs[0]["steps"],
        "examples": len(encoded),
        "real_tokens": real_tokens,
        "ours_computed_tokens": ours_runs[0]["computed_tokens"],
        "shared_prefix_saved_share": round(1 - ours_runs[0]["computed_tokens"] / real_tokens, 4),
        "answer_tokens": sum(sum(label != -100 for label in e.labels[1:]) for e in encoded),
        "repeats": args.repeats,
        "threads": args.threads,
        "model": "smollm2-135m-instruct",
        "lora": f"r={RANK} alpha={ALPHA:g} on {'/'.join(TARGETS)}",
        "tasks": ",".join(TASKS),
        "peer": "peft get_peft_model + transformers.Trainer (DataCollatorForSeq2Seq, adamw_torch)",
        "ours_wall_s_runs": ",".join(f"{run['wall_s']:.2f}" for run in ours_runs),
        "peer_wall_s_runs": ",".join(f"{run['wall_s']:.2f}" for run in peer_runs),
        "note": "2-core machine shared with other jobs during the run: absolute times are noisy, ratios are same-run",
        **{key: value for key, value in interleaved.items() if key != "matmul_peak_share"},
        **profile,
    }
    width = max(len(key) for key in results)
    for key, value in results.items():
        if key != "flop_formula":
            print(f"{key:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from forgetless.io import write_json

    write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
