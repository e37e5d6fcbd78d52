"""The recipe -> Unsloth mapping, checked against the signatures of unsloth 2026.10.9 (recorded from its source in
unsloth_signatures.json, since Unsloth itself needs a GPU to import) and, where Unsloth imports, against the live ones."""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import pytest

from runner.backends.unsloth_args import from_pretrained_kwargs, get_peft_model_kwargs
from runner.recipe import load_schema

SIGNATURES = json.loads((Path(__file__).parent / "unsloth_signatures.json").read_text())
SCHEMA = load_schema()["properties"]
MODEL = {k: p["default"] for k, p in SCHEMA["model"]["properties"].items()}
LORA = {k: p["default"] for k, p in SCHEMA["lora"]["properties"].items()}
# A value different from the default for each key, to see where each key lands.
CHANGED_LORA = {"r": 8, "alpha": 32, "dropout": 0.05, "bias": "all", "vision_layers": False, "language_layers": False,
                "attention_modules": False, "mlp_modules": False, "target_modules": ["q_proj"], "use_rslora": True,
                "seed": 1}


def test_from_pretrained_arguments_exist_in_unsloths_signature():
    kwargs = from_pretrained_kwargs({**MODEL, "quantization": "4bit"}, "cpu")
    assert set(kwargs) <= set(SIGNATURES["FastVisionModel.from_pretrained"])
    assert kwargs["use_gradient_checkpointing"] == "unsloth" and kwargs["model_name"] == MODEL["id"]
    assert (kwargs["load_in_4bit"], kwargs["load_in_8bit"], kwargs["load_in_16bit"]) == (True, False, False)
    sixteen = from_pretrained_kwargs({**MODEL, "quantization": "none"}, "off")
    assert (sixteen["load_in_4bit"], sixteen["load_in_16bit"], sixteen["use_gradient_checkpointing"]) == (False, True, False)


def test_get_peft_model_arguments_exist_in_unsloths_signature():
    kwargs = get_peft_model_kwargs(LORA, "cpu")
    assert set(kwargs) <= set(SIGNATURES["FastVisionModel.get_peft_model"]) - {"model"}


@pytest.mark.parametrize("key", list(LORA))
def test_every_lora_key_lands_in_get_peft_model(key):
    assert set(CHANGED_LORA) == set(LORA)  # a new schema key needs a row here
    base = get_peft_model_kwargs(LORA, "cpu")
    changed = get_peft_model_kwargs({**LORA, key: CHANGED_LORA[key]}, "cpu")
    differing = {name for name in base if base[name] != changed[name]}
    assert len(differing) == 1 and changed[differing.pop()] == CHANGED_LORA[key]


def test_recorded_signatures_match_the_installed_unsloth():
    unsloth = pytest.importorskip("unsloth", reason="Unsloth imports only on a CUDA machine")
    for name, recorded in SIGNATURES.items():
        if name == "unsloth":
            assert unsloth.__version__ == recorded
            continue
        function = getattr(unsloth.FastVisionModel, name.split(".")[1])
        live = [p for p in inspect.signature(function).parameters if p not in ("args", "kwargs")]
        assert live == [p for p in recorded if p not in ("args", "kwargs")]


def test_every_train_key_lands_in_sft_config(tmp_path):
    from runner.train import sft_config

    train = {k: p["default"] for k, p in SCHEMA["train"]["properties"].items()}
    changed = {"max_steps": 7, "epochs": 3, "batch_size": 5, "gradient_accumulation_steps": 3, "group_by_length": True,
               "learning_rate": 1e-5, "lr_scheduler": "cosine", "warmup_steps": 9, "optimizer": "sgd",
               "weight_decay": 0.1, "max_grad_norm": 0.5, "gradient_checkpointing": False, "precision": "fp32",
               "logging_steps": 3, "save_steps": 11, "save_total_limit": 4, "seed": 5, "dataloader_workers": 2}
    # save_every_minutes and profile_steps are callbacks (runner/checkpoints.py, runner/profiling.py); method picks
    # the trainer (runner/run.py:train_step); activation_offload goes to the backend (runner.backends.checkpointing)
    assert set(changed) == set(train) - {"save_every_minutes", "profile_steps", "method", "activation_offload"}
    base = sft_config(train, tmp_path, 256).to_dict()
    for key, value in changed.items():
        if key == "precision":
            continue  # fp32 is the CPU default already; precision resolution is covered by resolve_precision
        other = sft_config({**copy.deepcopy(train), key: value}, tmp_path, 256).to_dict()
        assert other != base, f"train.{key} changed nothing in SFTConfig"
    config = sft_config({**train, **{k: v for k, v in changed.items() if k != "max_steps"}}, tmp_path, 256)
    assert (config.num_train_epochs, config.per_device_train_batch_size, config.gradient_accumulation_steps) == (3, 5, 3)
    assert (config.learning_rate, config.warmup_steps, config.optim, config.seed) == (1e-5, 9, "sgd", 5)
    assert config.train_sampling_strategy == "group_by_length" and config.length_column_name == "length"
    assert config.remove_unused_columns is False and config.dataset_kwargs == {"skip_prepare_dataset": True}


def test_each_ddp_process_loads_onto_its_own_gpu(monkeypatch):
    assert "device_map" not in from_pretrained_kwargs(MODEL, "cpu")  # one process: Unsloth's own placement
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    kwargs = from_pretrained_kwargs(MODEL, "cpu")
    assert kwargs["device_map"] == {"": 1} and set(kwargs) <= set(SIGNATURES["FastVisionModel.from_pretrained"])
