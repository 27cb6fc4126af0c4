"""``forgetless`` command line: thin commands over the library.

Exit codes: 0 ok, 2 bad input (one line on stderr, no traceback), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from forgetless.errors import InputError

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str, str]] = {}


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None], epilog: str = ""
) -> Callable[[Command], Command]:
    """Register ``func(args) -> exit code`` as a subcommand; ``arguments(parser)`` adds its options."""

    def register(func: Command) -> Command:
        _COMMANDS[name] = (func, arguments, help, epilog)
        return func

    return register


def _table(rows: list[dict], columns: list[str], title: str) -> None:
    """A table on a terminal; plain tab-separated lines when stdout is a file or a pipe (nothing
    is ever cut: the names printed are the names a user must type)."""
    from rich.console import Console
    from rich.table import Table

    if not sys.stdout.isatty():
        print(title)
        print("\t".join(columns))
        for row in rows:
            print("\t".join(str(row[column]) for column in columns))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[str(row[column]) for column in columns])
    Console().print(table)


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


def _log(message: str) -> None:
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see examples/)")
    parser.add_argument(
        "overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4 limits.train=32"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: the config's output, else runs/<name>)"
    )
    parser.add_argument("--no-report", action="store_true", help="write results.json only, no plots / HTML")


def _run_and_report(config: object, out: str, report: bool = True) -> int:
    from forgetless.experiment.runner import results_folder, run_experiment
    from forgetless.experiment.summary import print_summary

    results = run_experiment(config, out, log=_log)
    report_path = None
    if report:
        from forgetless.report import write_report

        report_path = str(write_report(results_folder(config, out)))
    print_summary(results, report_path)
    return 0


@command("run", "run an experiment: task sequence x methods -> accuracy matrices, metrics, report", _run_args,
         epilog="""examples:
  forgetless run examples/demo.yaml --out runs/demo
  forgetless run examples/trace.yaml data_dir=../shared/data
  forgetless run examples/slim_multidataset.yaml data_dir=../shared/data evaluation.split=validation
  forgetless run examples/demo.yaml train.epochs=3 methods.0.params.r=8
re-running the same command resumes: finished stages and evaluations are reused.""")  # fmt: skip
def cmd_run(args: argparse.Namespace) -> int:
    from forgetless.config import load_config

    config = load_config(args.config, args.overrides)
    out = args.out or config.output or f"runs/{config.name}"
    return _run_and_report(config, out, report=not args.no_report)


def _plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, as for forgetless run")
    parser.add_argument(
        "--discordance",
        type=float,
        default=0.3,
        help="expected share of items on which two compared methods disagree (default 0.3)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("plan", "before compute: the smallest method difference a config's test sizes resolve", _plan_args,
         epilog="example:\n  forgetless plan examples/slim_gate_study.yaml\n  forgetless plan examples/demo.yaml limits.test=64")  # fmt: skip
def cmd_plan(args: argparse.Namespace) -> int:
    from forgetless.config import load_config
    from forgetless.errors import InputError
    from forgetless.experiment.plan import plan

    if not 0 < args.discordance <= 1:
        raise InputError(f"--discordance {args.discordance}: give a share in (0, 1], e.g. 0.3")
    rows = plan(load_config(args.config, args.overrides), args.discordance)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    shown = [{**row, "detectable": f"{100 * row['detectable']:.1f} points"} for row in rows]
    _table(
        shown, ["what", "items", "detectable"], "smallest difference resolved (paired, 80% power, 5% level)"
    )
    print(f"assuming the methods disagree on {100 * args.discordance:.0f}% of items (--discordance)")
    return 0


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the demo's experiment YAML and exit"
    )


@command("demo", "the built-in experiment on the embedded default model (about 10 minutes on 2 CPU cores)", _demo_args,
         epilog="examples:\n  forgetless demo\n  forgetless demo --print-config > my.yaml")  # fmt: skip
def cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from forgetless.config import validate_config

    text = files("forgetless.experiment").joinpath("demo.yaml").read_text(encoding="utf-8")
    if args.print_config:
        print(text, end="")
        return 0
    import yaml

    config = validate_config(yaml.safe_load(text), "demo.yaml")
    return _run_and_report(config, args.out)


def _key_values(items: list[str], what: str) -> dict:
    from forgetless.config import apply_overrides

    return apply_overrides({}, [f"{what}.{item}" for item in items]).get(what, {})


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


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="what eval's --model takes: alias, .gguf, HF folder, hub id, stage folder"
    )
    parser.add_argument("--adapter", default=None, help="forgetless or PEFT adapter folder to load on top")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("FORGETLESS_API_KEY"), help="API key to require")
    parser.add_argument("--name", default=None, help="the model id clients send (default: MODEL)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    parser.add_argument("--queue-size", type=int, default=64, help="requests that may wait (503 above)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens (400 above)")
    parser.add_argument("--max-request-bytes", type=int, default=1_000_000, help="largest body (413 above)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)


@command("serve", "serve a model (optionally with an adapter) over an OpenAI-compatible HTTP API", _serve_args,
         epilog="""examples:
  forgetless serve runs/demo/methods/slim/stage-2-glorp_arithmetic
  forgetless serve runs/demo/methods/seq_fft/stage-2-glorp_arithmetic/model --port 8001 --api-key secret""")  # fmt: skip
def cmd_serve(args: argparse.Namespace) -> int:
    from forgetless.serving import serve

    options = ("host", "port", "api_key", "name", "max_batch", "queue_size", "max_tokens_limit",
               "max_request_bytes", "dtype", "seed")  # fmt: skip
    return serve(args.model, args.adapter, **{option: getattr(args, option) for option in options})


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="what eval's --model takes: alias, .gguf, HF folder, stage folder")
    parser.add_argument("--adapter", default=None, help="forgetless or PEFT adapter folder to load on top")
    parser.add_argument(
        "--for", dest="target", required=True, metavar="ENGINE", help="vllm (SGLang, TGI too)"
    )
    parser.add_argument("--out", required=True, help="output folder, written atomically")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--calibration", default=None, metavar="TASKS", help="comma-separated tasks calibrating SLIM / MoE-LoRA "
                        "(default: a stage folder's own tasks)")  # fmt: skip
    parser.add_argument("--calibration-limit", type=int, default=16, help="examples per calibration task")
    parser.add_argument("--seed", type=int, default=0)


@command("export", "export for GPU engines: base HF folder, PEFT LoRA adapters, a prompt router", _export_args,
         epilog="example:\n  forgetless export runs/demo/methods/slim/stage-2-glorp_arithmetic --for vllm --out exports/slim")  # fmt: skip
def cmd_export(args: argparse.Namespace) -> int:
    from forgetless.export import export_model, summary_lines

    names = [name.strip() for name in (args.calibration or "").split(",") if name.strip()]
    manifest = export_model(args.model, args.out, target=args.target, adapter=args.adapter, calibration=names,
                            calibration_limit=args.calibration_limit, overwrite=args.overwrite, seed=args.seed)  # fmt: skip
    print("\n".join(summary_lines(manifest, args.out)))
    return 0


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


def _report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder holding results.json (written by forgetless run)")
    parser.add_argument("--out", default=None, help="report folder (default: the run folder)")


@command("report", "write tables, plots and report.html for a finished (or partial) run", _report_args,
         epilog="example:\n  forgetless report runs/demo")  # fmt: skip
def cmd_report(args: argparse.Namespace) -> int:
    from forgetless.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="a SLIM / MoE-LoRA adapter folder")
    parser.add_argument(
        "--model", default=None, help="its base model (default: the one recorded in the adapter)"
    )
    parser.add_argument(
        "--tasks", default="general", help="comma-separated tasks or suites whose prompts are routed"
    )
    parser.add_argument("--limit", type=int, default=32, help="prompts per task")
    parser.add_argument(
        "--config",
        default=None,
        help="an experiment YAML whose tasks (sequence and general) --tasks may name",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for --config (repeatable)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


@command("inspect", "SLIM routing diagnostics: identity-expert share, expert load, distances per layer", _inspect_args,
         epilog="""examples:
  forgetless inspect runs/demo/methods/slim/stage-2-glorp_arithmetic/adapter --tasks general,kelvar_dates
  forgetless inspect runs/slim_multidataset/methods/slim/stage-0-openbookqa_social_i_qa_boolq/adapter \\
      --config examples/slim_multidataset.yaml --set data_dir=../shared/data --tasks openbookqa,general""")  # fmt: skip
def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from forgetless.experiment.inspect import inspect_adapter, resolve_tasks

    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    config_tasks = None
    if args.config:
        from forgetless.config import load_config
        from forgetless.experiment.runner import load_tasks

        config = load_config(args.config, args.set)
        sequence, general = load_tasks(config)
        config_tasks = sequence + general
    elif args.set:
        raise InputError("--set overrides a --config; give --config CONFIG.yaml")
    report = inspect_adapter(
        args.adapter, resolve_tasks(names, config_tasks), model_spec=args.model, limit=args.limit
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    tasks = list(report["tasks"])
    layers = list(report["tasks"][tasks[0]]) if tasks else []
    rows = []
    for key, label in (
        ("yielded_sequences", "sequences yielded by the gate"),
        ("gate_score", "mean gate score"),
    ):
        if tasks and key in report["summary"][tasks[0]]:
            rows.append({"layer": label, **{t: f"{report['summary'][t][key]:.3f}" for t in tasks}})
    rows.append(
        {"layer": "all layers (mean)", **{t: f"{report['summary'][t]['identity_share']:.3f}" for t in tasks}}
    )
    rows += [
        {"layer": layer, **{t: f"{report['tasks'][t][layer]['identity_share']:.3f}" for t in tasks}}
        for layer in layers
    ]
    _table(rows, ["layer", *tasks], "share of tokens routed to identity experts, per task")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # command modules register themselves on import (kept lazy: heavy imports happen inside commands)
    parser = argparse.ArgumentParser(
        prog="forgetless",
        description="Add new knowledge to a language model task after task without losing what it knew.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, configure, help_text, epilog) in _COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        configure(child)
        child.set_defaults(func=func)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["lm-eval"] and not {"-h", "--help"} & set(arguments[1:2]):
        try:  # every argument is lm_eval's: argparse here would read its options as ours
            return _run_lm_eval(arguments[1:])
        except InputError as error:
            print(f"forgetless: error: {error}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as error:
        if args.debug or os.environ.get("FORGETLESS_DEBUG"):
            raise
        print(f"forgetless: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a vanished folder: one line, and what was written stays
        if args.debug or os.environ.get("FORGETLESS_DEBUG"):
            raise
        print(f"forgetless: error: {error}; nothing written before it was lost: free the space or fix "
              "the path, then re-run the same command to resume", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print("forgetless: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
