"""How many decode steps the eval step spends, batch by batch, for different ways of grouping rows (CPU, no model).

A batch decodes until its longest answer has ended, so every row shorter than the batch's longest decodes steps in
vain. The eval step groups rows by prompt length (image tokens); a trained model's answers are about as long as the
references, so with the reference answers' token counts this script counts, for each grouping, the decode steps
(sum over batches of the longest answer + its end token, capped at max_new_tokens) and the share of row-steps that
produce a token of some row's answer. Orders: the eval step's (prompt length), image width, the count of ink edges
(a cheap image feature that follows formula length), the reference lengths themselves (the best any order can do)
and random. Fewer steps at the same batch size is less decode time, since a decode step at
a given batch size costs about the same whatever it emits; that is an inference from the counts, not a timing.

    python -m bench.eval_batch_order --data ../shared/data/latex_ocr_val/validation.parquet --out order.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Decode steps of the eval step's batches, per way of grouping rows.")
    parser.add_argument("--data", type=Path, required=True, help="a parquet file in the unsloth/LaTeX_OCR schema")
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--recipe", default="recipes/qwen25vl_latex_fast.yaml", help="its dataset section")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def decode_steps(order: list[int], answer_steps: list[int], batch_size: int, cap: int) -> dict:
    """Decode steps and useful row-steps when rows are batched in `order` (each row ends after answer_steps[i])."""
    steps = useful = 0
    for start in range(0, len(order), batch_size):
        batch = [min(answer_steps[i], cap) for i in order[start : start + batch_size]]
        steps += max(batch)
        useful += sum(batch)
    return {"decode_steps": steps, "useful_fraction": round(useful / (steps * batch_size), 4)}


def main(argv=None) -> None:
    args = parse_args(argv)
    import numpy
    from PIL import Image
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from bench.qwen25vl_7b import MAX_PIXELS, MIN_PIXELS
    from runner.data import prepare
    from runner.prompt import text_of
    from runner.recipe import load_recipe
    from runner.tiny import CHAT_TEMPLATE, build_tokenizer

    started = time.perf_counter()
    processor = Qwen2_5_VLProcessor(  # the released model's processor bounds, as bench/qwen25vl_7b.py saves them
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=build_tokenizer(), video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    recipe = load_recipe(Path(args.recipe))
    cfg = {**recipe["dataset"], "id": str(args.data), "eval_split": None, "eval_fraction": 0.0, "shuffle": False,
           "max_samples": args.rows}
    rows = prepare(cfg, processor, recipe["model"]["max_seq_length"]).train
    answers = [text_of(value) for value in rows[cfg["text_column"]]]
    answer_steps = [len(ids) + 1 for ids in processor.tokenizer(answers, add_special_tokens=False)["input_ids"]]
    widths, heights, strokes = [], [], []
    for value in rows[cfg["image_column"]]:
        image = Image.open(io.BytesIO(value["bytes"]))
        width, height = image.size
        ink = numpy.asarray(image.convert("L")) < 128
        strokes.append(int(numpy.abs(numpy.diff(ink.astype(numpy.int8), axis=1)).sum()))  # ink edges, left to right
        resized_height, resized_width = smart_resize(height, width, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        widths.append(resized_width // 28)  # image tokens per row of the merged 2x2 patch grid
        heights.append(resized_height // 28)
    prompt = rows["prompt_length"]
    positions = list(range(len(rows)))
    shuffled = positions[:]
    random.Random(0).shuffle(shuffled)
    orders = {
        "prompt_length (the eval step now)": sorted(positions, key=lambda i: -prompt[i]),
        "image_width": sorted(positions, key=lambda i: (-widths[i], -heights[i])),
        "ink_edges (dark/light changes along rows)": sorted(positions, key=lambda i: -strokes[i]),
        "reference_answer_length (oracle)": sorted(positions, key=lambda i: -answer_steps[i]),
        "random": shuffled,
    }
    results = {name: decode_steps(order, answer_steps, args.batch_size, args.max_new_tokens)
               for name, order in orders.items()}
    summary = {"benchmark": "eval_batch_order", "data": str(args.data), "rows": len(rows),
               "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "mean_answer_steps": round(sum(answer_steps) / len(answer_steps), 1),
               "answers_over_cap": sum(s > args.max_new_tokens for s in answer_steps), "orders": results,
               "seconds": round(time.perf_counter() - started, 1), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
