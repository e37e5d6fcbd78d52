"""Rewards for a LaTeX OCR answer against its reference, each a plain function returning a number in [0, 1].

These are the building blocks for reinforcement learning after SFT (issue 9: GRPO chooses them and their
weights per recipe); every one is tested on hand-computed cases in tests/test_rewards.py.

- `similarity`: 1 - normalized character edit distance, after the eval's whitespace normalization.
- `exact`: 1 when equal once whitespace is removed (the eval's exact match).
- `well_formed`: the share of four checks passed: balanced braces, `\\left` / `\\right` pairs, `\\begin` /
  `\\end` pairs of the same environment, and only known commands.
- `length_and_stop`: 0 for an answer cut off before its end token; else 1 minus the relative token-length gap.
- `render_match`: both rendered with matplotlib's mathtext (a real TeX-like renderer, no TeX installation) and
  compared pixel by pixel: 1 for the same picture, less for more differing ink, 0 when the answer does not render.
  Two strings that differ but draw the same formula (`x^{2}` and `x ^ { 2 }`) get 1. Before drawing, `canonical`
  rewrites what TeX accepts and mathtext does not (spaces, `\\bigl(`, `\\frac 1 2`, `\\stackrel`). Where the
  reference still does not draw (mathtext has no `array` environment, for one), it falls back to `similarity`.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache

from .metrics import edit_distance, exact_match, latex_tokens, normalize_latex

_CONTROL_WORD = re.compile(r"\\[a-zA-Z]+\*?$")
# Commands of the im2latex vocabulary that are structure or spacing rather than symbols.
_STRUCTURE = {
    r"\frac", r"\dfrac", r"\tfrac", r"\sqrt", r"\left", r"\right", r"\begin", r"\end", r"\mathrm", r"\mathbf",
    r"\mathit", r"\mathcal", r"\mathbb", r"\mathsf", r"\mathtt", r"\mathfrak", r"\boldsymbol", r"\operatorname",
    r"\operatorname*", r"\text", r"\textrm", r"\textbf", r"\hat", r"\widehat", r"\bar", r"\overline", r"\underline",
    r"\vec", r"\tilde", r"\widetilde", r"\dot", r"\ddot", r"\check", r"\breve", r"\acute", r"\grave", r"\overrightarrow",
    r"\overleftarrow", r"\overbrace", r"\underbrace", r"\stackrel", r"\overset", r"\underset", r"\binom", r"\choose",
    r"\over", r"\atop", r"\displaystyle", r"\textstyle", r"\scriptstyle", r"\scriptscriptstyle", r"\limits",
    r"\nolimits", r"\quad", r"\qquad", r"\hspace", r"\vspace", r"\mbox", r"\hfill", r"\phantom", r"\hphantom",
    r"\vphantom", r"\big", r"\Big", r"\bigg", r"\Bigg", r"\bigl", r"\bigr", r"\Bigl", r"\Bigr", r"\biggl", r"\biggr",
    r"\Biggl", r"\Biggr", r"\cal", r"\bf", r"\rm", r"\it", r"\sf", r"\tt", r"\mit", r"\operatornamewithlimits",
    r"\prime", r"\cdots", r"\ldots", r"\dots", r"\vdots", r"\ddots", r"\colon", r"\not", r"\label", r"\nonumber",
    r"\cr", r"\hline", r"\array", r"\arraystretch", r"\null", r"\kern", r"\mathop", r"\mathrel", r"\mathbin",
    r"\mathord", r"\lbrace", r"\rbrace", r"\langle", r"\rangle", r"\vert", r"\Vert", r"\mid", r"\parallel",
}


@lru_cache(maxsize=1)
def known_commands() -> frozenset[str]:
    """Every command mathtext draws as a symbol, plus the structural ones above."""
    from matplotlib import _mathtext_data

    return frozenset({"\\" + name for name in _mathtext_data.tex2uni} | _STRUCTURE)


def similarity(prediction: str, reference: str) -> float:
    return 1.0 - edit_distance(normalize_latex(reference), normalize_latex(prediction))


def exact(prediction: str, reference: str) -> float:
    return 1.0 if exact_match(reference, prediction) else 0.0


def _balanced_braces(tokens: list[str]) -> bool:
    depth = 0
    for token in tokens:
        depth += (token == "{") - (token == "}")
        if depth < 0:
            return False
    return depth == 0


def _paired(tokens: list[str]) -> tuple[bool, bool]:
    """(\\left/\\right balanced, \\begin{env}/\\end{env} matched in order)."""
    left_right, environments = 0, []
    ok_left_right, ok_environments = True, True
    for index, token in enumerate(tokens):
        if token == r"\left":
            left_right += 1
        elif token == r"\right":
            left_right -= 1
            ok_left_right &= left_right >= 0
        elif token in (r"\begin", r"\end"):
            name = "".join(tokens[index + 1 : index + 1 + tokens[index + 1 :].index("}") + 1]) \
                if "}" in tokens[index + 1 :] else ""
            if token == r"\begin":
                environments.append(name)
            else:
                ok_environments &= bool(environments) and environments.pop() == name
    return ok_left_right and left_right == 0, ok_environments and not environments


def well_formed(prediction: str, reference: str | None = None) -> float:
    """The share of the four checks the answer passes (the reference is not used)."""
    tokens = latex_tokens(prediction)
    if not tokens:
        return 0.0
    left_right, environments = _paired(tokens)
    commands = [t for t in tokens if _CONTROL_WORD.match(t)]
    known = all(command in known_commands() for command in commands)
    return (_balanced_braces(tokens) + left_right + environments + known) / 4


def length_and_stop(prediction: str, reference: str, finished: bool = True) -> float:
    """0 for an answer that ran out of tokens before its end; else 1 - |answer - reference| / reference in tokens."""
    if not finished:
        return 0.0
    expected, actual = len(latex_tokens(reference)), len(latex_tokens(prediction))
    return max(0.0, 1.0 - abs(actual - expected) / max(expected, 1))


# Delimiter sizing mathtext does not know; dropping it leaves the delimiter at its natural size.
_SIZING = {rf"\{size}{side}" for size in ("big", "Big", "bigg", "Bigg") for side in ("", "l", "r", "m")}
_RENAMED = {r"\stackrel": r"\overset", r"\boldmath": "", r"\unboldmath": ""}
_TWO_ARGUMENTS = {r"\frac", r"\dfrac", r"\tfrac", r"\overset", r"\underset", r"\binom"}


def _braced_arguments(tokens: list[str]) -> list[str]:
    """`\\frac 1 2` as `\\frac { 1 } { 2 }` and `\\sqrt 2` as `\\sqrt { 2 }`: TeX takes one token as an argument,
    mathtext wants braces."""
    out, index = [], 0
    while index < len(tokens):
        token = tokens[index]
        out.append(token)
        wanted = 2 if token in _TWO_ARGUMENTS else 1 if token == r"\sqrt" else 0
        index += 1
        for _ in range(wanted):
            if index < len(tokens) and tokens[index] not in ("{", "["):
                out += ["{", tokens[index], "}"]
                index += 1
            else:
                break
    return out


def canonical(latex: str) -> str:
    """The formula as mathtext should draw it: without the whitespace TeX ignores in math mode (a space is kept only
    where it ends a control word before a letter, `\\alpha b`; mathtext, unlike TeX, would draw the dataset's
    spaces), without delimiter sizing, and with braces around one-token arguments."""
    tokens = [_RENAMED.get(t, t) for t in latex_tokens(latex) if t not in _SIZING]
    tokens = _braced_arguments([t for t in tokens if t])
    out = []
    for token, following in zip(tokens, tokens[1:] + [""]):
        out.append(token + (" " if _CONTROL_WORD.match(token) and following[:1].isalpha() else ""))
    return "".join(out)


@lru_cache(maxsize=65536)
def render(latex: str, dpi: int = 100):
    """The formula drawn by mathtext as a cropped grayscale array (ink > 0), or None if mathtext cannot draw it."""
    import numpy as np
    from matplotlib.mathtext import math_to_image
    from PIL import Image

    buffer = io.BytesIO()
    try:
        math_to_image(f"${canonical(latex)}$", buffer, dpi=dpi, format="png")
    except Exception:  # mathtext raises ValueError for syntax it does not know; treat any failure as "no picture"
        return None
    ink = 255 - np.asarray(Image.open(buffer).convert("L"), dtype=np.int16)
    rows, columns = np.nonzero(ink > 32)
    if not len(rows):
        return ink[:0, :0]
    return ink[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1] > 32


def render_match(prediction: str, reference: str) -> float:
    """1 - (differing ink pixels / ink pixels of either picture), the pictures aligned at their top-left corner."""
    import numpy as np

    expected = render(reference)
    if expected is None:
        return similarity(prediction, reference)
    actual = render(prediction)
    if actual is None:
        return 0.0
    height, width = max(expected.shape[0], actual.shape[0]), max(expected.shape[1], actual.shape[1])
    canvas = np.zeros((2, height, width), dtype=bool)
    canvas[0, : expected.shape[0], : expected.shape[1]] = expected
    canvas[1, : actual.shape[0], : actual.shape[1]] = actual
    union = (canvas[0] | canvas[1]).sum()
    return 1.0 if union == 0 else 1.0 - float((canvas[0] ^ canvas[1]).sum()) / float(union)


REWARDS = {"similarity": similarity, "exact": exact, "well_formed": well_formed, "length_and_stop": length_and_stop,
           "render_match": render_match}
