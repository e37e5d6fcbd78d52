"""The eval step's decode attention (runner/decode_attention.py) computes what transformers' SDPA path computes:
the same logits at every step and the same answers, on the tiny model (2 query heads per KV head), float32, CPU."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from runner import decode_attention, refill
from runner.prompt import decode_image, generation_batch

INSTRUCTION = "Write the LaTeX representation for this image."


@pytest.fixture(scope="module")
def setting(tiny_assets):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_assets["model"])
    rows = pq.read_table(tiny_assets["train"]).slice(0, 5).to_pylist()
    images = [decode_image(row["image"]) for row in rows]
    batch = generation_batch(processor, images, INSTRUCTION)
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: padded, so every step has a mask
    return model, processor, images, batch


def _generate(model, processor, batch, cache: str | None):
    return model.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, cache_implementation=cache,
                          pad_token_id=processor.tokenizer.pad_token_id)


def _attention_query_shapes(monkeypatch) -> list[tuple]:
    shapes, original = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda query, *a, **k: shapes.append(tuple(query.shape)) or original(query, *a, **k))
    return shapes


def test_one_decode_position_at_the_7b_models_head_counts_matches_sdpa_with_repeated_kv():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=7, is_causal=True)
    query = torch.randn(3, 28, 1, 16)
    key, value = torch.randn(3, 4, 11, 16), torch.randn(3, 4, 11, 16)
    mask = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    mask[2, ..., 9:] = False  # static cache columns not written yet
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    got, _ = decode_attention.grouped_decode_sdpa(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (3, 1, 28, 16)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("cache", [None, "static"])
def test_every_decode_step_has_the_logits_of_transformers_sdpa_path(setting, cache, monkeypatch):
    model, processor, _, batch = setting
    reference = _generate(model, processor, batch, cache)
    shapes = _attention_query_shapes(monkeypatch)
    with decode_attention.for_generation(model):
        grouped = _generate(model, processor, batch, cache)
    assert torch.equal(grouped.sequences, reference.sequences)
    for step, (mine, theirs) in enumerate(zip(grouped.logits, reference.logits)):
        assert torch.allclose(mine, theirs, atol=2e-5, rtol=1e-4), f"step {step}"
    text = model.config.text_config
    decode_calls = [s for s in shapes if s[1:3] == (text.num_key_value_heads, 2)]  # 2 heads per KV head, grouped
    assert len(decode_calls) == 7 * text.num_hidden_layers  # every decode step after the prefill, every layer
    assert not any(s[1] == text.num_attention_heads and s[2] == 1 for s in shapes)  # no decode step the old way


def test_the_model_and_sdpa_backends_are_restored_afterwards(setting):
    model = setting[0]
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    with decode_attention.for_generation(model):
        assert model.config.text_config._attn_implementation == decode_attention.NAME
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert model.config.vision_config._attn_implementation == "sdpa"  # one head per KV head: nothing to save
    assert model.config.text_config._attn_implementation == "sdpa"
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    with pytest.raises(RuntimeError), decode_attention.for_generation(model):
        raise RuntimeError("generation failed")
    assert model.config.text_config._attn_implementation == "sdpa"


def test_compiled_code_runs_eagerly_unless_the_steps_are_compiled_on_purpose(setting):
    compiled_graphs = []

    def counting_backend(graph, example_inputs):
        compiled_graphs.append(graph)
        return graph.forward

    layer = torch.compile(torch.nn.Linear(4, 4), backend=counting_backend)  # as Unsloth compiles its decoder layers
    with torch.no_grad(), decode_attention.for_generation(setting[0]):
        layer(torch.randn(2, 4))
        layer(torch.randn(3, 4))
    assert compiled_graphs == []
    with torch.no_grad(), decode_attention.for_generation(setting[0], compiled_steps=True):
        layer(torch.randn(2, 4))
    assert len(compiled_graphs) == 1
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_refilled_answers_are_unchanged(setting, cache):
    model, processor, images, _ = setting
    lengths = [generation_batch(processor, [image], INSTRUCTION)["input_ids"].shape[1] for image in images]
    order = sorted(range(len(images)), key=lambda i: -lengths[i])  # the ring is sized by the first, longest rows
    ordered, caps = [images[i] for i in order], [9, 4, 12, 6, 10]
    reference = refill.refill_generate(model, processor, ordered, INSTRUCTION, caps, slots=2, cache=cache)
    with decode_attention.for_generation(model):
        got = refill.refill_generate(model, processor, ordered, INSTRUCTION, caps, slots=2, cache=cache)
    assert got == reference and len(set(got)) > 1
