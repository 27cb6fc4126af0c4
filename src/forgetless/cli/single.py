"""``forgetless train`` and ``eval``: one strategy over a task sequence, one model on tasks."""

from __future__ import annotations

import argparse

from forgetless.cli._base import _key_values, _table, command


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", required=True, help="strategy name (sequential_lora, olora, slim, ...)")
    parser.add_argument("--tasks", required=True, help="comma-separated built-in task names, in order")
    parser.add_argument("--model", default=None, help="base model (default: the embedded model)")
    parser.add_argument("--out", required=True, help="output folder of the stage folders")
    parser.add_argument(
        "--param", action="append", default=[], help="strategy parameter key=value (repeatable)"
    )
    parser.add_argument(
        "--train", action="append", default=[], help="training setting key=value (repeatable)"
    )
    parser.add_argument(
        "--setting", default="semi_cooperative", choices=["semi_cooperative", "fully_cooperative"]
    )
    parser.add_argument("--limit-train", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--seed", type=int, default=0)


@command("train", "train one strategy over a task sequence (no evaluation); prints the stage artifacts", _train_args,
         epilog="""examples:
  forgetless train --strategy sequential_lora --tasks zorbian_topics,kelvar_dates --out runs/lora --param r=8
  forgetless train --strategy slim --tasks kelvar_dates --out runs/slim --train epochs=3 --train lr=5e-4""")  # fmt: skip
def cmd_train(args: argparse.Namespace) -> int:
    from forgetless.models import DEFAULT_MODEL
    from forgetless.tasks import expand_task_names, get_task
    from forgetless.training import TrainConfig, results_table, run_strategy

    names = expand_task_names([name.strip() for name in args.tasks.split(",") if name.strip()])
    tasks = [get_task(name, args.seed).limited(args.limit_train, None, args.seed) for name in names]
    config = TrainConfig.coerce({"seed": args.seed, **_key_values(args.train, "train")})
    results = run_strategy(args.strategy, _key_values(args.param, "param"), args.model or DEFAULT_MODEL, tasks,
                           config, args.out, args.setting)  # fmt: skip
    print(results_table(results))
    return 0


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help="model alias, .gguf, HF folder, hub id or a run's stage folder (default: embedded)",
    )  # fmt: skip
    parser.add_argument("--adapter", default=None, help="forgetless or PEFT adapter folder to load on top")
    parser.add_argument(
        "--tasks", default="general", help="comma-separated tasks or suites (default: general)"
    )
    parser.add_argument("--out", default=None, help="write the scores as JSON here")
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


@command("eval", "evaluate one model (optionally with an adapter) on tasks or suites", _eval_args,
         epilog="""examples:
  forgetless eval --tasks general,kelvar_dates --limit 20
  forgetless eval --model runs/demo/methods/seq_fft/stage-2-glorp_arithmetic/model --tasks general --out scores.json""")  # fmt: skip
def cmd_eval(args: argparse.Namespace) -> int:
    from forgetless.evaluation import run_eval
    from forgetless.models import DEFAULT_MODEL

    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    result = run_eval(args.model or DEFAULT_MODEL, args.adapter, names, args.out, args.limit, args.batch_size,
                      seed=args.seed)  # fmt: skip
    rows = [{"task": name, "score": f"{100 * score:.1f}"} for name, score in result["scores"].items()]
    rows += [
        {"task": f"general: {family}", "score": f"{100 * v:.1f}"} for family, v in result["general"].items()
    ]
    _table(rows, ["task", "score"], f"forgetless eval ({result['seconds']:.0f} s)")
    return 0
