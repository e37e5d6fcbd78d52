"""The DPO train step: trl's DPOTrainer on (image, chosen, rejected) pairs, starting from an SFT adapter.

trl keeps a frozen copy of the starting adapter as the reference (a second "ref" adapter on the same base), so
DPO moves the policy relative to the SFT result, not to the bare base model. The prompt is runner/prompt.py's chat
turn; the answers are assistant turns. The preference margin per logged step goes into metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import strategies
from .prompt import decode_image, messages, text_of
from .train import TokenCounter, callbacks, checked, fit, one_gpu_per_process, trainer_arguments

log = logging.getLogger("runner")
PAIR_COLUMNS = ("image", "chosen", "rejected")


class PairsError(ValueError):
    """The pairs named by dpo.pairs cannot be used."""


def load_pairs(source: str, max_samples: int | None = None):
    """The pairs dataset: a parquet file, a directory of parquet files, or a Hugging Face dataset id."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        pairs = datasets.Dataset.from_parquet(str(path))
    elif path.is_dir():
        pairs = datasets.Dataset.from_parquet(sorted(str(p) for p in path.glob("*.parquet")))
    else:
        pairs = datasets.load_dataset(source, split="train")
    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise PairsError(f"dpo.pairs {source}: no column {', '.join(missing)} (has {', '.join(pairs.column_names)}); "
                         "pairs need image, chosen and rejected, as `recipe pairs RUN_DIR` writes them")
    if len(pairs) == 0:
        raise PairsError(f"dpo.pairs {source}: no pairs (the model got every row right, or the file is empty)")
    return pairs if max_samples is None else pairs.select(range(min(max_samples, len(pairs))))


def preference_rows(pairs, instruction: str, base_dir=None):
    """The pairs as trl's conversational preference rows, each image decoded as its batch is read."""
    conversation = messages(instruction)

    def answer(text) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text_of(text)}]}]

    def decode(batch: dict) -> dict:
        return {"prompt": [conversation] * len(batch["image"]),
                "image": [decode_image(value, base_dir) for value in batch["image"]],
                "chosen": [answer(text) for text in batch["chosen"]],
                "rejected": [answer(text) for text in batch["rejected"]]}

    return pairs.select_columns(list(PAIR_COLUMNS)).with_transform(decode)


def dpo_config(train_cfg: dict, dpo_cfg: dict, max_seq_length: int, output_dir: Path, trainer_checkpointing: bool,
               distributed_cfg):
    from trl import DPOConfig

    return one_gpu_per_process(DPOConfig(
        **trainer_arguments(train_cfg, output_dir, trainer_checkpointing, distributed_cfg),
        beta=dpo_cfg["beta"],
        loss_type=[dpo_cfg["loss_type"]],
        max_length=max_seq_length,
        truncation_mode="keep_start",  # never cut the image tokens out of the prompt
    ))


def margin_curve(history: list[dict]) -> dict:
    keys = {"margin": "rewards/margins", "chosen": "rewards/chosen", "rejected": "rewards/rejected",
            "accuracy": "rewards/accuracies"}
    return {name: {e["step"]: e[key] for e in history if key in e} for name, key in keys.items()}


def train_dpo(model, processor, train_cfg: dict, dpo_cfg: dict, instruction: str, max_seq_length: int,
              output_dir: Path, base_dir=None, trainer_checkpointing: bool = True, resume_from: Path | None = None,
              distributed_cfg: dict | None = None) -> dict:
    """Runs DPO on the `dpo` section's pairs; returns the trainer's metrics with the preference-margin curve."""
    from trl import DPOTrainer

    pairs = load_pairs(dpo_cfg["pairs"], dpo_cfg["max_samples"])
    rows = preference_rows(pairs, instruction, base_dir)
    log.info("dpo: %d pairs from %s, beta %g, loss %s", len(rows), dpo_cfg["pairs"], dpo_cfg["beta"],
             dpo_cfg["loss_type"])
    args = dpo_config(train_cfg, dpo_cfg, max_seq_length, output_dir / "checkpoints", trainer_checkpointing,
                      distributed_cfg)
    counter = TokenCounter()
    speed, stop, every = callbacks(train_cfg, output_dir, counter)
    trainer = checked(DPOTrainer, counter)(model=model, args=args, train_dataset=rows, processing_class=processor,
                                           callbacks=every)
    strategies.set_gradient_exchange(trainer, distributed_cfg)
    metrics = fit(trainer, processor, output_dir, speed, stop, resume_from)
    curve = margin_curve(metrics.pop("log_history", []))
    if curve["margin"]:
        metrics["preference_curve"] = curve
        steps = sorted(curve["margin"])
        metrics["first_margin"], metrics["final_margin"] = curve["margin"][steps[0]], curve["margin"][steps[-1]]
        log.info("dpo: chosen-minus-rejected margin %.4f at step %d -> %.4f at step %d", metrics["first_margin"],
                 steps[0], metrics["final_margin"], steps[-1])
    return metrics
