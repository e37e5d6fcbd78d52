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


DECODE_ATTENTION = ("eval", "eval_unsloth_eager", "grouped", "sdpa_no_cudnn", "sdpa")


def add_decode_attention_argument(parser) -> None:
    parser.add_argument("--decode-attention", choices=DECODE_ATTENTION, default="eval",
                        help="eval: the eval step's (runner/decode_attention.py); eval_unsloth_eager: the same inside "
                        "unsloth_zoo's `unsloth_eager_decode()` (Unsloth's compiled regions and disabled-compile "
                        "wrappers call their eager originals directly); grouped: its layout with cuDNN allowed; "
                        "sdpa_no_cudnn: transformers' layout without cuDNN; sdpa: transformers' path")


def decode_attention_context(model, variant: str):
    """The context generation runs in, per --decode-attention (see add_decode_attention_argument)."""
    from contextlib import ExitStack, nullcontext

    from torch.nn.attention import sdpa_kernel

    from runner import decode_attention

    def unsloth_eager():
        from unsloth_zoo.temporary_patches.utils import unsloth_eager_decode  # on while grad is off, as here

        stack = ExitStack()
        stack.enter_context(decode_attention.for_generation(model))
        stack.enter_context(unsloth_eager_decode())
        return stack

    return {"eval": lambda: decode_attention.for_generation(model), "eval_unsloth_eager": unsloth_eager,
            "grouped": lambda: decode_attention.grouped_decode(model),
            "sdpa_no_cudnn": lambda: sdpa_kernel(decode_attention.WITHOUT_CUDNN),
            "sdpa": nullcontext}[variant]()
