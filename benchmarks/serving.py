"""``forgetless serve`` under load: does throughput grow with concurrency, and what does SLIM's route cost?

    python benchmarks/serving.py [--slim STAGE_FOLDER] [--requests 16] [--max-tokens 32] [--out FILE]

The server runs in this process (uvicorn on a thread, one worker thread owning the model), and
clients send chat requests with the real ``openai`` client from a thread pool, greedy, each asking
for ``--max-tokens`` new tokens with no stop token (``ignore`` of EOS is not an OpenAI option, so
the replies are cut by ``max_tokens`` or stop early on EOS; tokens/s counts the tokens received).

1. **Concurrency.** The embedded base model, the general suite's first ``--requests`` prompts sent
   by 1, 4 and 8 concurrent clients (``--max-batch 8``): completion tokens per second of wall time,
   its ratio to one client at a time (dynamic batching should raise it), p50 / p99 latency; and
   transformers' ``generate`` on the same prompts one at a time, the single-stream reference.
2. **SLIM's routes** (with ``--slim``, a run's stage folder of a SLIM method): the same general
   prompts (the gate should yield them: route ``base``) and the stage's own task prompts (route
   ``experts:stage=N``), each at 1 and 8 clients, against the base model's figure for the same
   prompts, so a yielded request's cost (gate prefill, then the base path) and an in-domain
   request's (experts) are ratios measured in the same run.

3. **Soak** (``--soak`` seconds, default 120): 8 concurrent clients, one request in four a bad one;
   server errors on good requests and the RSS growth of the process over the soak.

JSON (default ``benchmarks/results/serving.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
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

    def one(text: str) -> tuple[int, str, float]:
        start = time.perf_counter()
        raw = api.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0
        )
        reply = raw.parse()
        return (
            reply.usage.completion_tokens,
            raw.headers.get("x-forgetless-route", ""),
            time.perf_counter() - start,
        )

    one(prompts[0])  # warm-up: first-call allocations
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    seconds = time.perf_counter() - start
    tokens = sum(count for count, _, _ in results)
    routes: dict[str, int] = {}
    for _, route, _ in results:
        routes[route] = routes.get(route, 0) + 1
    latencies = sorted(latency for _, _, latency in results)
    return {"clients": clients, "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "routes": routes,
            "latency_p50_s": round(latencies[len(latencies) // 2], 3),
            "latency_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)}  # fmt: skip


def _hf_generate(spec: str, prompts: list[str], max_tokens: int) -> dict:
    """transformers' own ``generate`` (greedy, one prompt at a time, KV cache) on the same chat
    prompts: the single-stream reference."""
    import torch

    from forgetless.data.formatting import PromptFormatter

    model, tokenizer = _load(spec)
    formatter = PromptFormatter(tokenizer)
    tokens, start = 0, None
    for index, text in enumerate([prompts[0]] + prompts):  # the first is a warm-up
        ids = torch.tensor([formatter.prompt_ids(text)])
        if index == 1:
            start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        if index:
            tokens += out.shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def _soak(spec: str, prompts: list[str], seconds: float, max_tokens: int) -> dict:
    """``seconds`` of 8 concurrent clients, one request in four a bad one (unknown model, malformed
    JSON, max_tokens over the limit): server errors (5xx) and the process's RSS growth."""
    import httpx
    import psutil

    from forgetless.serving import background_server, build_engine

    model, tokenizer = _load(spec)
    engine = build_engine(model, tokenizer, max_batch=8, queue_size=256)
    process = psutil.Process()
    counts = {"good": 0, "good_errors": 0, "bad": 0, "bad_5xx": 0}
    lock = threading.Lock()
    with background_server(engine, "bench", max_tokens_limit=64) as url:

        def client_loop(worker: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as http:
                request = 0
                while time.monotonic() < deadline:
                    request += 1
                    text = prompts[(worker * 7 + request) % len(prompts)]
                    body = {"model": "bench", "messages": [{"role": "user", "content": text}],
                            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
                    bad = request % 4 == 0  # one request in four, cycling through three faults
                    fault = (request // 4) % 3
                    if bad and fault == 0:
                        response = http.post("/v1/chat/completions", json=dict(body, model="nope"))
                    elif bad and fault == 1:
                        response = http.post("/v1/chat/completions", content=b"{not json")
                    elif bad:
                        response = http.post("/v1/chat/completions", json=dict(body, max_tokens=10_000))
                    else:
                        response = http.post("/v1/chat/completions", json=body)
                    with lock:
                        if not bad:
                            counts["good"] += 1
                            counts["good_errors"] += response.status_code != 200
                        else:
                            counts["bad"] += 1
                            counts["bad_5xx"] += response.status_code >= 500

        deadline = time.monotonic() + min(20.0, seconds / 6)  # warm-up: allocations settle
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client_loop, range(8)))
        rss_start = process.memory_info().rss
        deadline = time.monotonic() + seconds
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(client_loop, range(8)))
        rss_end = process.memory_info().rss
    return dict(counts, seconds=seconds, rss_start_mb=round(rss_start / 2**20, 1),
                rss_end_mb=round(rss_end / 2**20, 1), rss_growth=round(rss_end / rss_start - 1, 4))  # fmt: skip


def _measure(spec: str, groups: dict[str, list[str]], levels: list[int], max_tokens: int) -> dict:
    from forgetless.serving import background_server, build_engine

    model, tokenizer = _load(spec)
    engine = build_engine(model, tokenizer, max_batch=8, queue_size=256)
    out: dict = {}
    with background_server(engine, "bench") as url:
        for group, prompts in groups.items():
            out[group] = {}
            for clients in levels:
                batches, rows = engine.batches, engine.rows
                result = _drive(url, "bench", prompts, clients, max_tokens)
                # rows per batch: with continuous batching, requests that joined a running batch count in it
                result["rows_per_batch"] = round((engine.rows - rows) / max(1, engine.batches - batches), 2)
                out[group][str(clients)] = result
                print(spec, group, json.dumps(result), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slim", default=None, help="a SLIM method's stage folder of a finished run")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="the base model (default: the embedded one)")
    parser.add_argument("--soak", type=float, default=120.0, help="seconds of the soak (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "serving.json")
    args = parser.parse_args(argv)
    from forgetless.models import DEFAULT_MODEL

    DEFAULT_MODEL = args.model or DEFAULT_MODEL  # noqa: N806

    groups = {"general": _prompts(["general"], args.requests)}
    if args.slim:
        done = json.loads((Path(args.slim) / "done.json").read_text(encoding="utf-8"))
        groups["in_domain"] = _prompts(list(done["trained_on"]), args.requests)
    results = {"base": _measure(DEFAULT_MODEL, groups, [1, 4, 8], args.max_tokens)}
    base = results["base"]["general"]
    results["base_concurrency_speedup"] = {
        clients: round(base[clients]["tokens_per_s"] / base["1"]["tokens_per_s"], 2) for clients in base
    }
    results["hf_generate"] = _hf_generate(DEFAULT_MODEL, groups["general"], args.max_tokens)
    results["single_stream_vs_hf_generate"] = round(
        base["1"]["tokens_per_s"] / results["hf_generate"]["tokens_per_s"], 2
    )
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
    if args.soak > 0:
        results["soak"] = _soak(DEFAULT_MODEL, groups["general"], args.soak, args.max_tokens)
    print(json.dumps({k: v for k, v in results.items() if k not in ("base", "slim")}, indent=1))
    from forgetless.io import write_json

    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
