from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import eval_speed, train_speed


def test_train_speed_arguments_and_command():
    args = train_speed.parse_args(["--model-dir", "/m", "--data", "d.parquet", "--settings", "fast",
                                   "--extra", "bs64=recipes/qwen25vl_latex_fast.yaml;train.batch_size=64", "--steps", "5"])
    assert list(args.settings) == ["fast", "bs64"]
    assert args.settings["bs64"] == ("recipes/qwen25vl_latex_fast.yaml", ["train.batch_size=64"], 12)
    command = train_speed.command("bs64", *args.settings["bs64"][:2], args.steps, args)
    sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    assert command[1:5] == ["-m", "runner", "run", "recipes/qwen25vl_latex_fast.yaml"]
    assert {"model.id=/m", "dataset.id=d.parquet", "eval.enabled=false", "export=[]", "train.max_steps=5",
            "name=bs64"} <= set(sets)
    assert sets[-1] == "train.batch_size=64"  # the setting's own overrides come last and win


def test_train_speed_repeats_the_rows_it_trains_on(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b", "c"], "image": [{"bytes": b"1", "path": None}] * 3}), tmp_path / "d.parquet")
    out = train_speed.repeated(tmp_path / "d.parquet", 4, tmp_path / "runs")
    assert pq.read_table(out).column("text").to_pylist() == ["a", "b", "c"] * 4
    args = train_speed.parse_args(["--model-dir", "/m", "--data", "d.parquet", "--repeat", "11"])
    assert args.repeat == 11


def test_train_speed_rejects_unknown_settings():
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--model-dir", "/m", "--data", "d", "--settings", "nope"])


def test_every_named_setting_is_a_valid_recipe_run(tmp_path):
    from runner.recipe import load_recipe

    args = train_speed.parse_args(["--model-dir", "/m", "--data", "d.parquet"])
    for name, (recipe, overrides, steps) in args.settings.items():
        sets = [p for p in train_speed.command(name, recipe, overrides, steps, args) if "=" in p]
        load_recipe(recipe, sets)  # raises RecipeError listing every problem


def test_train_speed_table_formats_results_and_failures():
    rows = [{"setting": "fast", "backend": "unsloth", "samples_per_step": 128, "samples_per_s": 32.66,
             "real_tokens_per_s": 3967.2, "peak_allocated_gib": 25.35, "peak_reserved_gib": 26.17,
             "time_to_first_step_s": 26.16},
            {"setting": "broken", "exit_code": 1},
            {"setting": "two_steps", "exit_code": 0, "recipe_eval_samples_per_s": 56.49}]  # eval-only run
    lines = train_speed.table(rows).splitlines()
    assert lines[2] == "| fast | unsloth | 128 | 32.66 | 3967 | 25.4 | 26.2 | 26.2 | 35 min |  |  |"
    assert lines[3] == "| broken | failed (exit 1) | | | | | | | |  |  |"
    assert lines[4] == "| two_steps | no steady steps | | | | | | | |  | 56.49 |"


def test_recipe_eval_takes_its_own_rows_and_overrides_last(tmp_path):
    args = train_speed.parse_args(["--model-dir", "/m", "--data", "d.parquet", "--settings=", "--eval-rows", "512",
                                   "--recipe-eval", "--recipe-eval-rows", "7632",
                                   "--recipe-eval-set", "model.backend=transformers"])
    command, rows = train_speed.recipe_eval_command(tmp_path, "recipes/qwen25vl_latex_fast.yaml",
                                                    ["model.backend=unsloth"], args)
    sets = [command[i + 1] for i, part in enumerate(command) if part == "--set"]
    assert command[3:5] == ["eval", str(tmp_path)] and rows == 7632 and "eval.max_samples=7632" in sets
    assert sets[-2:] == ["model.backend=unsloth", "model.backend=transformers"]  # --recipe-eval-set wins


def test_train_speed_times_the_recipes_own_eval_step_when_asked():
    args = train_speed.parse_args(["--model-dir", "/m", "--data", "d.parquet", "--settings", "fast",
                                   "--eval-rows", "512", "--eval-new-tokens", "128"])
    sets = [p for p in train_speed.command("fast", *args.settings["fast"][:2], 3, args) if "=" in p]
    assert {"eval.enabled=true", "eval.split=train", "eval.max_samples=512", "eval.max_new_tokens=128"} <= set(sets)
    assert not any(s.startswith("eval.batch_size") for s in sets)  # the recipe's own eval batch is what is timed


def test_step_profile_arguments():
    from bench import step_profile

    args = step_profile.parse_args(["--model-dir", "/m", "--data", "d", "--set", "train.batch_size=64"])
    assert args.vision_attention == "varlen,per_window" and args.overrides == ["train.batch_size=64"]


def test_eval_speed_arguments_and_table():
    args = eval_speed.parse_args(["--model-dir", "/m", "--data", "d", "--batch-sizes", "64,256",
                                  "--quantizations", "none"])
    assert args.batch_sizes == [64, 256] and args.quantizations == ["none"] and args.model_dir == Path("/m")
    table = eval_speed.table([{"quantization": "none", "batch_size": 256, "rows": 768, "samples_per_s": 53.243,
                               "peak_allocated_gib": 20.94}])
    assert table.splitlines()[2] == "| none | 256 | 768 | 53.2 | 143 | 20.9 |"


def test_render_coverage_reports_the_share_drawn_and_the_cost(tiny_assets, tmp_path):
    import json

    from bench import render_coverage

    out = tmp_path / "coverage.json"
    render_coverage.main([str(tiny_assets["train"]), "--rows", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["rows"] == 8 and report["drawn"] == 8 and report["share_drawn"] == 1.0  # mathtext drew them
    assert report["render_ms_median"] > 0 and report["cached_ms_mean"] < report["render_ms_median"]


def test_dpo_pairs_reject_a_near_miss_that_is_never_the_reference(tiny_assets, tmp_path):
    import random

    import pyarrow.parquet as pq

    from bench import dpo_pairs
    from runner.dpo import load_pairs

    rng = random.Random(0)
    for reference in ["x ^ { 2 }", "\\frac { 1 } { 2 }", "a + b = c", "\\alpha"]:
        rejected = dpo_pairs.near_miss(reference, rng)
        assert rejected != reference and len(rejected.split()) == len(reference.split())
    out = tmp_path / "pairs.parquet"
    dpo_pairs.main([str(tiny_assets["train"]), str(out), "5"])
    pairs = load_pairs(str(out), None)  # the file `dpo.pairs` reads
    assert len(pairs) == 5 and pq.read_table(out).column("image").to_pylist()[0]["bytes"]


def test_generate_variants_arguments():
    from bench import generate_variants

    args = generate_variants.parse_args(["--model-dir", "/m", "--data", "d", "--backend", "unsloth", "--cache",
                                         "static", "--batch-size", "512"])
    assert (args.backend, args.cache, args.batch_size, args.new_tokens) == ("unsloth", "static", 512, 64)
    with pytest.raises(SystemExit):
        generate_variants.parse_args(["--model-dir", "/m", "--data", "d", "--cache", "paged"])


def test_stop_at_reference_length_lets_each_row_end_where_its_reference_ends():
    import torch

    from bench.generate_variants import StopAtReferenceLength

    stop = StopAtReferenceLength(prompt_length=5, lengths=[2, 4], end_id=7)
    scores = torch.zeros(2, 10)
    after_two = stop(torch.zeros(2, 5 + 2, dtype=torch.long), scores)  # both rows have generated 2 tokens
    assert after_two[0].argmax() == 7 and torch.isinf(after_two[0, :7]).all()  # row 0 must end now
    assert torch.equal(after_two[1], scores[1])  # row 1 goes on untouched
    assert stop(torch.zeros(2, 5 + 4, dtype=torch.long), scores).argmax(dim=1).tolist() == [7, 7]


def test_generate_variants_runs_on_the_tiny_model_with_reference_answer_lengths(tiny_assets, tmp_path):
    import json

    from bench import generate_variants

    out = tmp_path / "gen.jsonl"
    generate_variants.main(["--model-dir", str(tiny_assets["model"]), "--data", str(tiny_assets["train"]),
                            "--recipe", "recipes/smoke_tiny.yaml", "--batch-size", "3", "--batches", "1",
                            "--new-tokens", "300", "--answer-lengths", "reference", "--decode-attention", "grouped",
                            "--out", str(out), "--profile", str(tmp_path / "profile.txt")])
    result = json.loads(out.read_text())
    assert "batch 1, 3 rows, sorted by self_cpu_time_total" in (tmp_path / "profile.txt").read_text()
    assert result["answer_lengths"] == "reference" and result["decode_attention"] == "grouped"
    assert len(result["batches"]) == 2
    for batch in result["batches"]:  # each batch decodes its longest reference answer plus the end token
        assert 1 < batch["mean_answer_tokens"] < batch["decoded_tokens"] <= 300


def test_reference_lengths_end_the_tiny_models_answers_there(tiny_assets, tiny_processor):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, LogitsProcessorList

    from bench.generate_variants import StopAtReferenceLength
    from runner.prompt import END_OF_TURN, generation_batch

    model = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    images = [Image.new("RGB", (64, 32), "white"), Image.new("RGB", (96, 32), "white")]
    batch = generation_batch(tiny_processor, images, "Write the LaTeX.")
    end_id = tiny_processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    prompt_length, lengths = batch["input_ids"].shape[1], [3, 9]
    output = model.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=[end_id],
                            pad_token_id=tiny_processor.tokenizer.pad_token_id,
                            logits_processor=LogitsProcessorList([StopAtReferenceLength(prompt_length, lengths, end_id)]))
    new = output[:, prompt_length:].tolist()
    assert [row.index(end_id) for row in new] == lengths  # each answer ends right after its reference's length


def test_eval_batch_order_counts_each_batch_up_to_its_longest_answer():
    from bench.eval_batch_order import decode_steps

    answer_steps = [10, 2, 9, 3, 300]
    assert decode_steps([0, 2, 1, 3], answer_steps, 2, 256) == {"decode_steps": 13, "useful_fraction": 0.9231}
    assert decode_steps([0, 1, 2, 3], answer_steps, 2, 256)["decode_steps"] == 19  # a long and a short row together
    assert decode_steps([4], answer_steps, 2, 256) == {"decode_steps": 256, "useful_fraction": 0.5}  # capped


def test_eval_batch_order_runs_on_formula_images(tiny_assets, tmp_path):
    import json

    from bench import eval_batch_order

    out = tmp_path / "order.json"
    eval_batch_order.main(["--data", str(tiny_assets["train"]), "--batch-size", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    orders = result["orders"]
    assert result["rows"] > 8 and result["answers_over_cap"] == 0
    oracle = orders["reference_answer_length (oracle)"]["decode_steps"]
    assert all(oracle <= order["decode_steps"] for order in orders.values())  # no order beats the answers' own


@pytest.mark.slow
def test_refill_generate_times_batches_and_both_refill_layouts_on_the_same_rows(tiny_assets, tmp_path):
    import json

    from bench import refill_generate

    out = tmp_path / "refill.json"
    refill_generate.main(["--model-dir", str(tiny_assets["model"]), "--data", str(tiny_assets["train"]),
                          "--recipe", "recipes/smoke_tiny.yaml", "--rows", "6", "--batch-size", "3",
                          "--new-tokens", "40", "--cache", "dynamic", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] == 6 and result["batched_s"] > 0
    assert result["refilled_dynamic_s"] > 0 and result["refilled_static_s"] > 0
    assert 1 < result["mean_answer_tokens"] <= 40
    for kind in ("dynamic", "static"):  # where the refilled time went: every row prefilled once, steps counted
        assert result[f"refilled_{kind}_prefill_rows"] == 6 and result[f"refilled_{kind}_prefills"] >= 2
        # 3 slots emit at most 3 tokens a step; each row's first token comes from its prefill
        assert result[f"refilled_{kind}_decode_steps"] * 3 >= 6 * result["mean_answer_tokens"] - 6 - 0.3
        assert 0 < result[f"refilled_{kind}_prefill_s"] + result[f"refilled_{kind}_decode_s"] <= \
            result[f"refilled_{kind}_s"] + 0.1
    # float32: every path gives each row the same greedy answer
    assert result["same_answers_refilled_dynamic"] == result["same_answers_refilled_static"] == 1.0


@pytest.mark.slow
def test_refill_generate_can_time_the_refilled_runs_alone_with_grouped_decode_attention(tiny_assets, tmp_path):
    import json

    from bench import refill_generate

    out = tmp_path / "refill.json"
    refill_generate.main(["--model-dir", str(tiny_assets["model"]), "--data", str(tiny_assets["train"]),
                          "--recipe", "recipes/smoke_tiny.yaml", "--rows", "5", "--batch-size", "2",
                          "--new-tokens", "12", "--skip-batched", "--refill-caches", "dynamic",
                          "--decode-attention", "grouped", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "batched_s" not in result and result["batched_cache"] is None
    assert result["decode_attention"] == "grouped" and result["refilled_dynamic_prefill_rows"] == 5


def test_decode_attention_kernels_layouts_compute_the_same_attention(tmp_path):
    import json

    from bench import decode_attention_kernels

    out = tmp_path / "kernels.json"
    decode_attention_kernels.main(["--batch", "3", "--length", "9", "--heads", "6", "--kv-heads", "2", "--dim", "8",
                                   "--repeats", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    measured = [row for row in result["results"] if "ms" in row]
    assert {row["layout"] for row in measured} == {"repeat_kv", "grouped", "gqa_flag"}
    assert {row["mask"] for row in measured} == {"bool", "additive"}
    assert all(row["max_abs_diff"] < 1e-5 and row["ms"] > 0 for row in measured)  # float32 on the CPU


@pytest.mark.slow
def test_refill_check_compares_refilled_answers_with_each_rows_answer_alone(tmp_path):
    from bench import refill_check

    result = refill_check.main(["--rows", "6", "--slots", "2", "--new-tokens", "8", "--out", str(tmp_path / "r.json")])
    assert result["rows"] == 6 and result["distinct_answers"] > 1
    assert result["same_as_alone_dynamic"] == result["same_as_alone_static"] == 1.0  # float32 on the CPU


def test_allreduce_buckets_are_ddps_full_buckets_then_the_remainder():
    from bench.allreduce_bandwidth import bucket_sizes

    assert bucket_sizes(10_000_000, "25", 4) == [6_553_600, 3_446_400]
    assert bucket_sizes(10_000_000, "all", 2) == [10_000_000]
    assert sum(bucket_sizes(51_521_536, "25", 4)) == 51_521_536 and len(bucket_sizes(51_521_536, "25", 4)) == 8


def test_allreduce_bandwidth_runs_under_torchrun_on_two_cpu_processes(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "allreduce.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "bench.allreduce_bandwidth", "--parameters", "100000", "--bucket-mb", "0.1,all",
                           "--dtypes", "float32", "--steps", "2", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert [(r["bucket_mb"], r["buckets"]) for r in summary["results"]] == [("0.1", 4), ("all", 1)]
    assert all(r["ms_per_step"] > 0 and r["bus_gb_per_s"] == round(r["algorithm_gb_per_s"], 2) for r in summary["results"])


def test_rank_balance_counts_each_ranks_padded_tokens_and_the_global_grouping_waits_less():
    import random

    from bench.ddp_rank_balance import rank_costs, summary

    rng = random.Random(0)
    lengths = [rng.randint(40, 320) for _ in range(20_000)]  # enough rows for the trainer's groups of 50 batches
    one = rank_costs(lengths[:64], 8, 1, seed=0, grouping="process")
    assert len(one) == 8 and all(len(step) == 1 for step in one)
    assert summary(one, sum(lengths[:64]), 1)["waiting_share_mean"] == 0
    trainers, runners = (summary(rank_costs(lengths, 16, 8, 0, grouping), sum(lengths), 8)
                         for grouping in ("process", "global"))
    assert trainers["steps"] == runners["steps"] == 157
    assert runners["waiting_share_mean"] < trainers["waiting_share_mean"]
    assert runners["slowest_over_ideal"] < trainers["slowest_over_ideal"]
