"""An eval variant to measure: decode-step attention without copying the KV cache per query head.

Qwen2.5-VL-7B has 28 query heads over 4 KV heads. With an attention mask (always there with a static cache, and
whenever a batch is padded), transformers' SDPA path repeats every layer's cached keys and values 7 times before
each decode step (`repeat_kv`; SDPA's own `enable_gqa` would fall back to the math kernel with a mask). At batch
256 that copy moves more bytes per step than the weights. In a decode step each sequence has one query position,
so the 7 query heads of a KV group can instead sit in the query-length dimension: SDPA over (batch, 4, 7, dim)
against the uncopied (batch, 4, length, dim) cache, with the one mask row shared by the 7, is the same arithmetic.
Prefill (several positions) goes through transformers' SDPA unchanged.

    from bench.grouped_decode_attention import use_grouped_decode_attention
    use_grouped_decode_attention(model)   # a loaded Qwen2.5-VL (transformers backend)
"""

from __future__ import annotations

import torch

NAME = "sdpa_grouped_decode"


def grouped_decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], groups, dim)  # head h reads KV head h // groups, as repeat_kv does
    mask = attention_mask
    if mask is not None:  # (batch, 1, 1, length): one row, shared by the group's heads
        mask = mask.expand(mask.shape[0], mask.shape[1], groups, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def use_grouped_decode_attention(model) -> None:
    """Registers the function (and SDPA's mask builder under its name) and sets it on the language model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_decode_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation({"text_config": NAME})
