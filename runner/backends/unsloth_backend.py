"""Unsloth: FastVisionModel loading (4-bit or 16-bit, Unsloth's gradient checkpointing) and its LoRA.

Unsloth patches transformers, peft and trl when it is imported, so this module imports it first; the runner loads
the backend before any step imports transformers. Training is the same trl SFTTrainer and the same answer-only
collator as the transformers backend (runner/train.py): Unsloth's own vision collator masks only padding and
image tokens, so it would also train on the prompt.
"""

from __future__ import annotations

import logging

import unsloth  # noqa: F401  (must precede transformers, peft and trl)
from unsloth import FastVisionModel

from .. import vision_attention
from .transformers_backend import configure_processor, warn_remote_code
from .unsloth_args import from_pretrained_kwargs, get_peft_model_kwargs

log = logging.getLogger("runner")
# Unsloth checkpoints activations itself (use_gradient_checkpointing); the trainer must not add its own.
TRAINER_CHECKPOINTING = False


def load(model_cfg: dict, checkpointing: str = "cpu", sharded: bool = False):
    """Returns (model, processor) for the `model` section. Unsloth has no FSDP path (`sharded`): the recipe checks
    in runner/distributed.py refuse that combination before this runs."""
    if sharded:
        raise ValueError("Unsloth cannot train under FSDP; use the transformers backend or strategy ddp")
    # Eval generates through Unsloth's own fast generation (its default): 71 against 50 samples/s for
    # transformers' generate on the same Unsloth model (fast recipe, H200, docs/benchmarks.md: eval, round 3).
    warn_remote_code(model_cfg)
    model, processor = FastVisionModel.from_pretrained(**from_pretrained_kwargs(model_cfg, checkpointing))
    configure_processor(processor, model_cfg)
    vision_attention.apply(model, model_cfg["vision_attention"])
    log.info("model %s through Unsloth: %s, quantization %s", model_cfg["id"], type(model).__name__,
             model_cfg["quantization"])
    return model, processor


def attach_lora(model, lora_cfg: dict, checkpointing: str = "cpu"):
    model = FastVisionModel.get_peft_model(model, **get_peft_model_kwargs(lora_cfg, checkpointing))
    FastVisionModel.for_training(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("lora (unsloth): %s trainable parameters", f"{trainable:,}")
    return model


def prepare_for_inference(model):
    FastVisionModel.for_inference(model)
    return model

