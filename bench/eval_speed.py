"""Eval throughput: greedy generation at a fixed 64 new tokens through the runner's own eval step.

Builds (or reuses) the random-weight Qwen2.5-VL-7B architecture, loads it through the transformers backend in
16-bit and 4-bit, and times `runner.evaluate.evaluate` on real formula images for each batch size.

    python -m bench.eval_speed --model-dir /tmp/qwen25vl-7b --data bench_data/validation_2048.parquet \
        --rows 768 --batch-sizes 64,128,256 --quantizations none,4bit --out docs/benchmarks/eval.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

NEW_TOKENS = 64


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Eval throughput at a fixed number of new tokens.")
    parser.add_argument("--model-dir", type=Path, required=True, help="built here first if it has no config.json")
    parser.add_argument("--data", type=Path, required=True, help="parquet in the unsloth/LaTeX_OCR schema")
    parser.add_argument("--rows", type=int, default=768, help="rows timed per setting")
    parser.add_argument("--batch-sizes", default="64,128,256")
    parser.add_argument("--quantizations", default="none,4bit")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the raw figures")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.quantizations = args.quantizations.split(",")
    return args


def peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def table(results: list[dict]) -> str:
    lines = ["| weights | batch | rows | samples/s | s per 7,632 rows | peak allocated GiB |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['quantization']} | {r['batch_size']} | {r['rows']} | {r['samples_per_s']:.1f} | "
                     f"{7632 / r['samples_per_s']:.0f} | {r['peak_allocated_gib']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import torch

    from bench import qwen25vl_7b
    from bench.common import device_name, versions
    from runner.backends import transformers_backend
    from runner.data import prepare
    from runner.evaluate import evaluate
    from runner.recipe import load_schema

    args = parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        qwen25vl_7b.build(args.model_dir)
    schema = load_schema()["properties"]
    defaults = {s: {k: p["default"] for k, p in schema[s]["properties"].items()} for s in ("model", "dataset", "eval")}
    dataset_cfg = {**defaults["dataset"], "id": str(args.data), "eval_split": None, "shuffle": False,
                   "max_samples": args.rows}
    results = []
    for quantization in args.quantizations:
        model_cfg = {**defaults["model"], "id": str(args.model_dir), "quantization": quantization, "dtype": "bfloat16"}
        started = time.perf_counter()
        model, processor = transformers_backend.load(model_cfg)
        load_s = time.perf_counter() - started
        model.generation_config.min_new_tokens = NEW_TOKENS  # random weights: never stop early, time all 64
        rows = prepare(dataset_cfg, processor, model_cfg["max_seq_length"]).train
        for batch_size in args.batch_sizes:
            eval_cfg = {**defaults["eval"], "batch_size": batch_size, "max_new_tokens": NEW_TOKENS}
            evaluate(model, processor, rows.select(range(batch_size)), {**eval_cfg, "max_samples": batch_size},
                     dataset_cfg["instruction"], ("image", "text"), None, Path("/tmp/warmup.jsonl"), "warmup")
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            metrics, _ = evaluate(model, processor, rows, {**eval_cfg, "max_samples": args.rows},
                                  dataset_cfg["instruction"], ("image", "text"), None, Path("/tmp/eval.jsonl"),
                                  f"{quantization} bs{batch_size}")
            results.append({"quantization": quantization, "batch_size": batch_size, "rows": metrics["rows"],
                            "new_tokens": NEW_TOKENS, "samples_per_s": metrics["samples_per_s"],
                            "seconds": metrics["seconds"], "load_s": round(load_s, 1),
                            **peak_memory()})
            print(json.dumps(results[-1]), flush=True)
        del model
    report = {"benchmark": "eval_speed", "date": time.strftime("%Y-%m-%d"), "device": device_name(),
              "python": platform.python_version(), "versions": versions(), "model": "Qwen2.5-VL-7B architecture, "
              "random weights", "data": str(args.data), "results": results}
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
