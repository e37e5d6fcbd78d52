"""An eval variant to measure: greedy generation that refills a batch's ended rows with new ones.

The eval step's batches decode until their longest answer ends; on the validation split about half of all
row-steps belong to rows that have already ended (bench/eval_batch_order.py). Here a fixed number of slots decode
together, and once `refill_at` of them have ended, the next rows are prefilled (vision tower and prompt, as a small
batch of their own) and their KV cache is written into the ended slots, right-aligned with the running batch's
current length, so that every slot keeps decoding at the same cache column. Each row keeps its own mRoPE text
position (passed explicitly), and its attention mask covers only its own columns. Columns that no slot reads any
more are dropped as the cache grows. Transformers' own continuous batching (`generate_batch`) takes token ids with
one row of positions only, so it cannot run Qwen2.5-VL's image prompts; this is the runner-side version, kept in
bench/ until it is measured against the eval step's batches.

    from bench.refill_generate import refill_generate
    answers = refill_generate(model, processor, images, instruction, max_new_tokens=256, slots=256)

As a benchmark: the same rows, each ending at its reference answer's length (random weights never stop by
themselves), once through the eval step's length-sorted batches (`runner.prompt.generate`) and once refilled:

    python -m bench.refill_generate --model-dir /tmp/qwen7b --data bench_data/validation_4800.parquet --rows 2048 \
        --cache static --out refill.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from pathlib import Path

import torch
from transformers import DynamicCache

from runner.prompt import generation_batch, stop_token_ids


def _prefill(model, processor, images, instruction):
    """One forward over a left-padded batch of prompts: (cache, 2-D mask, last logits, each row's next position)."""
    batch = {k: v.to(model.device) for k, v in generation_batch(processor, images, instruction).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    out = model(**batch, past_key_values=DynamicCache(), use_cache=True)
    # as transformers' generate: a decode step's text position is the row's real token count + its rope delta
    owner = _language_model_owner(model)
    positions = batch["attention_mask"].sum(-1) + owner.rope_deltas.reshape(-1)
    owner.rope_deltas = None  # decode steps get explicit positions; a batch-sized tensor here would recompile them
    return out.past_key_values, batch["attention_mask"], out.logits[:, -1], positions


def _language_model_owner(model):
    """The module holding `rope_deltas` (Qwen2_5_VLModel), through peft's and transformers' wrappers."""
    inner = model
    while not hasattr(inner, "rope_deltas"):
        inner = inner.model
    return inner


class GrowingSlots:
    """Slots on a DynamicCache: every step appends a column; leading columns no slot reads are dropped."""

    def __init__(self, cache, mask):
        self.cache, self.mask = cache, mask

    def insert(self, targets, sub_cache, sub_mask) -> None:
        width = sub_mask.shape[1]
        if width > self.mask.shape[1]:
            self._left_pad(width - self.mask.shape[1])
        index = torch.tensor(targets, device=self.mask.device)
        for layer, sub_layer in zip(self.cache.layers, sub_cache.layers):
            layer.keys[index, :, -width:] = sub_layer.keys
            layer.values[index, :, -width:] = sub_layer.values
        self.mask[index] = 0
        self.mask[index, -width:] = sub_mask

    def step(self, model, tokens, positions):
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        out = model(input_ids=tokens.view(-1, 1), attention_mask=self.mask, position_ids=positions.view(1, -1, 1)
                    .expand(3, -1, 1), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self._drop_dead_columns()
        return out.logits[:, -1]

    def _left_pad(self, columns: int) -> None:
        """`columns` more masked columns on the left of every layer's keys and values."""
        for layer in self.cache.layers:
            pad = layer.keys.new_zeros(*layer.keys.shape[:2], columns, layer.keys.shape[-1])
            layer.keys, layer.values = torch.cat([pad, layer.keys], -2), torch.cat([pad, layer.values], -2)
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], columns), self.mask], 1)

    def _drop_dead_columns(self) -> None:
        live = self.mask.any(0).nonzero()
        first = int(live[0]) if len(live) else self.mask.shape[1]
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]


class RingSlots:
    """Slots on a StaticCache of `width` columns used as a ring: step t writes column t % width, and a new row's
    prompt goes into the columns just before it. Keys carry their rotary position already, so attention does not
    care where in the ring a column sits; each slot's mask marks its row's columns. Shapes never change, so the
    decode step can be compiled into CUDA graphs (`compile`). Each row needs prompt + answer <= width columns."""

    def __init__(self, model, first_cache, first_mask, width: int, compile: bool):
        from transformers import StaticCache

        keys = first_cache.layers[0].keys
        self.width, self.column = width, first_mask.shape[1]
        self.cache = StaticCache(config=model.config, max_cache_len=width)
        self.cache.early_initialization(keys.shape[0], keys.shape[1], keys.shape[-1], keys.dtype, keys.device)
        self.mask = torch.zeros(keys.shape[0], width, dtype=torch.bool, device=keys.device)
        self.insert(list(range(keys.shape[0])), first_cache, first_mask)
        self.forward = torch.compile(model, mode="reduce-overhead", dynamic=False) if compile else model

    def insert(self, targets, sub_cache, sub_mask) -> None:
        width = sub_mask.shape[1]
        index = torch.tensor(targets, device=self.mask.device)
        start = (self.column - width) % self.width
        first = min(width, self.width - start)  # the columns up to the ring's end, then from its start
        for layer, sub_layer in zip(self.cache.layers, sub_cache.layers):
            for mine, theirs in ((layer.keys, sub_layer.keys), (layer.values, sub_layer.values)):
                mine[index, :, start : start + first] = theirs[:, :, :first]
                mine[index, :, : width - first] = theirs[:, :, first:]
        self.mask[index] = False
        self.mask[index, start : start + first] = sub_mask[:, :first].bool()
        self.mask[index, : width - first] = sub_mask[:, first:].bool()

    def step(self, model, tokens, positions):
        column = self.column % self.width
        self.mask[:, column] = True  # every slot's new token (an ended slot's is never read)
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(column)  # where StaticLayer.update writes this step's keys and values
        out = self.forward(input_ids=tokens.view(-1, 1), position_ids=positions.view(1, -1, 1).expand(3, -1, 1),
                           attention_mask={"full_attention": self.mask[:, None, None, :]},
                           past_key_values=self.cache, use_cache=True)
        self.column += 1
        return out.logits[:, -1]


@torch.no_grad()
def refill_generate(model, processor, images: list, instruction: str, max_new_tokens, slots: int,
                    refill_at: int | None = None, cache: str = "dynamic", compile: bool = False) -> list[str]:
    """Greedy answers for `images`, in their order. `max_new_tokens`: an int, or one cap per image. `refill_at`:
    how many slots must have ended before new rows are prefilled into them (default a quarter of the slots).
    `cache`: "dynamic" (GrowingSlots) or "static" (RingSlots, `compile` for CUDA graphs); the static ring is as
    wide as the first rows' prompts + the largest cap, so later rows must not have longer prompts (sort them)."""
    caps = [max_new_tokens] * len(images) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    refill_at = refill_at or max(1, slots // 4)
    stops = set(stop_token_ids(processor))
    pending = deque(range(len(images)))
    answers: list[list[int]] = [[] for _ in images]
    first = [pending.popleft() for _ in range(min(slots, len(pending)))]
    first_cache, first_mask, logits, positions = _prefill(model, processor, [images[i] for i in first], instruction)
    if cache == "static":
        width = first_mask.shape[1] + max(caps)
        ring = RingSlots(model, first_cache, first_mask, width, compile)
    else:
        ring = GrowingSlots(first_cache, first_mask)
    row_of = list(first)  # the image each slot decodes; -1: ended (its slot decodes on, unread, until refilled)

    def take(tokens: list[int], slots_: list[int]) -> None:
        for slot in slots_:
            row = row_of[slot]
            if row < 0:
                continue
            if tokens[slot] in stops:
                row_of[slot] = -1
                continue
            answers[row].append(tokens[slot])
            if len(answers[row]) >= caps[row]:
                row_of[slot] = -1

    tokens = logits.argmax(-1)
    take(tokens.tolist(), list(range(len(row_of))))
    while True:
        free = [slot for slot, row in enumerate(row_of) if row < 0]
        while pending and free and (len(free) >= min(refill_at, len(pending)) or len(free) == len(row_of)):
            new = [pending.popleft() for _ in free[: len(pending)]]
            targets = free[: len(new)]
            sub_cache, sub_mask, sub_logits, sub_positions = _prefill(model, processor, [images[i] for i in new],
                                                                      instruction)
            if cache == "static" and sub_mask.shape[1] + max(caps[i] for i in new) > ring.width:
                raise ValueError(f"a prompt of {sub_mask.shape[1]} tokens does not fit the ring of {ring.width} "
                                 "columns sized by the first rows: pass the images longest prompt first")
            ring.insert(targets, sub_cache, sub_mask)
            positions[torch.tensor(targets, device=positions.device)] = sub_positions
            tokens[torch.tensor(targets, device=tokens.device)] = sub_logits.argmax(-1)  # from their own prefill
            for slot, row in zip(targets, new):
                row_of[slot] = row
            take(tokens.tolist(), targets)
            free = [slot for slot, row in enumerate(row_of) if row < 0]
        if all(row < 0 for row in row_of):
            break
        tokens = ring.step(model, tokens, positions).argmax(-1)
        positions = positions + 1
        take(tokens.tolist(), list(range(len(row_of))))
    return [processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]


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
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from runner import backends
    from runner.recipe import load_recipe

    recipe = load_recipe(Path(args.recipe), [f"model.id={args.model_dir}", f"model.backend={args.backend}"])
    backend = backends.load_backend(args.backend)  # Unsloth must be imported before transformers
    from transformers import LogitsProcessorList

    from bench.common import device_name, versions
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
    results, answers = {}, {}
    with torch.no_grad(), generation_weights(model, "auto"):
        sync()
        started, batched = time.perf_counter(), []
        for start in range(0, len(images), args.batch_size):
            chunk, lengths = images[start : start + args.batch_size], caps[start : start + args.batch_size]
            prompt_length = generation_batch(processor, chunk, instruction)["input_ids"].shape[1]
            stop = LogitsProcessorList([StopAtReferenceLength(prompt_length, lengths, end_id)])
            batched += generate(model, processor, chunk, instruction, args.new_tokens, args.cache, stop)
        sync()
        results["batched"] = time.perf_counter() - started
        answers["batched"] = batched
        for kind in args.refill_caches.split(","):
            started = time.perf_counter()
            answers[f"refilled_{kind}"] = refill_generate(model, processor, images, instruction, caps, args.batch_size,
                                                          args.refill_at, kind, torch.cuda.is_available())
            sync()
            results[f"refilled_{kind}"] = time.perf_counter() - started
    same = {f"same_answers_{k}": round(sum(a == b for a, b in zip(batched, v)) / len(images), 4)
            for k, v in answers.items() if k != "batched"}
    summary = {"benchmark": "refill_generate", "backend": args.backend, "rows": len(images),
               "batch_size": args.batch_size, "refill_at": args.refill_at or max(1, args.batch_size // 4),
               "new_tokens_cap": args.new_tokens, "batched_cache": args.cache,
               "mean_answer_tokens": round(sum(caps) / len(caps), 1),
               **{f"{k}_s": round(v, 1) for k, v in results.items()},
               **{f"{k}_samples_per_s": round(len(images) / v, 2) for k, v in results.items()},
               **same, "device": device_name(), "versions": versions(),
               "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
