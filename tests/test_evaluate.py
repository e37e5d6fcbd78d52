"""The eval step's batching and adapter merging (CPU, tiny model)."""

from __future__ import annotations

import functools
import json
import sys

import pytest
import torch
from datasets import Dataset

from runner.evaluate import evaluate, length_sorted_batches


def test_batches_hold_prompts_of_similar_length_longest_first():
    rows = Dataset.from_dict({"row_id": list(range(7)), "prompt_length": [30, 90, 10, 60, 90, 20, 50]})
    assert length_sorted_batches(rows, 3) == [[1, 4, 3], [6, 0, 5], [2]]
    # without lengths (a dataset that did not go through the data step) the order is kept
    assert length_sorted_batches(Dataset.from_dict({"row_id": [5, 6, 7]}), 2) == [[0, 1], [2]]


@pytest.fixture(scope="module")
def eval_setting(tiny_assets):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from runner.data import prepare
    from runner.recipe import load_schema

    schema = load_schema()["properties"]
    dataset_cfg = {**{k: p["default"] for k, p in schema["dataset"]["properties"].items()},
                   "id": str(tiny_assets["train"].parent), "eval_split": None, "shuffle": False, "max_samples": 7}
    processor = AutoProcessor.from_pretrained(tiny_assets["model"])
    rows = prepare(dataset_cfg, processor, 2048).train
    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    eval_cfg = {**{k: p["default"] for k, p in schema["eval"]["properties"].items()},
                "max_samples": 7, "batch_size": 3, "max_new_tokens": 12}
    run = functools.partial(evaluate, model, processor, rows, instruction=dataset_cfg["instruction"],
                            columns=("image", "text"), base_dir=tiny_assets["train"].parent)
    return run, eval_cfg, rows


@pytest.mark.slow
def test_refill_and_batches_with_either_cache_give_every_row_the_same_answer(eval_setting, tmp_path):
    """eval.batching: refill (slots refilled as rows end) and batches (a static cache reused by every batch, the last,
    smaller one filled up with repeats) must give the same answers, row for row (greedy, float32), written in the
    rows' order, with nothing left in a partial file."""
    run, eval_cfg, rows = eval_setting
    assert eval_cfg["batching"] == "refill"
    answers = {}
    for batching in ("refill", "batches"):
        for kv_cache in ("dynamic", "static"):
            out = tmp_path / f"{batching}-{kv_cache}.jsonl"
            _, results = run({**eval_cfg, "kv_cache": kv_cache, "batching": batching}, out_file=out)
            answers[batching, kv_cache] = [(r["row_id"], r["prediction"]) for r in results]
            assert [json.loads(line)["row_id"] for line in out.read_text().splitlines()] == rows["row_id"][:7]
            assert not out.with_name(out.name + ".partial").exists()
    first = answers["refill", "dynamic"]
    assert len(first) == 7 and len({prediction for _, prediction in first}) > 1
    assert all(got == first for got in answers.values()), answers


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["refill", "batches"])
def test_out_of_gpu_memory_halves_the_rows_together_and_keeps_every_answer(eval_setting, batching, tmp_path,
                                                                           monkeypatch, caplog):
    """A GPU smaller than the recipe's eval batch assumes must not lose the run's eval (or the rows already
    answered): the step goes on with half as many rows at a time."""
    import runner.evaluate as evaluate_module

    run, eval_cfg, rows = eval_setting
    cfg = {**eval_cfg, "batching": batching, "kv_cache": "dynamic", "batch_size": 4}
    _, expected = run(cfg, out_file=tmp_path / "plain.jsonl")
    attempts = []

    def runs_out_above_one_row(real):
        def wrapped(model, processor, images, *args, **kwargs):
            slots = args[2] if batching == "refill" else len(images)
            attempts.append(slots)
            if slots > 1:
                if batching == "refill":  # one row ends first, then memory runs out: that answer must be kept
                    real(model, processor, [images[0]], args[0], 1, 1, on_answer=kwargs["on_answer"])
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.40 GiB")
            return real(model, processor, images, *args, **kwargs)
        return wrapped

    name = "refill_generate" if batching == "refill" else "generate"
    monkeypatch.setattr(evaluate_module, name, runs_out_above_one_row(getattr(evaluate_module, name)))
    with caplog.at_level("WARNING", logger="runner"):
        _, results = run(cfg, out_file=tmp_path / "halved.jsonl")
    assert attempts[:3] == [4, 2, 1]
    assert [r["row_id"] for r in results] == [r["row_id"] for r in expected]
    if batching == "batches":  # (refill: the row answered before running out kept its 1-token answer)
        assert [r["prediction"] for r in results] == [r["prediction"] for r in expected]
    assert "out of GPU memory generating 4 rows at a time; going on with 2" in caplog.text
    assert "eval.batch_size=1" in caplog.text


def test_auto_kv_cache_is_dynamic_and_static_falls_back_under_unsloth(monkeypatch):
    from types import SimpleNamespace

    from runner.evaluate import kv_cache_kind

    monkeypatch.delitem(sys.modules, "unsloth", raising=False)
    assert kv_cache_kind("auto") == "dynamic"  # eager beat the compiled ring on 7,632 rows (eval round 7)
    assert kv_cache_kind("static") == "static" and kv_cache_kind("dynamic") == "dynamic"
    monkeypatch.setitem(sys.modules, "unsloth", SimpleNamespace())  # Unsloth's patched forward is loaded
    assert kv_cache_kind("static") == "dynamic"  # backend auto chose Unsloth: its forward cannot compile again
