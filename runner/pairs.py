"""`recipe pairs`: DPO preference pairs from a run's own mistakes on training rows.

The run's adapter answers the training rows (greedy, as in eval); every row it got wrong becomes a pair whose
chosen answer is the reference and whose rejected answer is the model's. Rows it got right are left out (a pair
needs two different answers), so the pairs teach exactly what the model still confuses.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from .metrics import exact_match

log = logging.getLogger("runner")


def build_pairs(results: list[dict], image_of) -> list[dict]:
    """Pairs from eval results (row_id, reference, prediction): only rows answered wrongly, where wrong means what
    the eval's exact match means (whitespace ignored), so an answer is never paired with itself. `image_of(row_id)`
    gives a pair's image."""
    pairs = []
    for result in results:
        reference, prediction = result["reference"], result["prediction"]
        if reference is None or prediction is None or exact_match(reference, prediction):
            continue
        pairs.append({"row_id": result["row_id"], "image": image_of(result["row_id"]), "chosen": reference,
                      "rejected": prediction})
    return pairs


def image_struct(value, base_dir: Path | None) -> dict:
    """An image value as the `{bytes, path}` struct of the unsloth/LaTeX_OCR schema, readable without base_dir."""
    if isinstance(value, dict) and value.get("bytes"):
        return {"bytes": value["bytes"], "path": value.get("path")}
    if isinstance(value, (dict, str)):
        path = Path(value.get("path") if isinstance(value, dict) else value)
        path = path if path.is_absolute() or base_dir is None else base_dir / path
        return {"bytes": path.read_bytes(), "path": str(path)}
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")  # a decoded PIL image
    return {"bytes": buffer.getvalue(), "path": None}


def write_pairs(pairs: list[dict], out_file: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_file.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(pairs, schema=pa.schema([
        ("row_id", pa.int64()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("chosen", pa.string()), ("rejected", pa.string())]))
    pq.write_table(table, out_file)


def make_pairs(recipe: dict, target: Path, out_file: Path) -> dict:
    """Runs the adapter in `target` (a run directory or LoRA export) on the recipe's training rows (up to
    eval.max_samples) and writes the pairs of the rows it got wrong to `out_file`; returns the counts."""
    from . import backends
    from .data import prepare
    from .evaluate import evaluate
    from .run import adapter_dir, with_adapter

    adapter = adapter_dir(target)
    if adapter is None:
        raise FileNotFoundError(f"{target}: no LoRA adapter in it (a run directory or a LoRA export is needed)")
    backend_name, why = backends.select(recipe["model"]["backend"])
    log.info("pairs: answering training rows with %s (backend %s: %s)", adapter, backend_name, why)
    backend = backends.load_backend(backend_name)
    model, processor = backend.load(recipe["model"])
    model = backend.prepare_for_inference(with_adapter(model, adapter))
    dataset, eval_cfg = recipe["dataset"], recipe["eval"]
    data = prepare(dataset, processor, recipe["model"]["max_seq_length"])
    columns = (dataset["image_column"], dataset["text_column"])
    predictions = out_file.with_name(out_file.stem + ".predictions.jsonl")
    _, results = evaluate(model, processor, data.train, eval_cfg, dataset["instruction"], columns, data.base_dir,
                          predictions, "pairs")
    positions = {row_id: position for position, row_id in enumerate(data.train["row_id"])}
    pairs = build_pairs(results, lambda row_id: image_struct(data.train[positions[row_id]][columns[0]], data.base_dir))
    write_pairs(pairs, out_file)
    counts = {"rows": len(results), "pairs": len(pairs), "right": len(results) - len(pairs)}
    log.info("pairs: %d of %d training rows answered wrongly -> %d pairs in %s (predictions: %s)", len(pairs),
             len(results), len(pairs), out_file, predictions)
    return counts
