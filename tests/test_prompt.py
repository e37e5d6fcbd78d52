from __future__ import annotations

import io

import pytest
from PIL import Image

from runner.prompt import IGNORE_INDEX, decode_image, generation_batch, training_batch
from runner.tiny import render_png

INSTRUCTION = "Write the LaTeX representation for this image."


def png(formula: str) -> Image.Image:
    return decode_image({"bytes": render_png(formula)})


def test_labels_cover_exactly_the_answer_and_its_end_of_turn(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    answers = [r"\frac { 1 } { 2 }", r"x ^ { 2 } + y ^ { 2 } = z ^ { 2 }"]
    images = [png(a) for a in answers]
    batch = training_batch(tiny_processor, images, answers, INSTRUCTION)
    for row, answer in enumerate(answers):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        length = int(mask.sum())
        start = length - len(answer_ids)
        # prompt (system, user turn, image tokens, assistant header): all ignored
        assert (labels[:start] == IGNORE_INDEX).all()
        # answer and <|im_end|>: labelled with themselves, token for token
        assert labels[start:length].tolist() == answer_ids == ids[start:length].tolist()
        assert tokenizer.convert_ids_to_tokens(labels[length - 1].item()) == "<|im_end|>"
        # right padding: ignored and masked
        assert (labels[length:] == IGNORE_INDEX).all() and (mask[length:] == 0).all()
        # the image tokens are in the prompt and are never labels
        image_positions = ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert image_positions.sum() > 0 and (labels[image_positions] == IGNORE_INDEX).all()
        assert tokenizer.decode(ids[start - 3 : start]) == "<|im_start|>assistant\n"


def test_training_and_inference_prompts_agree_token_for_token(tiny_processor):
    answers = [r"\alpha + \beta", r"\sqrt { x + 1 }"]
    images = [png(a) for a in answers]
    train = training_batch(tiny_processor, images, answers, INSTRUCTION)
    infer = generation_batch(tiny_processor, images, INSTRUCTION)
    assert (train["pixel_values"] == infer["pixel_values"]).all()
    assert (train["image_grid_thw"] == infer["image_grid_thw"]).all()
    for row in range(len(answers)):
        prompt = infer["input_ids"][row][infer["attention_mask"][row].bool()].tolist()  # left padding removed
        assert train["input_ids"][row][: len(prompt)].tolist() == prompt
        assert (train["labels"][row][: len(prompt)] == IGNORE_INDEX).all()
        assert train["labels"][row][len(prompt)] != IGNORE_INDEX


def test_generation_batch_is_left_padded(tiny_processor):
    images = [png("x"), png(r"\int _ { 0 } ^ { 1 } f ( x ) d x + \sum _ { i = 1 } ^ { n } i ^ { 2 }")]
    batch = generation_batch(tiny_processor, images, INSTRUCTION)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]  # every prompt ends at the last column; the short one is padded left


def test_decode_image_flattens_transparency_onto_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = decode_image({"bytes": buffer.getvalue(), "path": None})
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_reads_paths_relative_to_the_data(tmp_path):
    Image.new("RGB", (3, 2)).save(tmp_path / "a.png")
    assert decode_image("a.png", tmp_path).size == (3, 2)
    assert decode_image({"bytes": None, "path": str(tmp_path / "a.png")}).size == (3, 2)


def test_decode_image_rejects_garbage():
    with pytest.raises(Exception):
        decode_image({"bytes": b"not a png", "path": None})
    with pytest.raises(ValueError):
        decode_image(12)
