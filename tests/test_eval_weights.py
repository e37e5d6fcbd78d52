"""The weights the eval step generates with: LoRA merged (16-bit), 4-bit layers dequantized (CPU, tiny model)."""

from __future__ import annotations

import pytest
import torch

from runner.eval_weights import DequantizedLinear, generation_weights, is_quantized


def test_lora_is_merged_while_generating_and_unmerged_after(tiny_assets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    inputs = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        with generation_weights(model, "auto"):
            assert layer.merged and not torch.equal(layer.base_layer.weight, before)
            merged = model(input_ids=inputs).logits
    assert not layer.merged and torch.allclose(layer.base_layer.weight, before, atol=1e-6)
    assert torch.allclose(merged, expected, atol=1e-4)  # float32: W + BA computes what W x + B A x does


@pytest.fixture
def four_bit_lora_model(tiny_assets):
    """The tiny model loaded in 4-bit (NF4, float32 compute) as the runner loads it, with LoRA on some layers."""
    pytest.importorskip("bitsandbytes")  # the `test` extra installs it; its 4-bit layers run on CPU
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32,
                                                       quantization_config=quantization, device_map={"": "cpu"})
    for module in base.modules():  # on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first inference
        if hasattr(module, "support_avx512bf16_for_cpu"):  # forward and multiplies in bf16; a GPU dequantizes and
            module.support_avx512bf16_for_cpu = False  # multiplies in the compute dtype, as this keeps it doing
    # LoRA on attention only: the MLP layers stay bare 4-bit layers, which are dequantized too
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_four_bit_layers_generate_from_dequantized_copies_with_the_same_logits_and_answers(four_bit_lora_model):
    model = four_bit_lora_model
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    mlp = model.base_model.model.model.language_model.layers[0].mlp
    four_bit_types = {name: type(module) for name, module in model.named_modules()}
    inputs = torch.tensor([[5, 17, 3, 99, 250, 7]])
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        expected_answer = model.generate(input_ids=inputs, max_new_tokens=8, do_sample=False)
        with generation_weights(model, "auto"):
            assert not is_quantized(model)
            assert type(layer.base_layer) is DequantizedLinear and layer.merged  # LoRA folded into the copy
            assert type(mlp.gate_proj) is DequantizedLinear  # no LoRA: dequantized alone
            dequantized = model(input_ids=inputs).logits
            answer = model.generate(input_ids=inputs, max_new_tokens=8, do_sample=False)
    # the copies hold exactly the weights the 4-bit matmul dequantizes, plus BA: float32 rounding apart
    assert torch.allclose(dequantized, expected, atol=1e-4)
    assert torch.equal(answer, expected_answer)
    # the training model is back: the same 4-bit layers, LoRA unmerged, the same outputs
    assert {name: type(module) for name, module in model.named_modules()} == four_bit_types
    assert is_quantized(model) and not layer.merged
    with torch.no_grad():
        assert torch.equal(model(input_ids=inputs).logits, expected)


def test_dequantize_never_keeps_the_four_bit_layers(four_bit_lora_model):
    model = four_bit_lora_model
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    with generation_weights(model, "never"):
        assert is_quantized(model) and type(layer.base_layer).__name__ == "Linear4bit" and not layer.merged


def test_auto_keeps_the_four_bit_layers_without_room_for_the_copies_and_says_so(four_bit_lora_model, monkeypatch,
                                                                                 caplog):
    import runner.eval_weights as eval_weights

    needed = []
    monkeypatch.setattr(eval_weights, "room_on_gpu", lambda size: (needed.append(size) or False, "3.0 GiB free"))
    with caplog.at_level("INFO", logger="runner"), generation_weights(four_bit_lora_model, "auto"):
        assert is_quantized(four_bit_lora_model)
    # every 4-bit layer of the tiny model, counted at 2 bytes per weight
    assert needed == [sum(m.in_features * m.out_features * 2 for m in four_bit_lora_model.modules()
                          if eval_weights.is_bnb_4bit(m))]
    assert "4-bit weights kept" in caplog.text and "eval.dequantize: always" in caplog.text
    with generation_weights(four_bit_lora_model, "always"):  # forced: dequantized even so
        assert not is_quantized(four_bit_lora_model)
