"""The eval step's batching and adapter merging (CPU, tiny model)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from datasets import Dataset

from runner.evaluate import length_sorted_batches


def test_batches_hold_prompts_of_similar_length_longest_first():
    rows = Dataset.from_dict({"row_id": list(range(7)), "prompt_length": [30, 90, 10, 60, 90, 20, 50]})
    assert length_sorted_batches(rows, 3) == [[1, 4, 3], [6, 0, 5], [2]]
    # without lengths (a dataset that did not go through the data step) the order is kept
    assert length_sorted_batches(Dataset.from_dict({"row_id": [5, 6, 7]}), 2) == [[0, 1], [2]]


@pytest.mark.slow
def test_refill_and_batches_with_either_cache_give_every_row_the_same_answer(tiny_assets, tmp_path):
    """eval.batching: refill (slots refilled as rows end) and batches (a static cache reused by every batch, the last,
    smaller one filled up with repeats) must give the same answers, row for row (greedy, float32), written in the
    rows' order, with nothing left in a partial file."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from runner.data import prepare
    from runner.evaluate import evaluate
    from runner.recipe import load_schema

    schema = load_schema()["properties"]
    dataset_cfg = {**{k: p["default"] for k, p in schema["dataset"]["properties"].items()},
                   "id": str(tiny_assets["train"].parent), "eval_split": None, "shuffle": False, "max_samples": 7}
    processor = AutoProcessor.from_pretrained(tiny_assets["model"])
    rows = prepare(dataset_cfg, processor, 2048).train
    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    eval_cfg = {k: p["default"] for k, p in schema["eval"]["properties"].items()}
    assert eval_cfg["batching"] == "refill"
    answers = {}
    for batching in ("refill", "batches"):
        for kv_cache in ("dynamic", "static"):
            cfg = {**eval_cfg, "max_samples": 7, "batch_size": 3, "max_new_tokens": 12, "kv_cache": kv_cache,
                   "batching": batching}
            out = tmp_path / f"{batching}-{kv_cache}.jsonl"
            _, results = evaluate(model, processor, rows, cfg, dataset_cfg["instruction"], ("image", "text"),
                                  tiny_assets["train"].parent, out, kv_cache)
            answers[batching, kv_cache] = [(r["row_id"], r["prediction"]) for r in results]
            assert [json.loads(line)["row_id"] for line in out.read_text().splitlines()] == rows["row_id"][:7]
            assert not out.with_name(out.name + ".partial").exists()
    first = answers["refill", "dynamic"]
    assert len(first) == 7 and len({prediction for _, prediction in first}) > 1
    assert all(got == first for got in answers.values()), answers


def test_auto_kv_cache_is_static_only_where_transformers_can_compile_the_decode_step(monkeypatch):
    from types import SimpleNamespace

    from runner.evaluate import kv_cache_kind

    class Linear4bit:  # what bitsandbytes' 4-bit layer is called
        pass

    plain = SimpleNamespace()
    four_bit = SimpleNamespace(is_loaded_in_4bit=True, modules=lambda: [Linear4bit()])
    dequantized = SimpleNamespace(is_loaded_in_4bit=True, modules=lambda: [])  # eval.dequantize swapped them out
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    assert kv_cache_kind("auto", plain) == "static" and kv_cache_kind("auto", four_bit) == "dynamic"
    assert kv_cache_kind("auto", dequantized) == "static"
    monkeypatch.setitem(sys.modules, "unsloth", SimpleNamespace())  # Unsloth's patched forward is loaded
    assert kv_cache_kind("auto", plain) == "dynamic"
    assert kv_cache_kind("static", four_bit) == "static" and kv_cache_kind("dynamic", plain) == "dynamic"
