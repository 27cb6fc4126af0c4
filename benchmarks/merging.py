"""Merging benchmark: our streaming TIES / linear merges vs mergekit, same inputs, same run.

Inputs: the default model (SmolLM2-135M-Instruct, fp32) and three models derived from it by adding
seeded task vectors (per tensor, Gaussian noise at 1% of the tensor's RMS). Each merge runs in a
fresh subprocess (so peak RSS is the merge's own), ours and mergekit alternating, ``--repeats``
times; we report medians. Both read the *same* YAML (a mergekit config is a valid forgetless
config; only the linear method is called ``average`` here). Outputs are compared tensor by tensor.

    python benchmarks/merging.py [--out FILE] [--data-dir DIR] [--repeats 3]

JSON keys: speedup_vs_mergekit (TIES: median over back-to-back pairs of mergekit seconds / ours),
peak_rss_vs_mergekit (TIES, ours / mergekit), max_abs_diff_vs_mergekit (TIES, all entries) and
max_abs_diff_vs_mergekit_outside_trim_ties (entries not tied at a model's trim cut, where the two
tools legitimately choose different equal-magnitude entries); the same for linear with a
``linear_`` prefix; absolute times and RSS; and the streaming bound (peak RSS above the post-import
baseline, in units of the largest tensor and of all inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUM_MODELS = 3


def current_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(tool: str, config_path: str, target: str) -> None:
    """Run one merge in this (fresh) process and print a JSON line with its time and memory."""
    import resource

    import yaml

    if tool == "ours":
        from forgetless.merging import load_merge_config, run_merge

        config = load_merge_config(config_path)
        baseline = current_rss()
        started = time.perf_counter()
        run_merge(config, target)
    else:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge

        config = MergeConfiguration.model_validate(yaml.safe_load(Path(config_path).read_text()))
        options = MergeOptions(cuda=False, copy_tokenizer=True, quiet=True, write_model_card=False)
        baseline = current_rss()
        started = time.perf_counter()
        run_merge(config, target, options)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline}))


def make_inputs(work: Path) -> tuple[Path, list[Path], int, int]:
    """The base folder and three derived models; returns also total and largest tensor bytes."""
    import torch

    from forgetless.merging.streaming import SafetensorsReader
    from forgetless.models import DEFAULT_MODEL, resolve_model_folder

    base = resolve_model_folder(DEFAULT_MODEL)
    reader = SafetensorsReader(base)
    sizes = [reader.infos[name].end - reader.infos[name].start for name in reader.keys()]
    variants = []
    for index in range(NUM_MODELS):
        folder = work / f"derived{index}"
        variants.append(folder)
        if (folder / "model.safetensors").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(1000 + index)
        state = {}
        for name in reader.keys():
            tensor = reader.read(name)
            if tensor.is_floating_point():
                rms = tensor.float().pow(2).mean().sqrt()
                tensor = tensor + torch.randn(tensor.shape, generator=generator) * (0.01 * rms)
            state[name] = tensor.contiguous()
        from safetensors.torch import save_file

        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        for path in base.iterdir():
            if (
                path.is_file()
                and not path.name.endswith(".safetensors")
                and path.name != "forgetless_source.json"
            ):
                shutil.copy2(path, folder / path.name)
    return base, variants, sum(sizes), max(sizes)


def write_config(path: Path, method: str, base: Path, variants: list[Path], density: float | None) -> None:
    models = []
    for folder in variants:
        parameters = {"weight": 1.0} if density is None else {"weight": 1.0, "density": density}
        models.append({"model": str(folder), "parameters": parameters})
    data = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32"}
    if method != "ties":  # a linear merge has no base (mergekit would average the base in too)
        del data["base_model"]
    else:
        data["parameters"] = {"normalize": True}
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run_child(tool: str, config: Path, target: Path) -> dict:
    if target.exists():
        shutil.rmtree(target)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", tool, "--config", str(config), "--target", str(target)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{tool} merge failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(ours: Path, theirs: Path, ties_of: dict | None = None) -> dict:
    """Max abs difference and differing entries; for TIES also outside the entries tied at a trim cut.

    TIES keeps the k largest |task vector| entries of each model. Where several entries share the
    k-th magnitude exactly, mergekit's unstable argsort keeps an arbitrary subset of them and we
    keep the lowest indices, so those entries legitimately differ. ``ties_of`` (base reader, model
    readers, density) lets us mask them out and measure the agreement everywhere else.
    """
    import torch

    from forgetless.merging.base import kth_largest
    from forgetless.merging.streaming import SafetensorsReader

    a, b = SafetensorsReader(ours), SafetensorsReader(theirs)
    names = set(a.keys())
    if names != set(b.keys()):
        raise RuntimeError(f"different tensor names: {sorted(names ^ set(b.keys()))[:5]}")
    worst, differing, worst_outside, tied_entries = 0.0, 0, 0.0, 0
    for name in sorted(names):
        x, y = a.read(name).double(), b.read(name).double()
        diff = (x - y).abs().reshape(-1)
        worst = max(worst, float(diff.max()))
        differing += int((diff > 0).sum())
        if ties_of is not None:
            base = ties_of["base"].read(name).float().reshape(-1)
            tied = torch.zeros(diff.numel(), dtype=torch.bool)
            for reader in ties_of["models"]:
                magnitude = (reader.read(name).float().reshape(-1) - base).abs()
                k = max(1, int(ties_of["density"] * magnitude.numel()))
                threshold = kth_largest(magnitude, k)
                at_cut = magnitude == threshold
                if int((magnitude >= threshold).sum()) > k:  # the cut falls inside a group of equal values
                    tied |= at_cut
            tied_entries += int(tied.sum())
            worst_outside = max(worst_outside, float(diff[~tied].max()) if (~tied).any() else 0.0)
    return {
        "max_abs_diff": worst,
        "differing_entries": differing,
        "tensors": len(names),
        "max_abs_diff_outside_trim_ties": worst_outside,
        "trim_tie_entries": tied_entries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merging.json"))
    parser.add_argument(
        "--data-dir", default=str(ROOT.parent / "shared" / "data"), help="unused (synthetic inputs)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="TIES runs per tool")
    parser.add_argument("--linear-repeats", type=int, default=6, help="linear runs per tool (they are short)")
    parser.add_argument("--work-dir", default=None, help="keep derived models here (default: a temp folder)")
    parser.add_argument("--child", choices=["ours", "mergekit"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.target)
        return

    from forgetless.merging.streaming import SafetensorsReader

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="forgetless-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    base, variants, model_bytes, largest = make_inputs(work)
    write_config(work / "ties.yaml", "ties", base, variants, density=0.2)
    write_config(work / "average.yaml", "average", base, variants, density=None)
    write_config(work / "linear.yaml", "linear", base, variants, density=None)
    configs = {"ties": {"ours": "ties.yaml", "mergekit": "ties.yaml"},
               "linear": {"ours": "average.yaml", "mergekit": "linear.yaml"}}  # fmt: skip
    repeats = {"ties": args.repeats, "linear": args.linear_repeats}
    runs: dict[str, list[dict[str, dict]]] = {"ties": [], "linear": []}
    for repeat in range(max(repeats.values())):
        for merge in ("ties", "linear"):
            if repeat >= repeats[merge]:
                continue
            # the two tools run back to back, who goes first alternates: each pair shares the load
            order = ("ours", "mergekit") if repeat % 2 == 0 else ("mergekit", "ours")
            pair = {}
            for tool in order:
                pair[tool] = run_child(tool, work / configs[merge][tool], work / f"out-{merge}-{tool}")
                print(f"repeat {repeat} {merge:6s} {tool:8s} {pair[tool]['seconds']:7.2f} s", flush=True)
            runs[merge].append(pair)

    results: dict[str, float | int | str] = {}
    for merge, prefix in (("ties", ""), ("linear", "linear_")):
        pairs = runs[merge]

        def median(tool: str, field: str, pairs: list = pairs) -> float:
            return statistics.median(pair[tool][field] for pair in pairs)

        ratios = [pair["mergekit"]["seconds"] / pair["ours"]["seconds"] for pair in pairs]
        rss_ratios = [pair["ours"]["peak_rss"] / pair["mergekit"]["peak_rss"] for pair in pairs]
        ties_of = None
        if merge == "ties":
            ties_of = {
                "base": SafetensorsReader(base),
                "models": [SafetensorsReader(v) for v in variants],
                "density": 0.2,
            }
        agreement = compare(work / f"out-{merge}-ours", work / f"out-{merge}-mergekit", ties_of)
        results[f"{prefix}speedup_vs_mergekit"] = round(statistics.median(ratios), 3)
        results[f"{prefix}speedup_per_repeat"] = ", ".join(f"{r:.2f}" for r in ratios)
        results[f"{prefix}peak_rss_vs_mergekit"] = round(statistics.median(rss_ratios), 3)
        results[f"{prefix}max_abs_diff_vs_mergekit"] = agreement["max_abs_diff"]
        results[f"{prefix}differing_entries_vs_mergekit"] = agreement["differing_entries"]
        if merge == "ties":
            results["max_abs_diff_vs_mergekit_outside_trim_ties"] = agreement[
                "max_abs_diff_outside_trim_ties"
            ]
            results["trim_tie_entries"] = agreement["trim_tie_entries"]
        results[f"{prefix}ours_seconds"] = round(median("ours", "seconds"), 3)
        results[f"{prefix}mergekit_seconds"] = round(median("mergekit", "seconds"), 3)
        results[f"{prefix}ours_peak_rss_mb"] = round(median("ours", "peak_rss") / 2**20, 1)
        results[f"{prefix}mergekit_peak_rss_mb"] = round(median("mergekit", "peak_rss") / 2**20, 1)
        increment = statistics.median(
            pair["ours"]["peak_rss"] - pair["ours"]["baseline_rss"] for pair in pairs
        )
        results[f"{prefix}ours_rss_above_baseline_mb"] = round(increment / 2**20, 1)
        results[f"{prefix}ours_rss_above_baseline_in_largest_tensors"] = round(increment / largest, 2)
        results[f"{prefix}ours_rss_above_baseline_vs_all_inputs"] = round(
            increment / (model_bytes * (NUM_MODELS + 1)), 3
        )
        results[f"{prefix}tensors_compared"] = agreement["tensors"]
        results[f"{prefix}repeats"] = len(pairs)
    results.update(
        model="smollm2-135m-instruct (fp32) + 3 derived models",
        num_models=NUM_MODELS,
        ties_density=0.2,
        model_mb=round(model_bytes / 2**20, 1),
        largest_tensor_mb=round(largest / 2**20, 1),
        note="2 shared CPU cores with other agents running; speedups are medians of back-to-back pairs",
    )
    print(f"\n{'figure':50s} value")
    for key, value in results.items():
        print(f"{key:50s} {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "src"))
    from forgetless.io import write_json

    write_json(out, results)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
