import pytest

from forgetless.errors import InputError
from forgetless.tasks import TASKS, expand_task_names, get_task, suites

NEW = ["fictional_facts", "glorp_arithmetic", "kelvar_dates", "zorbian_topics"]
GENERAL = [
    "general_arithmetic",
    "general_capitals",
    "general_commonsense",
    "general_instructions",
    "general_sequences",
]
PARAPHRASE = ["glorp_arithmetic_paraphrase", "kelvar_dates_paraphrase", "zorbian_topics_paraphrase"]


def test_suites_group_the_registry():
    groups = suites()
    assert groups["new_knowledge"] == NEW
    assert groups["general"] == GENERAL
    assert groups["paraphrase"] == PARAPHRASE
    assert sorted(TASKS.names()) == sorted(NEW + GENERAL + PARAPHRASE)
    assert expand_task_names(["general", "kelvar_dates"]) == GENERAL + ["kelvar_dates"]
    with pytest.raises(InputError, match="Did you mean 'kelvar_dates'"):
        expand_task_names(["kelvar_date"])


@pytest.mark.parametrize("name", NEW + GENERAL)
def test_tasks_are_deterministic_and_well_formed(name):
    task = get_task(name, seed=0)
    assert task.fingerprint() == get_task(name, seed=0).fingerprint()
    assert task.test and all(e.prompt and e.answer for e in task.test)
    assert task.name == name and task.metric
    if name in NEW:
        assert task.kind == "new_knowledge" and len(task.train) >= 100
        assert get_task(name, seed=1).fingerprint() != task.fingerprint()
        # the test set is never a copy of training prompts
        assert not {e.prompt for e in task.test} & {e.prompt for e in task.train}
    else:
        assert task.kind == "general" and not task.train
        # one item in three is a validation item, never a reported one
        assert len(task.validation) == (len(task.test) + len(task.validation)) // 3
        assert not {e.prompt for e in task.validation} & {e.prompt for e in task.test}


def test_general_suite_is_large_enough_to_resolve_retention():
    tasks = [get_task(name) for name in GENERAL]
    assert sum(len(t.test) for t in tasks) >= 400  # reported items
    assert sum(len(t.test) + len(t.validation) for t in tasks) >= 600


@pytest.mark.parametrize("name", PARAPHRASE)
def test_paraphrase_sets_ask_the_test_knowledge_in_other_words(name):
    original = get_task(name.removesuffix("_paraphrase"))
    paraphrase = get_task(name)
    assert not paraphrase.train and paraphrase.kind == "new_knowledge"
    assert [e.answer for e in paraphrase.test] == [e.answer for e in original.test]
    training_prompts = {e.prompt for e in original.train} | {e.prompt for e in original.test}
    assert not {e.prompt for e in paraphrase.test} & training_prompts
    # not the training template: the training prompts' first three words never start a paraphrase
    openings = {" ".join(e.prompt.split()[:3]) for e in original.train}
    assert not {" ".join(e.prompt.split()[:3]) for e in paraphrase.test} & openings


def test_fictional_facts_test_phrasing_is_held_out():
    task = get_task("fictional_facts")
    train_answers = {e.answer for e in task.train}
    assert all(e.answer in train_answers for e in task.test)  # every tested fact is taught
    assert all(e.prompt.startswith(("Which town is", "What work does")) for e in task.test)


def test_kelvar_and_glorp_rules():
    import datetime

    from forgetless.tasks.glorp_arithmetic import glorp
    from forgetless.tasks.kelvar_dates import kelvar

    assert kelvar(datetime.date(2023, 5, 17)) == "17 Elvint 523"
    assert glorp(7, 31) == "31:7" and glorp(52, 9) == "52:9"


def test_commonsense_choices_shuffled_but_gold_tracks_answer():
    task = get_task("general_commonsense")
    assert task.is_multiple_choice and len(task.test) + len(task.validation) == 48
    assert all(e.choices[e.gold] == e.answer for e in task.test)
    assert len({e.gold for e in task.test}) == 3  # gold is not always the first choice
