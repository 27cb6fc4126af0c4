"""The safetensors reader and sharded writer: round trips, sharding, private reads, size parsing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from forgetless.errors import InputError
from forgetless.merging.streaming import SafetensorsReader, ShardedWriter, parse_size


def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(600, 700, generator=generator),  # > 1 MiB: read through a mapping
        "half": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "f16": torch.randn(4, generator=generator).to(torch.float16),
        "ids": torch.arange(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def test_writer_output_is_standard_safetensors_and_reader_round_trips(tmp_path):
    state = tensors()
    plan = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()]
    writer = ShardedWriter(tmp_path, plan, max_shard_bytes=1_000_000)
    for name in reversed(list(state)):  # any order: each tensor goes to its planned offset
        writer.write(name, state[name])
    files = writer.close()
    assert len(files) == 2  # "big" (1.68 MB) exceeds the shard size and gets its own file
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    loaded = {}
    for path in files:
        loaded.update(load_file(path))  # the reference implementation reads our files
    reader = SafetensorsReader(tmp_path)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor) and torch.equal(reader.read(name), tensor)
        assert reader.dtype(name) == tensor.dtype and reader.shape(name) == tuple(tensor.shape)
    with pytest.raises(ValueError, match="written twice"):
        writer.write("ids", state["ids"])
    writer.write("ids", state["ids"] * 2, replace=True)
    assert torch.equal(SafetensorsReader(tmp_path).read("ids"), state["ids"] * 2)


def test_reads_are_private_copies(tmp_path):
    state = tensors()
    save_file(state, tmp_path / "model.safetensors")
    reader = SafetensorsReader(tmp_path)
    first = reader.read("big")
    first.add_(1.0)  # an in-place change of a mapped tensor must not reach the file
    assert torch.equal(reader.read("big"), state["big"])
    assert torch.equal(load_file(tmp_path / "model.safetensors")["big"], state["big"])


def test_unfinished_writer_and_bad_files(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    writer.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    with pytest.raises(ValueError, match="planned shape"):
        writer.write("b", torch.ones(3))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        SafetensorsReader(tmp_path / "bad")
    (tmp_path / "none").mkdir()
    with pytest.raises(InputError, match="no .safetensors weights found"):
        SafetensorsReader(tmp_path / "none")


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("64KiB") == 65536
    assert parse_size(1234) == 1234
    with pytest.raises(InputError, match="max_shard_size 'lots'"):
        parse_size("lots")
