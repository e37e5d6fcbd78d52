"""The language model's attention while the eval step generates: no KV copy per query head, no cuDNN set-up per shape.

Two costs of transformers' SDPA path bound a decode step at the eval batch (256 rows, Qwen2.5-VL-7B: 28 query
heads over 4 KV heads), measured on an H200 (docs/benchmarks.md, "Eval, round 7"):

- With an attention mask (a padded batch, the refill slots, a static cache: always in the eval step), transformers
  repeats every layer's cached keys and values once per query head of a group (`repeat_kv`) before SDPA, because
  SDPA's own `enable_gqa` was math-kernel only with a mask when that code was written. In a decode step each row
  has one query position, so the 7 query heads of a group can sit in SDPA's query-length dimension instead:
  (batch, 4, 7, dim) against the uncopied (batch, 4, length, dim) cache, the row's one mask row shared by the 7.
  The same arithmetic; 0.19 ms a layer against 1.6 ms.
- PyTorch picks cuDNN's attention for these calls, and cuDNN builds an execution plan for every new shape: ~2.4 ms
  of CPU per call when the cache grows by a column each step, more than the GPU work of the step. The eval step
  leaves cuDNN out of SDPA's choices (flash, memory-efficient and math stay).

`for_generation(model)` switches both on for the duration of the eval step and restores the model afterwards.
Prefill (several query positions) goes through transformers' SDPA unchanged. It also runs torch.compile'd code
eagerly (unless the steps are the compiled ring's): Unsloth runs parts of the model through torch.compile, and in
generation every new prompt and cache length compiled them again, ~20 s of the first 512 rows (eval round 8).
tests/test_decode_attention.py checks logits and answers against transformers' path on the tiny model.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

log = logging.getLogger("runner")

NAME = "sdpa_grouped_decode"
WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def grouped_decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """transformers' attention-interface signature; decode steps with a mask take the grouped layout."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or attention_mask is None or kwargs.get("position_bias") is not None:
        # prefill, or nothing to save (without a mask transformers passes enable_gqa itself); "sdpa" is read at
        # call time: Unsloth wraps transformers' function
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, is_causal=is_causal, **kwargs)
    batch, heads, _, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], groups, dim)  # head h reads KV head h // groups, as repeat_kv pairs
    mask = attention_mask[..., : key.shape[-2]]  # (batch, 1, 1, length): one row, shared by the group's heads
    mask = mask.expand(mask.shape[0], mask.shape[1], groups, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_decode_sdpa)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks SDPA gets


def _grouped_query_configs(model) -> list:
    """The configs of attention modules with grouped KV heads that run transformers' SDPA (the language model)."""
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(module, "num_key_value_groups", 1) > 1 and config is not None and \
                getattr(config, "_attn_implementation", None) == "sdpa":
            configs[id(config)] = config
    return list(configs.values())


@contextmanager
def grouped_decode(model):
    """The grouped decode layout on the model's SDPA layers with grouped KV heads, until the block ends."""
    configs = _grouped_query_configs(model)
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield len(configs)
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"


@contextmanager
def for_generation(model, compiled_steps: bool = False):
    """The eval step's attention: the grouped decode layout, SDPA without cuDNN, compiled code run eagerly unless
    `compiled_steps` (the static ring compiles its decode step on purpose)."""
    stance = "default" if compiled_steps else "force_eager"
    with grouped_decode(model) as switched, sdpa_kernel(WITHOUT_CUDNN), torch.compiler.set_stance(stance):
        if switched:
            log.info("eval: decode steps attend without copying the KV cache per query head; SDPA without cuDNN")
        yield
