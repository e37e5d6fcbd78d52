"""What share of real formulas the render-match reward can draw, and what a render costs (CPU).

Renders every `text` of a parquet in the unsloth/LaTeX_OCR schema with `runner.rewards.render` (matplotlib
mathtext), then renders them all again to time the cache.

    python -m bench.render_coverage ../shared/data/latex_ocr_val/validation.parquet \
        --out docs/benchmarks/2026-11-29-render-coverage-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from collections import Counter
from pathlib import Path


def main(argv=None) -> None:
    import matplotlib
    import pyarrow.parquet as pq

    from runner.rewards import render

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    texts = pq.read_table(args.data, columns=["text"]).column("text").to_pylist()[: args.rows]
    times, failed = [], Counter()
    for text in texts:
        started = time.perf_counter()
        picture = render(text)
        times.append(time.perf_counter() - started)
        if picture is None:  # the first command mathtext does not know, as a hint of what is missing
            commands = re.findall(r"\\[a-zA-Z]+", text)
            failed[next((c for c in commands if c in (r"\begin", r"\end", r"\hspace", r"\vspace")),
                        "other syntax")] += 1
    started = time.perf_counter()
    for text in texts:
        render(text)
    cached_s = time.perf_counter() - started
    drawn = len(texts) - sum(failed.values())
    report = {"benchmark": "render_coverage", "date": time.strftime("%Y-%m-%d"), "data": str(args.data),
              "machine": f"{platform.processor() or platform.machine()}, CPU", "matplotlib": matplotlib.__version__,
              "rows": len(texts), "drawn": drawn, "share_drawn": round(drawn / len(texts), 4),
              "not_drawn_by_first_blocker": dict(failed.most_common()),
              "render_ms_median": round(statistics.median(times) * 1000, 2),
              "render_ms_mean": round(statistics.mean(times) * 1000, 2),
              "render_ms_p95": round(sorted(times)[int(0.95 * len(times))] * 1000, 2),
              "cached_ms_mean": round(cached_s / len(texts) * 1000, 4)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
