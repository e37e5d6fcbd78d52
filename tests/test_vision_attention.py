"""The packed vision attention computes what transformers' per-window loop computes (tiny model, CPU)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from runner import vision_attention
from runner.prompt import decode_image, generate, training_batch

INSTRUCTION = "Write the LaTeX representation for this image."


def loop_attention(query, key, value, cu_seqlens, scale):
    """The reference: one SDPA call per chunk, as transformers does without flash-attn."""
    chunks = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        chunks.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1))
    return torch.cat(chunks)


def test_block_diagonal_mask_joins_only_tokens_of_one_chunk():
    mask = vision_attention.block_diagonal_mask(torch.tensor([0, 2, 5, 6]), 6)
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0],
                             [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the varlen flash kernel needs CUDA"))])
def test_packed_attention_equals_the_per_chunk_loop(device):
    generator = torch.Generator().manual_seed(0)
    cu_seqlens = torch.tensor([0, 64, 100, 164, 165, 301], device=device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    query, key, value = (torch.randn(301, 4, 16, generator=generator).to(device, dtype) for _ in range(3))
    expected = loop_attention(query.float(), key.float(), value.float(), cu_seqlens, 16**-0.5)
    actual = vision_attention.packed_attention(query, key, value, cu_seqlens, 16**-0.5).float()
    # float32 on the CPU: the same sums in another order (~1e-7); bf16 on CUDA: bf16 rounding of the output (2^-8).
    tolerance = 1e-5 if device == "cpu" else 2e-2
    assert (actual - expected).abs().max() < tolerance


@pytest.fixture(scope="module")
def rows(tiny_assets):
    table = pq.read_table(tiny_assets["train"]).to_pylist()[:6]
    return [decode_image(row["image"]) for row in table], [row["text"] for row in table]


def load(tiny_assets, mode):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    return vision_attention.apply(model, mode)


def test_training_loss_logits_and_gradients_match_the_loop(tiny_assets, tiny_processor, rows):
    images, answers = rows
    batch = training_batch(tiny_processor, images, answers, INSTRUCTION)
    windows = tiny_processor.image_processor.merge_size * 4  # window_size 112 px = 4 merged units of 28 px
    assert (batch["image_grid_thw"][:, 1:] > windows).any(), "the batch must hold images of several windows"
    results = {}
    for mode in ("per_window", "varlen"):
        model = load(tiny_assets, mode)
        output = model(**batch)
        output.loss.backward()
        qkv = model.model.visual.blocks[0].attn.qkv.weight.grad
        results[mode] = (output.loss.detach(), output.logits.detach(), qkv.clone())
    assert vision_attention.use_packed_vision_attention(load(tiny_assets, "per_window")) == 3  # every block
    (loss_ref, logits_ref, grad_ref), (loss, logits, grad) = results["per_window"], results["varlen"]
    # float32 throughout: only the order of additions differs, so relative differences stay near 1e-6.
    assert torch.allclose(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert (logits - logits_ref).abs().max() < 1e-4
    assert torch.allclose(grad, grad_ref, rtol=1e-4, atol=1e-6) and grad_ref.abs().sum() > 0


def test_greedy_generation_matches_the_loop(tiny_assets, tiny_processor, rows):
    images, _ = rows
    answers = {mode: generate(load(tiny_assets, mode).eval(), tiny_processor, images, INSTRUCTION, 12)
               for mode in ("per_window", "varlen")}
    assert answers["varlen"] == answers["per_window"] and any(answers["varlen"])
