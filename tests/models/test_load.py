import pytest
import torch

from forgetless import load_model
from forgetless.errors import InputError
from forgetless.models import model_status


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_tiny_models_are_seeded_and_small(alias):
    model, tokenizer = load_model(alias, seed=3)
    again, _ = load_model(alias, seed=3)
    other, _ = load_model(alias, seed=4)
    ids = tokenizer(["hello world"], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (model, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    blocks = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    assert blocks < 200_000
    assert tokenizer.pad_token_id is not None


def test_local_folder_round_trip(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(str(tmp_path / "m"))
    ids = tokenizer(["abc"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, atol=1e-6, rtol=0)
    assert type(tok).__name__ == type(tokenizer).__name__


def test_bad_specs_give_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="Did you mean 'tiny-llama'"):
        load_model("tiny-lama")
    with pytest.raises(InputError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="unknown dtype"):
        load_model("tiny-llama", dtype="float33")


def test_missing_package_says_what_to_install(monkeypatch):
    from forgetless.errors import MissingDependencyError
    from forgetless.models import MODELS

    alias = MODELS.get("gemma3-270m")
    monkeypatch.setattr(type(alias), "package_dir", lambda self: None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        alias.gguf_path()


def test_model_status_lists_aliases():
    rows = {row["name"]: row for row in model_status()}
    assert {"smollm2-135m-instruct", "gemma3-270m", "tiny-llama"} <= set(rows)
    assert rows["tiny-llama"]["installed"] is True


@pytest.mark.real_model
def test_default_model_answers_paris(default_model):
    from forgetless.data import PromptFormatter

    model, tokenizer = default_model
    ids = torch.tensor([PromptFormatter(tokenizer).prompt_ids("What is the capital of France?")])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.real_model
def test_default_model_loads_from_cache_quickly(default_model):
    import time

    start = time.perf_counter()
    load_model("smollm2-135m-instruct")
    # behaviour check, not a benchmark: the cached folder is used, no GGUF dequantization
    assert time.perf_counter() - start < 60
