"""FFT-MoE: Mixtral folders from tiny Llama experts load with plain transformers and match references."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from forgetless.errors import InputError
from forgetless.mixing import run_mix, validate_mix_config

IDS = torch.tensor([[1, 57, 300, 2000, 45, 9, 812], [1, 7, 7, 7, 4000, 12, 90]])


def mix(base, experts, **extra):
    data = {
        "base_model": str(base),
        "experts": [{"model": str(e), "prompts": [f"text {i}"]} for i, e in enumerate(experts)],
    }
    data.update(extra)
    return validate_mix_config(data)


def load_plain(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def reference_with_mlps(base, mlp_sources, combine):
    """Hand-built reference: the base Llama whose MLPs are replaced by ``combine`` of the experts' MLPs."""
    reference = AutoModelForCausalLM.from_pretrained(base).eval()
    experts = [AutoModelForCausalLM.from_pretrained(path).eval() for path in mlp_sources]

    class Combined(torch.nn.Module):
        def __init__(self, mlps):
            super().__init__()
            self.mlps = torch.nn.ModuleList(mlps)

        def forward(self, x):
            return combine([mlp(x) for mlp in self.mlps])

    for index, layer in enumerate(reference.model.layers):
        layer.mlp = Combined([expert.model.layers[index].mlp for expert in experts])
    return reference


@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_experts_give_the_expert_mlp_exactly(mix_folders, tmp_path, top_k):
    base, variants = mix_folders
    summary = run_mix(mix(base, [variants[0], variants[0]], top_k=top_k, router="random"), tmp_path / "moe")
    assert summary["kind"] == "fft_moe" and summary["num_experts"] == 2
    moe = load_plain(tmp_path / "moe")
    assert moe.config.num_local_experts == 2 and moe.config.num_experts_per_tok == top_k
    # routing weights over identical experts sum to one, so the MoE is the base with the expert's MLP
    reference = reference_with_mlps(base, [variants[0]], lambda outs: outs[0])
    with torch.no_grad():
        torch.testing.assert_close(moe(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)


def test_uniform_router_averages_two_different_experts(mix_folders, tmp_path):
    base, variants = mix_folders
    run_mix(mix(base, variants, router="uniform", top_k=2), tmp_path / "moe")
    moe = load_plain(tmp_path / "moe")
    reference = reference_with_mlps(base, variants, lambda outs: 0.5 * outs[0] + 0.5 * outs[1])
    with torch.no_grad():
        got, expected = moe(IDS).logits, reference(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and it is not simply the base model
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(base)(IDS).logits, atol=1e-3)


def test_hidden_router_rows_are_centred_normalised_mean_mlp_inputs(mix_folders, tmp_path):
    from forgetless import load_model

    base, variants = mix_folders
    prompts = [["The capital of Zorbia is", "Zorbian music"], ["12 plus 30 is", "Compute 7 times 6"]]
    data = {
        "base_model": str(base),
        "experts": [{"model": str(v), "prompts": p} for v, p in zip(variants, prompts)],
        "router": "hidden",
        "top_k": 1,
    }
    run_mix(validate_mix_config(data), tmp_path / "moe")
    state = load_file(tmp_path / "moe" / "model.safetensors")
    # independent computation: capture the post-attention norm output (the MLP input) with a hook
    model, tokenizer = load_model(str(base))
    captured = {}
    handle = model.model.layers[1].post_attention_layernorm.register_forward_hook(
        lambda module, args, output: captured.setdefault("x", []).append(output.detach())
    )
    means = []
    for group in prompts:
        captured.clear()
        for text in group:
            model(torch.tensor([tokenizer(text).input_ids]))
        means.append(torch.cat([x[0] for x in captured["x"]]).double().mean(dim=0))
    handle.remove()
    centred = torch.stack(means) - torch.stack(means).mean(dim=0)
    expected = (centred / centred.norm(dim=1, keepdim=True)).float()
    gate = state["model.layers.1.block_sparse_moe.gate.weight"]
    torch.testing.assert_close(gate, expected, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "moe" / "mix_config.yaml").exists()


def test_random_router_is_seeded(mix_folders, tmp_path):
    base, variants = mix_folders
    gates = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_mix(mix(base, variants, router="random", seed=seed), tmp_path / name)
        gates.append(
            load_file(tmp_path / name / "model.safetensors")["model.layers.0.block_sparse_moe.gate.weight"]
        )
    assert torch.equal(gates[0], gates[1]) and not torch.equal(gates[0], gates[2])


def test_trained_router_learns_gates_and_keeps_experts_frozen(mix_folders, tmp_path):
    base, variants = mix_folders
    config = validate_mix_config(
        {
            "base_model": str(base),
            "experts": [
                {"model": str(variants[0]), "task": "fictional_facts"},
                {"model": str(variants[1]), "task": "kelvar_dates"},
            ],
            "router": "trained",
            "top_k": 2,
            "router_training": {"steps": 8, "lr": 0.05, "batch_size": 4, "examples_per_expert": 8},
            "prompts_per_expert": 4,
        }
    )
    summary = run_mix(config, tmp_path / "trained")
    assert summary["router_steps"] == 8
    assert summary["router_loss_last"] < summary["router_loss_first"]
    run_mix(config.model_copy(update={"router": "hidden"}), tmp_path / "start")
    trained = load_file(tmp_path / "trained" / "model.safetensors")
    start = load_file(tmp_path / "start" / "model.safetensors")
    assert not torch.equal(
        trained["model.layers.0.block_sparse_moe.gate.weight"],
        start["model.layers.0.block_sparse_moe.gate.weight"],
    )
    expert = load_file(variants[1] / "model.safetensors")
    assert torch.equal(
        trained["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
        expert["model.layers.1.mlp.down_proj.weight"],
    )
    assert torch.equal(
        trained["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"]
    )
    load_plain(tmp_path / "trained")


def test_dtype_and_sharding(mix_folders, tmp_path):
    base, variants = mix_folders
    summary = run_mix(
        mix(base, variants, router="random", dtype="bfloat16", max_shard_size="2MB"), tmp_path / "moe"
    )
    assert summary["shards"] > 1
    model = load_plain(tmp_path / "moe")
    assert model.dtype == torch.bfloat16


def test_mixing_errors(mix_folders, tmp_path):
    from forgetless import load_model

    base, variants = mix_folders
    qwen, tokenizer = load_model("tiny-qwen2")
    qwen.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    cases = [
        (dict(base_model=str(tmp_path / "qwen")), r"Llama-family base .* got model_type qwen2"),
        (
            dict(
                experts=[
                    {"model": str(variants[0]), "prompts": ["x"]},
                    {"model": str(tmp_path / "qwen"), "prompts": ["y"]},
                ]
            ),
            "architecture qwen2",
        ),
        (dict(num_identity_experts=1, router="random"), "identity experts exist only in LoRA-MoE"),
    ]
    for changes, message in cases:
        config = mix(base, variants, router="random")
        config = config.model_copy(
            update={
                k: (validate_mix_config({"base_model": "x", **changes}).experts if k == "experts" else v)
                for k, v in changes.items()
            }
        )
        with pytest.raises(InputError, match=message):
            run_mix(config, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-out*"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(router="hiden"), r"unknown router 'hiden'. Did you mean 'hidden'\?"),
        (dict(top_k=3), r"top_k 3 exceeds the 2 experts"),
        (dict(router="uniform", top_k=1), r"router uniform gives every expert the same logit"),
        (
            dict(experts=[{"model": "a"}, {"model": "b", "prompts": ["x"]}]),
            r"experts.0: router hidden needs prompts or a task",
        ),
        (
            dict(router="trained", experts=[{"model": "a"}], top_k=1),
            r"router trained learns from the experts' tasks",
        ),
        (dict(toop_k=1), r"unknown key 'toop_k'. Did you mean 'top_k'\?"),
        (dict(router="trained", top_k=1), r"with top_k 1 the chosen expert always weighs 1"),
        (
            dict(experts=[{"model": "a", "promts": []}]),
            r"unknown key 'experts.0.promts'. Did you mean 'prompts'\?",
        ),
    ],
)
def test_config_errors(changes, message):
    data = {
        "base_model": "b",
        "experts": [{"model": "a", "prompts": ["x"]}, {"model": "c", "prompts": ["y"]}],
    }
    data.update(changes)
    with pytest.raises(InputError, match=message):
        validate_mix_config(data, "mix.yaml")


def test_mergekit_moe_key_names_are_accepted():
    config = validate_mix_config(
        {
            "base_model": "b",
            "gate_mode": "hidden",
            "experts_per_token": 1,
            "experts": [{"source_model": "a", "positive_prompts": ["p"], "negative_prompts": ["n"]}],
        }
    )
    assert config.router == "hidden" and config.top_k == 1
    assert config.experts[0].model == "a" and config.experts[0].prompts == ["p"]


def test_answer_loss_equals_the_model_loss(mix_folders):
    from forgetless import load_model
    from forgetless.data import Example, PromptFormatter, collate
    from forgetless.mixing.train import answer_loss

    base, _ = mix_folders
    model, tokenizer = load_model(str(base))
    formatter = PromptFormatter(tokenizer)
    batch = collate(
        [formatter.encode(Example("Who is Zorb?", "A glorp")), formatter.encode(Example("2+2?", "4"))],
        tokenizer.pad_token_id,
    )
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, batch), model(**batch).loss)
