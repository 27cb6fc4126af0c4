"""``forgetless serve`` and ``export``: what forgetless trains, served or exported for GPU engines."""

from __future__ import annotations

import argparse
import os

from forgetless.cli._base import command


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
