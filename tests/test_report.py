from __future__ import annotations

from runner.report import write_report
from runner.tiny import render_png


def rows(predictions):
    references = ["a", "b + c", r"\frac { 1 } { 2 }"]
    return [{"row_id": i, "reference": r, "prediction": p, "edit_distance": 0.0 if r == p else 1.0}
            for i, (r, p) in enumerate(zip(references, predictions))]


def metrics(exact):
    keys = ["exact_match", "token_exact_match", "bleu", "bleu_normalized", "edit_distance",
            "edit_distance_normalized", "token_edit_distance", "samples_per_s"]
    return {**{k: exact for k in keys}, "rows": 3}


def test_report_with_before_and_after_columns(tmp_path):
    images = {i: {"bytes": render_png(f), "path": None} for i, f in enumerate(["a", "b+c", r"\frac{1}{2}"])}
    before = (metrics(0.0), rows(["x", "y", "z | w\nnext"]))
    after = (metrics(2 / 3), rows(["a", "b + c", "wrong"]))
    report = write_report(tmp_path, after, before, images).read_text()
    assert "| exact match (whitespace ignored) | 0.0000 | 0.6667 | +0.6667 |" in report
    assert "| 2 | `\\frac { 1 } { 2 }` | `z \\| w next` | `wrong` |" in report  # one line, pipe escaped
    worst = report.split("## The 3 worst rows")[1]
    assert worst.index("| 2 |") < worst.index("| 0 |")  # worst first
    assert sorted(p.name for p in (tmp_path / "report_images").iterdir()) == ["row_0.png", "row_1.png", "row_2.png"]
    assert (tmp_path / "edit_distance_histogram.png").stat().st_size > 0


def test_report_without_a_base_model_has_one_column(tmp_path):
    images = {i: {"bytes": render_png("x"), "path": None} for i in range(3)}
    report = write_report(tmp_path, (metrics(1.0), rows(["a", "b + c", r"\frac { 1 } { 2 }"])), None, images).read_text()
    assert "| metric | value |" in report and "before" not in report
