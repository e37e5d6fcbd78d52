"""Each reward on hand-computed cases."""

from __future__ import annotations

import pytest

from runner.rewards import (REWARDS, canonical, exact, known_commands, length_and_stop, render, render_match,
                            similarity, well_formed)


def test_similarity_is_one_minus_the_normalized_edit_distance_after_the_evals_normalization():
    assert similarity(r"\frac{1}{2}", r"\frac { 1 } { 2 }") == 1.0  # the same after normalization
    assert similarity("ab", "ac") == 0.5  # one substitution in two characters
    assert similarity("abcd", "") == 0.0


def test_exact_ignores_whitespace_only():
    assert exact("a+b", "a + b") == 1.0 and exact("a+b", "a-b") == 0.0


@pytest.mark.parametrize("answer, expected", [
    (r"\frac { a } { b }", 1.0),
    (r"\frac { a } { b", 0.75),                             # braces unbalanced
    (r"} a {", 0.75),                                       # closes before it opens
    (r"\left( x \right.", 1.0),
    (r"\left( x", 0.75),                                    # \left without \right
    (r"\begin{array} { c } x \end{array}", 1.0),
    (r"\begin{array} x \end{matrix}", 0.75),                # environments do not match
    (r"\notacommand x", 0.75),                              # unknown command
    (r"\left( \notacommand { x", 0.25),                     # three checks fail
    ("", 0.0),
])
def test_well_formed_is_the_share_of_checks_passed(answer, expected):
    assert well_formed(answer) == expected


def test_known_commands_come_from_the_renderer_and_the_structure_list():
    assert {r"\alpha", r"\sum", r"\frac", r"\mathrm", r"\left"} <= known_commands()
    assert r"\notacommand" not in known_commands()


def test_length_and_stop():
    assert length_and_stop("a + b", "a + b") == 1.0
    assert length_and_stop("a + b + c", "a + b") == pytest.approx(1 - 2 / 3)  # 5 tokens against 3
    assert length_and_stop("a + b + c + d", "a") == 0.0  # clipped at 0
    assert length_and_stop("a + b", "a + b", finished=False) == 0.0  # cut off before its end token


def test_canonical_drops_the_spaces_tex_ignores():
    assert canonical(r"\frac { 1 } { 2 }") == r"\frac{1}{2}"
    assert canonical(r"\alpha b") == r"\alpha b"  # the space ends the control word
    assert canonical(r"\mathrm { m a x }") == r"\mathrm{max}"


def test_canonical_rewrites_what_tex_draws_and_mathtext_does_not_parse():
    assert canonical(r"\frac 1 2 + \sqrt 3") == r"\frac{1}{2}+\sqrt{3}"  # one-token arguments get braces
    assert canonical(r"\sqrt [ 3 ] { x }") == r"\sqrt[3]{x}"  # an optional argument is left alone
    assert canonical(r"\Bigl( x \Bigr) \big[ y \big]") == r"(x)[y]"  # delimiter sizing dropped
    assert canonical(r"\stackrel { a } { = } \boldmath x") == r"\overset{a}{=}x"
    assert render_match(r"\frac 1 2", r"\frac { 1 } { 2 }") == 1.0


def test_render_match_compares_pictures_not_strings():
    assert render_match(r"x^{2}", r"x ^ { 2 }") == 1.0  # other strings, the same formula on paper
    assert 0.0 < render_match(r"x ^ { 3 }", r"x ^ { 2 }") < 1.0  # one glyph differs
    assert render_match(r"x ^ { 3 }", r"x ^ { 2 }") > render_match(r"\sum _ { i } y", r"x ^ { 2 }")
    assert render_match(r"\frac {", r"x ^ { 2 }") == 0.0  # the answer does not draw
    assert render(r"\frac {") is None and render(r"x ^ { 2 }").any()
    # mathtext has no array environment: such references fall back to string similarity
    reference = r"\begin{array} { c } x \end{array}"
    assert render(reference) is None and render_match(reference, reference) == 1.0
    assert render_match(r"\begin{array} { c } y \end{array}", reference) == similarity(
        r"\begin{array} { c } y \end{array}", reference)


def test_every_reward_is_between_zero_and_one():
    pairs = [(r"x ^ { 2 }", r"x ^ { 2 }"), (r"\frac {", r"\sqrt { a }"), ("", r"a + b"), (r"\alpha \beta", "q")]
    for name, reward in REWARDS.items():
        for prediction, reference in pairs:
            assert 0.0 <= reward(prediction, reference) <= 1.0, name
