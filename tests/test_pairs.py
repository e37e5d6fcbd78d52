"""The DPO pairs builder: only wrong rows, never an answer paired with itself."""

from __future__ import annotations

from runner.pairs import build_pairs


def test_pairs_keep_only_wrong_rows_with_the_reference_chosen_and_the_answer_rejected():
    results = [
        {"row_id": 0, "reference": r"x ^ { 2 }", "prediction": r"x ^ { 2 }"},      # right
        {"row_id": 1, "reference": r"x ^ { 2 }", "prediction": r"x^{2}"},          # right once spaces are ignored
        {"row_id": 2, "reference": r"\frac { a } { b }", "prediction": r"\frac { a } { c }"},
        {"row_id": 3, "reference": r"\alpha", "prediction": ""},                   # nothing is also wrong
        {"row_id": 4, "reference": None, "prediction": "y"},                       # no usable reference
    ]
    asked = []

    def image_of(row_id):
        asked.append(row_id)
        return {"bytes": bytes([row_id]), "path": None}

    pairs = build_pairs(results, image_of)
    assert [p["row_id"] for p in pairs] == [2, 3] and asked == [2, 3]  # images are read for the pairs only
    assert pairs[0] == {"row_id": 2, "image": {"bytes": b"\x02", "path": None}, "chosen": r"\frac { a } { b }",
                        "rejected": r"\frac { a } { c }"}
    assert all("".join(p["chosen"].split()) != "".join(p["rejected"].split()) for p in pairs)


def test_a_model_that_gets_everything_right_makes_no_pairs():
    results = [{"row_id": i, "reference": "a + b", "prediction": "a+b"} for i in range(3)]
    assert build_pairs(results, lambda row_id: None) == []
