from __future__ import annotations

import pyarrow.parquet as pq

from runner.tiny import FIRST_SPECIAL_ID, SPECIAL_TOKENS, make_formulas


def test_tokenizer_has_the_qwen25vl_special_tokens_at_their_real_ids(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    for offset, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == FIRST_SPECIAL_ID + offset
    assert FIRST_SPECIAL_ID + len(SPECIAL_TOKENS) - 1 == 151664
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    # the Qwen2 base vocabulary: these ids are the released tokenizer's
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]


def test_saved_model_loads_through_the_hub_code_path(tiny_assets):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_assets["model"])
    assert config.model_type == "qwen2_5_vl" and config.vision_config.depth >= 3
    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"])
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(tiny_assets["model"])
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert "<|vision_start|><|image_pad|><|vision_end|>" in processor.chat_template


def test_rendered_data_has_the_latex_ocr_schema(tiny_assets):
    table = pq.read_table(tiny_assets["train"])
    assert table.column_names == ["image", "text"]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image"]["bytes"].startswith(b"\x89PNG") and " " in row["text"]


def test_formulas_are_distinct_and_deterministic():
    formulas = make_formulas(200, seed=1)
    assert len(set(formulas)) == 200 and formulas == make_formulas(200, seed=1)
