"""Contract over the registry: every registered strategy runs two stages end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from forgetless import load_model
from forgetless.strategies import STRATEGIES, make_strategy
from forgetless.training import load_stage, run_strategy


def _logits(model, tokenizer) -> torch.Tensor:
    """Logits on training prompts, chat-formatted as in training (SLIM's gate yields on text that
    looks unlike its training prompts, so raw text would see the base model)."""
    from forgetless.data import PromptFormatter

    formatter = PromptFormatter(tokenizer)
    rows = [formatter.prompt_ids(text) for text in ("alpha item 3?", "beta item 5?")]
    assert len(rows[0]) == len(rows[1])
    with torch.no_grad():
        return model(input_ids=torch.tensor(rows)).logits


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_strategy_runs_two_stages(name, two_tasks, fast_config, tmp_path):
    strategy_class = STRATEGIES.get(name)
    setting = (
        "fully_cooperative" if strategy_class.setting_required == "fully_cooperative" else "semi_cooperative"
    )
    seen = []

    def on_stage_end(stage, model, tokenizer):
        assert not model.training
        seen.append((stage, _logits(model, tokenizer)))

    results = run_strategy(
        name, {}, "tiny-llama", two_tasks, fast_config, tmp_path, setting=setting, on_stage_end=on_stage_end
    )
    assert [r.stage for r in results] == [0, 1]
    assert [r.task for r in results] == ["alpha", "beta"]
    assert [stage for stage, _ in seen] == [0, 1]
    for result in results:
        done = json.loads((result.folder / "done.json").read_text())
        assert done["strategy"] == name and done["stage"] == result.stage
        assert result.artifact.is_dir() and any(result.artifact.iterdir())
        assert not (result.folder / "checkpoint").exists()
        assert result.summary["steps"] == 3
        assert result.produces == make_strategy(name).produces
        lines = (result.folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert "beta" in results[1].trained_on

    base, tokenizer = load_model("tiny-llama")
    base_logits = _logits(base, tokenizer)
    for stage, logits in seen:
        assert not torch.allclose(logits, base_logits, atol=1e-5), f"stage {stage} left the model unchanged"
        rebuilt, _ = load_stage(results[stage])
        assert torch.allclose(_logits(rebuilt, tokenizer), logits, atol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_unknown_param_is_one_line_with_suggestion(name):
    with pytest.raises(Exception) as caught:
        make_strategy(name, {"setting_x_unknown": 1})
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message
    assert f"strategy '{name}'" in message and "setting_x_unknown" in message


def test_strategy_attributes_are_declared():
    for name, strategy_class in STRATEGIES.items():
        assert strategy_class.name == name
        assert strategy_class.setting_required in ("any", "fully_cooperative")
        assert make_strategy(name).produces in ("model", "adapter", "per_task")
    assert {name for name, cls in STRATEGIES.items() if cls.setting_required == "fully_cooperative"} == {
        "agem",
        "ilora",
        "joint",
        "replay",
    }
