"""``forgetless models``, ``tasks`` and ``ask``: what is installed, and one question to a model."""

from __future__ import annotations

import argparse
import sys

from forgetless.cli._base import _table, command


def _models_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command(
    "models",
    "list built-in model aliases, their size and whether they are installed",
    _models_args,
    epilog="example:\n  forgetless models",
)
def cmd_models(args: argparse.Namespace) -> int:
    from forgetless.models import model_status

    rows = model_status()
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        row["installed"] = "yes" if row["installed"] else f"no: {row['install']}"
        row["cached"] = "yes" if row["cached"] else "no (converted on first load)"
    _table(rows, ["name", "parameters", "kind", "installed", "cached", "description"], "forgetless models")
    return 0


def _tasks_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--seed", type=int, default=0, help="task generation seed (default 0)")


@command(
    "tasks",
    "list built-in tasks and suites with their sizes",
    _tasks_args,
    epilog="example:\n  forgetless tasks",
)
def cmd_tasks(args: argparse.Namespace) -> int:
    from forgetless.tasks import get_task, suites

    rows = []
    for suite, names in suites().items():
        for name in names:
            summary = get_task(name, args.seed).summary()
            rows.append({"suite": suite, **summary})
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
        return 0
    _table(rows, ["suite", "name", "family", "train", "test", "metric", "description"], "forgetless tasks")
    return 0


def _ask_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the question to ask")
    parser.add_argument(
        "--model",
        default=None,
        help="model alias, .gguf file, HF folder or hub id (default: the embedded model)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)


@command(
    "ask",
    "load a model and answer one prompt (greedy); a smoke test of model loading",
    _ask_args,
    epilog='example:\n  forgetless ask "What is the capital of France?"',
)
def cmd_ask(args: argparse.Namespace) -> int:
    import time

    import torch

    from forgetless.data import PromptFormatter
    from forgetless.models import DEFAULT_MODEL, load_model

    start = time.perf_counter()
    model, tokenizer = load_model(args.model or DEFAULT_MODEL)
    loaded = time.perf_counter() - start
    ids = torch.tensor([PromptFormatter(tokenizer).prompt_ids(args.prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    print(f"[model loaded in {loaded:.1f} s]", file=sys.stderr)
    return 0
