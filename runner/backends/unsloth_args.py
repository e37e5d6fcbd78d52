"""Recipe sections -> Unsloth call arguments. Kept apart from unsloth_backend.py, which imports Unsloth (and so
needs a GPU), so that the mapping is testable on any machine (tests/backends/test_unsloth_args.py)."""

from __future__ import annotations

from ..distributed import local_rank, world_size
from .transformers_backend import resolve_dtype


# Unsloth's use_gradient_checkpointing for where the checkpointed activations wait (runner.backends.checkpointing).
USE_GRADIENT_CHECKPOINTING = {"off": False, "gpu": True, "cpu": "unsloth"}


def from_pretrained_kwargs(model_cfg: dict, checkpointing: str) -> dict:
    """The recipe's `model` section as FastVisionModel.from_pretrained arguments."""
    return dict(
        model_name=model_cfg["id"],
        max_seq_length=model_cfg["max_seq_length"],
        dtype=resolve_dtype(model_cfg["dtype"]),
        load_in_4bit=model_cfg["quantization"] == "4bit",
        load_in_8bit=model_cfg["quantization"] == "8bit",
        load_in_16bit=model_cfg["quantization"] == "none",
        use_gradient_checkpointing=USE_GRADIENT_CHECKPOINTING[checkpointing],
        trust_remote_code=model_cfg["trust_remote_code"],
        # under DDP each process loads onto its own GPU; one process keeps Unsloth's own placement
        **({"device_map": {"": local_rank()}} if world_size() > 1 else {}),
    )  # attention: Unsloth picks its own kernels, so model.attn_implementation does not apply here


def get_peft_model_kwargs(lora_cfg: dict, checkpointing: str) -> dict:
    """The recipe's `lora` section as FastVisionModel.get_peft_model arguments."""
    return dict(
        r=lora_cfg["r"],
        lora_alpha=lora_cfg["alpha"],
        lora_dropout=lora_cfg["dropout"],
        bias=lora_cfg["bias"],
        finetune_vision_layers=lora_cfg["vision_layers"],
        finetune_language_layers=lora_cfg["language_layers"],
        finetune_attention_modules=lora_cfg["attention_modules"],
        finetune_mlp_modules=lora_cfg["mlp_modules"],
        target_modules=lora_cfg["target_modules"],
        use_rslora=lora_cfg["use_rslora"],
        random_state=lora_cfg["seed"],
        use_gradient_checkpointing=USE_GRADIENT_CHECKPOINTING[checkpointing],
    )
