"""Where one training step of a recipe goes: data, vision tower, language model, LM head + loss, backward, optimizer.

Loads the model through the recipe's own backend (Unsloth for the fast recipe on a GPU), attaches the recipe's
LoRA, and runs the runner's own collator on real rows, then times each phase of `--steps` steps after one
warm-up step. Phases are separated with CUDA synchronisation (forward hooks on the vision tower, the language
model and the LM head), which costs a little speed: the sum is close to, not equal to, a `recipe run` step.
Each `--vision-attention` mode runs in its own process (Unsloth patches transformers on import).

    python -m bench.step_profile --model-dir /tmp/qwen7b --data bench_data/validation_6400.parquet \
        --recipe recipes/qwen25vl_latex_fast.yaml --vision-attention varlen,per_window --out docs/benchmarks/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("data", "vision_tower", "language_model", "lm_head_and_loss", "forward_other", "backward", "optimizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Per-phase time of one training step of a recipe.")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--recipe", default="recipes/qwen25vl_latex_fast.yaml")
    parser.add_argument("--vision-attention", default="varlen,per_window")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one mode
    return parser.parse_args(argv)


class PhaseTimer:
    """Forward hooks that time the vision tower, the language model and the LM head, synchronising the GPU."""

    def __init__(self, model, sync):
        self.sync, self.times, self.started = sync, {}, {}
        self.active = False
        inner = model
        while not hasattr(inner, "visual") and hasattr(inner, "model"):
            inner = inner.model
        parts = {"vision_tower": inner.visual, "language_model": inner.language_model}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            parts["lm_head"] = head
        for name, module in parts.items():
            module.register_forward_pre_hook(self._start(name))
            module.register_forward_hook(self._stop(name))

    def _start(self, name):
        def hook(module, args):
            if self.active:
                self.sync()
                self.started[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            if self.active and name in self.started:
                self.sync()
                self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self.started.pop(name)
        return hook


def profile_one(args) -> dict:
    import torch

    from runner import backends
    from runner.data import prepare
    from runner.recipe import load_recipe
    from runner.train import VisionCollator

    overrides = [f"model.id={args.model_dir}", f"dataset.id={args.data}", "dataset.eval_split=null",
                 "dataset.shuffle=false", "install=none", *args.overrides]
    recipe = load_recipe(args.recipe, overrides)
    backend_name, _ = backends.select(recipe["model"]["backend"])
    backend = backends.load_backend(backend_name)
    checkpointing = recipe["train"]["gradient_checkpointing"]
    model, processor = backend.load(recipe["model"], checkpointing)
    model = backend.attach_lora(model, recipe["lora"], checkpointing)
    if checkpointing and backend.TRAINER_CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    dataset = recipe["dataset"]
    batch_size = recipe["train"]["batch_size"]
    rows = prepare(dataset, processor, recipe["model"]["max_seq_length"]).train
    rows = rows.sort("length")  # consecutive rows of similar length, as group_by_length batches them
    collator = VisionCollator(processor, dataset["instruction"], dataset["image_column"], dataset["text_column"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    timer = PhaseTimer(model, torch.cuda.synchronize)
    totals, steps = {phase: 0.0 for phase in PHASES}, []
    for step in range(args.steps + 1):
        timer.active, timer.times = True, {}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start = (step * batch_size * 3) % max(len(rows) - batch_size, 1)  # short, middle and long batches
        batch = collator([rows[i] for i in range(start, start + batch_size)])
        batch = {k: v.to("cuda") for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        timer.active = False  # recomputation in the backward pass is part of `backward`
        loss.backward()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        times = {"data": t1 - t0, "vision_tower": timer.times.get("vision_tower", 0.0),
                 "language_model": timer.times.get("language_model", 0.0),
                 "lm_head_and_loss": timer.times.get("lm_head", 0.0), "backward": t3 - t2, "optimizer": t4 - t3}
        # the rest of the forward: embedding merge, mRoPE position ids, the loss outside the head
        times["forward_other"] = (t2 - t1) - times["vision_tower"] - times["language_model"] - times["lm_head_and_loss"]
        steps.append({k: round(v * 1000, 1) for k, v in times.items()} | {"tokens": int(batch["attention_mask"].sum())})
        if step > 0:  # step 0 warms up (kernels, compile)
            for phase in PHASES:
                totals[phase] += times[phase] / args.steps
    step_s = sum(totals.values())
    return {"recipe": args.recipe, "backend": backend_name, "vision_attention": recipe["model"]["vision_attention"],
            "batch_size": batch_size, "steps": args.steps,
            "phases_ms": {k: round(v * 1000, 1) for k, v in totals.items()}, "step_ms": round(step_s * 1000, 1),
            "samples_per_s": round(batch_size / step_s, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "per_step": steps}


def main(argv=None) -> None:
    from bench.common import device_name, versions

    args = parse_args(argv)
    if args.one:
        print("PROFILE " + json.dumps(profile_one(args)), flush=True)
        return
    results = []
    for mode in args.vision_attention.split(","):
        cmd = [sys.executable, "-m", "bench.step_profile", "--model-dir", str(args.model_dir), "--data", str(args.data),
               "--recipe", args.recipe, "--steps", str(args.steps), "--one",
               *sum((["--set", o] for o in [*args.overrides, f"model.vision_attention={mode}"]), [])]
        output = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True)
        lines = [line for line in output.stdout.splitlines() if line.startswith("PROFILE ")]
        if output.returncode != 0 or not lines:
            print(output.stdout[-3000:], output.stderr[-3000:], file=sys.stderr)
            results.append({"vision_attention": mode, "exit_code": output.returncode})
            continue
        results.append(json.loads(lines[-1][len("PROFILE "):]))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "per_step"}), flush=True)
    print("| vision attention | " + " | ".join(PHASES) + " | step ms | samples/s |")
    print("|---" * (len(PHASES) + 3) + "|")
    for r in results:
        if "phases_ms" in r:
            print(f"| {r['vision_attention']} | " + " | ".join(f"{r['phases_ms'][p]:.0f}" for p in PHASES)
                  + f" | {r['step_ms']:.0f} | {r['samples_per_s']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "step_profile", "date": time.strftime("%Y-%m-%d"),
                                        "device": device_name(), "versions": versions(), "data": str(args.data),
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
