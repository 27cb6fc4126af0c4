"""The training loop: schedule, learning, determinism, NaN stop, kill-and-resume, metrics log."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import make_task

from forgetless import load_model
from forgetless.adapters import AdapterConfig, adapter_state_dict, inject_adapters
from forgetless.data import PromptFormatter
from forgetless.training import TrainConfig, TrainingDivergedError, answer_loss, lr_factor, train_model
from forgetless.training import loop as loop_module
from forgetless.training.checkpoint import CHECKPOINT_DIR


def _encoded(tokenizer, size=16):
    formatter = PromptFormatter(tokenizer, max_length=64)
    return [formatter.encode(example) for example in make_task("alpha", 3, size=size).train]


def _lora_model(seed=0, kind="lora"):
    model, _ = load_model("tiny-llama")
    config = (
        AdapterConfig.lora(r=4, alpha=8, seed=seed) if kind == "lora" else AdapterConfig.slim(r=4, seed=seed)
    )
    inject_adapters(model, config)
    return model


def _config(**overrides):
    values = {"batch_size": 4, "progress": False, "log_every": 1, "checkpoint_every": 2} | overrides
    return TrainConfig(**values)


def test_lr_schedule_values():
    # 10 steps, warm-up ceil(0.2 * 10) = 2 steps: 1/3, 2/3, then linear decay from 1 to 1/8
    factors = [lr_factor(step, 10, 0.2, "linear") for step in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[-1] == pytest.approx(1 / 8)
    assert lr_factor(5, 10, 0.0, "constant") == 1.0
    assert lr_factor(5, 10, 0.0, "cosine") == pytest.approx(0.5)


def test_training_lowers_the_answer_loss(tokenizer):
    # all weights: a tiny model's frozen random embedding caps what an adapter alone can reach
    model, _ = load_model("tiny-llama")
    summary = train_model(
        model, _encoded(tokenizer), _config(epochs=4), lr=3e-2, pad_id=tokenizer.pad_token_id
    )
    assert summary.steps == 16 and summary.epochs == 4
    assert summary.final_loss < summary.first_loss / 2
    assert summary.answer_tokens > 0 and summary.tokens > summary.answer_tokens
    assert not model.training


def test_only_trainable_parameters_change(tokenizer):
    model = _lora_model()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    train_model(model, _encoded(tokenizer), _config(max_steps=2), lr=1e-2, pad_id=tokenizer.pad_token_id)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert torch.equal(parameter, frozen[name]), name


def test_same_seed_same_numbers_other_seed_other_order(tokenizer):
    runs = []
    for seed in (0, 0, 1):
        model = _lora_model()
        summary = train_model(
            model,
            _encoded(tokenizer),
            _config(max_steps=3, seed=seed),
            lr=1e-2,
            pad_id=tokenizer.pad_token_id,
        )
        runs.append((summary.final_loss, adapter_state_dict(model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][key], runs[1][1][key]) for key in runs[0][1])
    assert runs[0][0] != runs[2][0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tokenizer, tmp_path, monkeypatch):
    model = _lora_model()
    real_forward = loop_module.AnswerOnlyLoss.forward
    calls = {"n": 0}

    def poisoned(self, input_ids, attention_mask, labels):
        calls["n"] += 1
        loss_sum, count = real_forward(self, input_ids, attention_mask, labels)
        return (loss_sum * float("nan"), count) if calls["n"] == 3 else (loss_sum, count)

    monkeypatch.setattr(loop_module.AnswerOnlyLoss, "forward", poisoned)
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 3"):
        train_model(
            model,
            _encoded(tokenizer),
            _config(max_steps=5),
            lr=1e-2,
            pad_id=tokenizer.pad_token_id,
            folder=tmp_path,
        )
    state = json.loads((tmp_path / CHECKPOINT_DIR / "state.json").read_text())
    assert state["step"] == 2 and all(value == value for value in state["losses"])  # no NaN kept


@pytest.mark.parametrize("kind", ["lora", "slim"])  # slim: cluster statistics are buffers, not parameters
def test_kill_and_resume_gives_identical_results(tokenizer, tmp_path, monkeypatch, kind):
    examples = _encoded(tokenizer)
    config = _config(max_steps=7)
    reference_model = _lora_model(kind=kind)
    reference = train_model(
        reference_model, examples, config, lr=1e-2, pad_id=tokenizer.pad_token_id, folder=tmp_path / "a"
    )

    real_factor = loop_module.lr_factor

    def killed_at_step_five(step, *args):
        if step == 5:  # steps 0-4 done; the checkpoint holds step 4: step 4's work is lost
            raise KeyboardInterrupt
        return real_factor(step, *args)

    monkeypatch.setattr(loop_module, "lr_factor", killed_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        train_model(
            _lora_model(kind=kind),
            examples,
            config,
            lr=1e-2,
            pad_id=tokenizer.pad_token_id,
            folder=tmp_path / "b",
        )
    assert json.loads((tmp_path / "b" / CHECKPOINT_DIR / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(loop_module, "lr_factor", real_factor)

    resumed_model = _lora_model(seed=123, kind=kind)  # other init: everything must come from the checkpoint
    resumed = train_model(
        resumed_model, examples, config, lr=1e-2, pad_id=tokenizer.pad_token_id, folder=tmp_path / "b"
    )
    assert resumed.resumed_from_step == 4
    assert resumed.final_loss == reference.final_loss and resumed.first_loss == reference.first_loss
    ours, theirs = adapter_state_dict(resumed_model), adapter_state_dict(reference_model)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    reference_lines = [
        json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in lines] == list(range(1, 8))
    assert [line["loss"] for line in lines] == [line["loss"] for line in reference_lines]


def test_checkpoint_from_other_settings_is_refused(tokenizer, tmp_path, monkeypatch):
    examples = _encoded(tokenizer)
    real_factor = loop_module.lr_factor

    def stop(step, *args):
        if step == 3:
            raise KeyboardInterrupt
        return real_factor(step, *args)

    monkeypatch.setattr(loop_module, "lr_factor", stop)
    with pytest.raises(KeyboardInterrupt):
        train_model(
            _lora_model(),
            examples,
            _config(max_steps=5),
            lr=1e-2,
            pad_id=0,
            folder=tmp_path,
            fingerprint="one",
        )
    monkeypatch.setattr(loop_module, "lr_factor", real_factor)
    with pytest.raises(ValueError, match="other settings"):
        train_model(
            _lora_model(),
            examples,
            _config(max_steps=5),
            lr=1e-2,
            pad_id=0,
            folder=tmp_path,
            fingerprint="two",
        )


def test_grad_accumulation_normalises_by_answer_tokens_of_the_whole_step(tokenizer, monkeypatch):
    """One SGD step of batch 4 x accumulation 2 equals a manual step on the mean loss over both micro-batches.

    SGD (not Adam, whose first step is nearly sign(g)) so that a wrong normalisation shows.
    """

    def sgd(model, lr, weight_decay):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    monkeypatch.setattr(loop_module, "_optimizer", sgd)
    examples = _encoded(tokenizer, size=8)
    config = _config(batch_size=4, grad_accum=2, max_steps=1, warmup_ratio=0.0, max_grad_norm=None)
    model = _lora_model()
    manual = _lora_model()
    batches = loop_module.length_bucketed_batches(
        [len(e) for e in examples], 4, seed=loop_module._epoch_seed(config.seed, 0)
    )
    from forgetless.data import collate

    merged = collate([examples[i] for batch in batches for i in batch], tokenizer.pad_token_id)
    train_model(model, examples, config, lr=10.0, pad_id=tokenizer.pad_token_id)
    params = [p for p in manual.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=10.0)
    answer_loss(manual, merged).backward()
    optimizer.step()
    ours, theirs = adapter_state_dict(model), adapter_state_dict(manual)
    assert any(not torch.equal(ours[key], adapter_state_dict(_lora_model())[key]) for key in ours)
    assert all(torch.allclose(ours[key], theirs[key], atol=1e-6) for key in ours)


def test_no_examples_is_an_input_error(tokenizer):
    with pytest.raises(ValueError, match="no training examples"):
        train_model(_lora_model(), [], _config(), lr=1e-3, pad_id=0)


def test_fp16_on_cpu_is_refused_with_the_fix():
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    with pytest.raises(ValueError, match="fp16 needs a GPU; use bf16 or no"):
        loop_module.make_accelerator("fp16")


def test_bf16_autocast_trains(tokenizer):
    model = _lora_model()
    dtypes = set()
    layer = model.model.layers[0].mlp.down_proj.base_layer
    handle = layer.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    summary = train_model(
        model, _encoded(tokenizer), _config(max_steps=2, mixed_precision="bf16"), lr=1e-2, pad_id=0
    )
    handle.remove()
    assert dtypes == {torch.bfloat16}  # the matmuls ran under bf16 autocast
    assert summary.steps == 2 and summary.final_loss == summary.final_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
    loop_module.make_accelerator("no")  # switching back in one process works


def test_metrics_go_to_tensorboard_when_installed(tokenizer, tmp_path, monkeypatch):
    """With a SummaryWriter importable, every metrics line is also written as scalars (a stand-in writer)."""
    import sys
    import types

    written = []

    class RecordingWriter:
        def __init__(self, log_dir, purge_step=None):
            written.append(("open", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("close",))

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter)
    )
    train_model(_lora_model(), _encoded(tokenizer), _config(max_steps=2), lr=1e-2, pad_id=0, folder=tmp_path)
    assert written[0] == ("open", str(tmp_path / "tensorboard"), 1)
    assert ("train/loss", 1) in written and ("train/loss", 2) in written and ("train/lr", 2) in written
    assert written[-1] == ("close",)


def test_a_sample_gate_measures_each_trained_prompt_once_before_the_steps(tokenizer, monkeypatch):
    """SLIM's gate statistics after two epochs equal one measurement of the first epoch's
    micro-batches; the gate's base pass runs once per such micro-batch and never in a step; with
    max_steps shorter than an epoch only the micro-batches trained on are measured."""
    from forgetless.adapters import adapter_layers, fitted_gate
    from forgetless.adapters.gate import SequenceGate
    from forgetless.data.batching import collate

    examples = _encoded(tokenizer)  # 16 examples: 4 micro-batches of 4 an epoch
    config = _config(epochs=2)
    passes: list[int] = []
    original = SequenceGate._base_pass

    def counted(self, model, context, kwargs, inputs, content):
        passes.append(inputs.shape[0])
        return original(self, model, context, kwargs, inputs, content)

    monkeypatch.setattr(SequenceGate, "_base_pass", counted)
    model = _lora_model(kind="slim")
    summary = train_model(model, examples, config, lr=1e-2, pad_id=tokenizer.pad_token_id)
    assert passes == [4, 4, 4, 4] and summary.gate_seconds > 0
    assert not next(iter(adapter_layers(model).values())).context.gate_fitted

    reference = _lora_model(kind="slim")
    lengths = [len(example) for example in examples]
    batches = [
        collate([examples[i] for i in rows], tokenizer.pad_token_id)
        for rows in loop_module.epoch_batches(lengths, config, 0)
    ]
    with fitted_gate(reference, batches):
        pass

    def gate_buffers(m):
        return {name: t for name, t in m.named_buffers() if "clusters" in name or "moments" in name}

    assert gate_buffers(reference)
    for name, tensor in gate_buffers(reference).items():
        assert torch.equal(gate_buffers(model)[name], tensor), name
    passes.clear()
    train_model(
        _lora_model(kind="slim"), examples, _config(max_steps=2), lr=1e-2, pad_id=tokenizer.pad_token_id
    )
    assert passes == [4, 4]
