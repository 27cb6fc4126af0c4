import json

import pytest

from forgetless.data import TaskSpec, load_records
from forgetless.errors import InputError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_json_csv_tsv_trace(tmp_path):
    write(tmp_path / "a.jsonl", '{"prompt": "p1", "answer": "a1"}\n\n{"prompt": "p2", "answer": "a2"}\n')
    write(tmp_path / "b.json", json.dumps([{"prompt": "p", "answer": "a"}]))
    write(tmp_path / "c.csv", 'prompt,answer\n"hello, world",x\n')
    write(tmp_path / "d.txt", "some text\tSports\nmore text\tScience\n")
    assert [r["answer"] for _, r in load_records(tmp_path / "a.jsonl")] == ["a1", "a2"]
    assert load_records(tmp_path / "b.json")[0][1] == {"prompt": "p", "answer": "a"}
    assert load_records(tmp_path / "c.csv")[0][1] == {"prompt": "hello, world", "answer": "x"}
    assert load_records(tmp_path / "d.txt")[1][1] == {"text": "more text", "label": "Science"}
    assert load_records(tmp_path / "b.json", "trace")[0][0].endswith("record 0")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"prompt": "ok", "answer": "a"}\n{"prompt": "broken",\n')
    with pytest.raises(InputError, match=r"bad.jsonl line 2: invalid JSON"):
        load_records(path)


def test_bad_json_and_csv(tmp_path):
    with pytest.raises(InputError, match=r"bad.json line 1: invalid JSON"):
        load_records(write(tmp_path / "bad.json", "[{"))
    with pytest.raises(InputError, match=r"bad.csv line 3: 3 columns, the header has 2"):
        load_records(write(tmp_path / "bad.csv", "prompt,answer\na,b\na,b,c\n"))
    with pytest.raises(InputError, match="TRACE records need 'prompt' and 'answer'; missing answer"):
        load_records(write(tmp_path / "t.json", '[{"prompt": "x"}]'), "trace")
    with pytest.raises(InputError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="cannot tell the data format"):
        load_records(write(tmp_path / "x.parquet", "zz"))


def test_datasets_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"q": "a", "a": "b"}])}).save_to_disk(str(tmp_path / "ds"))
    spec = TaskSpec(
        name="t",
        train=str(tmp_path / "ds"),
        test=str(tmp_path / "ds"),
        splits={"test": "train"},
        fields={"prompt": "q", "answer": "a"},
    )
    task = spec.load()
    assert task.train[0].prompt == "a" and task.test[0].answer == "b"


def test_spec_field_mapping_templates_and_choices(tmp_path):
    write(tmp_path / "mc.jsonl", json.dumps({"query": "Q?", "choices": ["x", "y"], "gold": 1}) + "\n")
    task = TaskSpec(
        name="mc",
        test=str(tmp_path / "mc.jsonl"),
        fields={"prompt": "query", "choices": "choices", "gold": "gold"},
    ).load()
    example = task.test[0]
    assert example.choices == ("x", "y") and example.gold == 1 and example.answer == "y"
    assert task.is_multiple_choice

    write(tmp_path / "la.json", json.dumps([{"instruction": "Pick", "answer": "answer2"}]))
    task = TaskSpec(
        name="la",
        test=str(tmp_path / "la.json"),
        fields={"prompt": "instruction"},
        choices=["answer1", "answer2"],
    ).load()
    assert task.test[0].gold == 1

    write(tmp_path / "tpl.jsonl", json.dumps({"question": "2+2", "n": 4}) + "\n")
    task = TaskSpec(
        name="tpl",
        test=str(tmp_path / "tpl.jsonl"),
        prompt_template="Q: {question}\nA:",
        answer_template="{n}",
    ).load()
    assert task.test[0].prompt == "Q: 2+2\nA:" and task.test[0].answer == "4"


def test_spec_errors_name_record_and_fix(tmp_path):
    write(tmp_path / "x.json", json.dumps([{"prompt": "p", "answer": "a"}, {"question": "p"}]))
    with pytest.raises(InputError, match=r"x.json record 1: missing field 'prompt' .*set fields.prompt"):
        TaskSpec(name="x", test=str(tmp_path / "x.json")).load()
    write(tmp_path / "y.json", json.dumps([{"prompt": "p", "answer": "zzz"}]))
    with pytest.raises(InputError, match="record 0: the answer 'zzz' is not one of the choices"):
        TaskSpec(name="y", test=str(tmp_path / "y.json"), choices=["a", "b"]).load()
    with pytest.raises(InputError, match=r"prompt_template uses \{nope\}"):
        TaskSpec(name="y", test=str(tmp_path / "y.json"), prompt_template="{nope}").load()
    with pytest.raises(InputError, match="no test data"):
        TaskSpec(name="z", train=str(tmp_path / "y.json")).load()


def test_trace_data_dir_and_limits(tmp_path):
    folder = tmp_path / "FOMC"
    folder.mkdir()
    rows = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(20)]
    for name in ("train", "eval", "test"):
        write(folder / f"{name}.json", json.dumps(rows))
    task = TaskSpec(name="fomc", data_dir=str(folder), format="trace", limit_train=5, limit_test=3).load()
    assert (len(task.train), len(task.test), len(task.validation)) == (5, 3, 20)
    again = TaskSpec(name="fomc", data_dir=str(folder), format="trace", limit_train=5, limit_test=3).load()
    assert task.fingerprint() == again.fingerprint()


def test_unknown_spec_key_is_rejected():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="promt"):
        TaskSpec(name="x", test="t.json", promt="oops")


def test_train_from_test_splits_disjointly(tmp_path):
    rows = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(40)]
    write(tmp_path / "t.json", json.dumps(rows))
    task = TaskSpec(name="s", test=str(tmp_path / "t.json"), train_from_test=0.25).load(seed=1)
    assert (len(task.train), len(task.test)) == (10, 30)
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.test}
    with pytest.raises(InputError, match="either train or train_from_test"):
        TaskSpec(
            name="s", train=str(tmp_path / "t.json"), test=str(tmp_path / "t.json"), train_from_test=0.5
        ).load()
