"""DPO pairs for the speed benchmark: real formula images and references, each with a nearly-right wrong answer.

`recipe pairs` makes pairs from a trained adapter's mistakes; a random-weight 7B model has no useful mistakes (its
answers run to the token limit), so for timing the rejected answer is the reference with one token changed: the
length of a typical near miss, which is what sets DPO's cost. Written with runner.pairs.write_pairs, so the file has
the schema `dpo.pairs` reads.

    python -m bench.dpo_pairs bench_data/validation_4800.parquet /tmp/pairs.parquet 512
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pyarrow.parquet as pq

from runner.pairs import write_pairs

# Swaps a model trained on formulas typically gets wrong: a neighbouring digit, letter or bracket.
NEAR_MISSES = {"1": "l", "l": "1", "0": "o", "o": "0", "x": "\\times", "(": "\\left(", "{": "\\{", "a": "\\alpha",
               "+": "-", "-": "+", "=": "\\equiv", "i": "j", "n": "m", "2": "z"}


def near_miss(reference: str, rng: random.Random) -> str:
    tokens = reference.split()
    positions = [i for i, token in enumerate(tokens) if token in NEAR_MISSES] or list(range(len(tokens)))
    i = rng.choice(positions)
    tokens[i] = NEAR_MISSES.get(tokens[i], "\\," + tokens[i])
    return " ".join(tokens)


def main(argv=None) -> None:
    source, target, rows = (argv or sys.argv[1:])[:3]
    table = pq.read_table(source).slice(0, int(rows)).to_pylist()
    rng = random.Random(0)
    pairs = [{"row_id": i, "image": row["image"], "chosen": row["text"], "rejected": near_miss(row["text"], rng)}
             for i, row in enumerate(table)]
    write_pairs(pairs, Path(target))
    print(f"{target}: {len(pairs)} pairs")


if __name__ == "__main__":
    main()
