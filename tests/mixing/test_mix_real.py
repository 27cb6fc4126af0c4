"""The real default model (SmolLM2-135M, Llama) as a one-expert Mixtral: same logits as the model itself."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.real_model
def test_smollm2_as_a_mixtral_keeps_its_logits(default_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from forgetless.mixing import run_mix, validate_mix_config
    from forgetless.models import DEFAULT_MODEL

    model, tokenizer = default_model
    config = validate_mix_config(
        {"base_model": DEFAULT_MODEL, "experts": [{"model": DEFAULT_MODEL}], "router": "uniform", "top_k": 1}
    )
    run_mix(config, tmp_path / "moe")
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
