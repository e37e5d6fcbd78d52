"""The train step: trl's SFTTrainer driven by the recipe's `train` section, with the runner's own collator."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from . import distributed, strategies
from .checkpoints import RecordStatus, SaveEveryMinutes, StopOnSignal
from .errors import NonFiniteLoss
from .profiling import ProfileSteps
from .prompt import decode_image, text_of, training_batch

log = logging.getLogger("runner")
TRACE_ROWS = os.environ.get("RECIPE_TRACE_ROWS")  # a directory; a debugging aid, off unless set


class VisionCollator:
    """Decodes a batch of rows and encodes it with labels on the answers only (see runner/prompt.py)."""

    def __init__(self, processor, instruction: str, image_column: str, text_column: str, base_dir=None):
        self.processor, self.instruction = processor, instruction
        self.image_column, self.text_column, self.base_dir = image_column, text_column, base_dir

    def __call__(self, rows: list[dict]) -> dict:
        if TRACE_ROWS:  # which rows each rank trains on, to check how batches are sharded across processes
            with open(Path(TRACE_ROWS) / f"rows-rank{distributed.rank()}.txt", "a") as trace:
                trace.write("".join(f"{row['row_id']}\n" for row in rows))
        images = [decode_image(row[self.image_column], self.base_dir) for row in rows]
        answers = [text_of(row[self.text_column]) for row in rows]
        return training_batch(self.processor, images, answers, self.instruction)


class TokenCounter:
    """Real and padded tokens of the batches the model trained on. Counted in the training process, from the
    batches themselves: with `train.dataloader_workers` > 0 the collator runs in worker processes."""

    def __init__(self):
        self.samples, self.real_tokens, self.padded_tokens = 0, 0, 0

    def count(self, batch: dict) -> None:
        if "attention_mask" not in batch:  # GRPO's batches are prompts and sampled answers, counted by trl itself
            return
        mask = batch["attention_mask"]
        self.samples += mask.shape[0]
        self.real_tokens += int(mask.sum())
        self.padded_tokens += mask.numel()


def checked(trainer_class, counter: TokenCounter):
    """`trainer_class` (trl's SFTTrainer, or Unsloth's patch of it) that counts each training batch's tokens and
    stops on a NaN or infinite loss before the optimizer applies that step, so no checkpoint ever holds it."""

    class CheckedTrainer(trainer_class):
        def training_step(self, model, inputs, *args, **kwargs):
            counter.count(inputs)
            loss = super().training_step(model, inputs, *args, **kwargs)
            if not torch.isfinite(loss).all():
                raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))
            return loss

    return CheckedTrainer


class LogToFile(TrainerCallback):
    """Copies the trainer's periodic logs (loss, learning rate, grad norm) into the run log; says how FSDP or
    DeepSpeed ZeRO-3 sharded the model, once it has."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tensors = list(model.parameters()) if model is not None else []
        sharded = sum(type(tensor).__name__ == "DTensor" for tensor in tensors)
        if sharded:
            log.info("fsdp: %d of %d parameter tensors sharded across %d processes", sharded, len(tensors),
                     distributed.world_size())
        partitioned = sum(hasattr(tensor, "ds_numel") for tensor in tensors)  # ZeRO-3's partitioned parameters
        if partitioned:
            log.info("deepspeed: %d of %d parameter tensors partitioned across %d processes", partitioned,
                     len(tensors), distributed.world_size())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            log.info("step %d/%d: %s", state.global_step, state.max_steps, shown)


class SpeedMeter(TrainerCallback):
    """Time to first step, then steady-state throughput over the steps after `warmup_steps`, and peak memory.
    Steps count from where this process started training (a resumed run starts at its checkpoint's step).
    Each step's wall time and this process's padded tokens in it are kept too: under DDP a step lasts as long as
    its slowest rank, so uneven steps with even tokens point at something other than padding."""

    def __init__(self, counter: TokenCounter, samples_per_step: int, warmup_steps: int = 2):
        self.counter, self.samples_per_step, self.warmup_steps = counter, samples_per_step, warmup_steps
        self.started = self.first_step_s = self.steady_start = None
        self.steady_steps, self.start_step = 0, 0
        self.step_seconds, self.step_padded_tokens = [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.start_step = time.perf_counter(), state.global_step
        self.last_step_end, self.last_padded = self.started, self.counter.padded_tokens
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        now, done = time.perf_counter(), state.global_step - self.start_step
        self.step_seconds.append(round(now - self.last_step_end, 3))
        self.step_padded_tokens.append(self.counter.padded_tokens - self.last_padded)
        self.last_step_end, self.last_padded = now, self.counter.padded_tokens
        if done == 1:
            self.first_step_s = now - self.started
        if done == self.warmup_steps:
            self.steady_start = now
        elif done > self.warmup_steps:
            self.steady_steps = done - self.warmup_steps
            self.steady_s = now - self.steady_start

    def figures(self) -> dict:
        c = self.counter
        figures = {"time_to_first_step_s": self.first_step_s, "samples_per_step": self.samples_per_step}
        if c.samples:  # GRPO builds its batches inside trl, past the collator that counts tokens
            figures["real_tokens_per_sample"] = c.real_tokens / c.samples
            figures["padding_fraction"] = 1 - c.real_tokens / max(c.padded_tokens, 1)
        if self.steady_steps:
            figures["steady_steps"] = self.steady_steps
            figures["samples_per_s"] = self.steady_steps * self.samples_per_step / self.steady_s
            if c.samples:
                figures["real_tokens_per_s"] = figures["samples_per_s"] * figures["real_tokens_per_sample"]
        if c.samples:
            figures["step_padded_tokens"] = self.step_padded_tokens
        figures["step_seconds"] = self.step_seconds
        if torch.cuda.is_available():
            figures["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            figures["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return figures


def resolve_precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) flags for the trainer."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return False, False
        return (True, False) if torch.cuda.is_bf16_supported() else (False, True)
    return precision == "bf16", precision == "fp16"


def resolve_optimizer(name: str) -> str:
    if "8bit" in name and not torch.cuda.is_available():
        log.info("train: optimizer %s needs bitsandbytes on a CUDA GPU; using adamw_torch on this CPU", name)
        return "adamw_torch"
    return name


def trainer_arguments(cfg: dict, output_dir: Path, trainer_checkpointing: bool = True,
                      distributed_cfg: dict | None = None) -> dict:
    """The `train` (and `distributed`) sections as TrainingArguments keywords, shared by SFT, GRPO and DPO."""
    timeout_minutes = distributed_cfg["timeout_minutes"] if distributed_cfg else 30
    cpu_group = distributed.world_size() > 1 and not torch.cuda.is_available()
    sharded = bool(distributed_cfg) and distributed_cfg["strategy"] == "fsdp"
    bf16, fp16 = resolve_precision(cfg["precision"])
    return dict(
        output_dir=str(output_dir),
        max_steps=cfg["max_steps"] if cfg["max_steps"] is not None else -1,
        num_train_epochs=cfg["epochs"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=cfg["warmup_steps"],
        optim=resolve_optimizer(cfg["optimizer"]),
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["max_grad_norm"],
        gradient_checkpointing=cfg["gradient_checkpointing"] and trainer_checkpointing and not sharded,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg["gradient_checkpointing"] else None,
        bf16=bf16,
        fp16=fp16,
        logging_steps=cfg["logging_steps"],
        report_to=[],  # TensorBoard is attached in callbacks() so its events land in the run directory
        save_strategy="steps" if cfg["save_steps"] else "no",
        save_steps=cfg["save_steps"] or 500,
        save_total_limit=cfg["save_total_limit"],
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        dataloader_num_workers=cfg["dataloader_workers"],
        dataloader_pin_memory=torch.cuda.is_available(),
        # Vision rows are encoded on the fly (collator or trainer): trl must not drop the image column.
        remove_unused_columns=False,
        eval_strategy="no",
        disable_tqdm=not distributed.is_main(),
        # Under DDP: every LoRA parameter gets a gradient each step (and reentrant checkpointing with LoRA fails
        # with "marked ready twice"), so DDP need not search for unused ones; gloo where there is no GPU.
        ddp_find_unused_parameters=False,
        ddp_timeout=int(timeout_minutes * 60),
        ddp_backend="gloo" if cpu_group else None,
        use_cpu=cpu_group,  # makes accelerate treat the CPU processes as one distributed group
        **strategies.ddp_arguments(distributed_cfg),
        **strategies.fsdp_arguments(distributed_cfg, cfg["gradient_checkpointing"] and trainer_checkpointing),
        **strategies.deepspeed_arguments(distributed_cfg),
    )


def one_gpu_per_process(config):
    """One process on a machine with several GPUs: the trainer would wrap the model in nn.DataParallel, which trl
    refuses. The model sits on GPU 0; `recipe run --gpus N` trains on N of them with DDP."""
    if not distributed.launched() and config.n_gpu > 1:
        log.info("train: one process uses GPU 0 of the %d visible; `--gpus %d` trains on all of them", config.n_gpu,
                 config.n_gpu)
        config._n_gpu = 1
    return config


def sft_config(cfg: dict, output_dir: Path, max_seq_length: int, trainer_checkpointing: bool = True,
               distributed_cfg: dict | None = None):
    """Maps the `train` (and `distributed`) sections onto trl's SFTConfig, with what vision training requires."""
    from trl import SFTConfig

    return one_gpu_per_process(SFTConfig(
        **trainer_arguments(cfg, output_dir, trainer_checkpointing, distributed_cfg),
        train_sampling_strategy="group_by_length" if cfg["group_by_length"] else "random",
        length_column_name="length",
        # The collator encodes rows itself: trl must not tokenize them.
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=max_seq_length,
        packing=False,
    ))


def callbacks(train_cfg: dict, output_dir: Path, counter: TokenCounter) -> tuple[SpeedMeter, StopOnSignal, list]:
    """The speed meter, the signal handler and every callback a training run gets; logs the global batch."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    processes = distributed.world_size()
    speed = SpeedMeter(counter, train_cfg["batch_size"] * train_cfg["gradient_accumulation_steps"] * processes)
    stop = StopOnSignal()
    every = [speed, SaveEveryMinutes(train_cfg["save_every_minutes"]), stop]
    if train_cfg["profile_steps"]:
        every.append(ProfileSteps(train_cfg["profile_steps"], output_dir))
    if distributed.is_main():  # rank 0 alone writes the run directory's log, TensorBoard events and status
        tensorboard = TensorBoardCallback(SummaryWriter(log_dir=str(output_dir / "tensorboard")))
        every = [LogToFile(), tensorboard, RecordStatus(output_dir), *every]
    log.info("train: global batch %d = batch_size %d x gradient_accumulation_steps %d x %d process%s",
             speed.samples_per_step, train_cfg["batch_size"], train_cfg["gradient_accumulation_steps"], processes,
             "es" * (processes != 1))
    return speed, stop, every


def fit(trainer, processor, output_dir: Path, speed: SpeedMeter, stop: StopOnSignal,
        resume_from: Path | None = None) -> dict:
    """Trains (from `resume_from`, a checkpoint, if given), saves the adapter to `output_dir/adapter` and returns
    the trainer's metrics with speed and losses; `interrupted` names the signal that stopped it early."""
    if resume_from is not None:
        log.info("train: resuming from %s (optimizer, schedule, RNG and data position restored)", resume_from)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    if stop.interrupted:
        return {"interrupted": stop.interrupted, "step": trainer.state.global_step}
    adapter_dir = output_dir / "adapter"
    if trainer.args.fsdp or trainer.is_deepspeed_enabled:  # every rank takes part in gathering the adapter
        trainer.save_model(str(adapter_dir))
    elif distributed.is_main():
        # GRPO and DPO add a frozen "ref" copy of the starting adapter as their reference: save only the trained one
        adapters = list(getattr(trainer.model, "peft_config", {}))
        selected = {"selected_adapters": ["default"]} if len(adapters) > 1 and "default" in adapters else {}
        trainer.model.save_pretrained(adapter_dir, **selected)
    if distributed.is_main():
        processor.save_pretrained(adapter_dir)
        log.info("train: adapter saved to %s", adapter_dir)
    metrics = {**result.metrics, "speed": speed.figures(), "world_size": distributed.world_size(),
               "global_batch": speed.samples_per_step}
    log.info("train speed: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics["speed"].items()
                                          if isinstance(v, (int, float))))
    if history:
        metrics["first_loss"], metrics["final_loss"] = history[0]["loss"], history[-1]["loss"]
        metrics["losses"] = {entry["step"]: entry["loss"] for entry in history}
    metrics["log_history"] = history
    return metrics


def train(model, processor, data, train_cfg: dict, collator: VisionCollator, output_dir: Path, max_seq_length: int,
          trainer_checkpointing: bool = True, resume_from: Path | None = None, distributed_cfg: dict | None = None):
    """The SFT train step: trl's SFTTrainer on the rows, through the runner's collator (answer-only labels)."""
    from trl import SFTTrainer

    args = sft_config(train_cfg, output_dir / "checkpoints", max_seq_length, trainer_checkpointing, distributed_cfg)
    counter = TokenCounter()
    speed, stop, every = callbacks(train_cfg, output_dir, counter)
    trainer = strategies.grouped_by_global_batch(checked(SFTTrainer, counter))(
        model=model, args=args, train_dataset=data.train, processing_class=processor, data_collator=collator,
        callbacks=every,
    )
    strategies.set_gradient_exchange(trainer, distributed_cfg)
    metrics = fit(trainer, processor, output_dir, speed, stop, resume_from)
    metrics.pop("log_history", None)
    return metrics
