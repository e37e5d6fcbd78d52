"""Known failures of a run, each turned into one line a person can act on (the traceback goes to run.log)."""

from __future__ import annotations

import errno
from pathlib import Path


class RunError(Exception):
    """A failure the runner has already explained in one line."""


class NonFiniteLoss(RunError):
    def __init__(self, step: int, value: float):
        self.step = step
        super().__init__(f"the loss became {value} at step {step}; training stopped before that step's update, so "
                         "the last checkpoint is still good. Lower train.learning_rate, keep train.max_grad_norm on, "
                         "or use precision bf16 instead of fp16")


class RunInterrupted(RunError):
    pass


def model_not_found(model_id: str, error: Exception) -> RunError:
    return RunError(f"model.id {model_id!r} could not be loaded: {_where(model_id)}. Check the spelling, the network "
                    f"(the Hugging Face hub must be reachable) and HF_TOKEN for gated models. ({_first_line(error)})")


def dataset_not_found(dataset_id: str, error: Exception) -> RunError:
    return RunError(f"dataset.id {dataset_id!r} could not be loaded: {_where(dataset_id)}. Check the spelling, the "
                    f"network and HF_TOKEN for private datasets. ({_first_line(error)})")


def _where(identifier: str) -> str:
    path = Path(identifier).expanduser()
    looks_like_path = identifier.startswith((".", "/", "~")) or path.suffix in (".parquet", ".jsonl", ".json")
    if path.exists():
        return f"the local path {identifier} exists but does not hold what was expected"
    if looks_like_path:
        return f"it looks like a local path, and {identifier} does not exist"
    return f"no local path {identifier} exists, so it was read as a Hugging Face hub id"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def explain(error: BaseException, recipe: dict) -> str:
    """One line for a failure of `recipe run`: what went wrong and what to change."""
    if isinstance(error, RunError):
        return str(error)
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        train = recipe["train"]
        return (f"CUDA out of memory at train.batch_size {train['batch_size']} (eval.batch_size "
                f"{recipe['eval']['batch_size']}): lower the batch size and raise gradient_accumulation_steps to keep "
                "the effective batch, turn on train.gradient_checkpointing, lower model.image_max_pixels, or use "
                "model.quantization: 4bit")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (f"disk full while writing {error.filename or 'the run'}: free space under {recipe['output_dir']} "
                "(checkpoints are kept up to train.save_total_limit) or set output_dir to a larger disk")
    return f"{_first_line(error)} (the traceback is in run.log)"
