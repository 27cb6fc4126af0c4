from forgetless.data import IGNORE_INDEX, Example, PromptFormatter, collate, length_bucketed_batches


def test_chat_labels_cover_only_answer_and_end_of_turn(tokenizer):
    formatter = PromptFormatter(tokenizer)
    assert formatter.style == "chat"
    encoded = formatter.encode(Example("What is 2+2?", "4"))
    prompt = formatter.prompt_ids("What is 2+2?")
    assert encoded.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(prompt)])
    answer = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "4<|im_end|>"
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_plain_style_adds_space_and_eos(tokenizer):
    formatter = PromptFormatter(tokenizer, style="plain")
    encoded = formatter.encode(Example("Q: 2+2\nA:", "4"))
    answer = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer[:-1]) == " 4"
    assert answer[-1] == tokenizer.eos_token_id


def test_system_prompt_and_truncation(tokenizer):
    formatter = PromptFormatter(tokenizer, system_prompt="Be brief.", max_length=12)
    assert "Be brief." in formatter.prompt_text("hi")
    encoded = formatter.encode(Example("word " * 50, "yes"))
    assert len(encoded) == 12
    assert tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX]) == "yes<|im_end|>"


def test_length_buckets_cover_everything_and_are_seeded():
    lengths = [5, 50, 7, 48, 6, 49, 8, 51] * 4
    batches = length_bucketed_batches(lengths, batch_size=4, seed=1, pool_batches=8)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches == length_bucketed_batches(lengths, batch_size=4, seed=1, pool_batches=8)
    assert batches != length_bucketed_batches(lengths, batch_size=4, seed=2, pool_batches=8)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert max(spread) <= 3  # short and long never share a batch: padding stays small


def test_collate_pads_to_longest_in_batch(tokenizer):
    formatter = PromptFormatter(tokenizer)
    items = [
        formatter.encode(Example("hi", "a")),
        formatter.encode(Example("a much longer prompt here", "b")),
    ]
    batch = collate(items, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(i) for i in items))
    assert batch["attention_mask"][0].sum() == len(items[0])
    assert (batch["labels"][0, len(items[0]) :] == IGNORE_INDEX).all()
    left = collate(items, pad_id=tokenizer.pad_token_id, padding_side="left")
    assert left["attention_mask"][0, -1] == 1 and left["attention_mask"][0, 0] == 0
