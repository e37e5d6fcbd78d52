from __future__ import annotations

import json

import pytest
from datasets import Dataset, Features, Image, Value

from runner.data import DataError, prepare
from runner.recipe import load_schema
from runner.tiny import render_png

DEFAULTS = {key: prop["default"] for key, prop in load_schema()["properties"]["dataset"]["properties"].items()}


def dataset_cfg(path, **changes) -> dict:
    return {**DEFAULTS, "id": str(path), "eval_split": None, "shuffle": False, **changes}


def write_parquet(path, rows, image_feature=True):
    features = Features({"image": Image() if image_feature else {"bytes": Value("binary"), "path": Value("string")},
                         "text": Value("string")})
    Dataset.from_dict({"image": [r[0] for r in rows], "text": [r[1] for r in rows]}, features=features).to_parquet(str(path))


def good(formula):
    return ({"bytes": render_png(formula), "path": None}, formula)


def test_bad_rows_are_skipped_counted_and_named(tmp_path, tiny_processor, caplog):
    rows = [good("a + b"), ({"bytes": b"\x89PNG broken", "path": None}, "x"), good("c"), (good("d")[0], ""),
            (good("e")[0], None), good("f")]
    write_parquet(tmp_path / "train.parquet", rows)
    with caplog.at_level("INFO", logger="runner"):
        data = prepare(dataset_cfg(tmp_path / "train.parquet"), tiny_processor, max_seq_length=512)
    assert data.train["row_id"] == [0, 2, 5] and data.train["text"] == ["a + b", "c", "f"]
    report = data.reports[0].as_dict()
    assert report == {"rows": 6, "kept": 3, "skipped": {"image does not decode": 1, "empty or missing text": 2}}
    assert "image does not decode (rows 1)" in caplog.text and "empty or missing text (rows 3, 4)" in caplog.text


def test_too_long_rows_are_dropped_never_cut(tmp_path, tiny_processor):
    long_formula = " + ".join(["x"] * 60)
    write_parquet(tmp_path / "train.parquet", [good("a"), good(long_formula), good("b")])
    data = prepare(dataset_cfg(tmp_path / "train.parquet"), tiny_processor, max_seq_length=80)
    assert data.train["text"] == ["a", "b"]
    assert data.reports[0].as_dict()["skipped"] == {"longer than max_seq_length 80": 1}


def test_length_check_counts_image_tokens_like_the_processor(tmp_path, tiny_processor):
    from runner.prompt import decode_image, training_batch

    write_parquet(tmp_path / "train.parquet", [good("a")])
    batch = training_batch(tiny_processor, [decode_image(good("a")[0])], ["a"], DEFAULTS["instruction"])
    exact = batch["input_ids"].shape[1]
    kept = prepare(dataset_cfg(tmp_path / "train.parquet"), tiny_processor, max_seq_length=exact)
    assert len(kept.train) == 1
    with pytest.raises(DataError):  # one token less: dropped, so no training rows are left
        prepare(dataset_cfg(tmp_path / "train.parquet"), tiny_processor, max_seq_length=exact - 1)


def test_too_long_rows_can_stop_the_run(tmp_path, tiny_processor):
    write_parquet(tmp_path / "train.parquet", [good("a"), good(" + ".join(["x"] * 60))])
    with pytest.raises(DataError, match="row 1 is .* tokens, over model.max_seq_length 80"):
        prepare(dataset_cfg(tmp_path / "train.parquet", on_too_long="error"), tiny_processor, max_seq_length=80)


def test_a_wrong_column_name_lists_the_columns_that_exist(tmp_path, tiny_processor):
    write_parquet(tmp_path / "train.parquet", [good("a")])
    with pytest.raises(DataError, match="has no column 'formula'; its columns are 'image', 'text'"):
        prepare(dataset_cfg(tmp_path / "train.parquet", text_column="formula"), tiny_processor, 512)


def test_eval_split_is_the_sibling_file_and_eval_fraction_holds_out_rows(tmp_path, tiny_processor):
    write_parquet(tmp_path / "train.parquet", [good(f"x ^ {{ {i} }}") for i in range(10)])
    write_parquet(tmp_path / "test.parquet", [good("y"), good("z")])
    data = prepare(dataset_cfg(tmp_path / "train.parquet", eval_split="test"), tiny_processor, 512)
    assert len(data.train) == 10 and data.eval["text"] == ["y", "z"]
    held = prepare(dataset_cfg(tmp_path / "train.parquet", eval_fraction=0.2), tiny_processor, 512)
    assert len(held.train) == 8 and len(held.eval) == 2
    assert not set(held.train["text"]) & set(held.eval["text"])
    with pytest.raises(DataError, match="split 'valid' expected at"):
        prepare(dataset_cfg(tmp_path / "train.parquet", eval_split="valid"), tiny_processor, 512)


def test_max_samples_shuffle_and_plain_struct_images(tmp_path, tiny_processor):
    write_parquet(tmp_path / "train.parquet", [good(f"x _ {{ {i} }}") for i in range(8)], image_feature=False)
    data = prepare(dataset_cfg(tmp_path / "train.parquet", max_samples=3, shuffle=True), tiny_processor, 512)
    assert len(data.train) == 3 and data.reports[0].rows == 3  # stops checking once it has enough rows
    again = prepare(dataset_cfg(tmp_path / "train.parquet", max_samples=3, shuffle=True), tiny_processor, 512)
    assert again.train["row_id"] == data.train["row_id"] != [0, 1, 2]  # seeded shuffle, source row ids kept


def test_jsonl_with_image_paths_relative_to_the_file(tmp_path, tiny_processor):
    (tmp_path / "img").mkdir()
    lines = []
    for i, formula in enumerate(["a", "b"]):
        (tmp_path / "img" / f"{i}.png").write_bytes(render_png(formula))
        lines.append(json.dumps({"file": f"img/{i}.png", "latex": formula}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = dataset_cfg(tmp_path / "train.jsonl", image_column="file", text_column="latex")
    data = prepare(cfg, tiny_processor, 512)
    assert data.train["latex"] == ["a", "b"] and data.base_dir == tmp_path


def decompression_bomb_png() -> bytes:
    """A small file that claims 20,000 x 20,000 pixels: PIL refuses to decode it (over 2x MAX_IMAGE_PIXELS)."""
    import io

    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fuzzed_rows_are_skipped_and_counted_and_the_run_goes_on(tmp_path, tiny_processor):
    png = render_png("a + b")
    rows = [
        ({"bytes": png[: len(png) // 2], "path": None}, "truncated image"),
        ({"bytes": b"", "path": None}, "empty bytes"),
        ({"bytes": b"%PDF-1.4 not an image at all", "path": None}, "not an image"),
        ({"bytes": decompression_bomb_png(), "path": None}, "bomb"),
        ({"bytes": None, "path": "does/not/exist.png"}, "missing file"),
        good("x ^ { 2 }"),
        (good("y")[0], " \\frac { 1 } { 2 } " * 700),  # ~10,000 characters: longer than max_seq_length
        good("z"),
    ]
    write_parquet(tmp_path / "train.parquet", rows, image_feature=False)
    data = prepare(dataset_cfg(tmp_path / "train.parquet"), tiny_processor, max_seq_length=512)
    assert data.train["text"] == ["x ^ { 2 }", "z"]
    skipped = data.reports[0].as_dict()["skipped"]
    assert skipped == {"image does not decode": 4, "image over 89,478,485 pixels (PIL's decompression-bomb guard)": 1,
                       "longer than max_seq_length 512": 1}


def test_text_that_is_bytes_is_read_as_utf8_or_skipped(tmp_path, tiny_processor):
    features = Features({"image": Image(), "text": Value("binary")})
    images = [good("a")[0], good("b")[0], good("c")[0]]
    texts = ["a".encode(), b"\xff\xfe not UTF-8", "c \\alpha".encode()]
    Dataset.from_dict({"image": images, "text": texts}, features=features).to_parquet(str(tmp_path / "train.parquet"))
    data = prepare(dataset_cfg(tmp_path / "train.parquet"), tiny_processor, max_seq_length=512)
    assert data.train["row_id"] == [0, 2]
    assert data.reports[0].as_dict()["skipped"] == {"text is not a string or UTF-8 bytes": 1}

    from runner.train import VisionCollator

    batch = VisionCollator(tiny_processor, DEFAULTS["instruction"], "image", "text")([data.train[0], data.train[1]])
    labels = batch["labels"][1][batch["labels"][1] != -100]
    assert tiny_processor.tokenizer.decode(labels) == "c \\alpha<|im_end|>"  # the bytes trained as their text
