"""The eval step: greedy, batched generation over evaluation rows; writes predictions and metrics."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from .prompt import decode_image, generate

log = logging.getLogger("runner")


def exact_match(reference: str, prediction: str) -> bool:
    """Equal once all whitespace is removed: `\\frac { 1 } { 2 }` matches `\\frac{1}{2}`."""
    return "".join(reference.split()) == "".join(prediction.split())


def edit_distance(reference: str, prediction: str) -> float:
    """Character Levenshtein distance divided by the longer string's length: 0 is identical, 1 is nothing alike."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_distance(reference, prediction)


def evaluate(model, processor, rows, eval_cfg: dict, instruction: str, columns: tuple[str, str], base_dir,
             out_dir: Path) -> dict:
    """Generates answers for the first `eval.max_samples` rows; writes predictions.jsonl and returns metrics."""
    image_column, text_column = columns
    if eval_cfg["max_samples"] is not None:
        rows = rows.select(range(min(eval_cfg["max_samples"], len(rows))))
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_size, started = eval_cfg["batch_size"], time.perf_counter()
    matches, distances = 0, 0.0
    with open(out_dir / "predictions.jsonl", "w") as predictions_file, \
            tqdm(total=len(rows), desc="generating", unit="row") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            images = [decode_image(value, base_dir) for value in batch[image_column]]
            predictions = generate(model, processor, images, instruction, eval_cfg["max_new_tokens"])
            for row_id, reference, prediction in zip(batch["row_id"], batch[text_column], predictions):
                row = {"row_id": row_id, "reference": reference, "prediction": prediction,
                       "exact_match": exact_match(reference, prediction),
                       "edit_distance": edit_distance(reference, prediction)}
                matches += row["exact_match"]
                distances += row["edit_distance"]
                predictions_file.write(json.dumps(row) + "\n")
            bar.update(len(predictions))
            bar.set_postfix(samples_per_s=f"{bar.n / (time.perf_counter() - started):.2f}")
    seconds = time.perf_counter() - started
    count = max(len(rows), 1)
    metrics = {"rows": len(rows), "exact_match": matches / count, "exact_match_count": matches,
               "edit_distance": distances / count, "seconds": seconds, "samples_per_s": len(rows) / seconds}
    log.info("eval: %d/%d exact, mean edit distance %.4f, %.2f samples/s", matches, len(rows),
             metrics["edit_distance"], metrics["samples_per_s"])
    return metrics
