"""The eval step: greedy, batched generation over evaluation rows, per-row and corpus metrics.

`evaluate` writes `<out_dir>/predictions.jsonl` (row id, reference, prediction, per-row metrics) and returns the
corpus metrics; `runner/report.py` turns one or two such results (before / after training) into report.md.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from .metrics import corpus_metrics, row_metrics
from .prompt import decode_image, generate

log = logging.getLogger("runner")


def limit_rows(rows, max_samples: int | None):
    return rows if max_samples is None else rows.select(range(min(max_samples, len(rows))))


def evaluate(model, processor, rows, eval_cfg: dict, instruction: str, columns: tuple[str, str], base_dir,
             out_file: Path, label: str = "eval") -> tuple[dict, list[dict]]:
    """Generates answers for the first `eval.max_samples` rows; returns (corpus metrics, per-row results)."""
    image_column, text_column = columns
    rows = limit_rows(rows, eval_cfg["max_samples"])
    model.eval()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    batch_size, started, results = eval_cfg["batch_size"], time.perf_counter(), []
    with open(out_file, "w") as predictions_file, tqdm(total=len(rows), desc=label, unit="row") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            images = [decode_image(value, base_dir) for value in batch[image_column]]
            predictions = generate(model, processor, images, instruction, eval_cfg["max_new_tokens"])
            for row_id, reference, prediction in zip(batch["row_id"], batch[text_column], predictions):
                result = {"row_id": row_id, "reference": reference, "prediction": prediction,
                          **row_metrics(reference, prediction)}
                results.append(result)
                predictions_file.write(json.dumps(result) + "\n")
            bar.update(len(predictions))
            bar.set_postfix(samples_per_s=f"{bar.n / (time.perf_counter() - started):.2f}")
    seconds = time.perf_counter() - started
    metrics = corpus_metrics([r["reference"] for r in results], [r["prediction"] for r in results],
                             [{k: v for k, v in r.items() if k not in ("row_id", "reference", "prediction")}
                              for r in results])
    metrics.update(seconds=round(seconds, 2), samples_per_s=round(len(results) / seconds, 3))
    log.info("%s: exact match %.3f (%d/%d), edit distance %.4f (normalized %.4f), BLEU %.4f, %.2f samples/s",
             label, metrics.get("exact_match", 0), sum(r["exact_match"] for r in results), len(results),
             metrics.get("edit_distance", 0), metrics.get("edit_distance_normalized", 0), metrics["bleu"],
             metrics["samples_per_s"])
    return metrics, results
