"""Does SLIM's distance d(x) tell general prompts from in-domain ones, per token or pooled per prompt?

    python benchmarks/prompt_pooling.py ADAPTER [--config examples/slim_multidataset.yaml]
        [--data-dir ../shared/data] [--out FILE] [--threads 1]

ADAPTER is a trained SLIM adapter folder (protocol A's:
runs/slim_multidataset/methods/slim/stage-0-openbookqa_social_i_qa_boolq/adapter). The calibrated
distance of every token is recorded in every adapted layer (the ``MixtureLinear.recorder`` hook
that ``routing_diagnostics`` uses) on the config's in-domain test prompts (40 per task) and its
general tasks' prompts (30 each), then pooled per prompt in several ways. For each pooling, the
ROC AUC of "a general prompt has the larger pooled distance" is reported for the layer-averaged
distance and per layer (median, share of layers >= 0.9 and < 0.5). docs/results.md ("Routing")
quotes these figures. The chat template's fixed prefix and suffix are found as the token runs
that every prompt shares at its start and end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from forgetless.adapters import separation_auc

ROOT = Path(__file__).resolve().parent


def _record(model, tokenizer, tasks, limit: int) -> list[tuple[list[int], torch.Tensor]]:
    """(prompt ids, (layers, tokens) calibrated distances) per prompt."""
    from forgetless.adapters import adapter_layers
    from forgetless.adapters.slim import MixtureLinear
    from forgetless.experiment.inspect import _batches

    layers = [layer for layer in adapter_layers(model).values() if isinstance(layer, MixtureLinear)]
    seen: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(layers):
        layer.recorder = lambda _l, _w, _c, distance, _m, index=index: seen.__setitem__(
            index, distance.float()
        )
    rows = []
    for task in tasks:
        task = task.limited(None, limit, 0)
        for batch in _batches(tokenizer, [example.prompt for example in task.test]):
            seen.clear()
            with torch.no_grad():
                model(**batch)
            mask = batch["attention_mask"].bool()
            distances = torch.stack([seen[i].view(mask.shape) for i in range(len(layers))])
            for row in range(mask.shape[0]):
                length = int(mask[row].sum())
                rows.append((batch["input_ids"][row, :length].tolist(), distances[:, row, :length]))
    for layer in layers:
        layer.recorder = None
    return rows


def _shared_run(prompts: list[list[int]], from_end: bool) -> int:
    length = 0
    pick = (lambda p, i: p[-1 - i]) if from_end else (lambda p, i: p[i])
    while all(len(p) > length and pick(p, length) == pick(prompts[0], length) for p in prompts):
        length += 1
    return length


def _auc_figures(in_domain: torch.Tensor, general: torch.Tensor) -> dict[str, float]:
    # in_domain, general: (prompts or tokens, layers)
    per_layer = torch.tensor(
        [separation_auc(in_domain[:, i], general[:, i]) for i in range(in_domain.shape[1])]
    )
    return {
        "auc_layer_average": separation_auc(in_domain.mean(1), general.mean(1)),
        "per_layer_median": float(per_layer.median()),
        "layers_at_least_0.9": float((per_layer >= 0.9).float().mean()),
        "layers_below_0.5": float((per_layer < 0.5).float().mean()),
        "per_layer_min": float(per_layer.min()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--config", default=str(ROOT.parent / "examples" / "slim_multidataset.yaml"))
    parser.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "prompt_pooling.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from forgetless.adapters import load_adapter
    from forgetless.config import load_config
    from forgetless.experiment.runner import load_tasks
    from forgetless.io import write_json
    from forgetless.models import load_model

    config = load_config(args.config, [f"data_dir={args.data_dir}"])
    tasks, general = load_tasks(config)
    model, tokenizer = load_model(config.model, seed=config.seed)
    load_adapter(model, args.adapter)
    model.eval()
    in_rows, general_rows = _record(model, tokenizer, tasks, 40), _record(model, tokenizer, general, 30)
    prompts = [ids for ids, _ in in_rows + general_rows]
    prefix, suffix = _shared_run(prompts, False), _shared_run(prompts, True)
    poolings = {
        "token_level": None,
        "all_prompt_tokens": lambda d: d.mean(1),
        "content_tokens": lambda d: d[:, prefix : d.shape[1] - suffix].mean(1),
        "content_and_suffix": lambda d: d[:, prefix:].mean(1),
        "last_prompt_token": lambda d: d[:, -1],
    }
    results: dict[str, object] = {
        "adapter": str(args.adapter),
        "in_domain_prompts": len(in_rows),
        "general_prompts": len(general_rows),
        "template_prefix_tokens": prefix,
        "template_suffix_tokens": suffix,
    }
    for name, pool in poolings.items():
        if pool is None:  # every token on its own: (tokens, layers)
            pooled = [torch.cat([d.T for _, d in rows]) for rows in (in_rows, general_rows)]
        else:
            pooled = [torch.stack([pool(d) for _, d in rows]) for rows in (in_rows, general_rows)]
        results[name] = _auc_figures(*pooled)
        print(f"{name:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in results[name].items()), flush=True)
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
