"""The eval step's batching and adapter merging (CPU, tiny model)."""

from __future__ import annotations

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
