"""Which expert path a mixture layer should take: one dense product over all experts, or each expert
on its routed tokens only (sparse), at the token counts of training and prefill.

One ``MixtureLinear`` (8 LoRA experts of rank 16, top-2, SLIM's and MoE-LoRA's defaults) wraps each
of SmolLM2-135M's two linear shapes (576 -> 1536, the MLP's up/gate; 576 -> 576, q/o). Its router
is random (spread routing); both paths get the same routing, factors and inputs. For each token
count we time the layer's update (the frozen base product included, as in a forward) with autograd
(forward + backward, as in training) and without (prefill), median of ``--repeats`` alternated
rounds. ``MixtureLinear._sparse_pays`` reads the result: on CPU the dense path stays.

    python benchmarks/expert_paths.py [--out FILE] [--repeats 7] [--threads 2]

JSON: per shape and token count, ``dense_ms`` / ``sparse_ms`` with and without autograd and
``sparse_vs_dense`` (> 1: the sparse path is slower).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SHAPES = [(576, 1536), (576, 576)]
TOKENS = [64, 128, 256, 512, 1024, 2048]


def _layer(d_in: int, d_out: int):
    from forgetless.adapters import AdapterConfig, inject_adapters

    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(d_in, d_out, bias=False))
    inject_adapters(model, AdapterConfig.moe_lora(r=16, target_modules=["proj"]))
    layer = model.proj
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
        layer.router.copy_(torch.randn(layer.router.shape, generator=generator))
    return layer


def _time(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(d_in: int, d_out: int, tokens: int, repeats: int) -> dict:
    layer = _layer(d_in, d_out)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def run(path: str, grad: bool):
        def step() -> None:
            with torch.set_grad_enabled(grad):
                weights, _, chosen, _ = layer.route(x, None)
                a, b, scales = layer.expert_factors()
                if path == "dense":
                    update = layer._experts_dense(x, weights, a, b, scales)
                else:
                    update = layer._experts_sparse(x, weights, chosen, a, b, scales)
                out = layer.base_layer(x) + update
                if grad:
                    out.square().mean().backward()

        return step

    row = {}
    for grad, label in ((True, "train"), (False, "no_grad")):
        dense, sparse = [], []
        for _ in range(repeats):  # alternate so that machine noise hits both alike
            dense.append(_time(run("dense", grad), 1))
            sparse.append(_time(run("sparse", grad), 1))
        row[f"{label}_dense_ms"] = round(statistics.median(dense), 3)
        row[f"{label}_sparse_ms"] = round(statistics.median(sparse), 3)
        row[f"{label}_sparse_vs_dense"] = round(statistics.median(sparse) / statistics.median(dense), 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "expert_paths.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for d_in, d_out in SHAPES:
        for tokens in TOKENS:
            key = f"{d_in}x{d_out}_T{tokens}"
            rows[key] = measure(d_in, d_out, tokens, args.repeats)
            print(key, rows[key], flush=True)
    from forgetless.io import write_json

    result = {
        "device": "cpu",
        "threads": args.threads,
        "experts": "8 LoRA experts, r 16, top-2 (moe_lora defaults), random router",
        "repeats": args.repeats,
        "shapes": rows,
        "sparse_slower_everywhere": all(
            row[f"{label}_sparse_vs_dense"] > 1 for row in rows.values() for label in ("train", "no_grad")
        ),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
