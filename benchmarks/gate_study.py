"""What SLIM's sample-level gate does over a task sequence, read from a finished run folder.

    python benchmarks/gate_study.py RUN [--methods slim,seq_lora] [--out FILE]

For every stage of the named methods of a ``forgetless run`` folder (e.g. the one of
``examples/slim_gate_study.yaml``), rebuilt with ``load_stage``:

1. acquisition in other words: each sequence task's *paraphrase* test set (suite ``paraphrase``:
   the same test knowledge, wording unlike the training prompts), scored like the task;
2. for models with the sample-level gate: per task (the sequence tasks' test prompts, their
   paraphrases, and the reported general items) the mean gate score and the share of sequences
   that yield at the configured threshold and at 2 and 3 in-domain standard deviations, and the
   ROC AUC of "a general prompt scores higher than the prompt of a task learned so far"
   (``separation_auc``), and the paraphrase scores again with the gate switched off;

3. paired comparisons of the final stages against the reference method (``--reference``,
   default seq_lora), read from the item outcomes the run kept (no model is rerun): retention of
   general ability, final task average and BWT, each with a 95% paired bootstrap interval that
   resamples items within each task (2,000 draws, seed 0), and an exact McNemar test on the
   pooled binary general items (``forgetless.evaluation.uncertainty``, as in the run's report).

So one reads whether every task learned so far stays in-domain after later stages, whether the
gate recognises the knowledge or only the training template, and where general prompts go. The
run's own results.json holds the test-template and general scores of every stage.

JSON (default ``benchmarks/results/gate_study.json``): ``{method: {stage: {...}}}`` plus flat
keys ``<method>_paraphrase_acquisition_<task>`` (paraphrase score right after the task's own
stage), ``<method>_paraphrase_final_<task>`` and ``slim_final_gate_auc``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from forgetless.adapters import adapter_layers, separation_auc, set_inference_options
from forgetless.adapters.gate import uses_sample_gate
from forgetless.evaluation import evaluate_tasks
from forgetless.experiment.inspect import prompt_batches
from forgetless.io import write_json
from forgetless.tasks import get_task, suites
from forgetless.training import load_stage

ROOT = Path(__file__).resolve().parent


def _stage_folders(method_folder: Path) -> list[Path]:
    folders = [p for p in method_folder.iterdir() if p.is_dir() and p.name.startswith("stage-")]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def _gate_scores(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Gate score of every prompt, read from the gate after each batch."""
    gate = next(iter(adapter_layers(model).values())).context.gate
    scores = []
    for batch in prompt_batches(tokenizer, prompts, batch_size=16):
        with torch.no_grad():
            model(**batch)
        scores.append(gate.scores.detach().float().cpu())
    return torch.cat(scores)


def _gate_report(model, tokenizer, groups: dict[str, list[str]], learned: list[str]) -> dict:
    """Gate statistics per prompt group; the AUC compares general prompts with the test prompts of
    the tasks ``learned`` so far (later tasks are still out of domain, and should be)."""
    threshold = next(iter(adapter_layers(model).values())).config.yield_threshold
    report, in_domain, general = {}, [], []
    for name, prompts in groups.items():
        scores = _gate_scores(model, tokenizer, prompts)
        report[name] = {
            "sequences": int(scores.numel()),
            "mean_score": float(scores.mean()),
            "yielded": float((scores >= threshold).float().mean()),
            "yielded_at_2": float((scores >= 2).float().mean()),
            "yielded_at_3": float((scores >= 3).float().mean()),
        }
        if name == "general":
            general.append(scores)
        elif name in learned:
            in_domain.append(scores)
    report["auc_general_vs_tasks"] = separation_auc(torch.cat(in_domain), torch.cat(general))
    return report


def compare_final(run: Path, methods: list[str], reference: str) -> dict:
    """Every compared method's final stage against ``reference``, read from the run's per-item
    outcomes (``forgetless.evaluation.uncertainty``: stratified paired bootstrap, exact McNemar)."""
    from forgetless.report import load_results, with_metrics

    results = load_results(run)
    results = with_metrics({**results, "run": {**results.get("run", {}), "report": {"reference": reference}}})
    out: dict = {}
    for method in [reference] + [m for m in methods if m != reference]:
        entry = results["methods"][method]
        known = entry.get("uncertainty") or {}
        out[f"{method}_retention"] = entry["metrics"]["retention"]
        out[f"{method}_retention_interval"] = known.get("metrics", {}).get("retention")
        out[f"{method}_final_average"] = entry["metrics"]["final_average"]
        for metric, name in (
            ("retention", "retention"),
            ("final_average", "final_average"),
            ("bwt_absolute", "bwt"),
        ):
            for key, value in (known.get("vs_reference", {}).get(metric) or {}).items():
                out[f"{method}_vs_{reference}_{name}_{key}"] = value
        if known.get("mcnemar"):
            out[f"{method}_vs_{reference}_general_mcnemar_p"] = known["mcnemar"]["general"]
    return out


def study(run: Path, methods: list[str], learned_only: bool = False, gate_off: bool = True) -> dict:
    """Per method and stage: paraphrase scores (of every sequence task, or with ``learned_only``
    of the tasks trained so far), the gate report, and (``gate_off``) the paraphrases again with
    the gate switched off."""
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    sequence = [t if isinstance(t, str) else t["name"] for t in config["tasks"]]
    paraphrase = {
        name: f"{name}_paraphrase" for name in sequence if f"{name}_paraphrase" in suites()["paraphrase"]
    }
    general_prompts = [e.prompt for name in suites()["general"] for e in get_task(name).test]
    results: dict = {}
    for method in methods:
        results[method] = {}
        for stage, folder in enumerate(_stage_folders(run / "methods" / method)):
            print(f"{method} stage {stage} ({folder.name}) ...", flush=True)
            model, tokenizer = load_stage(folder)
            scored = {t: n for t, n in paraphrase.items() if not learned_only or t in sequence[: stage + 1]}
            scores = evaluate_tasks(model, tokenizer, list(scored.values()), batch_size=16)
            entry: dict = {"paraphrase": {task: scores[name].score for task, name in scored.items()}}
            if uses_sample_gate(model):
                groups = {name: [e.prompt for e in get_task(name).test] for name in sequence}
                groups.update({name: [e.prompt for e in get_task(name).test] for name in paraphrase.values()})
                groups["general"] = general_prompts
                entry["gate"] = _gate_report(model, tokenizer, groups, sequence[: stage + 1])
            if uses_sample_gate(model) and gate_off:
                # the same adapter with the gate never yielding: is a paraphrase failure the gate's?
                set_inference_options(model, yield_threshold=1e9, yield_scale=0.0)
                ungated = evaluate_tasks(model, tokenizer, list(scored.values()), batch_size=16)
                entry["paraphrase_gate_off"] = {task: ungated[name].score for task, name in scored.items()}
            results[method][stage] = entry
            print(json.dumps(entry, indent=1), flush=True)
    return results


def flat_figures(results: dict, sequence_order: list[str]) -> dict:
    flat = {}
    for method, stages in results.items():
        last = stages[max(stages)]
        for index, task in enumerate(sequence_order):
            if index in stages and task in stages[index]["paraphrase"]:
                flat[f"{method}_paraphrase_acquisition_{task}"] = stages[index]["paraphrase"][task]
            if task in last["paraphrase"]:
                flat[f"{method}_paraphrase_final_{task}"] = last["paraphrase"][task]
        if "gate" in last:
            flat[f"{method}_final_gate_auc"] = last["gate"]["auc_general_vs_tasks"]
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a finished forgetless run folder")
    parser.add_argument("--methods", default="slim,seq_lora")
    parser.add_argument("--reference", default="seq_lora", help="the method the others are compared with")
    parser.add_argument(
        "--compare",
        default="slim,slim_shared_gate,lora_gate,moe_lora,seq_fft,olora",
        help="methods compared item by item",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gate_study.json")
    parser.add_argument(
        "--learned-only",
        action="store_true",
        help="score each stage's paraphrases of the tasks trained so far only",
    )
    parser.add_argument("--no-gate-off", action="store_true", help="skip the paraphrases with the gate off")
    parser.add_argument("--data-dir", type=Path, help="unused: built-in tasks only (common interface)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    config = json.loads((args.run / "config.json").read_text(encoding="utf-8"))
    order = [t if isinstance(t, str) else t["name"] for t in config["tasks"]]
    results = study(args.run, methods, learned_only=args.learned_only, gate_off=not args.no_gate_off)
    compared = [m.strip() for m in args.compare.split(",") if m.strip()]
    # the paired comparison reads the finished run's results.json (item outcomes)
    finished = (args.run / "results.json").is_file()
    comparison = compare_final(args.run, compared, args.reference) if finished else {}
    print(json.dumps(comparison, indent=1), flush=True)
    write_json(args.out, {"stages": results, **flat_figures(results, order), **comparison})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
