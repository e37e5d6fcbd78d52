"""How evenly DDP's ranks are loaded when the trainer groups rows by length (CPU only, no model).

Under DDP the trainer builds one LengthGroupedSampler over the whole dataset (batches of `train.batch_size` rows of
similar length, the longest batch first) and accelerate deals its batches to the ranks in turn: batch k goes to
rank k mod N. Neighbouring batches differ in length, so at every step some ranks finish early and wait in the
gradient all-reduce for the slowest. This replays that dealing on real rows, with the lengths the runner's data
step gives them (runner/data.py: image tokens + prompt + answer), and prints, per step, the padded tokens each rank
computes (rows x its longest row) and the share of the step the other ranks wait:

    python -m bench.ddp_rank_balance --data ../shared/data/latex_ocr_val/validation.parquet --repeat 8 --out balance.json

Two groupings: `process`, the trainer's own (sorted groups of one process's batch, 50 batches at a time), and
`global`, what the runner does under DDP (runner/train.py `grouped_by_global_batch`: the same sampler over batches of
the global batch, so each step's ranks get neighbouring rows of one sorted group). `slowest_over_ideal` sums each
step's slowest rank's padded tokens and divides by the real tokens per rank: a step's time in the language model
follows its slowest rank (the vision tower packs its patches, no padding: not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.qwen25vl_7b import MAX_PIXELS, MIN_PIXELS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="parquet in the unsloth/LaTeX_OCR schema")
    parser.add_argument("--recipe", default="recipes/qwen25vl_latex_fast.yaml", help="dataset, model and train sections")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seeds", default="3407,0,1", help="comma-separated sampler seeds")
    parser.add_argument("--repeat", type=int, default=1, help="the rows' lengths N times over: a dataset of the "
                        "training split's size (8 x 8,475 = 67,800 rows against 68,686) groups 50 batches at a time")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def row_lengths(data: Path, recipe: dict) -> list[int]:
    """The `length` column the data step adds, with the 7B model's processor bounds and the real Qwen vocabulary."""
    from datasets import load_dataset
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from runner.data import check_rows
    from runner.tiny import CHAT_TEMPLATE, build_tokenizer

    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=build_tokenizer(), video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )
    rows = load_dataset("parquet", data_files=str(data), split="train")
    rows = rows.add_column("row_id", list(range(len(rows))))
    kept, _ = check_rows(rows, recipe["dataset"], processor, recipe["model"]["max_seq_length"], "train", None, None)
    return list(kept["length"])


def rank_costs(lengths: list[int], batch_size: int, processes: int, seed: int, grouping: str) -> list[list[int]]:
    """Per step, the padded tokens of each rank's batch, dealt as the trainer and accelerate deal them."""
    import torch
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    group = batch_size * (processes if grouping == "global" else 1)
    per_rank = []
    for rank in range(processes):
        generator = torch.Generator().manual_seed(seed)  # the same order on every rank, as the trainer's seed gives
        sampler = LengthGroupedSampler(group, lengths=lengths, generator=generator)
        shard = BatchSamplerShard(BatchSampler(sampler, batch_size, drop_last=False), processes, rank)
        per_rank.append([len(batch) * max(lengths[i] for i in batch) for batch in shard])
    return [list(step) for step in zip(*per_rank)]


def summary(costs: list[list[int]], real_tokens: int, processes: int) -> dict:
    waiting = [1 - statistics.mean(step) / max(step) for step in costs]
    return {"steps": len(costs), "waiting_share_mean": round(statistics.mean(waiting), 4),
            "waiting_share_median": round(statistics.median(waiting), 4),
            "slowest_over_ideal": round(sum(max(step) for step in costs) / (real_tokens / processes), 3)}


def main(argv=None) -> None:
    args = parse_args(argv)
    from runner.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    lengths = row_lengths(args.data, recipe) * args.repeat
    batch_size = recipe["train"]["batch_size"] * recipe["train"]["gradient_accumulation_steps"]
    result = {"benchmark": "ddp_rank_balance", "data": str(args.data), "rows": len(lengths),
              "mean_length": round(statistics.mean(lengths), 1), "batch_size": batch_size,
              "processes": args.processes, "repeat": args.repeat, "seeds": {}}
    for seed in map(int, args.seeds.split(",")):
        result["seeds"][seed] = {grouping: summary(rank_costs(lengths, batch_size, args.processes, seed, grouping),
                                                   sum(lengths), args.processes) for grouping in ("process", "global")}
        for grouping, figures in result["seeds"][seed].items():
            print(f"seed {seed}, {grouping} grouping: {figures}", flush=True)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
