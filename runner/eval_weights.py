"""The weights generation runs on during the eval step: LoRA folded in, and 4-bit layers turned back into 16-bit.

Decoding is launch-bound: each adapted linear layer adds two small matmuls and an add to every decode step, and a
Qwen2.5-VL adapter touches hundreds of them; a 4-bit layer also dequantizes its whole weight at every step.
`generation_weights` undoes both for the duration of the eval step and restores the training model afterwards.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

log = logging.getLogger("runner")

HEADROOM_BYTES = 6 * 2**30  # what the eval batches' KV cache and activations need beside the weights (batch 128-256)


def is_bnb_4bit(module) -> bool:
    """A bitsandbytes 4-bit layer (peft's LoRA wrapper around one has the same class name, and LoRA weights)."""
    return type(module).__name__ == "Linear4bit" and not hasattr(module, "lora_A")


def is_quantized(model) -> bool:
    """Whether bitsandbytes layers are left in the model (then nothing compiles, and LoRA is not merged)."""
    if getattr(model, "is_loaded_in_8bit", False):
        return True
    return getattr(model, "is_loaded_in_4bit", False) and any(is_bnb_4bit(module) for module in model.modules())


@contextmanager
def generation_weights(model, dequantize: str):
    """16-bit models: LoRA merged into the weights (W + BA in the model's dtype, what the merged_16bit export ships).

    4-bit models, when `dequantize` allows (eval.dequantize): every bitsandbytes layer is replaced by a 16-bit
    layer holding its dequantized weight, with the LoRA update added: exactly the weights the 4-bit matmul
    computes with, so the answers are those of the trained model, and decoding runs 16-bit kernels. It needs
    the 16-bit size of those layers in free GPU memory (about 14 GiB for the 7B model) for the eval step.
    8-bit weights, and 4-bit ones without the room, are left as they are (LoRA unmerged: merging would
    re-quantize the weights and evaluate another model than the one trained)."""
    if getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False):
        with dequantized(model, dequantize):
            yield
        return
    if is_quantized(model) or not hasattr(model, "merge_adapter"):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


class DequantizedLinear(torch.nn.Linear):
    """A 4-bit layer's 16-bit copy. Casts like bitsandbytes' Linear4bit: inputs to the compute dtype, the output
    back to the input's dtype (the vision tower hands some layers float32)."""

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def four_bit_layers(model) -> list[tuple[object, str, object, object]]:
    """(parent, attribute, 4-bit layer, LoRA layer wrapping it or None) for every bitsandbytes 4-bit layer."""
    found = []
    for module in model.modules():
        for name, child in module.named_children():
            if not is_bnb_4bit(child):
                continue
            wrapper = module if name == "base_layer" and hasattr(module, "lora_A") else None
            found.append((module, name, child, wrapper))
    return found


def dense_bytes(layers, dtype_size: int = 2) -> int:
    return sum(layer.in_features * layer.out_features * dtype_size for _, _, layer, _ in layers)


def room_on_gpu(needed: int) -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return True, "CPU memory"
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return needed + HEADROOM_BYTES <= free, f"{free / 2**30:.1f} GiB free on the GPU"


@contextmanager
def dequantized(model, dequantize: str):
    layers = four_bit_layers(model)
    needed = dense_bytes(layers)
    fits, where = room_on_gpu(needed)
    if dequantize == "never" or not layers or (dequantize == "auto" and not fits):
        if layers and dequantize == "auto":
            log.info("eval: 4-bit weights kept: their 16-bit copy needs %.1f GiB + %.0f GiB for the batches, %s "
                     "(eval.dequantize: always forces it)", needed / 2**30, HEADROOM_BYTES / 2**30, where)
        yield
        return
    import bitsandbytes.functional as bnb_functional

    swapped = []
    try:
        for parent, name, layer, wrapper in layers:
            weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            dtype = layer.compute_dtype or weight.dtype
            weight = weight.to(dtype)
            adapters = list(wrapper.active_adapters) if wrapper is not None else []
            for adapter in adapters:
                if adapter in wrapper.lora_A:
                    weight += wrapper.get_delta_weight(adapter).to(dtype)
            # built on the meta device: no second, randomly initialised weight is allocated before it is replaced
            dense = DequantizedLinear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      device="meta", dtype=dtype)
            dense.weight = torch.nn.Parameter(weight, requires_grad=False)
            if layer.bias is not None:
                dense.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, dense)
            swapped.append((parent, name, layer, wrapper, list(wrapper.merged_adapters) if wrapper else None))
            if wrapper is not None:
                wrapper.merged_adapters = adapters  # peft (and Unsloth) then call the base layer alone
        log.info("eval: %d 4-bit layers generate from 16-bit copies, LoRA merged (%.1f GiB, %s)", len(swapped),
                 needed / 2**30, where)
        yield
    finally:
        for parent, name, layer, wrapper, merged in reversed(swapped):
            setattr(parent, name, layer)
            if wrapper is not None:
                wrapper.merged_adapters = merged
        del swapped
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
