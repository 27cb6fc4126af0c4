"""``sari``: SARI for text simplification (Xu et al., 2016, TACL 4: "Optimizing Statistical Machine
Translation for Text Simplification"), as used for TRACE's 20Minuten task.

No maintained SARI package works offline (``evaluate`` downloads its metric script; ``easse`` is not
on PyPI; ``torchmetrics`` has none), so this is our implementation of the paper's definition with
the two conventions of the widely used tensor2tensor / Hugging Face ``evaluate`` variant:
0/0 counts as 1 (a reply that matches the reference exactly scores 100), and keep-recall divides
by the total count of n-grams worth keeping. Tests pin the published example values
(26.953601953601954 and 100.0 from the ``evaluate`` metric card).

For n = 1..4 over lower-cased, 13a-tokenised words, with source S, candidate C and references R
(each n-gram count multiplied by the number of references for S and C):

- keep:  F1 of precision / recall of n-grams in both S and C that the references keep,
- delete: precision of n-grams in S but not C that the references also drop,
- add:   F1 of n-grams in C but not S that appear in the references,

SARI = (mean_n keep + mean_n delete + mean_n add) / 3. A task's score is the mean over examples,
in [0, 1] (the literature reports it times 100). The source is the example's prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from forgetless.data.task import Example
from forgetless.evaluation.scorers import register_scorer

# mteval-v13a tokenisation (as sacrebleu's "13a"): split off punctuation and symbols; keep
# periods and commas inside numbers; split a dash that follows a digit.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(text: str) -> list[str]:
    """Lower-cased mteval-v13a tokens."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in text:
        text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return text.lower().split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _sari_ngram(source: Counter, candidate: Counter, references: Counter, n_refs: int) -> tuple[float, ...]:
    """(keep F1, delete precision, add F1) for one n-gram order."""
    source_rep = Counter({gram: count * n_refs for gram, count in source.items()})
    candidate_rep = Counter({gram: count * n_refs for gram, count in candidate.items()})

    kept = source_rep & candidate_rep
    kept_good = kept & references
    keep_worthy = source_rep & references
    keep_precision = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_recall = sum(kept_good.values()) / sum(keep_worthy.values()) if keep_worthy else 1.0

    deleted = source_rep - candidate_rep
    deleted_good = deleted - references
    delete_precision = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0

    added = set(candidate) - set(source)
    add_worthy = set(references) - set(source)
    added_good = added & set(references)
    add_precision = len(added_good) / len(added) if added else 1.0
    add_recall = len(added_good) / len(add_worthy) if add_worthy else 1.0
    return _f1(keep_precision, keep_recall), delete_precision, _f1(add_precision, add_recall)


def sari_sentence(
    source: str, prediction: str, references: Sequence[str], max_n: int = 4
) -> dict[str, float]:
    """SARI of one simplification, in [0, 1], with its keep / delete / add parts."""
    source_tokens, candidate_tokens = tokenize_13a(source), tokenize_13a(prediction)
    reference_tokens = [tokenize_13a(reference) for reference in references]
    parts = []
    for n in range(1, max_n + 1):
        all_references: Counter = Counter()
        for tokens in reference_tokens:
            all_references.update(_ngrams(tokens, n))
        parts.append(
            _sari_ngram(
                _ngrams(source_tokens, n), _ngrams(candidate_tokens, n), all_references, len(references)
            )
        )
    keep, delete, add = (sum(part[i] for part in parts) / max_n for i in range(3))
    return {"sari": (keep + delete + add) / 3, "keep": keep, "delete": delete, "add": add}


@register_scorer("sari")
def sari(prediction: str, example: Example) -> float:
    """SARI (Xu et al. 2016) of the reply against the reference, with the prompt as source."""
    return sari_sentence(example.prompt, prediction, [example.answer])["sari"]
