"""What each continual strategy costs beside sequential LoRA: stage time, step time, peak memory, state.

Every strategy trains the same two stages (zorbian_topics then kelvar_dates, ``--examples`` training
items each, batch 2, ``--steps`` optimizer steps per stage, lr 2e-3, rank 16 on the MLP
projections; the full-weight ones at lr 5e-5) on SmolLM2-135M-Instruct, each in its own fresh
process so that its peak resident memory is its own. Stage 2 is the one measured: there every
method does all of its work (a teacher, a Fisher penalty, a memory gradient, a designed
subspace, generated rehearsal). The methods run one after another, in the order given, on one
machine; ratios are to ``sequential_lora`` in the same invocation.

    python benchmarks/strategy_cost.py [--out FILE] [--steps 8] [--methods ...]

JSON: per method ``stage_seconds`` (stage 2 from build to saved artifact: hooks, training, save),
``step_seconds`` (the loop's mean optimizer-step time in stage 2), ``hook_seconds`` (the stage's
wall time outside the loop's steps), ``peak_rss_mib`` (the process's peak resident memory over
both stages), ``state_mib`` (the stage folder's ``state/`` on disk) and each one's ratio or
difference to sequential_lora (``*_vs_seq_lora``, ``extra_peak_rss_mib``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
METHODS = {
    "sequential_lora": ({"r": 16, "alpha": 32}, {}),
    "sequential_fft": ({}, {"lr": 5e-5}),
    "slim": ({}, {}),
    "moe_lora": ({}, {}),
    "mixlora_dy": ({}, {}),
    "loramoe": ({}, {}),
    "mola": ({}, {}),
    "olora": ({"r": 16, "alpha": 32}, {}),
    "ewc": ({"r": 16, "alpha": 32}, {}),
    "lwf": ({"r": 16, "alpha": 32}, {}),
    "inflora": ({"r": 16, "alpha": 32}, {}),
    "osf": ({}, {"lr": 5e-5}),
    "pseudo_replay": ({"r": 16, "alpha": 32}, {}),
    "ssr": ({"r": 16, "alpha": 32}, {}),
    "replay": ({"r": 16, "alpha": 32}, {}),
    "agem": ({"r": 16, "alpha": 32}, {}),
    "ilora": ({"r": 16, "alpha": 32}, {}),
}
FULLY_COOPERATIVE = {"replay", "agem", "ilora"}


def _child(method: str, steps: int, examples: int, folder: str) -> None:
    """Train two stages of ``method`` and print one JSON line (runs in its own process)."""
    import torch

    from forgetless.tasks import get_task
    from forgetless.training import run_strategy

    torch.manual_seed(0)
    params, train = METHODS[method]
    tasks = [get_task(name).limited(train=examples, test=1) for name in ("zorbian_topics", "kelvar_dates")]
    config = {"max_steps": steps, "batch_size": 2, "lr": 2e-3, "progress": False, "max_length": 96, **train}
    setting = "fully_cooperative" if method in FULLY_COOPERATIVE else "semi_cooperative"
    starts: list[float] = []

    def mark(stage, model, tokenizer) -> None:  # noqa: ANN001
        starts.append(time.perf_counter())

    begun = time.perf_counter()
    results = run_strategy(
        method, params, "smollm2-135m-instruct", tasks, config, folder, setting, on_stage_end=mark
    )
    stage_seconds = starts[1] - starts[0] if len(starts) == 2 else time.perf_counter() - begun
    # the stage-2 wall time minus its steps is what the method does outside the loop
    step_seconds = results[1].summary["seconds"] / max(results[1].summary["steps"], 1)
    state = results[1].folder / "state"
    state_bytes = sum(p.stat().st_size for p in state.rglob("*") if p.is_file()) if state.is_dir() else 0
    print(
        json.dumps(
            {
                "stage_seconds": stage_seconds,
                "step_seconds": step_seconds,
                "hook_seconds": stage_seconds - results[1].summary["seconds"],
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "state_mib": state_bytes / 2**20,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "strategy_cost.json")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per stage")
    parser.add_argument("--examples", type=int, default=16, help="training items per task")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.steps, args.examples, args.folder)
        return 0
    methods = ["sequential_lora"] + [m for m in args.methods if m != "sequential_lora"]
    rows: dict[str, dict] = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for method in methods:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, __file__, "--child", method, "--folder", folder]
            command += ["--steps", str(args.steps), "--examples", str(args.examples)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{method} failed:\n{done.stderr[-2000:]}")
        rows[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(method, {k: round(v, 2) for k, v in rows[method].items()}, flush=True)
    peer = rows["sequential_lora"]
    for row in rows.values():
        row["stage_seconds_vs_seq_lora"] = row["stage_seconds"] / peer["stage_seconds"]
        row["step_seconds_vs_seq_lora"] = row["step_seconds"] / peer["step_seconds"]
        row["extra_peak_rss_mib"] = row["peak_rss_mib"] - peer["peak_rss_mib"]
    result = {"steps": args.steps, "examples": args.examples, "methods": rows}
    from forgetless.io import write_json

    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
