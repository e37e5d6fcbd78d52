"""The export step: each target of the `export` list lands in `exports/<name>/<format>/`.

Every target is written to a temporary sibling directory and renamed into place at the end, so a failed
export never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("runner")


@contextmanager
def staged(final: Path):
    """Yields a temporary directory that replaces `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = final.with_name(f".{final.name}.previous")
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    staging.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def _readme(kind: str, base_model: str, trained_on: str, how_to_load: str) -> str:
    return (
        f"# {kind}\n\nFine-tuned from `{base_model}` for LaTeX OCR on `{trained_on}` with the recipe runner.\n\n"
        f"## Load it\n\n```python\n{how_to_load.strip()}\n```\n\n"
        "Prompt: the image, then the recipe's instruction, in the Qwen2.5-VL chat template "
        "(`runner.prompt.messages`).\n"
    )


def export_lora(adapter_dir: Path, final: Path, base_model: str, trained_on: str) -> Path:
    with staged(final) as staging:
        shutil.copytree(adapter_dir, staging, dirs_exist_ok=True)
        (staging / "README.md").write_text(_readme("LoRA adapter", base_model, trained_on, f"""
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("{base_model}", dtype="auto")
model = PeftModel.from_pretrained(base, "{final}")
processor = AutoProcessor.from_pretrained("{final}")
"""))
    return final


def export_merged_16bit(adapter_dir: Path, final: Path, base_model: str, trained_on: str, dtype_name: str) -> Path:
    """Merges the adapter into freshly loaded 16-bit base weights (never into dequantized 4-bit ones)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.float16 if dtype_name == "float16" else torch.bfloat16
    log.info("export merged_16bit: loading %s in %s (16-bit base weights, not the training-time "
             "quantized ones) and merging the adapter", base_model, dtype)
    base = AutoModelForImageTextToText.from_pretrained(base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with staged(final) as staging:
        merged.save_pretrained(staging, max_shard_size="5GB")
        AutoProcessor.from_pretrained(adapter_dir).save_pretrained(staging)
        (staging / "README.md").write_text(_readme("Merged 16-bit model", base_model, trained_on, f"""
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{final}", dtype="auto")
processor = AutoProcessor.from_pretrained("{final}")
"""))
    return final


def export(targets: list[dict], adapter_dir: Path, export_root: Path, base_model: str, trained_on: str,
           dtype_name: str, instruction: str) -> dict[str, str]:
    """Runs every export target; returns {format: directory}. GGUF is converted from the merged 16-bit model."""
    written = {}
    export_root.mkdir(parents=True, exist_ok=True)
    # Merged first: GGUF is made from it (or from a temporary merge when merged_16bit is not a target).
    for target in sorted(targets, key=lambda t: t["format"] != "merged_16bit"):
        final = export_root / target["format"]
        if target["format"] == "lora":
            export_lora(adapter_dir, final, base_model, trained_on)
        elif target["format"] == "merged_16bit":
            export_merged_16bit(adapter_dir, final, base_model, trained_on, dtype_name)
        else:
            from .gguf import export_gguf

            if "merged_16bit" in written:
                export_gguf(Path(written["merged_16bit"]), final, base_model, trained_on, target["quantizations"],
                            instruction)
            else:
                with tempfile.TemporaryDirectory(dir=export_root, prefix=".merge-") as tmp:
                    merged = export_merged_16bit(adapter_dir, Path(tmp) / "merged", base_model, trained_on, dtype_name)
                    export_gguf(merged, final, base_model, trained_on, target["quantizations"], instruction)
        log.info("export %s: %s", target["format"], final)
        written[target["format"]] = str(final)
    return written
