"""Scorers: registry contract, hand-checked values, published reference values (SARI)."""

from __future__ import annotations

import pytest

from forgetless.data.task import Example
from forgetless.errors import InputError
from forgetless.evaluation.scorers import SCORERS, get_scorer
from forgetless.evaluation.scorers._text import final_number, normalize
from forgetless.evaluation.scorers.sari import sari_sentence, tokenize_13a

EXPECTED = {
    "accuracy",
    "contains",
    "edit_similarity",
    "exact_match",
    "final_number",
    "loglik_mc",
    "rouge_l",
    "sari",
}


def score(name: str, prediction: str, answer: str, prompt: str = "Question?") -> float:
    return get_scorer(name).score(prediction, Example(prompt, answer))


def test_registry_has_every_scorer():
    assert EXPECTED <= set(SCORERS.names())


@pytest.mark.parametrize("name", [n for n, s in SCORERS.items() if s.kind == "generation"])
def test_generation_scorer_contract(name):
    """Every generation scorer: the reference itself scores 1, unrelated text scores less, all in [0, 1]."""
    reference = "The answer is 42 apples."
    perfect = score(name, reference, reference, prompt="How many apples are there in the basket?")
    wrong = score(name, "zebra crossing 7", reference, prompt="How many apples are there in the basket?")
    assert perfect == pytest.approx(1.0)
    assert 0.0 <= wrong < perfect


def test_unknown_scorer_names_the_valid_ones():
    with pytest.raises(InputError, match="Did you mean 'exact_match'"):
        get_scorer("exact_mach")


def test_normalize_follows_squad():
    assert normalize("  The  Eiffel-Tower, in PARIS! ") == "eiffel tower in paris"
    assert normalize("An apple a day") == "apple day"
    assert normalize("«Zürich»") == "zürich"


def test_exact_match_normalises():
    assert score("exact_match", "the Paris.", "Paris") == 1.0
    assert score("exact_match", "Paris, France", "Paris") == 0.0


def test_contains_needs_whole_words():
    assert score("contains", "The capital of France is Paris.", "paris") == 1.0
    assert score("contains", "Parisian food is great", "Paris") == 0.0
    assert score("contains", "It is New Delhi, of course", "New Delhi") == 1.0


def test_accuracy_reads_the_first_line_and_gold_choice():
    assert score("accuracy", "ZEPH\nbecause it is about weather", "zeph") == 1.0
    assert score("accuracy", "ZEPH: it rains", "ZEPH") == 0.0
    assert score("accuracy", "A", "A\nFigures of speech are words ...") == 1.0  # TRACE ScienceQA
    assert score("accuracy", "B", "A\nFigures of speech are words ...") == 0.0
    example = Example("Pick", "b", choices=("a", "b"), gold=1)
    assert get_scorer("accuracy").score("B.", example) == 1.0


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72.0),
        ("So she has 1,234.5 dollars.", 1234.5),
        ("The result is -3", -3.0),
        ("no digits here", None),
        ("#### 1,000\nand then 5 more", 1000.0),
    ],
)
def test_final_number_extraction(text, number):
    assert final_number(text) == number


def test_final_number_scorer():
    assert score("final_number", "7 + 5 = 12", "12") == 1.0
    assert score("final_number", "The answer is 12.0.", "Janet has ... #### 12") == 1.0
    assert score("final_number", "12 or 13", "12") == 0.0


def test_rouge_l_matches_rouge_score_on_ascii_and_keeps_unicode_words():
    from rouge_score import rouge_scorer

    reference, prediction = "the quick brown fox jumps over the lazy dog", "The quick fox jumped over a dog!"
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure
    assert score("rouge_l", prediction, reference) == pytest.approx(expected)
    # LCS of "ich gehe über die brücke" vs "ich gehe über eine brücke": 4 of 5 tokens each side
    assert score("rouge_l", "Ich gehe über eine Brücke", "ich gehe über die Brücke") == pytest.approx(0.8)


def test_edit_similarity_is_normalised_indel():
    # kitten -> sitting: Indel distance 5 over 13 characters
    assert score("edit_similarity", "kitten", "sitting") == pytest.approx(1 - 5 / 13)
    assert score("edit_similarity", "  x = 1\n", "x = 1") == 1.0


def test_sari_matches_published_values():
    """The example of the Hugging Face evaluate SARI metric card (Xu et al. 2016 definition)."""
    result = sari_sentence(
        "About 95 species are currently accepted.",
        "About 95 you now get in.",
        [
            "About 95 species are currently known.",
            "About 95 species are now accepted.",
            "95 species are now accepted.",
        ],
    )
    assert result["sari"] * 100 == pytest.approx(26.953601953601954, abs=1e-12)
    assert result["keep"] * 100 == pytest.approx(22.527472527472526)
    assert result["delete"] * 100 == pytest.approx(50.0)
    assert result["add"] * 100 == pytest.approx(8.333333333333332)
    same = "About 95 species are currently accepted ."
    assert sari_sentence(same, same, [same])["sari"] == pytest.approx(1.0)


def test_tokenize_13a_matches_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu.tokenizers.tokenizer_13a")
    tokenizer = sacrebleu.Tokenizer13a()
    for text in [
        "Hello, world! It costs $3.50-4, e.g. 1,000 people.",
        'Don\'t "x" &amp; y<z',
        "Für 20 Min: schön.",
    ]:
        assert tokenize_13a(text) == tokenizer(text).lower().split()


def test_loglik_mc_acc_and_length_normalisation():
    example = Example("Q", "a long answer", choices=("short", "a long answer"), gold=1)
    scorer = get_scorer("loglik_mc")
    # summed: -2 > -6 picks "short"; per character: -2/5 = -0.4 < -6/13 = -0.46 still "short"
    assert scorer.score([-2.0, -6.0], example) == {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 0.0}
    # summed: -3 > -5 picks "short"; per character: -0.6 < -5/13 = -0.385 picks the long one
    assert scorer.score([-3.0, -5.0], example) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    # ties go to the first choice, as numpy.argmax does
    assert scorer.score([-1.0, -1.0], Example("Q", "x", choices=("x", "y"), gold=0))["acc"] == 1.0
    assert scorer.primary == "acc"
    with pytest.raises(ValueError):
        scorer.score([-1.0], example)
