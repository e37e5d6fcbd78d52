"""Decode-step attention without copying the KV cache once per query head (eval.decode_attention).

Qwen2.5-VL-7B has 28 query heads over 4 KV heads. With an attention mask (always there with a static cache, and
whenever a batch is left-padded), transformers' SDPA path repeats every layer's cached keys and values 7 times
before each decode step (`repeat_kv`; SDPA's own `enable_gqa` would fall back to the math kernel with a mask). At
batch 256 that copy moves more bytes per step than the weights do. In a decode step each sequence has one query
position, so the 7 query heads of a KV group can sit in the query-length dimension instead: SDPA over
(batch, 4, 7, dim) against the uncopied (batch, 4, length, dim) cache, the one mask row shared by the 7, is the
same arithmetic. Prefill and training (several positions) go through transformers' SDPA unchanged.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import torch

log = logging.getLogger("runner")

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


def text_attention(model) -> str | None:
    return getattr(model.config.get_text_config(), "_attn_implementation", None)


def decode_attention_kind(requested: str, model) -> str:
    """eval.decode_attention with `auto` resolved (schemas/eval.schema.json says when each applies)."""
    if requested != "auto":
        return requested
    return "grouped" if text_attention(model) == "sdpa" and "unsloth" not in sys.modules else "sdpa"


@contextmanager
def decode_attention(model, kind: str):
    """The language model attends with `kind` ("grouped" or "sdpa") inside the block, as before after it."""
    previous = text_attention(model)
    if kind != "grouped" or previous == NAME:
        yield
        return
    if previous != "sdpa":
        raise ValueError(f"eval.decode_attention: grouped replaces the sdpa attention; this model's language model "
                         f"attends with {previous!r} (set eval.decode_attention: sdpa, or model.attn_implementation: sdpa)")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, grouped_decode_sdpa)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation({"text_config": NAME})
    log.info("eval: decode steps attend per KV group (eval.decode_attention: grouped)")
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": previous})
