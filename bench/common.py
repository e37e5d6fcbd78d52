"""What every benchmark records beside its figures."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "unsloth", "unsloth_zoo")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'unknown'})"


DECODE_ATTENTION = ("eval", "grouped", "sdpa_no_cudnn", "sdpa")


def add_decode_attention_argument(parser) -> None:
    parser.add_argument("--decode-attention", choices=DECODE_ATTENTION, default="eval",
                        help="eval: the eval step's (runner/decode_attention.py); grouped: its layout with cuDNN "
                        "allowed; sdpa_no_cudnn: transformers' layout without cuDNN; sdpa: transformers' path")


def decode_attention_context(model, variant: str):
    """eval: the eval step's (runner/decode_attention.py); grouped: its layout with cuDNN allowed; sdpa_no_cudnn:
    transformers' layout without cuDNN; sdpa: transformers' path as it is."""
    from contextlib import nullcontext

    from torch.nn.attention import sdpa_kernel

    from runner import decode_attention

    return {"eval": lambda: decode_attention.for_generation(model),
            "grouped": lambda: decode_attention.grouped_decode(model),
            "sdpa_no_cudnn": lambda: sdpa_kernel(decode_attention.WITHOUT_CUDNN),
            "sdpa": nullcontext}[variant]()
