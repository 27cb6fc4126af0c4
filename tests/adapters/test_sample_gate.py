"""Sample-level yielding (SLIM's default): the gate's definition, exactness on every route, and that
a fully yielded sequence is the base model with no expert work."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import randomize_adapters, recompute_greedy

from forgetless import load_model
from forgetless.adapters import (
    AdapterConfig,
    adapter_layers,
    inject_adapters,
    load_adapter,
    save_adapter,
    set_inference_options,
)
from forgetless.adapters.gate import content_mask, prompt_boundary, prompt_mask_from_labels
from forgetless.adapters.slim import MixtureLinear
from forgetless.compat import cache_kwargs, output_cache
from forgetless.data.formatting import PromptFormatter
from forgetless.evaluation.inference import choice_loglikelihoods, generate_greedy
from forgetless.training.loss import AnswerOnlyLoss

TRAIN_TEXTS = ["zorb the glorp twice", "what does kelvar mean", "glorp 3 and 4", "name the zorbian topic"]


def _gated_model(threshold: float = 3.0, **fields):
    """A SLIM model (sample-level gate) whose clusters and moments learned on a few prompts."""
    model, tokenizer = load_model("tiny-llama", seed=0)
    config = AdapterConfig.slim(r=4, num_experts=3, yield_threshold=threshold, **fields)
    assert config.yield_pooling == "sample"
    inject_adapters(model, config, tokenizer=tokenizer)
    randomize_adapters(model, seed=3, scale=0.3)
    formatter = PromptFormatter(tokenizer)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            for text in TRAIN_TEXTS:
                prompt = formatter.prompt_ids(text)
                ids = torch.tensor([prompt + [11, 12, 13]])
                with prompt_boundary(model, torch.tensor([[True] * len(prompt) + [False] * 3])):
                    model(input_ids=ids)
    return model.eval(), tokenizer, formatter


def _gate(model):
    return next(iter(adapter_layers(model).values())).context.gate


def test_template_parts_come_from_the_chat_template():
    _, tokenizer = load_model("tiny-llama", seed=0)
    prefix, suffix = PromptFormatter(tokenizer).template_parts()
    assert tokenizer.decode(prefix).endswith("<|im_start|>user\n")
    assert tokenizer.decode(suffix) == "<|im_end|>\n<|im_start|>assistant\n"


def test_content_mask_drops_template_prefix_and_suffix_per_row():
    ids = torch.tensor([[0, 7, 8, 1, 2, 3, 5, 6], [7, 8, 9, 4, 5, 6, 40, 41]])
    prompt = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]]).bool()  # padded, answer
    mask = content_mask(ids, prompt, prefix_ids=[7, 8, 9], suffix_ids=[5, 6])
    # row 0: prefix matches 2 tokens (7, 8), suffix 5, 6 -> content 1, 2, 3
    # row 1: prefix 7, 8, 9; suffix read back from its prompt end (4, 5, 6) -> content 4
    assert mask.tolist() == [[False, False, False, True, True, True, False, False],
                             [False, False, False, True, False, False, False, False]]  # fmt: skip
    # a prompt that is all template keeps its tokens (the gate still has something to pool)
    only_template = content_mask(torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.bool), [7, 8, 9], [])
    assert only_template.all()


def test_prompt_mask_from_labels():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, -100, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    assert prompt_mask_from_labels(labels, mask).tolist() == [
        [True, True, False, False],
        [False, True, True, False],
    ]


def test_gate_score_is_the_layer_mean_of_z_scored_pooled_base_distances():
    model, tokenizer, formatter = _gated_model()
    prompt = formatter.prompt_ids("What is the capital of France?")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model(input_ids=ids)
    score = float(_gate(model).scores[0])
    # recompute by hand: every SLIM layer's input on the base path, over the content tokens
    layers = [layer for layer in adapter_layers(model).values() if isinstance(layer, MixtureLinear)]
    inputs = {}

    def keep_input(key):
        def hook(module, args, output):
            inputs.setdefault(key, args[0])

        return hook

    hooks = [layer.base_layer.register_forward_hook(keep_input(i)) for i, layer in enumerate(layers)]
    prefix, suffix = formatter.template_parts()
    content = slice(len(prefix), len(prompt) - len(suffix))
    with torch.no_grad():
        for layer in layers:
            layer.context.gate_pass, layer.context.content_mask = (
                True,
                torch.ones(1, len(prompt), dtype=torch.bool),
            )
        model.get_decoder()(input_ids=ids)  # the base path: gate_pass makes SLIM layers add nothing
        for layer in layers:
            layer.context.gate_pass, layer.context.content_mask = False, None
    for hook in hooks:
        hook.remove()
    expected = []
    for i, layer in enumerate(layers):
        distance, _ = layer.clusters(inputs[i][0, content], None, learn=False)
        expected.append(float(layer.gate_moments.standardise(distance.mean())))
    assert score == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    # the score depends on the prompt only, never on the experts
    randomize_adapters(model, seed=9, scale=0.5)
    with torch.no_grad():
        model(input_ids=ids)
    assert float(_gate(model).scores[0]) == pytest.approx(score, abs=1e-6)


def test_full_forward_with_boundary_equals_prefill_and_cached_decoding():
    model, tokenizer, formatter = _gated_model(threshold=50.0)
    prompt = formatter.prompt_ids("glorp 5 and 9, then tell me why")
    answer = [21, 22, 23, 24]
    ids = torch.tensor([prompt + answer])
    with torch.no_grad(), prompt_boundary(model, torch.tensor([[True] * len(prompt) + [False] * 4])):
        full = model(input_ids=ids).logits[0, len(prompt) - 1 :]
    with torch.no_grad():
        out = model(
            input_ids=ids[:, : len(prompt)], attention_mask=torch.ones(1, len(prompt)), use_cache=True
        )
        steps, cache = [out.logits[0, -1]], output_cache(out)
        for t in range(len(answer)):
            length = len(prompt) + t + 1
            out = model(input_ids=ids[:, length - 1 : length], attention_mask=torch.ones(1, length),
                        use_cache=True, **cache_kwargs(model, cache))  # fmt: skip
            steps.append(out.logits[0, -1])
            cache = output_cache(out)
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-5)
    # without the boundary the answer would count as prompt: another score, other logits
    with torch.no_grad():
        unmarked = model(input_ids=ids).logits[0, len(prompt) - 1 :]
    assert not torch.allclose(unmarked, full)


def test_batched_generation_with_left_padding_and_dropped_rows_equals_one_by_one():
    model, tokenizer, formatter = _gated_model(threshold=0.0)  # some prompts yield, some do not
    texts = ["Hello there, how are you doing today my friend?", "Hi", "glorp 3 and 4", "zorb the glorp"]
    prompts = [formatter.prompt_ids(text) for text in texts]
    with torch.no_grad():
        model(**{"input_ids": torch.tensor([prompts[1]])})
    free = [recompute_greedy(model, p, 6, set()) for p in prompts]
    stop = {free[1][2]} if free[1][2] not in free[0] else {free[1][1]}
    reference = [recompute_greedy(model, p, 6, stop) for p in prompts]
    batched = generate_greedy(
        model, prompts, lambda ids: tokenizer.decode(ids), max_new_tokens=6,
        pad_id=tokenizer.pad_token_id, stop_token_ids=stop, batch_size=4,
    )  # fmt: skip
    assert [list(g.token_ids) for g in batched] == reference
    # transformers' own generate() takes the same route (prefill, then cached steps)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False)
    assert hf[0, len(prompts[0]) :].tolist()[: len(free[0])] == free[0]


def test_choice_loglikelihoods_packed_and_cached_equal_a_full_forward_per_choice():
    model, tokenizer, formatter = _gated_model(threshold=50.0)
    prompts = [formatter.prompt_ids("Question one is here"), formatter.prompt_ids("glorp 2 and 2")]
    choices = [[[11, 12, 13], [14]], [[15, 16], [17, 18, 19], [20]]]
    expected = []
    for prompt, options in zip(prompts, choices):
        row = []
        for option in options:
            ids = torch.tensor([list(prompt) + option])
            boundary = torch.tensor([[True] * len(prompt) + [False] * len(option)])
            with torch.no_grad(), prompt_boundary(model, boundary):
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            row.append(sum(float(logprobs[len(prompt) - 1 + t, token]) for t, token in enumerate(option)))
        expected.append(row)
    for packed in (True, False):
        got = choice_loglikelihoods(model, prompts, choices, pad_id=tokenizer.pad_token_id, packed=packed)
        for row, reference in zip(got, expected):
            assert row == pytest.approx(reference, abs=1e-4)


def test_a_fully_yielded_sequence_is_the_base_model_and_runs_no_expert(monkeypatch):
    model, tokenizer, formatter = _gated_model(threshold=-1e9)  # every sequence yields
    base, _ = load_model("tiny-llama", seed=0)
    ids = torch.tensor([formatter.prompt_ids("What is 2 plus 2?")])

    def no_expert_work(*args, **kwargs):
        raise AssertionError("a fully yielded sequence ran expert work")

    for name in ("route", "_experts_dense", "_experts_sparse", "_sample_signal"):
        monkeypatch.setattr(MixtureLinear, name, no_expert_work)  # not even the per-token check
    monkeypatch.setattr("forgetless.adapters.slim.inference_update", no_expert_work)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
        out = model(input_ids=ids, use_cache=True)  # and cached decoding steps after the prefill
        step = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, ids.shape[1] + 1)}
        expected = base(input_ids=torch.cat([ids, step["input_ids"]], dim=1)).logits[:, -1]
        got = model(**step, past_key_values=out.past_key_values).logits[:, -1]
        torch.testing.assert_close(got, expected)
    monkeypatch.undo()
    with torch.no_grad():  # a threshold changed between prefill and decoding applies at once
        out = model(input_ids=ids, use_cache=True)
        set_inference_options(model, yield_threshold=1e9)
        got = model(**step, past_key_values=out.past_key_values).logits[:, -1]
        assert not torch.allclose(got, expected)
        set_inference_options(model, yield_threshold=-1e9)
    set_inference_options(model, yield_threshold=1e9)  # nobody yields: the experts change the output
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_training_loss_pools_over_prompts_only():
    model, tokenizer, formatter = _gated_model(threshold=50.0)
    prompt = formatter.prompt_ids("kelvar of the third moon")
    ids = torch.tensor([prompt + [30, 31]])
    labels = torch.tensor([[-100] * len(prompt) + [30, 31]])
    with torch.no_grad():
        AnswerOnlyLoss(model)(ids, torch.ones_like(ids), labels)
        from_loss = _gate(model).scores.clone()
        model(input_ids=torch.tensor([prompt]))
    torch.testing.assert_close(from_loss, _gate(model).scores)


def test_continuing_an_unseen_sequence_or_a_misaligned_batch_fails_clearly():
    model, _, formatter = _gated_model()
    _gate(model).scores = None
    with pytest.raises(RuntimeError, match="never saw"), torch.no_grad():
        model(input_ids=torch.tensor([[5]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    with torch.no_grad():
        model(input_ids=torch.tensor([formatter.prompt_ids("hello")] * 2))
    with pytest.raises(RuntimeError, match="reorder_sequence_state"), torch.no_grad():
        model(input_ids=torch.tensor([[5]] * 3), attention_mask=torch.ones(3, 30, dtype=torch.long))


def test_gate_state_and_template_survive_save_and_load(tmp_path):
    model, tokenizer, formatter = _gated_model(threshold=0.5)
    save_adapter(model, tmp_path / "adapter", "tiny-llama")
    fresh, _ = load_model("tiny-llama", seed=0)
    load_adapter(fresh, tmp_path / "adapter")
    layer = next(iter(adapter_layers(fresh).values()))
    assert layer.config.yield_pooling == "sample"
    assert layer.config.template_prefix_ids == formatter.template_parts()[0]
    assert int(layer.gate_moments.batches) == 3 * len(TRAIN_TEXTS)
    fresh.eval()
    for text in ("glorp 1 and 2", "What is the capital of Peru"):
        ids = torch.tensor([formatter.prompt_ids(text)])
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_without_identity_experts_the_gate_is_a_plain_switch_in_front_of_the_experts():
    """moe_lora with one expert, top-1 and the sample gate: LoRA on sequences the gate keeps, the
    base model on those it yields (the gate-only baseline beside SLIM)."""
    model, tokenizer = load_model("tiny-llama", seed=0)
    config = AdapterConfig.moe_lora(r=4, num_experts=1, top_k=1, yield_pooling="sample", balance_weight=0.0)
    inject_adapters(model, config, tokenizer=tokenizer)
    randomize_adapters(model, seed=3, scale=0.3)
    formatter = PromptFormatter(tokenizer)
    ungated, _ = load_model("tiny-llama", seed=0)
    inject_adapters(ungated, AdapterConfig.moe_lora(r=4, num_experts=1, top_k=1, balance_weight=0.0))
    base, _ = load_model("tiny-llama", seed=0)
    with torch.no_grad():  # same experts and router; the ungated copy has no clusters to copy
        for name, tensor in ungated.state_dict(keep_vars=True).items():
            tensor.copy_(model.state_dict()[name])
    model.eval(), ungated.eval()
    ids = torch.tensor([formatter.prompt_ids("glorp 4 and 5")])
    with torch.no_grad():
        set_inference_options(model, yield_threshold=1e9)
        torch.testing.assert_close(model(input_ids=ids).logits, ungated(input_ids=ids).logits)
        set_inference_options(model, yield_threshold=-1e9)
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)


def test_in_training_the_clusters_learn_from_the_gate_pass_only_and_nothing_yields(monkeypatch):
    from forgetless.adapters.clustering import SlidingClusters

    model, tokenizer, formatter = _gated_model(threshold=-1e9)  # would yield everything at inference
    calls = []
    original = SlidingClusters.forward

    def counted(self, *args, **kwargs):
        calls.append(next(iter(adapter_layers(model).values())).context.gate_pass)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SlidingClusters, "forward", counted)
    prompt = formatter.prompt_ids("glorp 6 and 7")
    ids = torch.tensor([prompt + [40, 41]])
    labels = torch.tensor([[-100] * len(prompt) + [40, 41]])
    model.train()
    loss_sum, _ = AnswerOnlyLoss(model)(ids, torch.ones_like(ids), labels)
    assert calls and all(calls)  # every clustering call came from the gate's base pass
    loss_sum.backward()  # and the experts were used: training never yields
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in adapter_layers(model).values())


def _gate_buffers(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.named_buffers() if "clusters" in name or "moments" in name}


def test_fitted_gate_learns_what_training_forwards_teach_and_then_skips_the_base_pass(monkeypatch):
    """Measuring the prompts before training equals the first epoch's in-forward learning exactly;
    inside the block training forwards run no base pass; after it they learn again."""
    from forgetless.adapters import fitted_gate
    from forgetless.data.batching import collate
    from forgetless.data.task import Example

    model, tokenizer = load_model("tiny-llama", seed=0)
    inject_adapters(model, AdapterConfig.slim(r=4, num_experts=3), tokenizer=tokenizer)
    reference, _ = load_model("tiny-llama", seed=0)
    inject_adapters(reference, AdapterConfig.slim(r=4, num_experts=3), tokenizer=tokenizer)
    formatter = PromptFormatter(tokenizer)
    encoded = [
        formatter.encode(Example(prompt=text, answer=f"answer {i}")) for i, text in enumerate(TRAIN_TEXTS)
    ]
    batches = [collate(encoded[i : i + 2], tokenizer.pad_token_id) for i in (0, 2)]
    reference.train()
    with torch.no_grad():  # the first epoch's training forwards, learning in the forward
        for batch in batches:
            AnswerOnlyLoss(reference)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    model.eval()
    with fitted_gate(model, iter(batches)) as measured:
        assert measured == len(TRAIN_TEXTS) and not model.training  # train mode was restored
        learned = _gate_buffers(model)
        assert learned.keys() == _gate_buffers(reference).keys()
        for name, tensor in _gate_buffers(reference).items():
            assert torch.equal(learned[name], tensor), name
        passes = []
        monkeypatch.setattr(type(_gate(model)), "_base_pass", lambda *a, **k: passes.append(1))
        model.train()
        with torch.no_grad():
            AnswerOnlyLoss(model)(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["labels"])
        assert not passes
        for name, tensor in _gate_buffers(model).items():
            assert torch.equal(learned[name], tensor), name
    monkeypatch.undo()
    with torch.no_grad():  # outside the block a training forward learns from its batch again
        AnswerOnlyLoss(model)(batches[0]["input_ids"], batches[0]["attention_mask"], batches[0]["labels"])
    assert any(not torch.equal(learned[n], t) for n, t in _gate_buffers(model).items())


def test_fitted_gate_is_a_no_op_without_the_gate():
    from forgetless.adapters import fitted_gate

    model, tokenizer = load_model("tiny-llama", seed=0)
    inject_adapters(model, AdapterConfig.moe_lora(r=4))
    batch = {
        "input_ids": torch.tensor([[1, 2]]),
        "attention_mask": torch.ones(1, 2),
        "labels": torch.tensor([[-100, 2]]),
    }
    with fitted_gate(model, iter([batch])) as measured:
        assert measured == 0
