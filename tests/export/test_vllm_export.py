"""``forgetless export --for vllm``: stock PEFT loads the adapters, the router decides as the gate does."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import (
    OTHER,
    STAGE_A,
    STAGE_B,
    import_file,
    logits,
    randomize,
    stock_model,
    two_stage_slim,
)

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_layers,
    inject_adapters,
    save_adapter,
    set_inference_options,
)
from forgetless.cli import main
from forgetless.data.formatting import PromptFormatter
from forgetless.export import export_model


def test_plain_lora_loads_in_stock_peft_with_the_same_logits(tmp_path, capsys):
    model, tokenizer = load_model("tiny-llama", seed=0)
    inject_adapters(
        model, AdapterConfig.lora(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    )
    randomize(model, seed=1)
    model.eval()
    save_adapter(model, tmp_path / "lora", base_model="tiny-llama")
    out = tmp_path / "out"
    argv = ["export", "tiny-llama", "--adapter", str(tmp_path / "lora"), "--for", "vllm", "--out", str(out)]
    assert main([*argv, "--calibration", "kelvar_dates", "--calibration-limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "adapters/adapter: rank 4, exact" in printed and "vllm serve base" in printed
    config = json.loads((out / "adapters" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    assert config["r"] == 4 and config["lora_alpha"] == 32.0  # alpha / r as trained
    prompt = PromptFormatter(tokenizer).prompt_ids("what does kelvar 12 mean?")
    ids = torch.tensor([prompt, list(range(20, 20 + len(prompt)))])
    torch.testing.assert_close(
        logits(stock_model(out, "adapter"), ids), logits(model, ids), atol=1e-5, rtol=1e-5
    )
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["exact"] and manifest["adapters"]["adapter"]["calibration_tasks"] == ["kelvar_dates"]
    assert manifest["gap"]["all"]["token_agreement"] == 1.0


def test_a_model_without_adapters_exports_its_base_alone(tmp_path):
    model, tokenizer = load_model("tiny-llama", seed=0)
    manifest = export_model("tiny-llama", tmp_path / "out", calibration=["kelvar_dates"], calibration_limit=1)
    assert manifest["adapters"] == {} and manifest["kind"] is None and manifest["exact"]
    assert not (tmp_path / "out" / "adapters").exists()
    ids = torch.tensor([PromptFormatter(tokenizer).prompt_ids("hello")])
    torch.testing.assert_close(
        logits(stock_model(tmp_path / "out"), ids), logits(model, ids), atol=1e-6, rtol=0
    )
    router = import_file(tmp_path / "out" / "router.py", "router_base").Router(tmp_path / "out")
    assert router.route("hello") is None and "--enable-lora" not in manifest["serve_command"]


def _forgetless_gate(model, ids):
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    layer = next(iter(adapter_layers(model).values()))
    score, stage = float(layer.context.gate.scores[0]), int(layer.context.gate.stages[0])
    return score, stage, (None if score >= layer.config.yield_threshold else f"stage{stage}")


def test_slim_per_stage_experts_export_one_adapter_per_stage_and_the_router_decides_as_the_gate(tmp_path):
    model, _, formatter = two_stage_slim()
    texts = STAGE_A + STAGE_B + OTHER
    scores = sorted(_forgetless_gate(model, formatter.prompt_ids(text))[0] for text in texts)
    set_inference_options(model, yield_threshold=(scores[-4] + scores[-3]) / 2)  # the 3 farthest yield
    save_adapter(model, tmp_path / "slim", base_model="tiny-llama")
    out = tmp_path / "out"
    manifest = export_model(
        "tiny-llama", out, adapter=tmp_path / "slim", calibration=["kelvar_dates"], calibration_limit=2
    )
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["stage0", "stage1"]
    for name in ("stage0", "stage1"):
        adapter = manifest["adapters"][name]
        assert not adapter["exact"] and adapter["rank"] == 12 and adapter["stage"] == int(name[-1])
    assert manifest["router"]["gated"] and manifest["router"]["stage_adapters"] == ["stage0", "stage1"]
    assert manifest["gap"]["all"]["sequences"] == 2 and manifest["gap"]["all"]["route_agreement"] == 1.0
    source = (out / "router.py").read_text()
    assert "forgetless" not in "".join(
        line for line in source.splitlines() if line.startswith(("import", "from"))
    )
    exported = import_file(out / "router.py", "router_slim")
    router = exported.Router(out)  # loads base/ with stock transformers
    decisions = []
    for text in texts:
        ids = formatter.prompt_ids(text)
        score, stage, route = _forgetless_gate(model, ids)
        assert router.gate(ids) == (pytest.approx(score, abs=1e-4), stage)
        assert router.route(ids) == route
        assert (
            router.prompt_ids([{"role": "user", "content": text}]) == ids
        )  # chat messages as engines format them
        decisions.append(route)
    assert {None, "stage0", "stage1"} <= set(decisions)
    assert exported.route(formatter.prompt_ids(STAGE_B[0])) == "stage1"  # the module-level shortcut


def test_a_stage_folder_calibrates_each_stage_on_its_own_tasks(tmp_path):
    from forgetless.tasks import get_task
    from forgetless.training import run_strategy

    tasks = [get_task("kelvar_dates").limited(8, 4), get_task("glorp_arithmetic").limited(8, 4)]
    train = {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False}
    results = run_strategy("slim", {"r": 4, "num_experts": 2}, "tiny-llama", tasks, train, tmp_path / "run")
    manifest = export_model(str(results[-1].folder), tmp_path / "out", calibration_limit=2)
    adapters = manifest["adapters"]
    assert [adapters[name]["calibration_tasks"] for name in ("stage0", "stage1")] == [
        ["kelvar_dates"],
        ["glorp_arithmetic"],
    ]
    assert all(adapter["gap"]["sequences"] >= 0 for adapter in adapters.values())
    assert manifest["gap"]["all"]["sequences"] == 4 and manifest["gap"]["all"]["route_agreement"] == 1.0
