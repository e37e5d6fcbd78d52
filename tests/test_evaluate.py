"""The eval step's batching and adapter merging (CPU, tiny model)."""

from __future__ import annotations

import sys

import torch
from datasets import Dataset

from runner.evaluate import length_sorted_batches, lora_merged


def test_batches_hold_prompts_of_similar_length_longest_first():
    rows = Dataset.from_dict({"row_id": list(range(7)), "prompt_length": [30, 90, 10, 60, 90, 20, 50]})
    assert length_sorted_batches(rows, 3) == [[1, 4, 3], [6, 0, 5], [2]]
    # without lengths (a dataset that did not go through the data step) the order is kept
    assert length_sorted_batches(Dataset.from_dict({"row_id": [5, 6, 7]}), 2) == [[0, 1], [2]]


def test_lora_is_merged_while_generating_and_unmerged_after(tiny_assets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    inputs = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        with lora_merged(model):
            assert layer.merged and not torch.equal(layer.base_layer.weight, before)
            merged = model(input_ids=inputs).logits
    assert not layer.merged and torch.allclose(layer.base_layer.weight, before, atol=1e-6)
    assert torch.allclose(merged, expected, atol=1e-4)  # float32: W + BA computes what W x + B A x does


def test_the_static_kv_cache_answers_as_the_dynamic_one_with_a_filled_up_last_batch(tiny_assets, tmp_path):
    """eval.kv_cache: static reuses one cache (and on a GPU one compiled decode step) for every batch, filling the
    last, smaller batch up with repeats; the answers must be the dynamic cache's, row for row (greedy, float32)."""
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
    answers = {}
    for kv_cache in ("dynamic", "static"):
        cfg = {**eval_cfg, "max_samples": 7, "batch_size": 3, "max_new_tokens": 12, "kv_cache": kv_cache}
        _, results = evaluate(model, processor, rows, cfg, dataset_cfg["instruction"], ("image", "text"),
                              tiny_assets["train"].parent, tmp_path / f"{kv_cache}.jsonl", kv_cache)
        answers[kv_cache] = [(r["row_id"], r["prediction"]) for r in results]
    assert len(answers["static"]) == 7 and any(prediction for _, prediction in answers["static"])
    assert answers["static"] == answers["dynamic"]


def test_auto_kv_cache_is_static_only_where_transformers_can_compile_the_decode_step(monkeypatch):
    from types import SimpleNamespace

    from runner.evaluate import kv_cache_kind

    plain, four_bit = SimpleNamespace(), SimpleNamespace(is_loaded_in_4bit=True)
    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    assert kv_cache_kind("auto", plain) == "static" and kv_cache_kind("auto", four_bit) == "dynamic"
    monkeypatch.setitem(sys.modules, "unsloth", SimpleNamespace())  # Unsloth's patched forward is loaded
    assert kv_cache_kind("auto", plain) == "dynamic"
    assert kv_cache_kind("static", four_bit) == "static" and kv_cache_kind("dynamic", plain) == "dynamic"
