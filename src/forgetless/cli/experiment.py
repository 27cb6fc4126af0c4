"""``forgetless run``, ``plan``, ``demo``, ``report`` and ``inspect``: experiments and what they found."""

from __future__ import annotations

import argparse
import json

from forgetless.cli._base import _log, _table, command
from forgetless.errors import InputError


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


@command("demo", "the built-in experiment on the embedded default model (about 8 minutes on 2 CPU cores)", _demo_args,
         epilog="examples:\n  forgetless demo\n  forgetless demo --print-config > my.yaml")  # fmt: skip
def cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from forgetless.config import validate_config

    text = files("forgetless.experiment").joinpath("demo.yaml").read_text(encoding="utf-8")
    if args.print_config:
        print(text, end="")
        return 0
    from forgetless.validation import parse_yaml_mapping

    config = validate_config(parse_yaml_mapping(text, "demo.yaml", "the demo's experiment"), "demo.yaml")
    return _run_and_report(config, args.out)


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
