"""Training stacks. A backend loads the model and processor (`load`) and attaches LoRA (`attach_lora`);
training itself is trl's trainers (runner/train.py for SFT; runner/grpo.py and runner/dpo.py, transformers only)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


# Measured on two H200s, each pair in one call, rows grouped by length as in an epoch (docs/benchmarks.md, "Several
# GPUs", seventh run for Unsloth, second run for transformers).
UNSLOTH_UNDER_DDP = ("Unsloth under DDP scaled 0.94 on 2 x H200 (fast recipe, activations kept on the GPU: 140.1 "
                     "samples/s against 74.4 on one GPU, 35.1 GiB per GPU; the 4-bit flagship 1.00), the fastest "
                     "two-GPU setting measured; model.backend=transformers scaled 0.95 but trained slower (87.7 "
                     "samples/s, 39.7 GiB per GPU)")


def select(requested: str, strategy: str = "none", method: str = "sft") -> tuple[str, str]:
    """Returns (backend, why) for the recipe's `model.backend` under the `distributed.strategy` and `train.method`."""
    if method != "sft" and requested != "transformers":
        # Unsloth's GRPO for vision models generates through vLLM (fast_inference), which the runner does not use;
        # its patches are not tested under trl's GRPO and DPO trainers here.
        return "transformers", f"{method} runs on transformers + peft + trl (Unsloth's path for it is not supported here)"
    if requested == "unsloth" and strategy == "ddp":
        return "unsloth", f"set in the recipe; {UNSLOTH_UNDER_DDP}"
    if requested != "auto":
        return requested, "set in the recipe"
    if strategy in ("fsdp", "deepspeed"):
        return "transformers", f"auto: distributed.strategy is {strategy}, which the runner runs on transformers only"
    if not cuda_available():
        return "transformers", "auto: no CUDA GPU (unsloth needs one)"
    if not unsloth_installed():
        return "transformers", "auto: unsloth is not installed (install the `gpu` extra for it)"
    if strategy == "ddp":
        return "unsloth", f"auto: CUDA GPU present and unsloth installed; {UNSLOTH_UNDER_DDP}"
    return "unsloth", "auto: CUDA GPU present and unsloth installed"


def checkpointing(train_cfg: dict, backend: str, processes: int) -> str:
    """Where gradient checkpointing keeps the activations it saves: "off", "gpu", or "cpu" (Unsloth's offload to
    pinned CPU memory). Under DDP Unsloth cannot use its own offloaded checkpointing (reentrant, which DDP refuses
    with LoRA on vision models) and offloads through saved-tensor hooks instead, allocating pinned buffers during the
    steps; `auto` keeps the activations on the GPU there."""
    if not train_cfg["gradient_checkpointing"]:
        return "off"
    offload = train_cfg["activation_offload"]
    if backend != "unsloth":
        if offload == "cpu":  # model.backend: auto chose transformers (an explicit transformers is a recipe error)
            logging.getLogger("runner").warning("train.activation_offload: cpu is Unsloth's offload; the %s backend "
                                                "keeps checkpointed activations on the GPU", backend)
        return "gpu"
    if offload == "auto":
        return "cpu" if processes == 1 else "gpu"
    return "cpu" if offload == "cpu" else "gpu"


def machine_problems(model_cfg: dict, train_cfg: dict) -> list[tuple[str, str]]:
    """Recipe settings this machine cannot run, as (key path, message) pairs."""
    problems = []
    gpu = cuda_available()
    if model_cfg["backend"] == "unsloth" and not gpu:
        problems.append(("model.backend", "unsloth needs a CUDA GPU and this machine has none; "
                         "use backend: transformers (or auto) to run on the CPU"))
    elif model_cfg["backend"] == "unsloth" and not unsloth_installed():
        problems.append(("model.backend", "unsloth is not installed; `just setup gpu` installs it, "
                         "or use backend: transformers"))
    if model_cfg["quantization"] != "none" and not gpu:
        problems.append(("model.quantization", f"{model_cfg['quantization']} (bitsandbytes) needs a CUDA GPU; "
                         "use quantization: none on this machine"))
    local = Path(model_cfg["id"]).expanduser()
    if model_cfg["safetensors_only"] and local.is_dir() and (local / "config.json").exists() \
            and not any(local.glob("*.safetensors")) and any(local.glob("*.bin")):
        problems.append(("model.safetensors_only", f"{local} holds only pickled .bin weights, which can run code "
                         "when loaded; convert them to safetensors, or set safetensors_only: false if you trust them"))
    if train_cfg["precision"] in ("bf16", "fp16") and not gpu:
        problems.append(("train.precision", f"{train_cfg['precision']} mixed precision needs a GPU here; use fp32 or auto"))
    return problems


def load_backend(name: str):
    if name == "transformers":
        from . import transformers_backend

        return transformers_backend
    if name == "unsloth":
        from . import unsloth_backend

        return unsloth_backend
    raise ValueError(f"unknown backend {name!r}")
