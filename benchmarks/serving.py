"""``forgetless serve`` under load: does throughput grow with concurrency, and what does SLIM's route cost?

    python benchmarks/serving.py [--slim STAGE_FOLDER] [--requests 16] [--max-tokens 32] [--out FILE]

The server runs in this process (uvicorn on a thread, one worker thread owning the model), and
clients send chat requests with the real ``openai`` client from a thread pool, greedy, each asking
for ``--max-tokens`` new tokens with no stop token (``ignore`` of EOS is not an OpenAI option, so
the replies are cut by ``max_tokens`` or stop early on EOS; tokens/s counts the tokens received).

1. **Concurrency.** The embedded base model, the general suite's first ``--requests`` prompts sent
   by 1, 4 and 8 concurrent clients (``--max-batch 8``): completion tokens per second of wall time,
   and its ratio to one client at a time (dynamic batching should raise it).
2. **SLIM's routes** (with ``--slim``, a run's stage folder of a SLIM method): the same general
   prompts (the gate should yield them: route ``base``) and the stage's own task prompts (route
   ``experts:stage=N``), each at 1 and 8 clients, against the base model's figure for the same
   prompts, so a yielded request's cost (gate prefill, then the base path) and an in-domain
   request's (experts) are ratios measured in the same run.

JSON (default ``benchmarks/results/serving.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _load(spec: str):  # noqa: ANN202
    from forgetless.evaluation.run import load_model_and_adapter

    return load_model_and_adapter(spec)


def _prompts(names: list[str], count: int) -> list[str]:
    from forgetless.tasks import expand_task_names, get_task

    texts = []
    for name in expand_task_names(names):
        texts.extend(example.prompt for example in get_task(name).test)
    return texts[:count] if count <= len(texts) else (texts * (count // len(texts) + 1))[:count]


def _drive(url: str, name: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """Send every prompt once from ``clients`` threads; tokens/s and the routes taken."""
    import openai

    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def one(text: str) -> tuple[int, str]:
        raw = api.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0
        )
        reply = raw.parse()
        return reply.usage.completion_tokens, raw.headers.get("x-forgetless-route", "")

    one(prompts[0])  # warm-up: first-call allocations
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    tokens = sum(count for count, _ in results)
    routes: dict[str, int] = {}
    for _, route in results:
        routes[route] = routes.get(route, 0) + 1
    return {"clients": clients, "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "routes": routes}  # fmt: skip


def _measure(spec: str, groups: dict[str, list[str]], levels: list[int], max_tokens: int) -> dict:
    from forgetless.serving import background_server, build_engine

    model, tokenizer = _load(spec)
    engine = build_engine(model, tokenizer, max_batch=8, queue_size=256)
    out: dict = {}
    with background_server(engine, "bench") as url:
        for group, prompts in groups.items():
            out[group] = {}
            for clients in levels:
                result = _drive(url, "bench", prompts, clients, max_tokens)
                out[group][str(clients)] = result
                print(spec, group, json.dumps(result), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slim", default=None, help="a SLIM method's stage folder of a finished run")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serving.json")
    args = parser.parse_args(argv)
    from forgetless.models import DEFAULT_MODEL

    groups = {"general": _prompts(["general"], args.requests)}
    if args.slim:
        done = json.loads((Path(args.slim) / "done.json").read_text(encoding="utf-8"))
        groups["in_domain"] = _prompts(list(done["trained_on"]), args.requests)
    results = {"base": _measure(DEFAULT_MODEL, groups, [1, 4, 8], args.max_tokens)}
    base = results["base"]["general"]
    results["base_concurrency_speedup"] = {
        clients: round(base[clients]["tokens_per_s"] / base["1"]["tokens_per_s"], 2) for clients in base
    }
    if args.slim:
        results["slim"] = _measure(args.slim, groups, [1, 8], args.max_tokens)
        results["slim_vs_base"] = {
            f"{group}_{clients}": round(
                results["slim"][group][clients]["tokens_per_s"]
                / results["base"][group][clients]["tokens_per_s"],
                2,
            )
            for group in groups
            for clients in ("1", "8")
        }
    print(
        json.dumps(
            {k: v for k, v in results.items() if not isinstance(v, dict) or "speedup" in k or "vs" in k}
        )
    )
    from forgetless.io import write_json

    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
