from __future__ import annotations

import math

import pytest

from runner.metrics import (bleu, corpus_metrics, edit_distance, exact_match, latex_tokens, normalize_latex,
                            row_metrics, token_edit_distance, token_exact_match)


@pytest.mark.parametrize("raw, normalized", [
    (r"\frac { 1 } { 2 }", r"\frac{1}{2}"),
    (r"\mathrm { m a x } ( x , y )", r"\mathrm{max}(x,y)"),
    (r"\alpha b + c", r"\alpha b+c"),      # a space between two letters separates tokens: kept
    (r"d x", r"d x"),
    (r"x \ y", r"x\ y"),                   # the `\ ` spacing command survives
    (r"x ^ { 2 }  +   1", r"x^{2}+1"),
])
def test_normalize_latex_removes_only_meaningless_whitespace(raw, normalized):
    assert normalize_latex(raw) == normalized


def test_latex_tokens_are_commands_symbols_and_characters():
    assert latex_tokens(r"\left\{ x_1 \right. \,") == [r"\left", r"\{", "x", "_", "1", r"\right", ".", r"\,"]
    assert latex_tokens(r"\frac{1}{2}") == latex_tokens(r"\frac { 1 } { 2 }")


def test_exact_match_ignores_whitespace_only():
    assert exact_match(r"\frac { 1 } { 2 }", r"\frac{1}{2}")
    assert not exact_match(r"\frac { 1 } { 2 }", r"\frac{1}{3}")


def test_edit_distance_is_normalized_by_the_longer_string():
    assert edit_distance("abcd", "abce") == 0.25
    assert edit_distance("abc", "") == 1.0
    assert edit_distance("ab", "abcd") == 0.5


def test_token_metrics_compare_canonical_tokens():
    assert token_exact_match(r"\frac { 1 } { 2 }", r"\frac{1}{2}")
    assert not token_exact_match(r"\alpha", r"\alpha x")
    assert token_edit_distance(r"\frac { 1 } { 2 }", r"\frac{1}{3}") == pytest.approx(1 / 7)


def test_bleu_matches_hand_computed_values():
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    # precisions 4/5, 3/4, 2/3, 1/2; same length, so no brevity penalty
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25, abs=1e-4)
    # all n-grams right but one word short: brevity penalty exp(1 - 5/4)
    assert bleu(["a b c d e"], ["a b c d"]) == pytest.approx(math.exp(1 - 5 / 4), abs=1e-4)


def test_corpus_metrics_report_raw_and_normalized_figures():
    references = [r"\frac { 1 } { 2 }", r"x ^ { 2 }"]
    predictions = [r"\frac{1}{2}", r"x ^ { 3 }"]
    rows = [row_metrics(r, p) for r, p in zip(references, predictions)]
    summary = corpus_metrics(references, predictions, rows)
    assert summary["exact_match"] == 0.5 and summary["token_exact_match"] == 0.5
    assert summary["edit_distance"] > summary["edit_distance_normalized"]  # spacing costs only in the raw figure
    assert rows[0]["edit_distance_normalized"] == 0.0
    # 13a splits braces and carets off their neighbours, so spacing around them leaves BLEU unchanged
    assert summary["bleu_normalized"] == pytest.approx(summary["bleu"]) and summary["rows"] == 2
    assert bleu([r"\mathrm { m a x }"], [r"\mathrm{max}"]) < bleu([normalize_latex(r"\mathrm { m a x }")], [r"\mathrm{max}"])
