"""LaTeX OCR metrics, computed the way the field's reference evaluations compute them.

- `bleu`: corpus BLEU-4 with sacrebleu's 13a tokenizer (what UniMERNet, texify and pix2tex report), as a 0-1 score.
- `edit_distance`: per row, character Levenshtein distance / the longer string's length; averaged over rows.
- `exact_match`: equal once all whitespace is removed.
- `token_exact_match`, `token_edit_distance`: the same on canonical LaTeX tokens (`\\frac`, `{`, `1`, ...), so
  `\\frac{1}{2}` and the dataset's spaced `\\frac { 1 } { 2 }` are the same sequence.

Raw figures compare the strings as written. Figures suffixed `_normalized` first apply `normalize_latex`, the
whitespace normalization of UniMERNet's `normalize_text` / pix2tex's `post_process`, as published results do.
"""

from __future__ import annotations

import re

# `\mathrm { m a x }` and its kin are written letter by letter in im2latex; inside them spaces carry no meaning.
_TEXT_GROUP = re.compile(r"\\(?:operatorname|mathrm|text|mathbf)\s?\*? \{.*?\}")
_LETTER, _NON_LETTER = r"[a-zA-Z]", r"[\W_^\d]"
# A space survives only between two letters (`\alpha b`) or as the `\ ` spacing command.
_SPACE_RULES = [
    re.compile(rf"(?!\\ )({_NON_LETTER})\s+?({_NON_LETTER})"),
    re.compile(rf"(?!\\ )({_NON_LETTER})\s+?({_LETTER})"),
    re.compile(rf"({_LETTER})\s+?({_NON_LETTER})"),
]
_LATEX_TOKEN = re.compile(r"\\[a-zA-Z]+\*?|\\.|\S")


def normalize_latex(text: str) -> str:
    """Removes the whitespace LaTeX ignores, as UniMERNet's `normalize_text` does.

    `\\frac { 1 } { 2 }` -> `\\frac{1}{2}`; `\\mathrm { m a x }` -> `\\mathrm{max}`; `\\alpha b` keeps its space.
    """
    text = _TEXT_GROUP.sub(lambda match: match.group(0).replace(" ", ""), text)
    while True:
        collapsed = text
        for rule in _SPACE_RULES:
            collapsed = rule.sub(r"\1\2", collapsed)
        if collapsed == text:
            return text
        text = collapsed


def latex_tokens(text: str) -> list[str]:
    """Canonical LaTeX tokens: control words (`\\frac`), control symbols (`\\{`, `\\,`), single characters."""
    return _LATEX_TOKEN.findall(text)


def exact_match(reference: str, prediction: str) -> bool:
    """Equal once all whitespace is removed."""
    return "".join(reference.split()) == "".join(prediction.split())


def edit_distance(reference: str, prediction: str) -> float:
    """Character Levenshtein distance / the longer string's length: 0 identical, 1 nothing in common."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_distance(reference, prediction)


def token_exact_match(reference: str, prediction: str) -> bool:
    return latex_tokens(reference) == latex_tokens(prediction)


def token_edit_distance(reference: str, prediction: str) -> float:
    """Levenshtein distance over LaTeX tokens / the longer token sequence's length."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_distance(latex_tokens(reference), latex_tokens(prediction))


def bleu(references: list[str], predictions: list[str]) -> float:
    """Corpus BLEU-4 (13a tokenizer, sacrebleu's defaults) on a 0-1 scale."""
    import sacrebleu

    if not references:
        return 0.0
    return sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score / 100


def row_metrics(reference: str, prediction: str) -> dict:
    return {
        "exact_match": exact_match(reference, prediction),
        "edit_distance": edit_distance(reference, prediction),
        "edit_distance_normalized": edit_distance(normalize_latex(reference), normalize_latex(prediction)),
        "token_exact_match": token_exact_match(reference, prediction),
        "token_edit_distance": token_edit_distance(reference, prediction),
    }


def corpus_metrics(references: list[str], predictions: list[str], rows: list[dict]) -> dict:
    """Averages of `row_metrics` plus corpus BLEU, raw and normalized."""
    count = max(len(rows), 1)
    summary = {key: sum(row[key] for row in rows) / count for key in rows[0]} if rows else {}
    summary["bleu"] = bleu(references, predictions)
    summary["bleu_normalized"] = bleu([normalize_latex(r) for r in references],
                                      [normalize_latex(p) for p in predictions])
    summary["rows"] = len(rows)
    return summary
