"""The exports of the memorized tiny model load and answer like the trained model (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from runner.cli import main
from runner.prompt import decode_image, generation_batch

pytestmark = pytest.mark.slow
INSTRUCTION = "Write the LaTeX representation for this image."


def first_rows(run_dir, count=4):
    """The first `count` evaluated rows of a run: their images and the run's own predictions."""
    import pyarrow.parquet as pq
    import yaml

    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()][:count]
    recipe = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text())
    table = pq.read_table(recipe["dataset"]["id"]).to_pylist()
    return [decode_image(table[p["row_id"]]["image"]) for p in predictions], predictions


def test_merged_16bit_logits_equal_the_peft_models(memorized, tiny_assets):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    images, _ = first_rows(memorized["run"])
    processor = AutoProcessor.from_pretrained(memorized["merged_16bit"])
    batch = generation_batch(processor, images, INSTRUCTION)
    # Both sides in float32 from the same bfloat16 base weights, so the only difference left is the export's own
    # rounding of W + BA to bfloat16 (8-bit mantissa, relative step 2^-8).
    base = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.bfloat16).float()
    peft_model = PeftModel.from_pretrained(base, str(memorized["lora"])).eval()
    merged = AutoModelForImageTextToText.from_pretrained(memorized["merged_16bit"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        actual = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    difference = (expected - actual).abs()[mask]
    # Measured: max 0.12, mean 0.006 on logits up to |12|. Tolerance: max 0.25 (2% of the logit range), mean 0.02.
    assert difference.max() < 0.25 and difference.mean() < 0.02, (difference.max(), difference.mean())
    assert (expected.argmax(-1)[mask] == actual.argmax(-1)[mask]).float().mean() > 0.95


def test_merged_model_loads_without_peft(memorized):
    script = (
        "import sys; sys.modules['peft'] = None\n"  # any import of peft now fails
        "from transformers import AutoModelForImageTextToText\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(memorized['merged_16bit'])!r})\n"
        "print(type(m).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Qwen2_5_VLForConditionalGeneration" in result.stdout
    assert not list(memorized["merged_16bit"].glob("adapter_*"))


def test_every_export_has_a_readme_saying_how_to_load_it(memorized):
    assert "PeftModel.from_pretrained" in (memorized["lora"] / "README.md").read_text()
    assert "AutoModelForImageTextToText" in (memorized["merged_16bit"] / "README.md").read_text()
    readme = (memorized["gguf"] / "README.md").read_text()
    assert "llama-mtmd-cli -m" in readme and "--mmproj" in readme and "mmproj-f16.gguf" in readme


@pytest.mark.parametrize("export", ["lora", "merged_16bit"])
def test_predict_from_hugging_face_exports_reproduces_the_training_rows(memorized, export, tmp_path):
    images, predictions = first_rows(memorized["run"])
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        image.save(paths[-1])
    result = CliRunner().invoke(main, ["predict", *map(str, paths), "--model", str(memorized[export]),
                                       "--batch-size", "3", "--max-new-tokens", "48"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    answers = [line.split("\t", 1)[1] for line in result.stdout.splitlines() if "\t" in line]
    assert answers == [p["prediction"] for p in predictions]


def test_export_a_finished_run_without_retraining(memorized, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", str(memorized["run"]), "--format", "lora"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    exported = tmp_path / "exports" / "memorize-tiny" / "lora"
    assert (exported / "adapter_model.safetensors").read_bytes() == \
        (memorized["run"] / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_failed_export_leaves_no_half_model(tmp_path):
    from runner.export import staged

    final = tmp_path / "exports" / "x" / "merged_16bit"
    with pytest.raises(RuntimeError):
        with staged(final) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert not final.exists() and not list(final.parent.iterdir())
