"""SQuAD v2 Exact Match / F1 with answer normalisation that is right for Persian and Arabic as well as English.

    from hubforge.qa_metrics import squad_v2_scores
    scores = squad_v2_scores(predictions=["تهران", "پاسخی در متن نیست."], references=[["تهران"], []],
                             no_answer_text="پاسخی در متن نیست.")
    scores["overall"]["f1"], scores["answerable"]["exact_match"], scores["unanswerable"]["n"]

Semantics are the official SQuAD v2 evaluation script's (the `evaluate` library's `squad_v2`): per question the
maximum over the gold answers, gold answers that normalise to nothing are dropped, a question with no gold answer
has the empty string as its only correct answer, F1 between an empty and a non-empty answer is 0, and scores are
percentages. A gold/prediction pair in which neither side has Arabic-script letters or digits is normalised exactly
as the official script does, so English numbers equal the official ones. When either side has them, both sides get
the Persian/Arabic rules instead:

- NFKC (presentation forms and ligatures -> base letters); Arabic/Persian letter variants unified:
  ي ى -> ی, ك -> ک, ة ۀ ە ھ -> ه, أ إ ٱ -> ا, ؤ -> و (آ stays: it is a distinct Persian letter);
- diacritics (harakat, tanwin, shadda, sukun, superscript alef, hamza marks, Quranic marks) and tatweel removed;
- zero-width characters removed: ZWNJ joins the parts of one word (می‌روم, کتاب‌ها), so a word written with or
  without it is the same single token (written with a space instead it is two tokens, as any spaced word);
- Persian (۰-۹) and Arabic-Indic (٠-٩) digits -> ASCII;
- every Unicode punctuation character removed (« » ، ؛ ؟ ٪ ٫ ٬ ...) besides ASCII punctuation;
- English articles (a/an/the) are NOT removed: that rule is for English only.

Pure functions, no I/O.
"""
from __future__ import annotations

import collections
import re
import string
import unicodedata

NORMALIZATION_NAME = "squad_v2+fa_ar/1"
LANGS = ("auto", "en", "fa", "ar")
_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)  # the official script's rule, English only
# Arabic-script letters and the Persian / Arabic-Indic digits (a bare "۱۹۹۰" must still meet "1990").
_ARABIC_SCRIPT = re.compile(r"[\u0620-\u064A\u0660-\u0669\u066E-\u06D3\u06D5\u06EE-\u06FF\u0750-\u077F\u08A0-\u08FF"
                            r"\uFB50-\uFDFF\uFE70-\uFEFC]")
_LETTER_MAP = str.maketrans({
    "ي": "ی", "ى": "ی", "ك": "ک", "ة": "ه", "ۀ": "ه", "ە": "ه", "ھ": "ه", "أ": "ا", "إ": "ا", "ٱ": "ا", "ؤ": "و",
    # Persian and Arabic-Indic digits -> ASCII
    **{chr(0x06F0 + i): str(i) for i in range(10)}, **{chr(0x0660 + i): str(i) for i in range(10)},
})
# harakat/tanwin/shadda/sukun/hamza marks (064B-065F), superscript alef (0670), Quranic marks (0610-061A, 06D6-06ED),
# tatweel (0640); zero-width space/non-joiner/joiner, word joiner, BOM, and direction marks.
_DROP = re.compile(r"[\u064B-\u065F\u0670\u0610-\u061A\u06D6-\u06DC\u06DF-\u06E8\u06EA-\u06ED\u0640"
                   r"\u200B-\u200F\u2060\u202A-\u202E\uFEFF]")


def is_arabic_script(text: str) -> bool:
    return bool(_ARABIC_SCRIPT.search(text))


def normalize_official(text: str) -> str:
    """The official SQuAD v1.1/v2.0 normalisation: lower case, drop ASCII punctuation, articles, extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_fa_ar(text: str) -> str:
    """Persian/Arabic-aware normalisation (see the module docstring); no article removal."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _DROP.sub("", text).translate(_LETTER_MAP)
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCT and not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def normalize_answer(text: str, lang: str = "auto") -> str:
    """`auto`: Persian/Arabic rules for text with Arabic-script letters or digits, else the official English rules.
    `en` forces the official rules; `fa` / `ar` force the Persian/Arabic ones."""
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}, not {lang!r}")
    if lang == "en" or (lang == "auto" and not is_arabic_script(text)):
        return normalize_official(text)
    return normalize_fa_ar(text)


def pair_lang(gold: str, prediction: str, lang: str = "auto") -> str:
    """One rule set for both sides of a comparison: Persian/Arabic if either side is in Arabic script."""
    if lang != "auto":
        return lang
    return "fa" if is_arabic_script(gold) or is_arabic_script(prediction) else "en"


def answer_tokens(text: str, lang: str = "auto") -> list[str]:
    return normalize_answer(text, lang).split() if text else []


def exact_match(gold: str, prediction: str, lang: str = "auto") -> int:
    lang = pair_lang(gold, prediction, lang)
    return int(normalize_answer(gold, lang) == normalize_answer(prediction, lang))


def f1_score(gold: str, prediction: str, lang: str = "auto") -> float:
    lang = pair_lang(gold, prediction, lang)
    gold_toks, pred_toks = answer_tokens(gold, lang), answer_tokens(prediction, lang)
    if not gold_toks or not pred_toks:  # no-answer on either side: 1 if both are no-answer, else 0
        return float(gold_toks == pred_toks)
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def as_answer(prediction: str, no_answer_text: str | None, lang: str = "auto") -> str:
    """The model's reply as a SQuAD answer: the no-answer phrase (compared after normalisation) is the empty answer."""
    if no_answer_text and exact_match(no_answer_text, prediction, lang):
        return ""
    return prediction.strip()


def score_one(prediction: str, gold_answers: list[str], lang: str = "auto") -> tuple[int, float]:
    """(EM, F1) of one prediction: max over the gold answers; no gold answer (after normalisation) -> only '' is right."""
    golds = [a for a in gold_answers if normalize_answer(a, lang)] or [""]
    return max(exact_match(g, prediction, lang) for g in golds), max(f1_score(g, prediction, lang) for g in golds)


def _aggregate(pairs: list[tuple[int, float]]) -> dict:
    if not pairs:
        return {"exact_match": None, "f1": None, "n": 0}
    return {"exact_match": 100.0 * sum(p[0] for p in pairs) / len(pairs),
            "f1": 100.0 * sum(p[1] for p in pairs) / len(pairs), "n": len(pairs)}


def squad_v2_scores(predictions: list[str], references: list[list[str]], no_answer_text: str | None = None,
                    lang: str = "auto") -> dict:
    """EM/F1 (percent) overall and split into answerable / unanswerable (no gold answer text at all).

    `predictions[i]` is the model's reply to question i, `references[i]` its gold answer texts ([] = unanswerable).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references: every question needs "
                         "exactly one prediction")
    if not references:
        raise ValueError("no questions to score")
    answers = [as_answer(p, no_answer_text, lang) for p in predictions]
    pairs = [score_one(a, refs, lang) for a, refs in zip(answers, references)]
    has_answer = [bool(refs) for refs in references]  # as the official script splits HasAns/NoAns
    return {
        "overall": _aggregate(pairs),
        "answerable": _aggregate([p for p, h in zip(pairs, has_answer) if h]),
        "unanswerable": _aggregate([p for p, h in zip(pairs, has_answer) if not h]),
    }
