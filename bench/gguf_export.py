"""Time of the GGUF export step (llama.cpp converter + quantizer) on the Qwen2.5-VL-7B architecture.

Builds the random-weight 7B model directory on the CPU if missing (as a merged 16-bit export would look),
then times runner.gguf.export_gguf for the given quantizations and prints the file sizes.

    python -m bench.gguf_export --model-dir /tmp/qwen7b-cpu --out-dir /tmp/qwen7b-gguf --quantizations f16,q4_k_m
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    from bench import qwen25vl_7b
    from bench.common import device_name, versions
    from runner.gguf import export_gguf
    from runner.run import setup_logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--quantizations", default="f16,q4_k_m")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the raw figures")
    args = parser.parse_args(argv)
    setup_logging()
    if not (args.model_dir / "config.json").exists():
        started = time.perf_counter()
        qwen25vl_7b.build(args.model_dir, device="cpu")
        print(f"build: {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    export_gguf(args.model_dir, args.out_dir, "Qwen2.5-VL-7B architecture (random weights)", "-",
                args.quantizations.split(","), "Write the LaTeX representation for this image.")
    seconds = time.perf_counter() - started
    sizes = {p.name: p.stat().st_size for p in sorted(args.out_dir.glob("*.gguf"))}
    report = {"benchmark": "gguf_export", "date": time.strftime("%Y-%m-%d"), "device": device_name(),
              "versions": versions(), "quantizations": args.quantizations, "export_s": round(seconds, 1),
              "sizes_bytes": sizes}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
