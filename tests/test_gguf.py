"""GGUF + mmproj made with llama.cpp's tools answer like the Hugging Face model (CPU, llama-cpp-python)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .test_export import INSTRUCTION, first_rows

pytestmark = pytest.mark.slow


def test_gguf_export_has_every_requested_file(memorized):
    names = sorted(p.name for p in memorized["gguf"].glob("*.gguf"))
    assert names == ["mmproj-f16.gguf", "model-f16.gguf", "model-q4_k_m.gguf"]
    sizes = {p.name: p.stat().st_size for p in memorized["gguf"].glob("*.gguf")}
    assert sizes["model-q4_k_m.gguf"] < sizes["model-f16.gguf"]
    print({name: f"{size / 2**20:.1f} MiB" for name, size in sizes.items()})


def test_gguf_f16_text_logits_match_the_merged_model(memorized):
    from llama_cpp import Llama
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(memorized["merged_16bit"])
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{INSTRUCTION} \\frac {{ a }} {{ b }}<|im_end|>\n<|im_start|>assistant\n")
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    merged = AutoModelForImageTextToText.from_pretrained(memorized["merged_16bit"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
    llama = Llama(model_path=str(memorized["gguf"] / "model-f16.gguf"), logits_all=True, n_ctx=256, verbose=False)
    assert llama.tokenize(text.encode(), add_bos=False, special=True) == ids  # same tokenizer
    llama.eval(ids)
    actual = np.array(llama.scores[: len(ids)])
    # Tolerance: the f16 GGUF holds the bf16 weights exactly; llama.cpp's CPU matmuls round activations to f16
    # (10-bit mantissa), so logits of magnitude ~10 may move by a few hundredths, by how much depends on the CPU's
    # kernels. Where the reference's top two logits are closer than twice that, either may win: the argmax is
    # compared only where the margin exceeds it, and such positions must be most of the sequence.
    tolerance = 0.1
    assert np.abs(expected - actual).max() < tolerance
    top2 = np.sort(expected, axis=-1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * tolerance
    assert decided.mean() > 0.5, f"only {decided.sum()} of {len(ids)} positions have a clear top token"
    assert (expected.argmax(-1) == actual.argmax(-1))[decided].all()


@pytest.mark.parametrize("quantization", ["f16", "q4_k_m"])
def test_gguf_and_mmproj_reproduce_the_hf_models_formulas(memorized, quantization):
    """The test no other tool has: the vision part survives the export."""
    from runner.predict import load_gguf, pixel_bounds, predict_gguf

    images, predictions = first_rows(memorized["run"], count=16)
    llama = load_gguf(memorized["gguf"] / f"model-{quantization}.gguf")
    answers = predict_gguf(llama, images, INSTRUCTION, 48, pixel_bounds(memorized["gguf"]))
    same = sum(a == p["prediction"] for a, p in zip(answers, predictions))
    print(f"gguf {quantization}: {same}/16 answers equal the HF model's")
    assert same >= 15, "\n".join(f"{p['prediction']!r} -> {a!r}" for a, p in zip(answers, predictions))
