"""`recipe run`: the whole fine-tune, top to bottom. Read this file first.

    recipe  -> plan (resolved recipe, logged and saved in the run directory)
            -> model   (backend.load:        model section)
            -> data    (data.prepare:        dataset section)
            -> lora    (backend.attach_lora: lora section, or model.adapter to continue an earlier adapter)
            -> train   (train.train:         train section; grpo.train_grpo / dpo.train_dpo with their sections)
            -> eval    (evaluate.evaluate:   eval section)
            -> export  (export.export:       export section)

status.json in the run directory says how the run is going or ended (runner/status.py); training checkpoints
let `recipe run --resume` continue a run (runner/checkpoints.py). With several processes (torchrun, the
`distributed` section; runner/launch.py starts them) every rank runs this same story; rank 0 alone writes,
evaluates and exports.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from . import backends, distributed, install_sets, strategies
from .checkpoints import newest_usable
from .errors import RunError, RunInterrupted, explain, model_not_found
from .evaluate import evaluate, limit_rows
from .recipe import dump
from .report import write_report
from .status import write_status

log = logging.getLogger("runner")


def setup_logging(log_file: Path | None = None) -> None:
    """Console (and `log_file`) logging. Under torchrun, ranks other than 0 print only warnings, marked with their
    rank, and write no file: rank 0's run.log is the run's log."""
    if not distributed.is_main():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {distributed.rank()}] %(asctime)s %(message)s", "%H:%M:%S"))
        log.handlers[:] = [handler]
        log.setLevel(logging.WARNING)
        log.propagate = False
        return
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    log.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def record(run_dir: Path, **fields) -> None:
    """status.json, written by rank 0 alone."""
    if distributed.is_main():
        write_status(run_dir, **fields)


@contextmanager
def step(name: str, timings: dict):
    log.info("── %s", name)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 2)
    log.info("── %s done in %.1f s", name, timings[name])


def make_run_dir(recipe: dict) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(recipe["output_dir"]) / recipe["name"] / stamp
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def report(out_dir: Path, rows, eval_cfg: dict, image_column: str, after, before, base_dir) -> dict:
    """Writes report.md for an evaluation (after training, and before it when the base was evaluated)."""
    shown = limit_rows(rows, eval_cfg["max_samples"])
    images = dict(zip(shown["row_id"], shown[image_column]))
    log.info("eval: report %s", write_report(out_dir, after, before, images, base_dir))
    return {"after": after[0], **({"before": before[0]} if before else {})}


def preflight(recipe: dict) -> list[tuple[str, str]]:
    """What stops this recipe on this machine, found before any step starts: (key path, message) pairs."""
    problems = backends.machine_problems(recipe["model"], recipe["train"])
    distributed_cfg = distributed.resolve(recipe["distributed"])
    backend_name, _ = backends.select(recipe["model"]["backend"], distributed_cfg["strategy"], recipe["train"]["method"])
    problems += distributed.problems(distributed_cfg, backend_name, recipe["model"]["quantization"],
                                     recipe["train"]["optimizer"])
    for index, target in enumerate(recipe["export"]):
        if target["format"] == "gguf":
            from .gguf import GGUFError, llama_cpp_version

            try:
                llama_cpp_version()
            except GGUFError as error:
                problems.append((f"export.{index}.format", str(error)))
    if recipe["model"]["adapter"] and adapter_dir(recipe["model"]["adapter"]) is None:
        problems.append(("model.adapter", f"{recipe['model']['adapter']} holds no LoRA adapter (no adapter_config.json "
                         "in it or in its adapter/); give a run directory or a LoRA export"))
    model_id = Path(recipe["model"]["id"])
    if model_id.parts[:2] == ("assets", "tiny") and not model_id.exists():
        problems.append(("model.id", f"{model_id} does not exist yet; build it with `recipe tiny` (or `just setup`)"))
    return problems


def run(recipe: dict, resume_dir: Path | None = None) -> Path:
    """Runs a validated, resolved recipe, or resumes the run in `resume_dir`; returns the run directory.

    status.json says how it ended. A failure is logged with its traceback in run.log and raised as a RunError
    whose message is one line; Ctrl-C or SIGTERM during training saves a checkpoint and raises RunInterrupted."""
    def run_dir_here():
        return resume_dir or distributed.shared_run_dir() or make_run_dir(recipe)

    if distributed.launched():  # every rank takes rank 0's directory (it writes its RNG state into checkpoints)
        run_dir = distributed.rank0s_run_dir(run_dir_here, recipe["distributed"]["timeout_minutes"])
    else:
        run_dir = run_dir_here()
    setup_logging(run_dir / "run.log")
    if distributed.is_main():
        (run_dir / "recipe.resolved.yaml").write_text(dump(recipe))
    log.info("run directory: %s\nresolved recipe:\n%s", run_dir, dump(recipe))
    checkpoint = None
    if resume_dir is not None:
        checkpoint = newest_usable(run_dir) if distributed.is_main() else distributed.newest_checkpoint(run_dir)
        log.info("resuming %s from %s", run_dir, checkpoint or "the start (no usable checkpoint was saved)")
    record(run_dir, state="running", pid=os.getpid(), error=None, resumed_from=str(checkpoint or "") or None)
    try:
        run_steps(recipe, run_dir, checkpoint)
    except RunInterrupted as stopped:
        record(run_dir, state="interrupted", error=str(stopped))
        raise
    except KeyboardInterrupt:
        message = "interrupted (Ctrl-C outside training, or a second Ctrl-C): no checkpoint was written for it"
        record(run_dir, state="interrupted", error=message)
        raise RunInterrupted(message) from None
    except Exception as error:
        message = explain(error, recipe)
        if distributed.is_main():
            with open(run_dir / "run.log", "a") as log_file:
                traceback.print_exc(file=log_file)
        record(run_dir, state="failed", error=message)
        raise RunError(message) from error
    record(run_dir, state="done")
    return run_dir


def run_steps(recipe: dict, run_dir: Path, checkpoint: Path | None) -> None:
    """The steps of a run, in order; training continues from `checkpoint` when resuming."""
    for warning in install_sets.mismatches(recipe["install"]):
        log.warning("install set %s: %s", recipe["install"], warning)

    sharded = distributed.shards_weights(recipe["distributed"])
    backend_name, why = backends.select(recipe["model"]["backend"], recipe["distributed"]["strategy"],
                                        recipe["train"]["method"])
    log.info("backend: %s (%s)", backend_name, why)
    backend = backends.load_backend(backend_name)
    timings: dict[str, float] = {}
    metrics: dict = {"backend": backend_name, "timings_s": timings}

    # Unsloth sets checkpointing up when loading; "off", "gpu", or "cpu" where its activations wait
    checkpointing = backends.checkpointing(recipe["train"], backend_name, distributed.world_size())
    log.info("gradient checkpointing: %s", {"off": "off", "gpu": "activations kept on the GPU",
                                            "cpu": "activations offloaded to CPU memory"}[checkpointing])
    with step("model", timings):
        try:
            model, processor = backend.load(recipe["model"], checkpointing, sharded)
        except (OSError, ValueError) as error:  # not found, no network, gated, not a Qwen2.5-VL directory
            raise model_not_found(recipe["model"]["id"], error) from error
        distributed.check_placement(model)
    with step("data", timings):
        from .data import prepare

        data = prepare(recipe["dataset"], processor, recipe["model"]["max_seq_length"])
        metrics["data"] = {report.name: report.as_dict() for report in data.reports}
    dataset, eval_cfg = recipe["dataset"], recipe["eval"]
    eval_rows = data.train if eval_cfg["split"] == "train" else data.eval
    evaluating = eval_cfg["enabled"] and eval_rows is not None
    if eval_cfg["enabled"] and eval_rows is None:
        log.info("eval: skipped, the dataset has no evaluation rows (set dataset.eval_split or eval_fraction)")
    eval_args = (eval_cfg, dataset["instruction"], (dataset["image_column"], dataset["text_column"]), data.base_dir)
    evaluating = evaluating and distributed.is_main()  # rank 0 evaluates the whole model; the others are done
    start_adapter = recipe["model"]["adapter"]
    if start_adapter:  # continue an earlier adapter; "before" below is then that adapter, not the bare base model
        with step("adapter", timings):
            model = with_adapter(model, adapter_dir(start_adapter), trainable=True)
    before = None
    if evaluating and eval_cfg["compare_base"]:
        with step("eval-base", timings):
            model = backend.prepare_for_inference(model)
            before = evaluate(model, processor, eval_rows, *eval_args, run_dir / "predictions_base.jsonl",
                              "start" if start_adapter else "base")
    if not start_adapter:
        with step("lora", timings):
            model = backend.attach_lora(model, recipe["lora"], checkpointing)
    with step("train", timings):
        metrics["train"] = train_step(recipe, model, processor, data, run_dir, backend.TRAINER_CHECKPOINTING,
                                      checkpoint)
    if "interrupted" in metrics["train"]:
        raise RunInterrupted(f"{metrics['train']['interrupted']}: stopped after step {metrics['train']['step']} with "
                             "a checkpoint saved")
    if evaluating:
        with step("eval", timings):
            if sharded:  # rank 0 holds only its shard of the weights: load the model whole, with the saved adapter
                del model
                strategies.load_whole_models()
                model = with_adapter(backend.load(recipe["model"])[0], run_dir / "adapter")
            model = backend.prepare_for_inference(model)
            after = evaluate(model, processor, eval_rows, *eval_args, run_dir / "predictions.jsonl", "eval")
            metrics["eval"] = report(run_dir, eval_rows, eval_cfg, dataset["image_column"], after, before, data.base_dir)

    if not distributed.is_main():
        return  # rank 0 alone evaluates, exports and writes metrics.json
    if recipe["export"]:
        with step("export", timings):
            from .export import export

            del model  # free the training copy before the export loads the base weights again
            metrics["exports"] = export(recipe["export"], run_dir / "adapter", Path("exports") / recipe["name"],
                                        recipe["model"]["id"], dataset["id"], recipe["model"]["dtype"],
                                        dataset["instruction"])

    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    log.info("metrics: %s", run_dir / "metrics.json")


def train_step(recipe: dict, model, processor, data, run_dir: Path, trainer_checkpointing: bool,
               checkpoint: Path | None) -> dict:
    """The train step of `train.method`: SFT on the rows, GRPO with the `grpo` rewards, or DPO on the `dpo` pairs."""
    train_cfg, dataset, distributed_cfg = recipe["train"], recipe["dataset"], recipe["distributed"]
    common = dict(trainer_checkpointing=trainer_checkpointing, resume_from=checkpoint, distributed_cfg=distributed_cfg)
    if train_cfg["method"] == "grpo":
        from .grpo import train_grpo

        return train_grpo(model, processor, data, train_cfg, recipe["grpo"], dataset, run_dir, data.base_dir, **common)
    if train_cfg["method"] == "dpo":
        from .dpo import train_dpo

        return train_dpo(model, processor, train_cfg, recipe["dpo"], dataset["instruction"],
                         recipe["model"]["max_seq_length"], run_dir, data.base_dir, **common)
    from .train import VisionCollator, train

    collator = VisionCollator(processor, dataset["instruction"], dataset["image_column"], dataset["text_column"],
                              data.base_dir)
    return train(model, processor, data, train_cfg, collator, run_dir, recipe["model"]["max_seq_length"], **common)


def adapter_dir(target: str | Path) -> Path | None:
    """The LoRA adapter in `target`: a run directory's `adapter/`, `target` itself (a LoRA export), or the newest
    run's adapter in a recipe's runs directory (`runs/<name>`); None if there is none."""
    target = Path(target).expanduser()
    found = next((d for d in (target / "adapter", target) if (d / "adapter_config.json").is_file()), None)
    if found is None and target.is_dir():
        runs = sorted(d / "adapter" for d in target.iterdir() if (d / "adapter" / "adapter_config.json").is_file())
        found = runs[-1] if runs else None  # run directories are named by their start time
    return found


def with_adapter(model, adapter: Path, trainable: bool = False):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
    log.info("adapter %s loaded%s", adapter, " to keep training" if trainable else "")
    return model


def run_eval(recipe: dict, target: Path, out_dir: Path | None = None) -> Path:
    """`recipe eval`: evaluates a finished run directory, a LoRA export or a merged model on the recipe's rows."""
    adapter = adapter_dir(target)
    if adapter is None and not (target / "config.json").exists():
        raise FileNotFoundError(f"{target}: neither a run directory, a LoRA adapter nor a model directory")
    out_dir = out_dir or target / f"eval-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(out_dir / "eval.log")
    model_cfg = {**recipe["model"], **({} if adapter else {"id": str(target)})}
    backend_name, why = backends.select(model_cfg["backend"])
    log.info("evaluating %s (base %s, backend %s: %s)", adapter or target, model_cfg["id"], backend_name, why)
    try:
        model, processor = backends.load_backend(backend_name).load(model_cfg)
    except (OSError, ValueError) as error:
        raise model_not_found(model_cfg["id"], error) from error
    from .data import prepare

    dataset, eval_cfg = recipe["dataset"], recipe["eval"]
    data = prepare(dataset, processor, model_cfg["max_seq_length"])
    rows = data.train if eval_cfg["split"] == "train" else data.eval
    if rows is None:
        raise ValueError("the recipe's dataset has no evaluation rows (set dataset.eval_split or eval_fraction)")
    eval_args = (eval_cfg, dataset["instruction"], (dataset["image_column"], dataset["text_column"]), data.base_dir)
    before = None
    if adapter is not None:
        if eval_cfg["compare_base"]:
            before = evaluate(model, processor, rows, *eval_args, out_dir / "predictions_base.jsonl", "base")
        model = with_adapter(model, adapter)
    elif eval_cfg["compare_base"]:
        log.info("eval: compare_base needs an adapter to compare against its base; skipped for a merged model")
    after = evaluate(model, processor, rows, *eval_args, out_dir / "predictions.jsonl", "eval")
    metrics = report(out_dir, rows, eval_cfg, dataset["image_column"], after, before, data.base_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out_dir
