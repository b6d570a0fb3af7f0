"""Benchmark metrics NVLM reports, written from their published definitions (stdlib only).

Every metric scores ONE item: ``metric(prediction, references) -> float`` in [0, 1]; a benchmark score is
the mean over items. ``references`` is a list of strings (a lone string is accepted as a one-item list).

- ``vqa`` (VQAv2, TextVQA; the evaluation code of the VQA challenge on EvalAI): prediction and the human
  answers are normalised (:func:`normalize_vqa_answer`); for each of the leave-one-out subsets of the
  references the item scores ``min(1, #answers in the subset equal to the prediction / 3)``, and the item
  score is the mean over the subsets (10 subsets of 9 for the usual 10 human answers).
- ``anls`` (ST-VQA, DocVQA, InfographicVQA: Average Normalized Levenshtein Similarity): with
  ``NL = levenshtein(pred, ref) / max(len(pred), len(ref))`` on lower-cased, stripped strings, an item
  scores ``max over references of (1 - NL if NL < 0.5 else 0)``.
- ``relaxed`` (ChartQA relaxed accuracy): where prediction and reference both read as numbers the
  prediction may be off by up to 5% of the reference; otherwise the strings must match exactly
  (case-insensitive). Max over references.
- ``mc`` (AI2D, MMMU and other multiple-choice sets): the option letter is extracted from the free-form
  answer (:func:`extract_choice`: "B", "(B)", "Answer: B", "The answer is (C).", or the option's text)
  and compared with the reference letter.
- ``exact``: stripped, case-insensitive string equality with any reference.

``score(metric, prediction, references, options=None)`` dispatches by the names of :data:`METRICS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

__all__ = [
    "METRICS",
    "anls",
    "exact_match",
    "extract_choice",
    "levenshtein",
    "mc_accuracy",
    "normalize_vqa_answer",
    "relaxed_accuracy",
    "score",
    "vqa_accuracy",
]

References = str | Sequence[str]


def _as_list(references: References) -> list[str]:
    """A lone string is one reference; an empty list is a caller error (an item with nothing to match)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("no references to score against")
    return refs


# --------------------------------------------------------------------------------------------------------
# VQA answer normalisation (VQAv2 / TextVQA evaluation)
# --------------------------------------------------------------------------------------------------------

# The contraction table of the official VQA evaluation, complete and in its order. Two quirks of the
# original are kept on purpose, so that scores agree with it: the keys written with a capital "I" ("Im",
# "Ive", "Id've", "I'dve") can never match, because words are lower-cased before the look-up, and
# "somebody'd" maps to "somebodyd".
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# Number words become digits; "none" counts as zero. Only these eleven words, as in the original.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The punctuation the official code treats one mark at a time. Apostrophes, colons and periods are not in
# it: apostrophes survive (contractions need them), colons survive ("3:15"), periods are handled below.
_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# A comma between two digits ("1,000"): where the answer has one, every mark above is deleted outright.
_DIGIT_COMMA = re.compile(r"\d,\d")
# A period not followed by a digit is dropped ("dog." -> "dog", "3." -> "3", but "2.5" stays). The original
# pattern also tries a look-behind for a preceding digit, but it is misspelt ("(?!<=\d)") and matches
# everywhere, so in effect only the look-ahead counts; that effective behaviour is what is written here.
_BARE_PERIOD = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    # Rule of the original, per mark: delete it where it touches a space on either side anywhere in the
    # answer, or where the answer has a comma between digits; otherwise replace it by a space (so that
    # "black/white" splits into two words). The tests look at the answer as given, not as rewritten so far.
    digit_comma = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if digit_comma or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _BARE_PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The VQAv2/TextVQA answer normalisation of the official evaluation.

    Steps, in order: newlines and tabs become spaces, the answer is stripped and lower-cased; punctuation
    is removed or replaced by a space (see ``_strip_punctuation``; "1,000" -> "1000", "yes!" -> "yes");
    periods not followed by a digit are dropped; then per word, number words become digits ("two" -> "2",
    "none" -> "0") and the articles a/an/the are dropped; finally contractions written without an
    apostrophe get one ("dont" -> "don't"). Words are re-joined by single spaces.

    Lower-casing first is equivalent to the original's order (it lower-cases just before splitting words),
    since none of the punctuation rules depends on case.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _strip_punctuation(text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def vqa_accuracy(prediction: str, references: References) -> float:
    """VQA accuracy of one item: ``mean over leave-one-out subsets of min(1, #matches in subset / 3)``.

    With the usual 10 human answers this is the official formula (the mean over all 10 subsets of 9
    answers). With fewer references the same leave-one-out mean is taken over the given references, so the
    values differ from a 10-answer item: with n answers of which k match, the item scores
    ``(k * min(1, (k-1)/3) + (n-k) * min(1, k/3)) / n``. A single reference leaves an empty subset, which
    would score every prediction 0; for that case only, the item scores 1.0 on a match and 0.0 otherwise.

    Prediction and references are always normalised with :func:`normalize_vqa_answer`. (The original
    script skips the normalisation when all human answers are identical, so that e.g. "Yes." would not
    match ten times "yes"; this implementation, like the TextVQA evaluator and most re-implementations,
    normalises every item.)
    """
    refs = [normalize_vqa_answer(ref) for ref in _as_list(references)]
    pred = normalize_vqa_answer(prediction)
    matches = [ref == pred for ref in refs]
    if len(refs) == 1:
        return 1.0 if matches[0] else 0.0
    total = sum(matches)
    # Leaving out reference i leaves (total - matches[i]) matching answers among the others.
    subset_scores = [min(1.0, (total - int(hit)) / 3.0) for hit in matches]
    return sum(subset_scores) / len(subset_scores)


# --------------------------------------------------------------------------------------------------------
# ANLS (ST-VQA / DocVQA)
# --------------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    # Dynamic programme over prefixes, one row per character of a; row[j] = distance(a[:i], b[:j]).
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        diagonal, row[0] = row[0], i
        for j, char_b in enumerate(b, start=1):
            substitution = diagonal + (char_a != char_b)
            diagonal = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, substitution)
    return row[-1]


def anls(prediction: str, references: References, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one item (ST-VQA, DocVQA).

    ``NL = levenshtein(p, r) / max(len(p), len(r))`` on lower-cased, stripped strings; a reference scores
    ``1 - NL`` where ``NL < threshold`` and 0 otherwise; the item scores the best reference. Two empty
    strings are identical (NL = 0).
    """
    pred = prediction.strip().lower()
    best = 0.0
    for ref in _as_list(references):
        ref = ref.strip().lower()
        longest = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# --------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# --------------------------------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_GROUPED_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _parse_number(text: str) -> float | None:
    """A number as ChartQA answers write one, else None: "12", "-3.5", "1,234.5", "12.5%" (-> 12.5).

    Commas are accepted only as thousands separators ("1,234", not "1,2"). A trailing percent sign is
    dropped without rescaling, so "12.5%" and "12.5" are the same number (the pix2struct evaluator divides
    by 100 instead, which makes "12.5%" differ from a reference of "12.5").
    """
    text = text.strip()
    if text.endswith("%"):
        text = text[:-1].rstrip()
    if _GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    elif not _PLAIN_NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def relaxed_accuracy(prediction: str, references: References, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy of one item.

    Where prediction and reference both read as numbers (:func:`_parse_number`), the prediction is right
    when ``|pred - ref| / |ref| <= tolerance`` (5% by default); a reference of 0 needs a prediction of
    exactly 0. Otherwise the lower-cased, stripped strings must be equal. Max over references.
    """
    pred_text = prediction.strip().lower()
    pred_number = _parse_number(pred_text)
    for ref in _as_list(references):
        ref_text = ref.strip().lower()
        ref_number = _parse_number(ref_text)
        if pred_number is not None and ref_number is not None:
            if ref_number == 0:
                correct = pred_number == 0
            else:
                correct = abs(pred_number - ref_number) / abs(ref_number) <= tolerance
        else:
            correct = pred_text == ref_text
        if correct:
            return 1.0
    return 0.0


# --------------------------------------------------------------------------------------------------------
# Multiple choice (AI2D / MMMU)
# --------------------------------------------------------------------------------------------------------

# The whole answer is a letter, optionally dressed: "B", "b", "B.", "(B)", "B)", "[B]", "B:".
_BARE_LETTER = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:)]?")
# An announced answer: "Answer: B", "The answer is (C).", "the correct option is B". The letter must be a
# capital standing alone, so that "the answer is a dog" does not read as option A.
_ANNOUNCED_LETTER = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is))?\s*[:：]?\s*[(\[]?([A-Z])(?![A-Za-z0-9])"
)
# The answer opens with a dressed letter: "B. a cat", "(B) a cat", "B) a cat", "B: a cat".
_LEADING_LETTER = re.compile(r"[(\[]?([A-Z])(?:[)\]]|[.:)])\s")
# A parenthesised capital anywhere: "... so (C) is right".
_PAREN_LETTER = re.compile(r"[(\[]([A-Z])[)\]]")


def _clean_option_text(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def extract_choice(prediction: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter ("A", "B", ...) a free-form multiple-choice answer picks, or None.

    Tried in order, the first rule that yields a letter wins:

    1. the whole answer is a letter: "B", "b", "B.", "(B)", "B)";
    2. an announced letter: "Answer: B", "The answer is (C).", "The correct option is D";
    3. the answer opens with a dressed letter: "B. a cat", "(B) cat" (and names no other bracketed letter);
    4. the answer is, up to case, spaces and a final period, the text of one option;
    5. exactly one parenthesised capital letter occurs: "I would pick (C) here";
    6. exactly one option's text occurs in the answer as whole words (an option whose text lies inside
       another matched option's text, "cat" inside "black cat", yields to the longer one).

    Where a rule finds several different letters (or option texts) the answer is ambiguous and the result
    is None. With ``options`` given, letters beyond the last option (e.g. "E" of four options) are not
    choices; without options any letter A-Z is accepted and rules 4 and 6 are skipped.
    """
    text = prediction.strip()
    letters = [chr(ord("A") + i) for i in range(len(options or ()))]
    cleaned = [_clean_option_text(option) for option in options or ()]
    valid = set(letters) if options is not None else None

    def single(letters: list[str]) -> str | None:
        found = {letter.upper() for letter in letters}
        if valid is not None:
            found &= valid
        return found.pop() if len(found) == 1 else None

    bare = _BARE_LETTER.fullmatch(text)
    if bare and (letter := single([bare.group(1)])):
        return letter
    if letter := single(_ANNOUNCED_LETTER.findall(text)):
        return letter
    leading = _LEADING_LETTER.match(text)
    # A leading letter counts unless other bracketed letters contradict it: "(A) or (B)" is ambiguous.
    if leading and (letter := single([leading.group(1), *_PAREN_LETTER.findall(text)])):
        return letter
    if options:
        answer = _clean_option_text(text)
        if letter := single([letters[i] for i, option in enumerate(cleaned) if option and option == answer]):
            return letter
    if letter := single(_PAREN_LETTER.findall(text)):
        return letter
    if options:
        lowered = " ".join(text.lower().split())
        hits = [
            i
            for i, option in enumerate(cleaned)
            if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", lowered)
        ]
        hits = [
            i for i in hits if not any(cleaned[i] != cleaned[j] and cleaned[i] in cleaned[j] for j in hits)
        ]
        if letter := single([letters[i] for i in hits]):
            return letter
    return None


def mc_accuracy(prediction: str, references: References, options: Sequence[str] | None = None) -> float:
    """1.0 where the letter :func:`extract_choice` finds equals a reference letter (case-insensitive).

    A reference that is not a single letter but, with ``options`` given, the text of an option stands for
    that option's letter.
    """
    choice = extract_choice(prediction, options)
    if choice is None:
        return 0.0
    for ref in _as_list(references):
        ref_letter = ref.strip().rstrip(".").strip("()").upper()
        if len(ref_letter) != 1 and options:
            cleaned = _clean_option_text(ref)
            texts = [_clean_option_text(option) for option in options]
            ref_letter = chr(ord("A") + texts.index(cleaned)) if cleaned in texts else ref_letter
        if ref_letter == choice:
            return 1.0
    return 0.0


# --------------------------------------------------------------------------------------------------------
# Exact match and dispatch
# --------------------------------------------------------------------------------------------------------


def exact_match(prediction: str, references: References) -> float:
    """1.0 where the stripped prediction equals a stripped reference, ignoring case."""
    pred = prediction.strip().lower()
    return 1.0 if any(pred == ref.strip().lower() for ref in _as_list(references)) else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "vqa": vqa_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
    "mc": mc_accuracy,
    "exact": exact_match,
}


def score(
    metric: str, prediction: str, references: References, options: Sequence[str] | None = None
) -> float:
    """Score one item with the metric named ``metric`` (a key of :data:`METRICS`).

    ``options`` reaches only the "mc" metric; the other metrics ignore it, so callers may pass an item's
    options uniformly.
    """
    try:
        fn = METRICS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(sorted(METRICS))}") from None
    if metric == "mc":
        return fn(prediction, references, options=options)
    return fn(prediction, references)
