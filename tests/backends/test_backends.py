from __future__ import annotations

import re

import pytest

from runner import backends
from runner.backends import transformers_backend
from runner.recipe import load_schema

SCHEMA = load_schema()["properties"]
LORA = {k: p["default"] for k, p in SCHEMA["lora"]["properties"].items()}
MODEL = {k: p["default"] for k, p in SCHEMA["model"]["properties"].items()}
TRAIN = {k: p["default"] for k, p in SCHEMA["train"]["properties"].items()}


@pytest.mark.parametrize("cuda, unsloth, expected", [
    (False, True, "transformers"), (True, False, "transformers"), (True, True, "unsloth"),
])
def test_auto_picks_unsloth_only_with_a_gpu_and_unsloth(monkeypatch, cuda, unsloth, expected):
    monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
    monkeypatch.setattr(backends, "unsloth_installed", lambda: unsloth)
    name, why = backends.select("auto")
    assert name == expected and why.startswith("auto: ")
    assert backends.select("transformers") == ("transformers", "set in the recipe")


def test_machine_problems_name_the_key_and_the_fix(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    problems = dict(backends.machine_problems({**MODEL, "backend": "unsloth", "quantization": "4bit"},
                                              {**TRAIN, "precision": "bf16"}))
    assert "needs a CUDA GPU" in problems["model.backend"] and "backend: transformers" in problems["model.backend"]
    assert "quantization: none" in problems["model.quantization"]
    assert "fp32" in problems["train.precision"]
    assert backends.machine_problems({**MODEL, "backend": "transformers"}, {**TRAIN, "precision": "auto"}) == []


def adapted(model_names, lora_cfg):
    pattern = transformers_backend.target_modules(lora_cfg)
    return {n for n in model_names if re.fullmatch(pattern, n)}


@pytest.fixture(scope="module")
def module_names(tiny_assets):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"])
    return [n for n, _ in model.named_modules()]


def test_lora_switches_select_exactly_the_documented_modules(module_names):
    everything = adapted(module_names, LORA)
    language = adapted(module_names, {**LORA, "vision_layers": False})
    vision = adapted(module_names, {**LORA, "language_layers": False})
    attention = adapted(module_names, {**LORA, "mlp_modules": False})
    assert everything == language | vision and not language & vision
    assert {n.rsplit(".", 1)[1] for n in language} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in vision} == {"qkv", "proj", "gate_proj", "up_proj", "down_proj"}
    assert {n.rsplit(".", 1)[1] for n in attention} == {"q_proj", "k_proj", "v_proj", "o_proj", "qkv", "proj"}
    assert len(language) == 2 * 7 and len(vision) == 3 * 5  # 2 text layers, 3 vision blocks in the tiny model
    assert not any("merger" in n or "lm_head" in n for n in everything)


def test_lora_with_nothing_selected_is_an_error():
    with pytest.raises(ValueError, match="no layers selected"):
        transformers_backend.target_modules({**LORA, "vision_layers": False, "language_layers": False})


def test_attach_lora_maps_every_lora_key(tiny_assets):
    model, _ = transformers_backend.load({**MODEL, "id": str(tiny_assets["model"]), "dtype": "float32"})
    lora_cfg = {**LORA, "r": 4, "alpha": 8, "dropout": 0.1, "bias": "lora_only", "use_rslora": True,
                "vision_layers": False, "mlp_modules": False}
    peft_model = transformers_backend.attach_lora(model, lora_cfg)
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias, config.use_rslora) == (4, 8, 0.1, "lora_only", True)
    adapted_names = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert len(adapted_names) == 2 * 4 and all("self_attn" in n for n in adapted_names)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.endswith(".bias") for n in trainable)


def test_processor_pixel_bounds_come_from_the_recipe(tiny_processor):
    import copy

    processor = copy.deepcopy(tiny_processor)
    transformers_backend.configure_processor(processor, {**MODEL, "image_min_pixels": 1000, "image_max_pixels": 9000})
    assert processor.image_processor.size["shortest_edge"] == 1000
    assert processor.image_processor.size["longest_edge"] == 9000


def test_remote_code_is_off_by_default_and_warned_about_when_on(tiny_assets, caplog):
    assert MODEL["trust_remote_code"] is False and MODEL["safetensors_only"] is True
    cfg = {**MODEL, "id": str(tiny_assets["model"]), "dtype": "float32", "trust_remote_code": True}
    with caplog.at_level("WARNING", logger="runner"):
        transformers_backend.load(cfg)
    assert f"model.trust_remote_code is on: loading {tiny_assets['model']} may run Python code" in caplog.text


def test_pickled_weights_are_refused_unless_the_recipe_allows_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    problems = dict(backends.machine_problems({**MODEL, "id": str(tmp_path)}, TRAIN))
    assert "holds only pickled .bin weights" in problems["model.safetensors_only"]
    assert "model.safetensors_only" not in dict(
        backends.machine_problems({**MODEL, "id": str(tmp_path), "safetensors_only": False}, TRAIN))


def test_unsloth_under_ddp_says_what_transformers_measured_instead():
    name, why = backends.select("unsloth", "ddp")
    assert name == "unsloth" and "Unsloth under DDP scaled 0.94" in why and "transformers scaled 0.95" in why
    assert "transformers" not in backends.select("unsloth")[1]


@pytest.mark.parametrize("backend, offload, processes, expected", [
    ("unsloth", "auto", 1, "cpu"),   # Unsloth's own offloaded checkpointing
    ("unsloth", "auto", 2, "gpu"),   # under DDP its offload takes the slower saved-tensor-hook path
    ("unsloth", "cpu", 2, "cpu"), ("unsloth", "none", 1, "gpu"),
    ("transformers", "auto", 1, "gpu"), ("transformers", "auto", 2, "gpu"),
])
def test_checkpointing_keeps_activations_where_the_recipe_and_the_process_count_say(backend, offload, processes,
                                                                                    expected):
    assert backends.checkpointing({**TRAIN, "activation_offload": offload}, backend, processes) == expected
    assert backends.checkpointing({**TRAIN, "gradient_checkpointing": False, "activation_offload": offload}, backend,
                                  processes) == "off"


def test_where_activations_wait_reaches_unsloths_argument():
    from runner.backends.unsloth_args import from_pretrained_kwargs, get_peft_model_kwargs

    for checkpointing, argument in (("cpu", "unsloth"), ("gpu", True), ("off", False)):
        for kwargs in (from_pretrained_kwargs(MODEL, checkpointing), get_peft_model_kwargs(LORA, checkpointing)):
            assert kwargs["use_gradient_checkpointing"] == argument
            assert type(kwargs["use_gradient_checkpointing"]) is type(argument)


def test_offload_asked_of_a_backend_auto_resolved_to_transformers_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="runner"):
        assert backends.checkpointing({**TRAIN, "activation_offload": "cpu"}, "transformers", 1) == "gpu"
    assert "activation_offload: cpu is Unsloth's offload" in caplog.text
