"""The one place that turns (image, instruction[, answer]) into model inputs, for training and inference alike.

Training and generation call the same `encode_prompts`, so the tokens the model is trained to continue are
exactly the tokens it is asked to continue at inference. Labels are -100 everywhere except the answer and
the `<|im_end|>` that closes it: the model learns the LaTeX and when to stop, never the prompt or the image.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"


def messages(instruction: str) -> list[dict]:
    """The Qwen2.5-VL chat turn: the image first, then the instruction (as in Unsloth's notebook)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def prompt_text(processor, instruction: str) -> str:
    return processor.apply_chat_template(messages(instruction), tokenize=False, add_generation_prompt=True)


def decode_image(value: Any, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a decoded image, a `{bytes, path}` struct or a path; raises on bad data."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, (dict, str)):
        path = value.get("path") if isinstance(value, dict) else value
        if not path:
            raise ValueError("image has neither bytes nor a path")
        path = Path(path)
        image = Image.open(path if path.is_absolute() or base_dir is None else base_dir / path)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    image.load()  # decode now, so a truncated file fails here and not inside a training step
    if image.mode != "RGB":
        # Formula PNGs often carry transparency; flatten onto white as a viewer would show them.
        background = Image.new("RGB", image.size, "white")
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    return image


def text_of(value: Any) -> str | None:
    """The LaTeX target as text: a string, or UTF-8 bytes (a binary parquet column); None if it is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def encode_prompts(processor, images: list[Image.Image], instruction: str) -> dict[str, list]:
    """Per-sample prompt token ids (image placeholders expanded) and the pixel inputs, unpadded."""
    text = prompt_text(processor, instruction)
    return processor(text=[text] * len(images), images=images, padding=False, return_tensors=None)


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


def _pixels(encoded) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.as_tensor(encoded["pixel_values"]),
        "image_grid_thw": torch.as_tensor(encoded["image_grid_thw"]),
    }


def training_batch(processor, images: list[Image.Image], answers: list[str], instruction: str) -> dict:
    """A right-padded training batch whose labels cover only each answer and its end-of-turn token."""
    tokenizer = processor.tokenizer
    encoded = encode_prompts(processor, images, instruction)
    answer_ids = tokenizer([a + END_OF_TURN for a in answers], add_special_tokens=False)["input_ids"]
    input_ids, labels, token_types = [], [], []
    for prompt_ids, types, answer in zip(encoded["input_ids"], encoded["mm_token_type_ids"], answer_ids):
        input_ids.append(list(prompt_ids) + answer)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + answer)
        token_types.append(list(types) + [0] * len(answer))
    pad_id = tokenizer.pad_token_id
    return {
        "input_ids": _pad(input_ids, pad_id, left=False),
        "attention_mask": _pad([[1] * len(r) for r in input_ids], 0, left=False),
        "mm_token_type_ids": _pad(token_types, 0, left=False),
        "labels": _pad(labels, IGNORE_INDEX, left=False),
        **_pixels(encoded),
    }


def generation_batch(processor, images: list[Image.Image], instruction: str) -> dict:
    """A left-padded batch of prompts, ready for `model.generate`."""
    encoded = encode_prompts(processor, images, instruction)
    pad_id = processor.tokenizer.pad_token_id
    return {
        "input_ids": _pad([list(r) for r in encoded["input_ids"]], pad_id, left=True),
        "attention_mask": _pad([[1] * len(r) for r in encoded["input_ids"]], 0, left=True),
        "mm_token_type_ids": _pad([list(r) for r in encoded["mm_token_type_ids"]], 0, left=True),
        **_pixels(encoded),
    }


def stop_token_ids(processor) -> list[int]:
    tokenizer = processor.tokenizer
    return sorted({tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.pad_token_id})


@torch.no_grad()
def generate(model, processor, images: list[Image.Image], instruction: str, max_new_tokens: int,
             kv_cache: str = "dynamic", logits_processor=None) -> list[str]:
    """Greedy answers (assistant text only, special tokens removed) for a batch of images. `kv_cache="static"`
    lets transformers compile the decode step on a GPU (see eval.kv_cache in schemas/eval.schema.json);
    `logits_processor` is handed to `model.generate` (bench/generate_variants.py ends answers at real lengths)."""
    batch = generation_batch(processor, images, instruction)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    stops = stop_token_ids(processor)
    output = model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
        pad_token_id=processor.tokenizer.pad_token_id, cache_implementation="static" if kv_cache == "static" else None,
        logits_processor=logits_processor,
    )
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
