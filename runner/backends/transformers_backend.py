"""transformers + peft: loads Qwen2.5-VL (16-bit, or 4/8-bit through bitsandbytes) and attaches LoRA."""

from __future__ import annotations

import logging

import torch

from .. import distributed, vision_attention

log = logging.getLogger("runner")
# The trainer turns on gradient checkpointing from `train.gradient_checkpointing` (Unsloth does its own instead).
TRAINER_CHECKPOINTING = True

# Module names in transformers' Qwen2_5_VLForConditionalGeneration (checked in tests/backends).
LANGUAGE_ATTENTION = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
LANGUAGE_MLP = r"model\.language_model\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"
VISION_ATTENTION = r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)"
VISION_MLP = r"model\.visual\.blocks\.\d+\.mlp\.(gate_proj|up_proj|down_proj)"


def resolve_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def configure_processor(processor, model_cfg: dict) -> None:
    """Applies the recipe's image pixel bounds to the processor (training and inference share it)."""
    size = processor.image_processor.size
    if model_cfg["image_min_pixels"] is not None:
        size["shortest_edge"] = model_cfg["image_min_pixels"]
    if model_cfg["image_max_pixels"] is not None:
        size["longest_edge"] = model_cfg["image_max_pixels"]
    processor.image_processor.size = size


def warn_remote_code(model_cfg: dict) -> None:
    if model_cfg["trust_remote_code"]:
        log.warning("model.trust_remote_code is on: loading %s may run Python code that ships with it",
                    model_cfg["id"])


def quantization_config(model_cfg: dict, dtype: torch.dtype, sharded: bool = False):
    from transformers import BitsAndBytesConfig

    if model_cfg["quantization"] == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards only floating-point tensors: packed 4-bit weights must be stored as the compute dtype
            **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
        )
    if model_cfg["quantization"] == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load(model_cfg: dict, checkpointing: str = "gpu", sharded: bool = False):
    """Returns (model, processor) for the `model` section (checkpointing is left to the trainer here); `sharded`:
    for training under FSDP."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = resolve_dtype(model_cfg["dtype"])
    warn_remote_code(model_cfg)
    processor = AutoProcessor.from_pretrained(model_cfg["id"], trust_remote_code=model_cfg["trust_remote_code"])
    configure_processor(processor, model_cfg)
    model = AutoModelForImageTextToText.from_pretrained(
        model_cfg["id"], dtype=dtype, attn_implementation=model_cfg["attn_implementation"],
        quantization_config=quantization_config(model_cfg, dtype, sharded),
        device_map={"": distributed.local_rank()} if torch.cuda.is_available() else None,  # one GPU per process
        trust_remote_code=model_cfg["trust_remote_code"],
        use_safetensors=True if model_cfg["safetensors_only"] else None,
    )
    vision_attention.apply(model, model_cfg["vision_attention"])
    if model_cfg["quantization"] != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    log.info("model %s: %s, %s, quantization %s", model_cfg["id"], type(model).__name__, dtype,
             model_cfg["quantization"])
    return model, processor


def target_modules(lora_cfg: dict) -> str | list[str]:
    """peft's target_modules for the recipe's switches: one regex over full module names."""
    if lora_cfg["target_modules"] is not None:
        return lora_cfg["target_modules"]
    groups = []
    if lora_cfg["language_layers"]:
        groups += [LANGUAGE_ATTENTION] * lora_cfg["attention_modules"] + [LANGUAGE_MLP] * lora_cfg["mlp_modules"]
    if lora_cfg["vision_layers"]:
        groups += [VISION_ATTENTION] * lora_cfg["attention_modules"] + [VISION_MLP] * lora_cfg["mlp_modules"]
    if not groups:
        raise ValueError("lora: no layers selected; enable vision_layers or language_layers, and "
                         "attention_modules or mlp_modules (or set target_modules)")
    return ".*(" + "|".join(groups) + ")"


def lora_config(lora_cfg: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg["r"], lora_alpha=lora_cfg["alpha"], lora_dropout=lora_cfg["dropout"], bias=lora_cfg["bias"],
        target_modules=target_modules(lora_cfg), use_rslora=lora_cfg["use_rslora"], task_type="CAUSAL_LM",
    )


def attach_lora(model, lora_cfg: dict, checkpointing: str = "gpu"):
    """Wraps `model` in a peft model with the `lora` section's adapters; only the adapters train."""
    from peft import get_peft_model

    torch.manual_seed(lora_cfg["seed"])
    model = get_peft_model(model, lora_config(lora_cfg))
    trainable, total = model.get_nb_trainable_parameters()
    names = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    if not names:
        raise ValueError(f"lora: target_modules {target_modules(lora_cfg)!r} matched no module of the model")
    log.info("lora: %d adapted modules, %s trainable of %s parameters (%.2f%%)", len(names), f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    return model


def prepare_for_inference(model):
    return model
