"""report.md: the metrics (before / after training when the base model was evaluated too), a histogram of per-row
edit distance, five example rows, and the ten worst rows with their images."""

from __future__ import annotations

from pathlib import Path

from .prompt import decode_image

SHOWN_METRICS = [
    ("exact_match", "exact match (whitespace ignored)", True),
    ("token_exact_match", "token exact match", True),
    ("bleu", "BLEU-4 (13a), raw", True),
    ("bleu_normalized", "BLEU-4 (13a), normalized", True),
    ("edit_distance", "edit distance, raw", False),
    ("edit_distance_normalized", "edit distance, normalized", False),
    ("token_edit_distance", "token edit distance", False),
    ("samples_per_s", "generation samples/s", True),
]
EXAMPLES, WORST = 5, 10


def _code(text: str, limit: int = 200) -> str:
    """A table-safe code span: one line, no backticks or pipes, long predictions cut with an ellipsis."""
    if not text:
        return "(empty)"
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit] + " …"
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _histogram(path: Path, after: list[dict], before: list[dict] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2))
    bins = [i / 20 for i in range(21)]
    if before is not None:
        axes.hist([r["edit_distance"] for r in before], bins=bins, alpha=0.5, label="before training")
    axes.hist([r["edit_distance"] for r in after], bins=bins, alpha=0.7, label="after training")
    axes.set_xlabel("edit distance per row (0 = identical)")
    axes.set_ylabel("rows")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(out_dir: Path, after: tuple[dict, list[dict]], before: tuple[dict, list[dict]] | None,
                 images: dict[int, object], base_dir=None) -> Path:
    """Writes out_dir/report.md (+ PNGs beside it); `images` maps row id -> image value for the shown rows."""
    after_metrics, after_rows = after
    before_metrics, before_rows = before if before is not None else (None, None)
    _histogram(out_dir / "edit_distance_histogram.png", after_rows, before_rows)

    lines = ["# Evaluation report", "", f"{after_metrics['rows']} rows, greedy decoding.", ""]
    if before_metrics is not None:
        lines += ["| metric | before training | after training | change |", "|---|---|---|---|"]
        for key, name, higher_is_better in SHOWN_METRICS:
            change = after_metrics[key] - before_metrics[key]
            lines.append(f"| {name} | {before_metrics[key]:.4f} | {after_metrics[key]:.4f} | {change:+.4f} |")
    else:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {after_metrics[key]:.4f} |" for key, name, _ in SHOWN_METRICS]
    lines += ["", "Raw figures compare the strings as written; normalized ones first remove the whitespace LaTeX "
              "ignores (UniMERNet's `normalize_text`), as published results do.", "",
              "![edit distance per row](edit_distance_histogram.png)", ""]

    if before_rows is not None:
        lines += ["## Examples, before and after", "", "| row | reference | before | after |", "|---|---|---|---|"]
        for old, new in list(zip(before_rows, after_rows))[:EXAMPLES]:
            lines.append(f"| {new['row_id']} | {_code(new['reference'])} | {_code(old['prediction'])} | "
                         f"{_code(new['prediction'])} |")
        lines.append("")

    image_dir = out_dir / "report_images"
    image_dir.mkdir(exist_ok=True)
    worst = sorted(after_rows, key=lambda r: -r["edit_distance"])[:WORST]
    lines += [f"## The {len(worst)} worst rows", "", "| row | image | edit distance | reference | prediction |",
              "|---|---|---|---|---|"]
    for row in worst:
        thumbnail = image_dir / f"row_{row['row_id']}.png"
        image = decode_image(images[row["row_id"]], base_dir)
        image.thumbnail((400, 100))
        image.save(thumbnail)
        lines.append(f"| {row['row_id']} | ![row {row['row_id']}](report_images/{thumbnail.name}) | "
                     f"{row['edit_distance']:.3f} | {_code(row['reference'])} | {_code(row['prediction'])} |")
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
