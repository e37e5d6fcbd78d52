"""One attention call per vision block instead of one per window and image.

Without the flash-attn package (it has no PyPI wheel), transformers' Qwen2.5-VL vision attention splits the
patches at every window and image boundary (`cu_seqlens`) and runs one SDPA call per chunk: about 140 calls per
block for a batch of 128 formula crops, each far too small to fill a GPU. That loop was 43% of a training
forward on an H200 (docs/benchmarks.md). The same attention, every chunk attending only to itself, is:

- on CUDA: one `torch.nn.attention.varlen.varlen_attn` call (PyTorch's flash kernel for packed sequences);
- elsewhere: one SDPA call with a block-diagonal mask, which computes exactly what the loop computes.

`model.vision_attention: varlen` (the default) swaps this in on every vision attention module after loading;
`per_window` keeps transformers' loop. tests/test_vision_attention.py checks loss, logits, gradients and
generation against the loop on the tiny model.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

log = logging.getLogger("runner")


def _cuda_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def block_diagonal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """(length, length) boolean mask: True where query and key lie in the same chunk of `cu_seqlens`."""
    chunk = torch.bucketize(torch.arange(length, device=cu_seqlens.device), cu_seqlens[1:], right=True)
    return chunk[:, None] == chunk[None, :]


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention within each chunk of packed (tokens, heads, head_dim) tensors; returns the same shape."""
    varlen_attn = _cuda_varlen()
    if query.is_cuda and varlen_attn is not None:
        # float32 reaches here when peft upcast a 4-bit model's vision tower for training and no autocast runs
        # (generation): the kernel takes 16-bit only, as autocast hands it in training; the one-mask fallback
        # below would need (tokens x tokens) per head, over 100 GiB for a batch of 256 images
        dtype = query.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            query, key, value = (tensor.to(torch.bfloat16) for tensor in (query, key, value))
        cu = cu_seqlens.to(torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        if abs(scale - query.shape[-1] ** -0.5) < 1e-12:  # the kernel's default scale; older torch takes no `scale`
            return varlen_attn(query, key, value, cu, cu, longest, longest).to(dtype)
        return varlen_attn(query * (scale * query.shape[-1] ** 0.5), key, value, cu, cu, longest, longest).to(dtype)
    mask = block_diagonal_mask(cu_seqlens, query.shape[0])
    out = F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """Qwen2_5_VLVisionAttention.forward with the per-chunk loop replaced by one packed call."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
    out = packed_attention(query, key, value, cu_seqlens, self.scaling)
    return self.proj(out.reshape(length, -1).contiguous())


def use_packed_vision_attention(model) -> int:
    """Replaces the forward of every Qwen2.5-VL vision attention module in `model`; returns how many."""
    patched = 0
    for module in model.modules():
        if type(module).__name__ == "Qwen2_5_VLVisionAttention":
            module.forward = types.MethodType(_forward, module)
            patched += 1
    return patched


def apply(model, mode: str):
    """Applies the recipe's `model.vision_attention` to a loaded model; logs which kernel serves it."""
    if mode == "per_window":
        log.info("vision attention: transformers' per-window loop (model.vision_attention: per_window)")
        return model
    count = use_packed_vision_attention(model)
    device = next(model.parameters()).device
    kernel = "torch varlen_attn" if device.type == "cuda" and _cuda_varlen() else "block-diagonal SDPA"
    log.info("vision attention: one %s call per block, %d blocks (model.vision_attention: varlen)", kernel, count)
    return model
