"""Writes the first N rows of the shared validation parquet to a small file a device call can carry.

    python -m bench.subset ../shared/data/latex_ocr_val/validation.parquet bench_data/validation_2048.parquet 2048
"""

import sys

import pyarrow.parquet as pq

source, target, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
table = pq.read_table(source).slice(0, rows)
pq.write_table(table, target)
print(f"{target}: {table.num_rows} rows")
