"""What each distributed strategy changes in the trainer: DDP's gradient buckets and exchange dtype, FSDP2's
wrapping, DeepSpeed's ZeRO config, and length grouping by the global batch. The section itself, its checks and the
launch are runner/distributed.py."""

from __future__ import annotations

import logging

from . import distributed

log = logging.getLogger("runner")


def ddp_arguments(cfg: dict | None) -> dict:
    """TrainingArguments for the ddp strategy (none otherwise): the gradient buckets' size."""
    if cfg is None or cfg["strategy"] != "ddp":
        return {}
    return {"ddp_bucket_cap_mb": cfg["ddp_bucket_mb"]}


def set_gradient_exchange(trainer, cfg: dict | None) -> None:
    """ddp with ddp_gradient_dtype bfloat16: the trainer's accelerator registers torch's bf16 compression hook on the
    DDP model when it wraps it, at the start of training; the log says so once the hook is seen on the DDP model."""
    if cfg is None or cfg["strategy"] != "ddp" or cfg["ddp_gradient_dtype"] == "float32" or distributed.world_size() == 1:
        return
    from accelerate.utils import DDPCommunicationHookType
    from transformers import TrainerCallback

    class ConfirmHook(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            hooks = getattr(trainer.model_wrapped, "_comm_hooks", [])
            if not hooks:
                raise RuntimeError(f"ddp: ddp_gradient_dtype bfloat16 asked for, but the trainer's "
                                   f"{type(trainer.model_wrapped).__name__} has no communication hook")
            log.info("ddp: gradients exchanged in bfloat16 (%s), buckets of %d MB", hooks[0][0].__name__,
                     cfg["ddp_bucket_mb"])

    trainer.accelerator.ddp_handler.comm_hook = DDPCommunicationHookType.BF16
    trainer.add_callback(ConfirmHook())


def global_batch_sampler(sampler, world_size: int):
    """The trainer's length-grouped sampler, sorting rows in groups of the global batch instead of one process's.

    The trainer sorts rows by length in groups of 50 batches of one process, and accelerate deals consecutive
    batches to the processes in turn: a step's processes get batches of different lengths, and the shorter ones
    wait in the all-reduce. Grouped by the global batch, a step's processes share one sorted stretch of rows, the
    global batches one process would train at the global batch size. On real rows, epoch-sized, 8 processes: the
    slowest process's padded tokens per step fall from 1.35x to 1.15x the real tokens per process
    (bench/ddp_rank_balance.py; docs/benchmarks.md, "Several GPUs, fifth run")."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    if type(sampler) is not LengthGroupedSampler or world_size == 1:
        return sampler
    return LengthGroupedSampler(sampler.batch_size * world_size, lengths=sampler.lengths, generator=sampler.generator)


def grouped_by_global_batch(trainer_class):
    """`trainer_class` with `global_batch_sampler` in place of its training sampler."""

    class GlobalBatchGroups(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            return global_batch_sampler(super()._get_train_sampler(*args, **kwargs), self.args.world_size)

    return GlobalBatchGroups


FSDP_WRAPPED_LAYERS = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]  # the model's _no_split_modules


def fsdp_arguments(cfg: dict, gradient_checkpointing: bool) -> dict:
    """TrainingArguments for the fsdp strategy (none otherwise). Each decoder layer and vision block is its own
    FSDP2 unit, so both towers are sharded; checkpointing goes through FSDP's own activation checkpointing
    (the trainer's would all-gather every layer's weights a second time in the backward pass)."""
    if cfg is None or cfg["strategy"] != "fsdp":
        return {}
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "transformer_layer_cls_to_wrap": FSDP_WRAPPED_LAYERS, "reshard_after_forward": True,
        "activation_checkpointing": gradient_checkpointing, "cpu_offload": cfg["fsdp_cpu_offload"],
        "state_dict_type": "FULL_STATE_DICT"}}


def deepspeed_arguments(cfg: dict) -> dict:
    """TrainingArguments for the deepspeed strategy (none otherwise): a ZeRO config whose batch, accumulation,
    clipping, precision and optimizer values ("auto") the trainer fills in from the train section."""
    if cfg is None or cfg["strategy"] != "deepspeed":
        return {}
    zero = {"stage": cfg["deepspeed_stage"], "overlap_comm": True, "contiguous_gradients": True}
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
              "fp16": {"enabled": "auto"}, "zero_optimization": zero}
    if cfg["deepspeed_stage"] == 3:  # the adapter is saved from the gathered weights, not from rank 0's shard
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg["deepspeed_cpu_offload"]:  # the optimizer then steps on the CPU: DeepSpeed's own CPU Adam
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg["deepspeed_stage"] == 3:
            zero["offload_param"] = {"device": "cpu"}
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return {"deepspeed": config}


def load_whole_models() -> None:
    """After ZeRO-3 training, transformers would partition every model this process loads (deepspeed's zero.Init,
    a collective that waits for all ranks); rank 0 reloads the model alone to evaluate it, so that is switched off."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
