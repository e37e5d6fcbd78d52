"""Several training processes through torchrun: the `distributed` section, its checks, and what a rank knows.

`recipe run` in one process reads the recipe; when it asks for more than one process, that process starts
`python -m torch.distributed.run ... -m runner run RECIPE ...` (torchrun, the launcher PyTorch ships) and waits
for it, passing stop signals on to the ranks (runner/launch.py). Each process torchrun starts sees RANK,
LOCAL_RANK and WORLD_SIZE in its environment and runs the recipe as usual: the Hugging Face Trainer inside trl's
SFTTrainer sets up DistributedDataParallel (or FSDP2, or DeepSpeed ZeRO, from the arguments built in
runner/strategies.py), shards every batch across the ranks and averages the gradients (NCCL on GPUs, gloo on
CPUs). This module never spawns processes or syncs gradients itself.

Rank 0 alone writes the run directory (log, status, TensorBoard, metrics, checkpoints), evaluates and exports;
the other ranks log warnings to the console with their rank in front and write nothing there but their own RNG
state in each checkpoint (the trainer's) and their profile with train.profile_steps (runner/profiling.py).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

log = logging.getLogger("runner")

ENVIRONMENT = {"processes_per_node": "NPROC_PER_NODE", "nodes": "NNODES", "node_rank": "NODE_RANK",
               "master_addr": "MASTER_ADDR", "master_port": "MASTER_PORT"}
RUN_DIR_VARIABLE = "RECIPE_RUN_DIR"  # the run directory the launching process made, handed to every rank
RUN_DIR_STORE_KEY = "recipe-runner/run-dir"  # rank 0's run directory, in torchrun's rendezvous store


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def bind_gpu() -> None:
    """Makes this process's GPU (its local rank) the current CUDA device before any model code runs: libraries
    that place tensors on "the current device" (Unsloth among them) would otherwise put every rank on GPU 0."""
    import torch

    if launched() and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def check_placement(model) -> None:
    """Fails fast if a launched process's model is not on its own GPU (every rank would share one otherwise)."""
    import torch

    if not (launched() and torch.cuda.is_available()):
        return
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    if devices != {torch.device("cuda", local_rank())}:
        raise RuntimeError(f"rank {rank()}: model on {sorted(map(str, devices))}, expected cuda:{local_rank()} only")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(cfg: dict) -> dict:
    """The section with the environment variables and `auto` applied."""
    cfg = dict(cfg)
    for key, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            value = os.environ[variable]
            cfg[key] = value if key == "master_addr" else int(value)
    if cfg["processes_per_node"] == "auto":
        cfg["processes_per_node"] = max(visible_gpus(), 1)
    if cfg["strategy"] == "none":
        cfg["processes_per_node"], cfg["nodes"] = 1, 1
    return cfg


def planned_world_size(cfg: dict) -> int:
    """Processes in all: torchrun's WORLD_SIZE inside a launched process, else what the section asks for."""
    return world_size() if launched() else cfg["processes_per_node"] * cfg["nodes"]


def shards_weights(cfg: dict) -> bool:
    """Whether each process holds only a shard of the weights (so rank 0 cannot evaluate the model it trained)."""
    return cfg["strategy"] == "fsdp" or (cfg["strategy"] == "deepspeed" and cfg["deepspeed_stage"] == 3)


def problems(cfg: dict, backend: str, quantization: str, optimizer: str = "adamw_torch") -> list[tuple[str, str]]:
    """What stops this distributed setting on this machine, before anything launches: (key path, message).
    `backend` is the one the run will use (`auto` already resolved)."""
    found = []
    if cfg["deepspeed_cpu_offload"] and cfg["strategy"] != "deepspeed":
        found.append(("distributed.deepspeed_cpu_offload", f"applies to strategy deepspeed only, not {cfg['strategy']}"))
    if cfg["strategy"] == "none":
        return found
    gpus = visible_gpus()
    if cfg["strategy"] == "deepspeed":
        found += deepspeed_problems(backend, quantization, optimizer, gpus, cfg["deepspeed_stage"])
    if cfg["strategy"] == "fsdp" and backend == "unsloth":
        found.append(("distributed.strategy", "fsdp needs the transformers backend: Unsloth has no FSDP path; set "
                      "model.backend: transformers (or auto), or use strategy: ddp to keep Unsloth"))
    if cfg["strategy"] == "fsdp" and not gpus:
        found.append(("distributed.strategy", "fsdp needs CUDA GPUs: accelerate runs CPU processes as plain DDP "
                      "whatever is asked, so use strategy: ddp on this machine"))
    if cfg["strategy"] == "fsdp" and quantization == "8bit":
        found.append(("distributed.strategy", "fsdp cannot shard 8-bit (bitsandbytes int8) weights; use "
                      "model.quantization: 4bit or none, or strategy: ddp"))
    for key, default in (("ddp_gradient_dtype", "float32"), ("ddp_bucket_mb", 25)):
        if cfg[key] != default and cfg["strategy"] != "ddp":
            found.append((f"distributed.{key}", f"applies to strategy ddp only, not {cfg['strategy']}"))
    if cfg["fsdp_cpu_offload"] and cfg["strategy"] != "fsdp":
        found.append(("distributed.fsdp_cpu_offload", f"applies to strategy fsdp only, not {cfg['strategy']}"))
    if gpus and cfg["processes_per_node"] > gpus:
        found.append(("distributed.processes_per_node", f"{cfg['processes_per_node']} processes but {gpus} visible "
                      "GPUs; use at most one process per GPU (CUDA_VISIBLE_DEVICES chooses which)"))
    if not gpus and cfg["processes_per_node"] > os.cpu_count():
        found.append(("distributed.processes_per_node", f"{cfg['processes_per_node']} processes on a machine without "
                      f"a GPU and {os.cpu_count()} CPU cores; use at most one process per core"))
    if cfg["node_rank"] >= cfg["nodes"]:
        found.append(("distributed.node_rank", f"is {cfg['node_rank']} but nodes is {cfg['nodes']}; node ranks run "
                      "from 0 to nodes - 1"))
    if cfg["node_rank"] == 0 and not launched() and port_in_use(cfg["master_port"]):
        found.append(("distributed.master_port", f"{cfg['master_port']} is in use on this machine (another "
                      "distributed run, or one still stopping); torchrun's rendezvous listens there on node 0: set "
                      f"distributed.master_port (or MASTER_PORT) to a free port, e.g. {free_port()}"))
    return found


def port_in_use(port: int) -> bool:
    """Whether torchrun's rendezvous store could not listen on `port` here (it binds it with SO_REUSEADDR too)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def deepspeed_problems(backend: str, quantization: str, optimizer: str, gpus: int, stage: int) -> list[tuple[str, str]]:
    found = []
    if importlib.util.find_spec("deepspeed") is None:
        found.append(("distributed.strategy", "deepspeed is not installed; add it with `recipe install deepspeed` "
                      "(or `just setup cpu deepspeed`, `just setup gpu deepspeed`), or use strategy: ddp or fsdp"))
    if backend == "unsloth":
        found.append(("distributed.strategy", "deepspeed needs the transformers backend: Unsloth's DeepSpeed path is "
                      "not supported here; set model.backend: transformers (or auto), or use strategy: ddp to keep "
                      "Unsloth"))
    if quantization == "8bit":
        found.append(("distributed.strategy", "deepspeed with 8bit (bitsandbytes int8) weights is not supported "
                      "here; use model.quantization: 4bit or none, or strategy: ddp"))
    if quantization == "4bit" and stage == 3:  # on two H200s its first step took 71 s against ZeRO-2's 6 s
        found.append(("distributed.deepspeed_stage", "3 with 4-bit weights is not supported here (it trained a first "
                      "step on two H200s, slowly, and was not checked end to end); use deepspeed_stage: 2, or "
                      "strategy: fsdp to shard 4-bit weights"))
    if "8bit" in optimizer and gpus:
        found.append(("train.optimizer", f"{optimizer} under deepspeed: ZeRO partitions the optimizer state itself, "
                      "and bitsandbytes' 8-bit optimizers are not supported under it here; use adamw_torch"))
    return found


def rank0_decides(flag: bool) -> bool:
    """Rank 0's `flag` on every rank. Saving must happen at the same step on all ranks (a checkpoint save gathers
    from every rank), while the processes' clocks read slightly different times."""
    return _agreed(flag, "rank 0")


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: a stop signal may reach one node's processes only (`kill` on
    one machine), and all ranks must stop at the same step."""
    return _agreed(flag, "any")


def _agreed(flag: bool, how: str) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = f"cuda:{local_rank()}" if dist.get_backend() == "nccl" else "cpu"
    decision = torch.tensor([int(flag)], device=device)
    if how == "any":
        dist.all_reduce(decision, op=dist.ReduceOp.MAX)
    else:
        dist.broadcast(decision, src=0)
    return bool(decision.item())


def shared_run_dir() -> Path | None:
    """Inside a launched process: the run directory its launcher made (rank 0's node), if any."""
    value = os.environ.get(RUN_DIR_VARIABLE)
    return Path(value) if launched() and value else None


def rank0s_run_dir(make, timeout_minutes: float) -> Path:
    """The run directory rank 0 makes (`make()`, on rank 0 only), on every rank. Rank 0 leaves its path in
    torchrun's rendezvous store and the other ranks wait for it there: ranks on another node (whose launcher made
    no directory) or started by torchrun directly would otherwise make directories of their own, and the trainer's
    per-rank files (each rank's RNG state in a checkpoint) would miss rank 0's checkpoints."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(minutes=timeout_minutes))
    if is_main():
        run_dir = make()
        store.set(RUN_DIR_STORE_KEY, str(run_dir))
        return run_dir
    return Path(store.get(RUN_DIR_STORE_KEY).decode())


def newest_checkpoint(run_dir: Path) -> Path | None:
    """For ranks other than 0, which must not set incomplete checkpoints aside: the newest complete one."""
    from .checkpoints import is_usable

    found = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return next((c for c in reversed(found) if is_usable(c)), None)
