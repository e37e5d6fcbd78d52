"""On a GPU, under a runner backend: does `eval.batching: refill` give each row the answer it gets alone?

tests/test_refill.py checks this on the CPU with transformers (float32). Unsloth patches the model's forward and
runs only on a GPU, and the compiled ring only compiles into CUDA graphs there, so this runs the same comparison on
the device: the embedded tiny model (runner/tiny.py, random weights) through the backend's own load, LoRA attached
as the eval step has it, rows capped at varied lengths so slots end and are refilled at different steps. It prints
the share of rows whose refilled answer equals the answer `runner.prompt.generate` gives that row alone.

    python -m bench.refill_check --backend unsloth --dtype float32 --out refill_check_unsloth.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Refilled answers against each row's answer alone, on one backend.")
    parser.add_argument("--backend", choices=("transformers", "unsloth"), default="transformers")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24, help="the longest cap; rows get 1..this")
    parser.add_argument("--caches", default=None, help="refill caches to check (default: dynamic, and static on "
                        "transformers)")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from runner import backends
    from runner.recipe import load_recipe
    from runner.tiny import build_assets

    backend = backends.load_backend(args.backend)  # Unsloth must be imported before transformers
    import pyarrow.parquet as pq
    import torch

    from bench.common import device_name, versions
    from runner.prompt import decode_image, generate, generation_batch
    from runner.refill import refill_generate

    assets = build_assets(Path(tempfile.mkdtemp()), train_rows=args.rows, test_rows=1)
    recipe = load_recipe(Path("recipes/smoke_tiny.yaml"), [f"model.id={assets['model']}",
                                                          f"model.backend={args.backend}", f"model.dtype={args.dtype}"])
    model, processor = backend.load(recipe["model"])
    model = backend.prepare_for_inference(backend.attach_lora(model, recipe["lora"]))
    instruction = recipe["dataset"]["instruction"]
    images = [decode_image(row["image"]) for row in pq.read_table(assets["train"]).to_pylist()]
    images.sort(key=lambda image: -generation_batch(processor, [image], instruction)["input_ids"].shape[1])
    caps = [1 + (7 * i) % args.new_tokens for i in range(len(images))]
    with torch.no_grad():
        alone = [generate(model, processor, [image], instruction, cap)[0] for image, cap in zip(images, caps)]
        caches = args.caches.split(",") if args.caches else ["dynamic"] + (["static"] * (args.backend == "transformers"))
        summary = {"benchmark": "refill_check", "backend": args.backend, "dtype": args.dtype, "rows": len(images),
                   "slots": args.slots, "distinct_answers": len(set(alone))}
        for cache in caches:
            started = time.perf_counter()
            got = refill_generate(model, processor, images, instruction, caps, args.slots, cache=cache,
                                  compile=cache == "static" and torch.cuda.is_available())
            summary[f"same_as_alone_{cache}"] = round(sum(a == b for a, b in zip(alone, got)) / len(images), 4)
            summary[f"{cache}_s"] = round(time.perf_counter() - started, 1)
    summary.update(device=device_name(), versions=versions(), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
