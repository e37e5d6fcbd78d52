"""The GRPO train step: trl's GRPOTrainer samples answers for each training image and learns from the recipe's
rewards (runner/rewards.py), starting from an SFT adapter (`model.adapter`).

The prompt is runner/prompt.py's chat turn, given to trl as a conversation with the image in its place, so the
tokens the model continues are the ones SFT trained and eval asks for. Generation goes through transformers
(no vLLM). The reward curve (mean reward per logged step, overall and per reward) goes into metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import strategies
from . import rewards as reward_functions
from .prompt import END_OF_TURN, decode_image, messages, text_of
from .train import TokenCounter, callbacks, checked, fit, one_gpu_per_process, trainer_arguments

log = logging.getLogger("runner")


def prompt_rows(rows, instruction: str, image_column: str, text_column: str, base_dir=None):
    """The training rows as trl's multimodal prompts: the chat turn (image placeholder + instruction), the decoded
    image and the reference. Decoded as each batch is read, not all up front."""
    conversation = messages(instruction)

    def decode(batch: dict) -> dict:
        count = len(batch[image_column])
        return {"prompt": [conversation] * count,
                "image": [decode_image(value, base_dir) for value in batch[image_column]],
                "reference": [text_of(value) for value in batch[text_column]],
                "row_id": batch["row_id"]}

    return rows.select_columns(["row_id", image_column, text_column]).with_transform(decode)


def answer_text(completion) -> str:
    """A sampled answer as text: trl hands conversational completions as a one-message list."""
    if isinstance(completion, list):
        completion = completion[0]["content"] if completion else ""
    return completion.strip()


def reward_function(name: str, stop_ids: set[int]):
    """The reward `name` in trl's calling convention: one score per completion, the reference from the row."""
    score = reward_functions.REWARDS[name]

    def reward(prompts, completions, reference, completion_ids=None, **_):
        answers = [answer_text(c) for c in completions]
        if name == "length_and_stop":
            finished = [bool(stop_ids & set(ids)) for ids in completion_ids]
            return [score(a, r, f) for a, r, f in zip(answers, reference, finished)]
        return [score(a, r) for a, r in zip(answers, reference)]

    reward.__name__ = name  # trl logs each reward as rewards/<name>/mean
    return reward


def left_padding(processor):
    """trl left-pads the prompt ids it generates from, but encodes the prompts again for the loss with the
    processor's own padding side. Padded on the right, mm_token_type_ids then slide against the ids wherever one
    step's images differ in size, and Qwen2.5-VL's mRoPE index fails ("shape mismatch", trl#5785; 7B on the H200 at
    step 2). The runner's own batches pad explicitly (runner/prompt.py), so this changes nothing else."""
    processor.tokenizer.padding_side = "left"
    return processor


def grpo_config(train_cfg: dict, grpo_cfg: dict, output_dir: Path, trainer_checkpointing: bool, distributed_cfg):
    from trl import GRPOConfig

    weights = {name: w for name, w in grpo_cfg["rewards"].items() if w > 0}
    return one_gpu_per_process(GRPOConfig(
        **trainer_arguments(train_cfg, output_dir, trainer_checkpointing, distributed_cfg),
        num_generations=grpo_cfg["num_generations"],
        temperature=grpo_cfg["temperature"],
        max_completion_length=grpo_cfg["max_completion_length"],
        beta=grpo_cfg["beta"],
        loss_type=grpo_cfg["loss_type"],
        importance_sampling_level=grpo_cfg["importance_sampling"],
        scale_rewards=grpo_cfg["scale_rewards"],
        reward_weights=list(weights.values()),
        log_completions=False,
    )), list(weights)


def reward_curve(history: list[dict], names: list[str]) -> dict:
    """Mean reward per logged step: the weighted sum the trainer maximizes, and each reward on its own."""
    curve = {"weighted": {e["step"]: e["reward"] for e in history if "reward" in e}}
    for name in names:
        curve[name] = {e["step"]: e[f"rewards/{name}/mean"] for e in history if f"rewards/{name}/mean" in e}
    return curve


def train_grpo(model, processor, data, train_cfg: dict, grpo_cfg: dict, dataset_cfg: dict, output_dir: Path,
               base_dir=None, trainer_checkpointing: bool = True, resume_from: Path | None = None,
               distributed_cfg: dict | None = None) -> dict:
    """Runs GRPO on the training rows; returns the trainer's metrics with the reward curve."""
    from trl import GRPOTrainer

    args, names = grpo_config(train_cfg, grpo_cfg, output_dir / "checkpoints", trainer_checkpointing, distributed_cfg)
    tokenizer = processor.tokenizer
    stop_ids = {tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.pad_token_id}
    rows = prompt_rows(data.train, dataset_cfg["instruction"], dataset_cfg["image_column"],
                       dataset_cfg["text_column"], base_dir)
    images_per_step = args.generation_batch_size // grpo_cfg["num_generations"]  # over all processes
    if len(rows) < images_per_step:  # trl would silently train 0 steps
        raise ValueError(f"grpo: each step samples answers for {images_per_step} images (train.batch_size x "
                         f"gradient_accumulation_steps x processes / grpo.num_generations) but the dataset has "
                         f"{len(rows)} rows; lower the batch or use more rows")
    log.info("grpo: %d images, %d answers each, rewards %s", len(rows), grpo_cfg["num_generations"],
             ", ".join(f"{n} x {grpo_cfg['rewards'][n]:g}" for n in names))
    counter = TokenCounter()
    speed, stop, every = callbacks(train_cfg, output_dir, counter)
    trainer = checked(GRPOTrainer, counter)(
        model=model, args=args, train_dataset=rows, processing_class=left_padding(processor),
        reward_funcs=[reward_function(name, stop_ids) for name in names], callbacks=every,
    )
    strategies.set_gradient_exchange(trainer, distributed_cfg)
    metrics = fit(trainer, processor, output_dir, speed, stop, resume_from)
    curve = reward_curve(metrics.pop("log_history", []), names)
    if curve["weighted"]:
        metrics["reward_curve"] = curve
        steps = sorted(curve["weighted"])
        metrics["first_reward"], metrics["final_reward"] = curve["weighted"][steps[0]], curve["weighted"][steps[-1]]
        log.info("grpo: mean reward %.4f at step %d -> %.4f at step %d", metrics["first_reward"], steps[0],
                 metrics["final_reward"], steps[-1])
    return metrics
