"""How fast the machine's processes exchange what DDP exchanges each step: the LoRA gradients, in buckets.

Under DDP every rank of the fast recipe all-reduces its LoRA gradients once per step: 51.5 M values, 206 MB in
float32, in DDP's buckets of 25 MB. A profile of that recipe under DDP on two H200s (docs/benchmarks.md, "Several
GPUs, fifth run") showed those all-reduce kernels taking 44 ms a bucket on the slower rank, far from what NVLink
would give; this times the exchange alone, per dtype and bucket size, after warm-up:

    python -m torch.distributed.run --nproc_per_node=2 -m bench.allreduce_bandwidth --out allreduce.json

Bandwidths follow nccl-tests: algorithm bandwidth = bytes / time; bus bandwidth = that x 2 (N - 1) / N, the rate
each link carries in a ring, comparable with the link's own figure. `NCCL_DEBUG=INFO` in the environment makes
NCCL print the transport it chose between the GPUs (P2P, SHM or NET). Runs on CPUs too (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

LORA_PARAMETERS = 51_521_536  # the fast recipe's LoRA (r=16 on vision and language layers of the 7B model)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=LORA_PARAMETERS, help="values all-reduced per step")
    parser.add_argument("--bucket-mb", default="25,100,all",
                        help="comma-separated bucket sizes in MB (DDP's default is 25); `all`: one bucket")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="float32: what DDP sends for fp32 LoRA "
                        "weights; bfloat16: what a bf16 compression hook would send")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (each all-reduces every bucket)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON written by rank 0")
    return parser.parse_args(argv)


def bucket_sizes(parameters: int, bucket_mb: str, element_size: int) -> list[int]:
    """Values per bucket, DDP's way: full buckets of `bucket_mb`, then the remainder."""
    if bucket_mb == "all":
        return [parameters]
    per_bucket = max(1, int(float(bucket_mb) * 2**20) // element_size)
    return [min(per_bucket, parameters - start) for start in range(0, parameters, per_bucket)]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_step(buckets: list[torch.Tensor], steps: int, warmup: int) -> float:
    """Seconds per step of all-reducing every bucket once, the mean over `steps` after `warmup`."""
    for _ in range(warmup):
        for bucket in buckets:
            dist.all_reduce(bucket)
    synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        for bucket in buckets:
            dist.all_reduce(bucket)
    synchronize()
    return (time.perf_counter() - started) / steps


def check_sum(device) -> None:
    """One all-reduce whose answer is known, so a broken setup fails instead of timing nothing."""
    world = dist.get_world_size()
    value = torch.full((8,), float(dist.get_rank() + 1), device=device)
    dist.all_reduce(value)
    expected = world * (world + 1) / 2
    if not torch.all(value == expected):
        raise RuntimeError(f"all-reduce gave {value.tolist()}, expected {expected}")


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    world = dist.get_world_size()
    check_sum(device)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        element_size = torch.tensor([], dtype=dtype).element_size()
        total_bytes = args.parameters * element_size
        for bucket_mb in args.bucket_mb.split(","):
            sizes = bucket_sizes(args.parameters, bucket_mb, element_size)
            buckets = [torch.zeros(size, dtype=dtype, device=device) for size in sizes]
            seconds = time_step(buckets, args.steps, args.warmup)
            algorithm_gbps = total_bytes / seconds / 1e9
            rows.append({"dtype": dtype_name, "bucket_mb": bucket_mb, "buckets": len(sizes), "mb_per_step":
                         round(total_bytes / 1e6, 1), "ms_per_step": round(seconds * 1e3, 3),
                         "ms_per_bucket": round(seconds * 1e3 / len(sizes), 3),
                         "algorithm_gb_per_s": round(algorithm_gbps, 2),
                         "bus_gb_per_s": round(algorithm_gbps * 2 * (world - 1) / world, 2)})
            del buckets
    if dist.get_rank() == 0:
        from bench.common import device_name

        summary = {"benchmark": "allreduce_bandwidth", "backend": dist.get_backend(), "world_size": world,
                   "parameters": args.parameters, "steps": args.steps, "warmup": args.warmup,
                   "device": device_name(), "torch": torch.__version__,
                   "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                   "environment": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}, "results": rows}
        print("| dtype | bucket MB | buckets | MB per step | ms per step | ms per bucket | algorithm GB/s | bus GB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(str(value) for value in row.values()) + " |")
        print(json.dumps(summary))
        if args.out:
            args.out.write_text(json.dumps(summary, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
