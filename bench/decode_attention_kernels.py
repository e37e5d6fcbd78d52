"""One decode step's attention at Qwen2.5-VL-7B's shapes, timed per SDPA layout and kernel (no model needed).

The eval step decodes `--batch` rows at once against a KV cache of `--length` columns (the ring: the longest
prompt + max_new_tokens) with a mask, 28 query heads over 4 KV heads of 128. Layouts:

- `repeat_kv`: what transformers' SDPA path does whenever a mask is given: keys and values copied 7 times
  (one per query head of a group), then SDPA over (batch, 28, 1, 128);
- `grouped`: the 7 query heads of a group in SDPA's query-length dimension, (batch, 4, 7, 128) against the
  uncopied (batch, 4, length, 128) cache, the mask row shared (bench/grouped_decode_attention.py);
- `gqa_flag`: SDPA's own `enable_gqa=True` with the mask.

Each layout under torch's own kernel choice, each kernel forced, and compiled by inductor (as the compiled decode
step runs it); every output is checked against `repeat_kv`
under the math kernel in float32. Per call, the median of `--repeats` timings, each between synchronizations; `--layers 28` times a step.

    python -m bench.decode_attention_kernels --batch 256 --length 345 --out kernels.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def layouts(query, key, value, mask, groups):
    batch, heads, _, dim = query.shape

    def repeat_kv():
        k = key[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, heads, -1, dim)
        v = value[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, heads, -1, dim)
        return F.scaled_dot_product_attention(query, k, v, attn_mask=mask)

    def grouped():
        q = query.reshape(batch, key.shape[1], groups, dim)
        shared = mask.expand(-1, -1, groups, -1)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=shared).reshape(batch, heads, 1, dim)

    def gqa_flag():
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)

    return {"repeat_kv": repeat_kv, "grouped": grouped, "gqa_flag": gqa_flag}


def timed_ms(fn, repeats: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - started))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=345, help="cache columns (longest prompt + max_new_tokens)")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1, help="calls per timing (28: one decode step's attention)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs check the layouts' arithmetic only
    dtype, groups = (torch.bfloat16 if device == "cuda" else torch.float32), args.heads // args.kv_heads
    query = torch.randn(args.batch, args.heads, 1, args.dim, device=device, dtype=dtype)
    key = torch.randn(args.batch, args.kv_heads, args.length, args.dim, device=device, dtype=dtype)
    value = torch.randn_like(key)
    # each row's live columns: a random start (left padding / ring wrap), the current column always live
    starts = torch.randint(0, args.length - 1, (args.batch, 1), device=device)
    masks = {"bool": (torch.arange(args.length, device=device)[None] >= starts)[:, None, None, :]}
    masks["additive"] = torch.zeros(masks["bool"].shape, device=device, dtype=dtype).masked_fill(
        ~masks["bool"], torch.finfo(dtype).min)
    with sdpa_kernel(SDPBackend.MATH):
        reference = layouts(query.float(), key.float(), value.float(), masks["bool"], groups)["repeat_kv"]()
    results = []
    for mask_kind, mask in masks.items():
        for layout, eager in layouts(query, key, value, mask, groups).items():
            for kernel, backend in [*KERNELS.items(), ("compiled", None)]:
                fn = torch.compile(eager, dynamic=False) if kernel == "compiled" else eager
                def call(fn=fn, backend=backend):
                    if backend is None:
                        for _ in range(args.layers):
                            fn()
                        return
                    with sdpa_kernel(backend):
                        for _ in range(args.layers):
                            fn()
                row = {"mask": mask_kind, "layout": layout, "kernel": kernel}
                try:
                    if backend is None:
                        out = fn()
                    else:
                        with sdpa_kernel(backend):
                            out = fn()
                    row["max_abs_diff"] = round(float((out.float() - reference).abs().max()), 5)
                    row["ms"] = round(timed_ms(call, args.repeats), 3)
                except RuntimeError as error:  # a kernel that refuses these inputs
                    row["error"] = str(error).splitlines()[0][:160]
                print(json.dumps(row), flush=True)
                results.append(row)
    kv_bytes = 2 * key.numel() * key.element_size()
    summary = {"batch": args.batch, "length": args.length, "heads": args.heads, "kv_heads": args.kv_heads,
               "dim": args.dim, "layers": args.layers, "kv_cache_mb_per_layer": round(kv_bytes / 1e6, 1),
               "repeated_kv_mb_per_layer": round(kv_bytes * groups / 1e6, 1),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
