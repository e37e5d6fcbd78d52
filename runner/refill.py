"""Greedy generation that refills ended rows: the eval step's default (`eval.batching: refill`).

Length-sorted batches decode until their longest answer ends, so on the validation split about half of all
row-steps belong to rows that have already ended (bench/eval_batch_order.py). Here `slots` rows decode together;
once `refill_at` of them have ended, the next rows are prefilled (vision tower and prompt, as a small batch of their
own) and their KV cache is written into the ended slots, right-aligned with the running batch's current column, so
every slot keeps decoding in one step. Each row keeps its own mRoPE text position (passed explicitly) and its
attention mask covers only its own columns. transformers' own continuous batching (`generate_batch`) takes token ids
with one row of positions, so it cannot run Qwen2.5-VL's image prompts.

Two cache layouts: `GrowingSlots` (a DynamicCache; columns no slot reads any more are dropped) and `RingSlots` (a
StaticCache used as a ring, fixed shapes, so the decode step compiles into CUDA graphs). Every row gets the answer
transformers' generate gives it alone: on the CPU (tests/test_refill.py) and on the GPU under both backends
(bench/refill_check.py); speed: docs/benchmarks.md, "Eval, round 6".
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

import torch
from transformers import DynamicCache

from .prompt import generation_batch, stop_token_ids

RING_COMPILE = {"mode": "reduce-overhead", "dynamic": False}  # CUDA graphs; bench/refill_generate.py tries others


def _prefill(model, processor, images, instruction):
    """One forward over a left-padded batch of prompts: (cache, 2-D mask, last logits, each row's next position)."""
    batch = {k: v.to(model.device) for k, v in generation_batch(processor, images, instruction).items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    # only the last position's logits, as generate asks: all of them would be rows x prompt x 152k vocabulary
    # (6.4 GiB in bf16 for the validation split's 256 longest prompts, 89 tokens each)
    out = model(**batch, past_key_values=DynamicCache(), use_cache=True, **_last_logits_only(model))
    # as transformers' generate: a decode step's text position is the row's real token count + its rope delta
    owner = _language_model_owner(model)
    positions = batch["attention_mask"].sum(-1) + owner.rope_deltas.reshape(-1)
    owner.rope_deltas = None  # decode steps get explicit positions; a batch-sized tensor here would recompile them
    return out.past_key_values, batch["attention_mask"], out.logits[:, -1], positions


def _last_logits_only(model) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through peft's wrapper
    supported = getattr(base, "_supports_logits_to_keep", None)
    return {"logits_to_keep": 1} if supported and supported() else {}


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
        self.forward = torch.compile(model, **RING_COMPILE) if compile else model

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
def refill_generate(model, processor, images: Sequence, instruction: str, max_new_tokens, slots: int,
                    refill_at: int | None = None, cache: str = "dynamic", compile: bool = False,
                    on_answer: Callable[[int, str], None] | None = None) -> list[str]:
    """Greedy answers for `images` (any sequence: read one by one as rows are prefilled), in their order.

    `max_new_tokens`: an int, or one cap per image. `refill_at`: how many slots must have ended before new rows are
    prefilled into them (default a quarter of the slots). `cache`: "dynamic" (GrowingSlots) or "static" (RingSlots,
    `compile` for CUDA graphs); the ring is as wide as the first rows' prompts + the largest cap, so later rows must
    not have longer prompts (sort them). `on_answer(index, text)` is called as each row ends, in ending order."""
    if not len(images):
        return []
    caps = [max_new_tokens] * len(images) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    refill_at = refill_at or max(1, slots // 4)
    stops = set(stop_token_ids(processor))
    pending = deque(range(len(images)))
    answers: list[list[int]] = [[] for _ in range(len(images))]
    texts: list[str | None] = [None] * len(images)
    first = [pending.popleft() for _ in range(min(slots, len(pending)))]
    first_cache, first_mask, logits, positions = _prefill(model, processor, [images[i] for i in first], instruction)
    if cache == "static":
        width = first_mask.shape[1] + max(caps)
        ring = RingSlots(model, first_cache, first_mask, width, compile)
    else:
        ring = GrowingSlots(first_cache, first_mask)
    del first_cache, first_mask  # the ring holds a copy: the prefill's own cache would stay for the whole run
    row_of = list(first)  # the image each slot decodes; -1: ended (its slot decodes on, unread, until refilled)

    def take(tokens: list[int], slots_: list[int]) -> None:
        for slot in slots_:
            row = row_of[slot]
            if row < 0:
                continue
            ended = tokens[slot] in stops
            if not ended:
                answers[row].append(tokens[slot])
                ended = len(answers[row]) >= caps[row]
            if ended:
                row_of[slot] = -1
                texts[row] = processor.tokenizer.decode(answers[row], skip_special_tokens=True).strip()
                if on_answer:
                    on_answer(row, texts[row])

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
            del sub_cache  # written into the slots; not kept until the next refill
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
    return texts
