"""The eval step's length-sorted batches against refilled slots (runner/refill.py), on the same rows.

Random weights never stop by themselves, so each row ends at its reference answer's length (capped at
`--new-tokens`): once through `runner.prompt.generate` in the eval step's length-sorted batches
(`eval.batching: batches`), and once per refill layout (`eval.batching: refill`, `--refill-caches`), each refilled
run with its breakdown (prefills and their rows, decode steps, the first steps' compilation, the median step):

    python -m bench.refill_generate --model-dir /tmp/qwen7b --data bench_data/validation_4800.parquet --rows 2048 \
        --cache static --out refill.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import add_decode_attention_argument
from runner import refill
from runner.prompt import generation_batch
from runner.refill import refill_generate


class Breakdown:
    """Where a refilled run's time goes: its prefills and its decode steps, each timed between synchronizations
    (the decode loop synchronizes every step anyway, to read the new tokens)."""

    def __init__(self, sync):
        self.sync, self.times = sync, {"prefill": [], "prefill_rows": [], "decode": []}

    def __enter__(self):
        self.patched = [(refill, "_prefill", refill._prefill, "prefill"),
                        (refill.GrowingSlots, "step", refill.GrowingSlots.step, "decode"),
                        (refill.RingSlots, "step", refill.RingSlots.step, "decode")]
        for owner, name, original, key in self.patched:
            setattr(owner, name, self._timed(original, key))
        return self

    def __exit__(self, *exc):
        for owner, name, original, _ in self.patched:
            setattr(owner, name, original)

    def _timed(self, original, key):
        def timed(*args, **kwargs):
            self.sync()
            started = time.perf_counter()
            out = original(*args, **kwargs)
            self.sync()
            self.times[key].append(time.perf_counter() - started)
            if key == "prefill":
                self.times["prefill_rows"].append(len(args[2]))
            return out
        return timed

    def figures(self, prefix: str) -> dict:
        decode, prefill = self.times["decode"], self.times["prefill"]
        steady = sorted(decode[3:]) or [0.0]  # the first steps compile (ring) or warm up
        return {f"{prefix}_prefills": len(prefill), f"{prefix}_prefill_rows": sum(self.times["prefill_rows"]),
                f"{prefix}_prefill_s": round(sum(prefill), 2), f"{prefix}_decode_steps": len(decode),
                f"{prefix}_decode_s": round(sum(decode), 2),
                f"{prefix}_first_decode_steps_s": round(sum(decode[:3]), 2),
                f"{prefix}_decode_ms_per_step_median": round(1000 * steady[len(steady) // 2], 2)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Eval-step batches against refilled slots, on the same rows.")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--recipe", default="recipes/qwen25vl_latex_fast.yaml", help="model and lora sections")
    parser.add_argument("--backend", choices=("transformers", "unsloth"), default="transformers")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256, help="the eval batch, and the refill slots")
    parser.add_argument("--refill-at", type=int, default=None, help="ended slots before a refill (default: 1/4)")
    parser.add_argument("--new-tokens", type=int, default=256, help="the cap, as eval.max_new_tokens")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="static", help="the batched path's KV cache")
    parser.add_argument("--refill-caches", default="dynamic,static", help="refill variants to time: dynamic "
                        "(a growing cache, eager) and/or static (a ring, compiled into CUDA graphs on a GPU)")
    add_decode_attention_argument(parser)
    parser.add_argument("--ring-compile", choices=("inductor", "cudagraphs"), default="inductor",
                        help="how the ring's decode step compiles: inductor's kernels in CUDA graphs (the eval step's), "
                        "or torch's eager kernels captured in CUDA graphs (backend=cudagraphs: no kernel generation)")
    parser.add_argument("--skip-batched", action="store_true", help="time the refilled runs only")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from runner import backends
    from runner.recipe import load_recipe

    if args.ring_compile == "cudagraphs":
        refill.RING_COMPILE = {"backend": "cudagraphs", "dynamic": False}
    recipe = load_recipe(Path(args.recipe), [f"model.id={args.model_dir}", f"model.backend={args.backend}"])
    backend = backends.load_backend(args.backend)  # Unsloth must be imported before transformers
    from transformers import LogitsProcessorList

    from bench.common import decode_attention_context, device_name, versions
    from bench.generate_variants import StopAtReferenceLength, reference_lengths
    from runner.data import prepare
    from runner.eval_weights import generation_weights
    from runner.evaluate import length_sorted_batches
    from runner.prompt import END_OF_TURN, decode_image, generate, text_of

    model, processor = backend.load(recipe["model"])
    model = backend.prepare_for_inference(backend.attach_lora(model, recipe["lora"]))
    cfg = {**recipe["dataset"], "id": str(args.data), "eval_split": None, "shuffle": False, "max_samples": args.rows}
    rows = prepare(cfg, processor, recipe["model"]["max_seq_length"]).train
    instruction, end_id = cfg["instruction"], processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    caps = [min(n, args.new_tokens) for n in reference_lengths(processor, [text_of(v) for v in rows["text"]])]
    order = [p for batch in length_sorted_batches(rows, args.batch_size) for p in batch]
    images = [decode_image(value, None) for value in rows.select(order)["image"]]
    caps = [caps[p] for p in order]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    # transformers' compiled decode step and the ring's compile the same forward: room for both sets of graphs
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    results, answers, breakdown = {}, {}, {}
    with torch.no_grad(), generation_weights(model, "auto"), decode_attention_context(model, args.decode_attention):
        sync()
        started, batched = time.perf_counter(), []
        for start in range(0, 0 if args.skip_batched else len(images), args.batch_size):
            chunk, lengths = images[start : start + args.batch_size], caps[start : start + args.batch_size]
            prompt_length = generation_batch(processor, chunk, instruction)["input_ids"].shape[1]
            stop = LogitsProcessorList([StopAtReferenceLength(prompt_length, lengths, end_id)])
            batched += generate(model, processor, chunk, instruction, args.new_tokens, args.cache, stop)
        sync()
        if not args.skip_batched:
            results["batched"] = time.perf_counter() - started
            print(f"batched: {results['batched']:.1f} s", flush=True)  # a run cut later still says this much
            answers["batched"] = batched
        for kind in args.refill_caches.split(","):
            started = time.perf_counter()
            with Breakdown(sync) as timer:
                answers[f"refilled_{kind}"] = refill_generate(model, processor, images, instruction, caps,
                                                              args.batch_size, args.refill_at, kind,
                                                              torch.cuda.is_available())
            sync()
            results[f"refilled_{kind}"] = time.perf_counter() - started
            breakdown.update(timer.figures(f"refilled_{kind}"))
            print(f"refilled_{kind}: {results[f'refilled_{kind}']:.1f} s", flush=True)
    same = {f"same_answers_{k}": round(sum(a == b for a, b in zip(batched, v)) / len(images), 4)
            for k, v in answers.items() if k != "batched" and not args.skip_batched}
    summary = {"benchmark": "refill_generate", "backend": args.backend, "rows": len(images),
               "batch_size": args.batch_size, "refill_at": args.refill_at or max(1, args.batch_size // 4),
               "new_tokens_cap": args.new_tokens, "batched_cache": None if args.skip_batched else args.cache,
               "decode_attention": args.decode_attention, "ring_compile": args.ring_compile,
               "mean_answer_tokens": round(sum(caps) / len(caps), 1),
               **{f"{k}_s": round(v, 1) for k, v in results.items()},
               **{f"{k}_samples_per_s": round(len(images) / v, 2) for k, v in results.items()},
               **breakdown, **same, "device": device_name(), "versions": versions(),
               "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
