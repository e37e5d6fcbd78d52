"""The Qwen2.5-VL-7B-Instruct architecture with random weights, saved as a local model directory.

Shapes set speed and memory, so benchmarks run on this instead of the hub checkpoint (no hub access on the GPU
machine). Config values are the public ones of Qwen/Qwen2.5-VL-7B-Instruct.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, initializer_range=0.02,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
)
VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, tokens_per_second=2,
)
# The released processor's bounds (preprocessor_config.json of Qwen2.5-VL-7B-Instruct).
MIN_PIXELS, MAX_PIXELS = 3136, 12845056


def build(model_dir: Path, device: str = "cuda") -> Path:
    """Random-weight 7B model (bf16) + a real processor, saved with save_pretrained."""
    import torch
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from runner.tiny import CHAT_TEMPLATE, build_model, build_tokenizer

    started = time.perf_counter()
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = build_model(seed=0, text=TEXT, vision=VISION)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
        tokenizer=build_tokenizer(), video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {model_dir}: {params / 1e9:.2f} B parameters in {time.perf_counter() - started:.0f} s", flush=True)
    del model
    torch.cuda.empty_cache()
    return model_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default="cuda")
    build(parser.parse_args().model_dir, parser.parse_args().device)
