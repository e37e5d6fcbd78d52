"""The eval step: greedy, batched generation over evaluation rows, per-row and corpus metrics.

`evaluate` writes `<out_dir>/predictions.jsonl` (row id, reference, prediction, per-row metrics) and returns the
corpus metrics; `runner/report.py` turns one or two such results (before / after training) into report.md.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import decode_attention
from .eval_weights import generation_weights
from .metrics import corpus_metrics, row_metrics
from .prompt import decode_image, generate, text_of
from .refill import refill_generate

log = logging.getLogger("runner")


def limit_rows(rows, max_samples: int | None):
    return rows if max_samples is None else rows.select(range(min(max_samples, len(rows))))


def length_sorted_batches(rows, batch_size: int) -> list[list[int]]:
    """Row positions in batches of similar length (longest first), so a batch pads and decodes little in vain.

    Lengths are the data step's prompt token counts (image tokens included, answers never read); without them
    rows keep their order."""
    order = list(range(len(rows)))
    if "prompt_length" in rows.column_names:
        lengths = rows["prompt_length"]
        order.sort(key=lambda position: -lengths[position])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def kv_cache_kind(requested: str) -> str:
    """eval.kv_cache with `auto` resolved: dynamic (schemas/eval.schema.json says why)."""
    if requested == "static" and "unsloth" in sys.modules:  # backend auto chose it; an explicit one fails validation
        log.warning("eval: kv_cache static needs a forward torch.compile can compile, and Unsloth's is compiled "
                    "already; generating with the dynamic cache")
        return "dynamic"
    return "dynamic" if requested == "auto" else requested


class _Images:
    """The images of the rows at `positions`, decoded only when generation reaches them."""

    def __init__(self, rows, positions: list[int], image_column: str, base_dir):
        self.values, self.positions, self.base_dir = rows.select_columns([image_column]), positions, base_dir
        self.column = image_column

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        return decode_image(self.values[self.positions[index]][self.column], self.base_dir)


def _generate(model, processor, images: _Images, eval_cfg, instruction, kv_cache, slots, answered) -> None:
    """Every row of `images`, `slots` at a time; `answered(row position, prediction)` as each one ends."""
    max_new_tokens = eval_cfg["max_new_tokens"]
    if eval_cfg["batching"] == "refill":
        refill_generate(model, processor, images, instruction, max_new_tokens, slots, cache=kv_cache,
                        compile=torch.cuda.is_available(),
                        on_answer=lambda index, text: answered(images.positions[index], text))
        return
    for start in range(0, len(images), slots):  # batches: each decodes until its longest answer ends
        batch = [images[i] for i in range(start, min(start + slots, len(images)))]
        real = len(batch)
        if kv_cache == "static":  # a new batch size would compile the decode step again
            batch += batch[-1:] * (min(slots, len(images)) - real)
        predictions = generate(model, processor, batch, instruction, max_new_tokens, kv_cache)
        for i, prediction in enumerate(predictions[:real]):
            answered(images.positions[start + i], prediction)


def evaluate(model, processor, rows, eval_cfg: dict, instruction: str, columns: tuple[str, str], base_dir,
             out_file: Path, label: str = "eval") -> tuple[dict, list[dict]]:
    """Generates answers for the first `eval.max_samples` rows; returns (corpus metrics, per-row results).

    Out of GPU memory, the step halves the rows generated together and goes on with the rows not answered yet."""
    image_column, text_column = columns
    rows = limit_rows(rows, eval_cfg["max_samples"])
    model.eval()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), {}
    if torch.cuda.is_available():  # the eval step's own peak: weights copies, KV cache, batches
        torch.cuda.reset_peak_memory_stats()
    # longest prompts first: batches pad little, and the static ring is sized by its first rows
    order = [position for batch in length_sorted_batches(rows, len(rows) or 1) for position in batch]
    labels = rows.select_columns(["row_id", text_column])
    partial = out_file.with_name(out_file.name + ".partial")  # kept if the step dies, in generation order
    kv_cache, slots = kv_cache_kind(eval_cfg["kv_cache"]), eval_cfg["batch_size"]
    with (open(partial, "w") as partial_file, tqdm(total=len(rows), desc=label, unit="row") as bar,
          generation_weights(model, eval_cfg["dequantize"]),
          decode_attention.for_generation(model, compiled_steps=kv_cache == "static")):

        def answered(position: int, prediction: str) -> None:
            row = labels[position]
            result = {"row_id": row["row_id"], "reference": (reference := text_of(row[text_column])),
                      "prediction": prediction, **row_metrics(reference, prediction)}
            results[position] = result
            partial_file.write(json.dumps(result) + "\n")
            bar.update(1)
            if bar.n % 32 == 0 or bar.n == bar.total:
                partial_file.flush()
                bar.set_postfix(samples_per_s=f"{bar.n / (time.perf_counter() - started):.2f}")

        while True:
            images = _Images(rows, [p for p in order if p not in results], image_column, base_dir)
            try:
                _generate(model, processor, images, eval_cfg, instruction, kv_cache, slots, answered)
                break
            except torch.cuda.OutOfMemoryError:
                if slots == 1:
                    raise
            gc.collect()  # past the except block, so the failed attempt's tensors are free
            torch.cuda.empty_cache()
            slots //= 2
            log.warning("%s: out of GPU memory generating %d rows at a time; going on with %d for the %d rows left "
                        "(`--set eval.batch_size=%d` starts there)", label, slots * 2, slots, len(rows) - len(results),
                        slots)
    seconds = time.perf_counter() - started
    results = [results[position] for position in sorted(results)]
    out_file.write_text("".join(json.dumps(result) + "\n" for result in results))
    partial.unlink()
    metrics = corpus_metrics([r["reference"] for r in results], [r["prediction"] for r in results],
                             [{k: v for k, v in r.items() if k not in ("row_id", "reference", "prediction")}
                              for r in results])
    metrics.update(seconds=round(seconds, 2), samples_per_s=round(len(results) / seconds, 3))
    if torch.cuda.is_available():
        metrics.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))
    log.info("%s: exact match %.3f (%d/%d), edit distance %.4f (normalized %.4f), BLEU %.4f, %.2f samples/s",
             label, metrics.get("exact_match", 0), sum(r["exact_match"] for r in results), len(results),
             metrics.get("edit_distance", 0), metrics.get("edit_distance_normalized", 0), metrics["bleu"],
             metrics["samples_per_s"])
    return metrics, results
