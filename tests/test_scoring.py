"""Benchmark metrics: worked examples from the published definitions, computed by hand in the comments."""

from __future__ import annotations

import pytest

from converter.parity.scoring import (
    METRICS,
    anls,
    exact_match,
    extract_choice,
    levenshtein,
    mc_accuracy,
    normalize_vqa_answer,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)

# --------------------------------------------------------------------------------------------------------
# VQA normalisation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # lower-cased, then the number word becomes a digit
        ("none", "0"),  # "none" counts as zero
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten (and none) are mapped
        ("the dog.", "dog"),  # article dropped, final period stripped
        ("An apple", "apple"),
        ("a", ""),  # an answer that is only an article normalises to nothing
        ("yes!", "yes"),  # "!" is replaced by a space, then words are re-joined
        ("Yes.\n", "yes"),  # newline -> space, strip, period stripped
        ("\tno\t", "no"),
        ("dont", "don't"),  # contractions written without the apostrophe get one
        ("isnt", "isn't"),
        ("Its not", "its not"),  # "its" is not in the official table
        ("whats", "what's"),
        ("Im", "im"),  # the official "Im" key is capitalised and never matches lower-cased text
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("3.", "3"),  # one that is not is stripped
        ("black/white", "black white"),  # "/" with no space beside it becomes a space
        ("black / white", "black white"),  # "/" touching a space is deleted; the spaces collapse
        ("it's 2:30", "it's 2:30"),  # apostrophes and colons are not in the punctuation list
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_normalize_comma_between_digits():
    # Official rule: where the answer has a comma between two digits, every listed punctuation mark is
    # deleted (not replaced by a space), so the thousands separator vanishes.
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("1,000 dollars!") == "1000 dollars"
    # No digit-comma-digit: "," touching a space is deleted, words stay apart.
    assert normalize_vqa_answer("1, 000") == "1 000"
    # No space beside the comma and no digits around it: it becomes a space, splitting the words
    # ("a,b" -> "a b"), and "a" is then dropped as an article.
    assert normalize_vqa_answer("a,b") == "b"


# --------------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # 10 human answers, k of them equal the prediction. Leaving out one of the k matching answers leaves
        # k-1 matches among the other 9; leaving out one of the 10-k others leaves k. So
        #   acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
        (0, 0.0),  # (0 + 10 * 0) / 10 = 0
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10 = 3 / 10 = 0.3
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
        (4, 1.0),  # (4 * 1 + 6 * 1) / 10 = 1.0: every subset of 9 still holds >= 3 matches
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_references(k, expected):
    references = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("yes", references) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    # "Two." -> "2"; the references "2", "two", "2 " all normalise to "2": 3 matches of 10 -> 0.9.
    references = ["2", "two", "2 "] + ["3"] * 7
    assert vqa_accuracy("Two.", references) == pytest.approx(0.9)
    # The official script skips normalisation when all answers agree; here "Yes." still matches "yes".
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0


def test_vqa_accuracy_fewer_references():
    # 5 references, 2 match: leaving out a match leaves 1 -> 1/3 (twice); a non-match leaves 2 -> 2/3
    # (three times): (2 * 1/3 + 3 * 2/3) / 5 = (2/3 + 2) / 5 = (8/3) / 5 = 8/15.
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "dog", "dog"]) == pytest.approx(8 / 15)
    # 3 references, all match: each subset of 2 holds 2 matches -> 2/3.
    assert vqa_accuracy("cat", ["cat"] * 3) == pytest.approx(2 / 3)
    # A single reference leaves an empty subset; the documented fallback is a plain match.
    assert vqa_accuracy("cat", ["Cat"]) == 1.0
    assert vqa_accuracy("cat", "cat") == 1.0  # a lone string is one reference
    assert vqa_accuracy("dog", ["cat"]) == 0.0


def test_empty_references_are_an_error():
    with pytest.raises(ValueError, match="no references"):
        vqa_accuracy("yes", [])


# --------------------------------------------------------------------------------------------------------
# ANLS
# --------------------------------------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("flaw", "lawn") == 2  # -f, +n
    assert levenshtein("abc", "abc") == 0


def test_anls_exact_match_is_one():
    assert anls("invoice", ["invoice"]) == 1.0


def test_anls_one_edit_in_ten_characters():
    # levenshtein("abcdefghij", "abcdefghiX") = 1; NL = 1 / 10 = 0.1 < 0.5 -> 1 - 0.1 = 0.9
    assert anls("abcdefghij", ["abcdefghiX"]) == pytest.approx(0.9)


def test_anls_threshold():
    # "ab" vs "abcd": 2 insertions, NL = 2 / 4 = 0.5, not < 0.5 -> 0
    assert anls("ab", ["abcd"]) == 0.0
    # "abc" vs "xyz": NL = 3 / 3 = 1 -> 0
    assert anls("abc", ["xyz"]) == 0.0
    # "abc" vs "abcd": NL = 1 / 4 = 0.25 -> 0.75
    assert anls("abc", ["abcd"]) == pytest.approx(0.75)
    # A stricter threshold cuts it: NL 0.25 is not < 0.2.
    assert anls("abc", ["abcd"], threshold=0.2) == 0.0


def test_anls_ignores_case_and_surrounding_space():
    assert anls("  TOTAL ", ["total"]) == 1.0


def test_anls_takes_best_reference():
    # vs "zzzz": NL = 4/4 -> 0; vs "abcx": NL = 1/4 -> 0.75; vs "abcd": NL = 0 -> 1.0.
    # Best is 1.0; without "abcd" it is 0.75.
    assert anls("abcd", ["zzzz", "abcx", "abcd"]) == 1.0
    assert anls("abcd", ["zzzz", "abcx"]) == pytest.approx(0.75)


def test_anls_empty_strings():
    assert anls("", [""]) == 1.0  # identical
    assert anls("", ["abc"]) == 0.0  # NL = 3 / 3


# --------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("104", "100", 1.0),  # |104 - 100| / 100 = 0.04 <= 0.05
        ("96", "100", 1.0),  # 0.04 below
        ("105", "100", 1.0),  # 5 / 100 = 0.05, on the boundary: <= holds
        ("106", "100", 0.0),  # 0.06 > 0.05
        ("12.5%", "12.5", 1.0),  # the percent sign is dropped, not rescaled
        ("12.5", "12.5%", 1.0),
        ("1,050", "1000", 1.0),  # thousands separator: 1050 vs 1000 -> 0.05
        ("0", "0.0", 1.0),  # a zero reference needs exactly zero
        ("0.001", "0", 0.0),
        ("Yes", " yes", 1.0),  # not numbers: lower-cased, stripped exact match
        ("Yes.", "yes", 0.0),  # ... and nothing more lenient than that
        ("12 apples", "12", 0.0),  # not a number, so the strings must agree
    ],
)
def test_relaxed_accuracy(prediction, reference, expected):
    assert relaxed_accuracy(prediction, [reference]) == expected


def test_relaxed_accuracy_tolerance_and_max_over_references():
    assert relaxed_accuracy("106", ["100"], tolerance=0.1) == 1.0  # 0.06 <= 0.1
    assert relaxed_accuracy("106", ["50", "105"]) == 1.0  # |106 - 105| / 105 ~ 0.0095
    assert relaxed_accuracy("106", ["50", "200"]) == 0.0


# --------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------

OPTIONS = ["dog", "cat", "black cat", "bird"]


@pytest.mark.parametrize(
    "prediction",
    ["B", "b", "B.", "(B)", "B)", " B ", "Answer: B", "answer:B", "The answer is B.", "B. cat", "(B) cat"],
)
def test_extract_choice_letter_forms(prediction):
    assert extract_choice(prediction, None) == "B"
    assert extract_choice(prediction, OPTIONS) == "B"


def test_extract_choice_announced_in_a_sentence():
    assert extract_choice("The answer is (C).", None) == "C"
    assert extract_choice("Looking at the diagram, the correct option is D", OPTIONS) == "D"
    assert extract_choice("I would pick (A) here.", OPTIONS) == "A"


def test_extract_choice_option_text():
    assert extract_choice("cat", OPTIONS) == "B"  # the whole answer is option B's text
    assert extract_choice("Black Cat.", OPTIONS) == "C"  # up to case and a final period
    assert extract_choice("It is a bird.", OPTIONS) == "D"  # one option's text inside the answer
    # "cat" lies inside "black cat": the longer option wins rather than calling it ambiguous.
    assert extract_choice("It is a black cat", OPTIONS) == "C"
    # A lower-case "a" in "the answer is a dog" is an article, not option A; the option text decides.
    assert extract_choice("the answer is a dog", OPTIONS) == "A"
    assert extract_choice("cat", None) is None  # option text needs the options


def test_extract_choice_none_and_ambiguity():
    assert extract_choice("I don't know", OPTIONS) is None
    assert extract_choice("", OPTIONS) is None
    assert extract_choice("(A) or (B)", OPTIONS) is None  # two letters
    assert extract_choice("either a dog or a bird", OPTIONS) is None  # two option texts
    assert extract_choice("E", OPTIONS) is None  # four options: A-D only
    assert extract_choice("The answer is E", OPTIONS) is None
    assert extract_choice("E", None) == "E"  # without options any letter A-Z is a choice


def test_mc_accuracy():
    assert mc_accuracy("The answer is (C).", ["C"]) == 1.0
    assert mc_accuracy("The answer is (C).", "c") == 1.0  # case-insensitive reference
    assert mc_accuracy("The answer is (C).", ["B"]) == 0.0
    assert mc_accuracy("I don't know", ["A"], OPTIONS) == 0.0  # nothing extracted
    assert mc_accuracy("bird", ["D"], OPTIONS) == 1.0
    assert mc_accuracy("D", ["bird"], OPTIONS) == 1.0  # a reference given as option text


# --------------------------------------------------------------------------------------------------------
# Exact match and dispatch
# --------------------------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("  Paris ", ["paris"]) == 1.0
    assert exact_match("Paris", ["London", "PARIS"]) == 1.0
    assert exact_match("Paris.", ["paris"]) == 0.0  # no punctuation handling
    assert exact_match("Paris", ["London"]) == 0.0


def test_metrics_table():
    assert set(METRICS) == {"vqa", "anls", "relaxed", "mc", "exact"}
    assert METRICS["vqa"] is vqa_accuracy
    assert METRICS["anls"] is anls
    assert METRICS["relaxed"] is relaxed_accuracy
    assert METRICS["mc"] is mc_accuracy
    assert METRICS["exact"] is exact_match


def test_score_dispatch():
    assert score("vqa", "yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert score("anls", "abcdefghij", ["abcdefghiX"]) == pytest.approx(0.9)
    assert score("relaxed", "104", ["100"]) == 1.0
    assert score("exact", "Paris", ["paris"]) == 1.0
    assert score("mc", "bird", ["D"], options=OPTIONS) == 1.0
    assert score("mc", "bird", ["D"]) == 0.0  # without the options the text names no letter
    # Options are ignored by the other metrics, so items can be scored uniformly.
    assert score("exact", "Paris", ["paris"], options=OPTIONS) == 1.0


def test_score_unknown_metric():
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'.*anls.*vqa"):
        score("bleu", "a", ["a"])
