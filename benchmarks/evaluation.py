"""Benchmark: our multiple-choice log-likelihood evaluation vs lm-eval harness, and generation speed.

Same run, same model (SmolLM2-135M-Instruct, fp32, CPU), the same ARC-Easy items (the first
``--limit`` of ``arc_easy/llm_foundry/arc_easy.jsonl``: query / choices / gold) with the same
prompt (``query + "\\nAnswer:"``, choices as `` choice`` continuations, no chat template):

- ours:  ``forgetless.evaluation.evaluate_task`` (metric ``loglik_mc``, style ``plain``): each
  question's prompt is encoded once and all its choices are scored from the KV cache;
- peer:  lm-eval ``hf`` model on a custom task YAML over the same items (``multiple_choice``).

Both sides use ``--threads`` torch threads (default 1). Runs alternate (ours, peer, ours, peer ...) so that load from other processes hits both alike;
times are medians. Agreement: accuracy difference and the share of items with the same predicted
choice. Generation: greedy tokens/s of ``generate_greedy`` vs ``transformers`` ``generate`` at batch
1 and 16 (fixed length: no stop token), alternating too.

    python benchmarks/evaluation.py [--out FILE] [--data-dir DIR] [--limit 500] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from forgetless.data.formatting import PromptFormatter  # noqa: E402
from forgetless.data.task import Example, Task  # noqa: E402
from forgetless.evaluation import evaluate_task, generate_greedy  # noqa: E402
from forgetless.io import write_json  # noqa: E402
from forgetless.models import DEFAULT_MODEL, load_model, resolve_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parent


def read_items(data_dir: Path, limit: int) -> list[dict]:
    path = data_dir / "arc_easy" / "llm_foundry" / "arc_easy.jsonl"
    if not path.is_file():
        sys.exit(f"ARC-Easy not found at {path}; pass --data-dir (the shared data folder)")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()][:limit]


def lm_eval_task(items: list[dict], folder: Path) -> None:
    data = folder / "arc_easy_items.jsonl"
    data.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    (folder / "fl_bench_arc_easy.yaml").write_text(
        "task: fl_bench_arc_easy\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{query}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


def run_ours(model, tokenizer, task: Task, batch_size: int) -> tuple[float, dict, list[int]]:
    start = time.perf_counter()
    score = evaluate_task(model, tokenizer, task, style="plain", batch_size=batch_size)
    seconds = time.perf_counter() - start
    return seconds, score.measures, [d["predicted"] for d in score.details]


def run_peer(lm, manager, batch_size: int) -> tuple[float, dict, list[int]]:
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["fl_bench_arc_easy"], task_manager=manager,
                                  batch_size=batch_size, log_samples=True)  # fmt: skip
    seconds = time.perf_counter() - start
    result = out["results"]["fl_bench_arc_easy"]
    samples = sorted(out["samples"]["fl_bench_arc_easy"], key=lambda s: s["doc_id"])
    predicted = []
    for sample in samples:
        lls = [resp[0] for resp in sample["filtered_resps"]]
        predicted.append(max(range(len(lls)), key=lambda i: (lls[i], -i)))
    return seconds, {"acc": result["acc,none"], "acc_norm": result["acc_norm,none"]}, predicted


def generation_speed(
    model, tokenizer, prompts: list[str], batch_size: int, new_tokens: int, repeats: int
) -> dict:
    """Greedy tokens/s of ours and of transformers' generate (left padding), alternating."""
    formatter = PromptFormatter(tokenizer, "chat")
    ids = [formatter.prompt_ids(p) for p in prompts]

    def ours() -> float:
        start = time.perf_counter()
        out = generate_greedy(model, ids, lambda t: tokenizer.decode(t, skip_special_tokens=True),
                              max_new_tokens=new_tokens, pad_id=tokenizer.pad_token_id, batch_size=batch_size)  # fmt: skip
        return sum(len(g.token_ids) for g in out) / (time.perf_counter() - start)

    def peer() -> float:
        tokenizer.padding_side = "left"
        produced, start = 0, time.perf_counter()
        for first in range(0, len(prompts), batch_size):
            chunk = ids[first : first + batch_size]
            longest = max(len(c) for c in chunk)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(c)) + c for c in chunk])
            mask = torch.tensor([[0] * (longest - len(c)) + [1] * len(c) for c in chunk])
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            produced += (out.shape[1] - longest) * len(chunk)
        return produced / (time.perf_counter() - start)

    ours_rates, peer_rates = [], []
    for _ in range(repeats):
        ours_rates.append(ours())
        peer_rates.append(peer())
    return {"ours": statistics.median(ours_rates), "peer": statistics.median(peer_rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "results" / "evaluation.json"))
    parser.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"))
    parser.add_argument("--limit", type=int, default=500, help="ARC-Easy items (default 500)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side (default 2)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gen-prompts", type=int, default=16, help="prompts for the generation speed test")
    parser.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a shared 2-core machine two "
                        "threads spin-wait for each other and double every time)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import lm_eval  # noqa: F401 - fail early when the peer is missing
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    items = read_items(Path(args.data_dir), args.limit)
    task = Task("arc_easy", [], [Example(f"{it['query']}\nAnswer:", it["choices"][it["gold"]],
                                         tuple(it["choices"]), it["gold"]) for it in items], metric="loglik_mc")  # fmt: skip
    model, tokenizer = load_model(DEFAULT_MODEL)
    folder = resolve_model_folder(DEFAULT_MODEL)
    peer_lm = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=args.batch_size)
    workdir = Path(tempfile.mkdtemp(prefix="fl-bench-eval-"))
    lm_eval_task(items, workdir)
    manager = TaskManager(include_path=str(workdir), include_defaults=False)

    ours_times, peer_times = [], []
    for repeat in range(args.repeats):
        seconds, ours_measures, ours_pred = run_ours(model, tokenizer, task, args.batch_size)
        ours_times.append(seconds)
        seconds, peer_measures, peer_pred = run_peer(peer_lm, manager, args.batch_size)
        peer_times.append(seconds)
        print(f"repeat {repeat + 1}: ours {ours_times[-1]:.1f} s, lm-eval {peer_times[-1]:.1f} s", flush=True)

    same = sum(a == b for a, b in zip(ours_pred, peer_pred)) / len(items)
    prompts = [it["query"].removeprefix("Question: ") for it in items[: args.gen_prompts]]
    gen1 = generation_speed(model, tokenizer, prompts[:4], 1, args.gen_tokens, args.repeats)
    gen16 = generation_speed(model, tokenizer, prompts, 16, args.gen_tokens, args.repeats)
    ours_median, peer_median = statistics.median(ours_times), statistics.median(peer_times)
    result = {
        "model": DEFAULT_MODEL,
        "items": len(items),
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "ours_seconds": round(ours_median, 2),
        "lm_eval_seconds": round(peer_median, 2),
        "speedup_vs_lm_eval": round(peer_median / ours_median, 3),
        "ours_acc": ours_measures["acc"],
        "lm_eval_acc": peer_measures["acc"],
        "accuracy_diff_vs_lm_eval": round(ours_measures["acc"] - peer_measures["acc"], 6),
        "ours_acc_norm": ours_measures["acc_norm"],
        "lm_eval_acc_norm": peer_measures["acc_norm"],
        "acc_norm_diff_vs_lm_eval": round(ours_measures["acc_norm"] - peer_measures["acc_norm"], 6),
        "same_prediction_share": round(same, 6),
        "gen_tokens_per_s_batch1": round(gen1["ours"], 2),
        "hf_generate_tokens_per_s_batch1": round(gen1["peer"], 2),
        "gen_speedup_vs_hf_batch1": round(gen1["ours"] / gen1["peer"], 3),
        "gen_tokens_per_s_batch16": round(gen16["ours"], 2),
        "hf_generate_tokens_per_s_batch16": round(gen16["peer"], 2),
        "gen_speedup_vs_hf_batch16": round(gen16["ours"] / gen16["peer"], 3),
    }
    width = max(len(key) for key in result)
    print("\nbenchmark: evaluation (ours vs lm-eval hf, same run; other processes share the CPU)")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value}")
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
