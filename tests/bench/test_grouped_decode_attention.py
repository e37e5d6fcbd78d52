"""The grouped decode attention variant computes what transformers' SDPA path computes (CPU, float32)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.grouped_decode_attention import grouped_decode_sdpa


def test_one_decode_position_matches_sdpa_with_repeated_kv_and_a_padding_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=7, is_causal=True)
    query = torch.randn(3, 28, 1, 16)
    key, value = torch.randn(3, 4, 11, 16), torch.randn(3, 4, 11, 16)
    mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    mask[2, ..., 9:] = False  # static cache slots not written yet
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    got, _ = grouped_decode_sdpa(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (3, 1, 28, 16)
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_tiny_model_generates_the_same_tokens_and_scores(tiny_assets):
    from transformers import AutoModelForImageTextToText

    from bench.grouped_decode_attention import use_grouped_decode_attention

    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads  # GQA
    inputs = {"input_ids": torch.tensor([[0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]]),
              "attention_mask": torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])}  # left-padded
    results = {}
    for name in ("sdpa", "grouped"):
        if name == "grouped":
            use_grouped_decode_attention(model)
        for cache in ("dynamic", "static"):
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=0, cache_implementation=cache)
            results[name, cache] = (out.sequences, torch.stack(out.scores))
    assert model.config.text_config._attn_implementation == "sdpa_grouped_decode"
    for cache in ("dynamic", "static"):
        assert torch.equal(results["grouped", cache][0], results["sdpa", cache][0])
        assert torch.allclose(results["grouped", cache][1], results["sdpa", cache][1], atol=1e-4)
