"""``forgetless merge``, ``mix`` and ``lm-eval``."""

from __future__ import annotations

import argparse
import json
import sys

from forgetless.cli._base import command
from forgetless.errors import InputError


def _merge_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="merge YAML (mergekit-like: merge_method, base_model, models, parameters)"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (HF model or PEFT LoRA), written atomically"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


@command("merge", "merge models or LoRA adapters (average, task_arithmetic, ties, dare, dare_ties, lora_average)",
         _merge_args, epilog="example:\n  forgetless merge examples/merge/ties.yaml --out runs/merged_ties")  # fmt: skip
def cmd_merge(args: argparse.Namespace) -> int:
    from forgetless.merging import load_merge_config, run_merge

    summary = run_merge(load_merge_config(args.config), args.out, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _mix_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="mix YAML: base_model, experts (model, task or prompts), router, top_k"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (Mixtral-style HF model or routed LoRA adapter), written atomically",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


@command("mix", "mix models (Mixtral-style MoE) or LoRA adapters (routed LoRA experts) into one model",
         _mix_args, epilog="example:\n  forgetless mix examples/mix/lora_experts.yaml --out runs/mixed_lora")  # fmt: skip
def cmd_mix(args: argparse.Namespace) -> int:
    from forgetless.mixing import load_mix_config, run_mix

    summary = run_mix(load_mix_config(args.config), args.out, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _lm_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs="*", help="anything lm_eval accepts (--model forgetless ...)")


@command("lm-eval", "lm-evaluation-harness's own CLI, with the forgetless model type registered", _lm_eval_args,
         epilog="example:\n  forgetless lm-eval --model forgetless --model_args pretrained=smollm2-135m-instruct,adapter=runs/x/adapter --tasks arc_easy")  # fmt: skip
def cmd_lm_eval(args: argparse.Namespace) -> int:
    return _run_lm_eval(list(args.lm_eval_args))


def _run_lm_eval(arguments: list[str]) -> int:
    """lm-eval has no plug-in discovery for model types: register ours, then hand over its CLI."""
    try:
        from forgetless.evaluation import lm_eval_bridge
    except ImportError as error:
        raise InputError(str(error)) from None
    saved = sys.argv
    sys.argv = ["lm_eval", *arguments]
    try:
        lm_eval_bridge.main()
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            print(f"forgetless: error: {exit_.code}", file=sys.stderr)
            return 2
        return int(exit_.code or 0)
    finally:
        sys.argv = saved
    return 0
