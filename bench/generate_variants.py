"""Where eval time goes: one generation variant per process, timed batch by batch, prefill apart from decoding.

Loads the 7B architecture through a runner backend, attaches a LoRA of the recipe's shape (merged into 16-bit
weights during generation, as runner.evaluate does), and times `runner.prompt.generate` on real formula images,
length-sorted as the eval step sorts them. Each batch is timed twice: once with 1 new token (prefill: vision tower
and prompt) and once with `--new-tokens` (random weights never stop early, so every row decodes all of them).
Variants: the backend, the batch size, transformers' KV cache kind (`static` lets generate compile the decode step
into CUDA graphs), Unsloth's own generate (UNSLOTH_DISABLE_FAST_GENERATION=0) and the decode-step attention
(`--decode-attention`: the eval step's runner/decode_attention.py by default, or transformers' SDPA path). `--profile FILE` writes a
torch.profiler table of the first steady batch. `--answer-lengths reference`
ends each answer where its reference answer ends (its token count, then the end token), as a model that reads the
formulas right would: a batch then decodes as long as its longest answer, up to `--new-tokens`.

    python -m bench.generate_variants --model-dir /tmp/qwen7b --data bench_data/validation_4800.parquet \
        --backend transformers --batch-size 256 --cache static --out /tmp/gen.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.common import add_decode_attention_argument


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generation time per batch for one eval variant.")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--recipe", default="recipes/qwen25vl_latex_fast.yaml", help="model and lora sections")
    parser.add_argument("--backend", choices=("transformers", "unsloth"), default="transformers")
    parser.add_argument("--quantization", default=None, help="override the recipe's model.quantization")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4, help="batches timed after one warm-up batch")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    add_decode_attention_argument(parser)
    parser.add_argument("--answer-lengths", choices=("forced", "reference"), default="forced",
                        help="forced: every row decodes --new-tokens; reference: each row stops at its reference "
                        "answer's length (--new-tokens is then the cap, as eval.max_new_tokens)")
    parser.add_argument("--no-lora", action="store_true", help="the bare model, as bench/eval_speed.py times it")
    parser.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table (kernels and "
                        "operators by device time) of the second batch's generation to this file")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file; one line per variant is appended")
    return parser.parse_args(argv)


class StopAtReferenceLength:
    """A logits processor: row i may only emit `end_id` once it has generated `lengths[i]` tokens, and must then."""

    def __init__(self, prompt_length: int, lengths, end_id: int):
        import torch

        self.prompt_length, self.end_id = prompt_length, end_id
        self.lengths = torch.as_tensor(lengths)

    def __call__(self, input_ids, scores):
        done = (input_ids.shape[1] - self.prompt_length) >= self.lengths.to(scores.device)
        scores = scores.clone()
        scores[done] = float("-inf")
        scores[done, self.end_id] = 0.0
        return scores


def reference_lengths(processor, references: list[str]) -> list[int]:
    return [len(ids) for ids in processor.tokenizer(references, add_special_tokens=False)["input_ids"]]


def profiled_activities() -> list:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def write_profile(profiler, path: Path, title: str) -> None:
    import torch

    sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    path.write_text(f"{title}, sorted by {sort_by}\n{profiler.key_averages().table(sort_by=sort_by, row_limit=50)}")
    print(f"profile: {path}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    from runner import backends
    from runner.recipe import load_recipe

    recipe = load_recipe(Path(args.recipe), [f"model.id={args.model_dir}", f"model.backend={args.backend}"]
                         + ([f"model.quantization={args.quantization}"] if args.quantization else []))
    backend = backends.load_backend(args.backend)  # Unsloth must be imported before transformers

    import torch

    from bench.common import decode_attention_context, device_name, versions
    from runner.data import prepare
    from runner.evaluate import length_sorted_batches
    from runner.eval_weights import generation_weights
    from runner.prompt import decode_image, generate, text_of

    started = time.perf_counter()
    model, processor = backend.load(recipe["model"])
    if not args.no_lora:
        model = backend.attach_lora(model, recipe["lora"])
    model = backend.prepare_for_inference(model)
    load_s = time.perf_counter() - started
    model.generation_config.min_new_tokens = args.new_tokens
    if args.cache == "static":
        model.generation_config.cache_implementation = "static"
    dataset_cfg = {**recipe["dataset"], "id": str(args.data), "eval_split": None, "shuffle": False,
                   "max_samples": args.batch_size * (args.batches + 1)}
    rows = prepare(dataset_cfg, processor, recipe["model"]["max_seq_length"]).train
    instruction = dataset_cfg["instruction"]

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(images, new_tokens, lengths=None) -> float:
        processors = None
        if lengths is not None:
            from transformers import LogitsProcessorList

            from runner.prompt import END_OF_TURN, generation_batch

            prompt_length = generation_batch(processor, images, instruction)["input_ids"].shape[1]
            end_id = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
            processors = LogitsProcessorList([StopAtReferenceLength(prompt_length, lengths, end_id)])
        sync()
        t = time.perf_counter()
        generate(model, processor, images, instruction, new_tokens, logits_processor=processors)
        sync()
        return time.perf_counter() - t

    batches = []
    with torch.no_grad(), generation_weights(model, "auto"), decode_attention_context(model, args.decode_attention):
        for i, positions in enumerate(length_sorted_batches(rows, args.batch_size)):
            batch = rows.select(positions)
            images = [decode_image(value, None) for value in batch["image"]]
            model.generation_config.min_new_tokens = 1
            prefill_s = timed(images, 1)
            lengths, decoded = None, args.new_tokens
            if args.answer_lengths == "reference":
                references = [text_of(value) for value in batch["text"]]
                lengths = [min(n, args.new_tokens - 1) for n in reference_lengths(processor, references)]
                decoded = max(lengths) + 1  # the end token too
            else:
                model.generation_config.min_new_tokens = args.new_tokens
            if args.profile is not None and i == 1:  # the first steady batch
                with torch.profiler.profile(activities=profiled_activities()) as profiler:
                    total_s = timed(images, args.new_tokens, lengths)
                write_profile(profiler, args.profile, f"{args.name or args.backend}: batch {i}, {len(images)} rows")
            else:
                total_s = timed(images, args.new_tokens, lengths)
            batches.append({"batch": i, "rows": len(images), "prefill_s": round(prefill_s, 3),
                            "generate_s": round(total_s, 3), "decoded_tokens": decoded,
                            **({"mean_answer_tokens": round(sum(lengths) / len(lengths), 1)} if lengths else {}),
                            "decode_ms_per_token": round(1000 * (total_s - prefill_s) / max(decoded - 1, 1), 2)})
            print(json.dumps(batches[-1]), flush=True)
    steady = batches[1:]  # the first batch pays compilation and allocator warm-up
    rows_s = sum(b["rows"] for b in steady) / sum(b["generate_s"] for b in steady)
    result = {"name": args.name or f"{args.backend}-{args.cache}-bs{args.batch_size}", "backend": args.backend,
              "quantization": recipe["model"]["quantization"], "lora": not args.no_lora, "cache": args.cache,
              "batch_size": args.batch_size, "new_tokens": args.new_tokens, "answer_lengths": args.answer_lengths,
              "decode_attention": args.decode_attention,
              "unsloth_fast_generation_disabled": os.environ.get("UNSLOTH_DISABLE_FAST_GENERATION"),
              "load_s": round(load_s, 1), "steady_samples_per_s": round(rows_s, 2),
              "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None, "batches": batches,
              "device": device_name(), "versions": versions(), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}), flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
