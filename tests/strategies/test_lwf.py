"""LwF: the distillation term, the teacher of each stage, and what it does to the base model's behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from forgetless import load_model
from forgetless.data import PromptFormatter
from forgetless.data.batching import collate
from forgetless.errors import InputError
from forgetless.strategies import ModelSource, make_strategy
from forgetless.strategies.context import StageContext, TrainBatch
from forgetless.strategies.lwf import distillation_loss
from forgetless.training import load_stage, run_strategy
from forgetless.training.loss import AnswerOnlyLoss


def _context(stage, model, tasks, tokenizer) -> StageContext:
    formatter = PromptFormatter(tokenizer)
    encoded = [formatter.encode(example) for example in tasks[stage].train]
    return StageContext(
        stage=stage, tasks=tasks, model=model, tokenizer=tokenizer, examples=encoded,
        pad_id=tokenizer.pad_token_id, seed=0,
    )  # fmt: skip


def _prompt_logprobs(model, tokenizer, texts) -> torch.Tensor:
    formatter = PromptFormatter(tokenizer)
    rows = [formatter.prompt_ids(text) for text in texts]
    assert len({len(row) for row in rows}) == 1
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor(rows)).logits.float(), dim=-1)


def test_distillation_loss_is_scaled_kl_from_teacher_to_student():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(5, 11, generator=generator)
    teacher = torch.randn(5, 11, generator=generator)
    for temperature in (1.0, 2.0, 0.5):
        expected = (
            F.kl_div(
                F.log_softmax(student / temperature, dim=-1),
                F.log_softmax(teacher / temperature, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            * temperature**2
        )
        assert distillation_loss(student, teacher, temperature).item() == pytest.approx(
            expected.item(), rel=1e-5
        )
    assert distillation_loss(student, teacher, 2.0).item() > 0
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # by hand, T = 1: teacher (1/2, 1/2), student (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    hand = distillation_loss(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]]), 1.0)
    assert hand.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # bf16 logits are computed in float32; no rows -> 0
    assert distillation_loss(student.bfloat16(), teacher, 1.0).dtype == torch.float32
    assert distillation_loss(torch.zeros(0, 11), torch.zeros(0, 11), 2.0).item() == 0.0


def test_params_modes_and_errors():
    strategy = make_strategy("lwf", {"lambda": 3, "temperature": 1.5, "r": 4})
    assert strategy.describe()["params"] == {"mode": "lora", "lambda": 3.0, "temperature": 1.5, "r": 4}
    assert strategy.produces == "adapter" and strategy.engine.continuation == "merge"
    fft = make_strategy("lwf", {"mode": "fft"})
    assert fft.produces == "model" and fft.engine.continuation == "continue" and fft.default_lr == 2e-5
    with pytest.raises(InputError, match="temperature"):
        make_strategy("lwf", {"temperature": 0})
    with pytest.raises(InputError, match="lambda"):
        make_strategy("lwf", {"lambda": -1})
    with pytest.raises(InputError, match="mode is fft"):
        make_strategy("lwf", {"mode": "fft", "r": 4})


def test_lambda_zero_builds_no_teacher_and_adds_nothing(two_tasks):
    strategy = make_strategy("lwf", {"lambda": 0, "r": 4})
    source = ModelSource("tiny-llama")
    model = strategy.build(0, source, [], seed=0)
    strategy.before_training(_context(0, model, two_tasks, source.tokenizer))
    assert strategy.teacher is None
    batch = TrainBatch({}, torch.zeros(3, 7), torch.zeros(1, 3, dtype=torch.bool))
    assert strategy.extra_loss(model, batch) is None


@pytest.mark.parametrize("mode", ["lora", "fft"])
def test_teacher_at_stage_one_is_the_model_after_stage_zero(mode, two_tasks, fast_config, tmp_path):
    params = {"mode": mode, **({"r": 4} if mode == "lora" else {})}
    results = run_strategy("lwf", params, "tiny-llama", two_tasks[:1], fast_config, tmp_path)
    strategy = make_strategy("lwf", params)
    source = ModelSource("tiny-llama")
    model = strategy.build(1, source, [results[0].artifact], seed=0)
    context = _context(1, model, two_tasks, source.tokenizer)
    strategy.before_training(context)
    teacher = strategy.teacher
    assert teacher is not None and teacher is not model and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    after_zero, tokenizer = load_stage(results[0])
    texts = ["alpha item 2?", "beta item 3?"]
    expected = _prompt_logprobs(after_zero, tokenizer, texts)
    assert torch.allclose(_prompt_logprobs(teacher, tokenizer, texts), expected, atol=1e-5)
    assert not torch.allclose(expected, _prompt_logprobs(load_model("tiny-llama")[0], tokenizer, texts))
    strategy.after_training(context)
    assert strategy.teacher is None


def test_gradient_reaches_trainable_parameters_only(two_tasks):
    strategy = make_strategy("lwf", {"lambda": 2.0, "temperature": 2.0, "r": 4})
    source = ModelSource("tiny-llama")
    model = strategy.build(0, source, [], seed=0)
    context = _context(0, model, two_tasks, source.tokenizer)
    strategy.before_training(context)
    inputs = collate(context.examples[:4], context.pad_id)
    forward = AnswerOnlyLoss(model, with_logits=True)
    _, _, logits, keep = forward(**inputs)
    # stage 0's teacher is the base model: a fresh adapter (B = 0) agrees with it
    assert strategy.extra_loss(model, TrainBatch(inputs, logits, keep)).item() == pytest.approx(0, abs=1e-5)
    with torch.no_grad():  # move the student away from the teacher
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
    _, _, logits, keep = forward(**inputs)
    extra = strategy.extra_loss(model, TrainBatch(inputs, logits, keep))
    with torch.no_grad():
        target = strategy.teacher(**{k: inputs[k] for k in ("input_ids", "attention_mask")}).logits[keep]
    assert extra.item() == pytest.approx(2.0 * distillation_loss(logits, target, 2.0).item(), rel=1e-4)
    assert extra.item() > 0
    extra.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(not p.requires_grad and p.grad is None for p in strategy.teacher.parameters())


def test_distillation_keeps_the_other_task_closer_to_the_base(two_tasks, fast_config, tmp_path):
    """Stage 0 trains alpha; on beta's prompts (never trained) a strong LwF term stays nearer the base."""
    base, tokenizer = load_model("tiny-llama")
    texts = [f"beta item {index}?" for index in range(4)]
    reference = _prompt_logprobs(base, tokenizer, texts)
    drift = {}
    for weight in (0.0, 100.0):
        results = run_strategy(
            "lwf",
            {"lambda": weight, "r": 4},
            "tiny-llama",
            two_tasks[:1],
            fast_config,
            tmp_path / str(weight),
        )
        after = _prompt_logprobs(load_stage(results[0])[0], tokenizer, texts)
        drift[weight] = (reference.exp() * (reference - after)).sum(-1).mean().item()  # KL(base || after)
    assert drift[0.0] > 0
    assert drift[100.0] < 0.7 * drift[0.0]
