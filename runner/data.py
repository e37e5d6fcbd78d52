"""The data step: read the dataset section's source, check every row, and keep the rows that can train.

A row is skipped (and counted, the first few ids logged) when its image does not decode or its text is
empty. A row longer than `model.max_seq_length` is dropped or stops the run: it is never cut, because a cut
inside the image tokens is the "image features and image tokens do not match" failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .errors import RunError
from .prompt import END_OF_TURN, decode_image, prompt_text, text_of

log = logging.getLogger("runner")
SHOWN_BAD_ROWS = 5
LOCAL_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


class DataError(RunError):
    """A problem with the data a person has to fix (wrong column, missing file, oversize row)."""


@dataclass
class SplitReport:
    name: str
    rows: int = 0
    kept: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, row_id: int) -> None:
        self.skipped.setdefault(reason, []).append(row_id)

    def summary(self) -> str:
        parts = [f"{self.name}: {self.kept} of {self.rows} rows kept"]
        for reason, ids in self.skipped.items():
            shown = ", ".join(str(i) for i in ids[:SHOWN_BAD_ROWS]) + (", ..." if len(ids) > SHOWN_BAD_ROWS else "")
            parts.append(f"{len(ids)} skipped: {reason} (rows {shown})")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "skipped": {k: len(v) for k, v in self.skipped.items()}}


@dataclass
class PreparedData:
    train: object  # datasets.Dataset with columns row_id, image, text
    eval: object | None
    reports: list[SplitReport]
    base_dir: Path | None  # where relative image paths are resolved


def _local_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return {"jsonl": "json"}.get(fmt, fmt)
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise DataError(f"{path}: unknown file type '{path.suffix}'; use .parquet or .jsonl, or set dataset.format")
        return LOCAL_FORMATS[path.suffix]
    suffixes = {p.suffix for p in path.iterdir()}
    for suffix, builder in LOCAL_FORMATS.items():
        if suffix in suffixes:
            return builder
    return "imagefolder"


def _load_split(cfg: dict, split: str):
    try:
        return _read_split(cfg, split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many kinds: not found, no network, bad file, unknown builder
        from .errors import dataset_not_found

        raise DataError(str(dataset_not_found(cfg["id"], error))) from error


def _read_split(cfg: dict, split: str):
    from datasets import load_dataset

    source = Path(cfg["id"]).expanduser()
    if cfg["format"] == "hub" or (cfg["format"] == "auto" and not source.exists()):
        return load_dataset(cfg["id"], split=split)
    builder = _local_format(source, cfg["format"])
    if source.is_dir():
        return load_dataset(builder, data_dir=str(source), split=split) if builder == "imagefolder" else \
            load_dataset(builder, data_files={split: str(source / f"{split}*{_suffix(builder)}")}, split=split)
    # A single file is the train split; other splits are sibling files named after the split.
    path = source if split == cfg["train_split"] else source.with_name(f"{split}{source.suffix}")
    if not path.exists():
        raise DataError(f"split '{split}' expected at {path} (a sibling of {source}); set dataset.eval_split")
    return load_dataset(builder, data_files={split: str(path)}, split=split)


def _suffix(builder: str) -> str:
    return {"parquet": ".parquet", "json": ".json*"}[builder]


def _check_columns(dataset, cfg: dict, split: str) -> None:
    missing = [c for c in (cfg["image_column"], cfg["text_column"]) if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"split '{split}' of {cfg['id']} has no column {', '.join(repr(c) for c in missing)}; "
            f"its columns are {', '.join(repr(c) for c in dataset.column_names)} "
            "(set dataset.image_column / dataset.text_column)"
        )


def _with_row_ids(dataset):
    """Numbers rows by their position in the source split, so logs and predictions name real rows."""
    if "row_id" in dataset.column_names:
        dataset = dataset.remove_columns("row_id")
    return dataset.add_column("row_id", list(range(len(dataset))))


def _image_tokens(processor, width: int, height: int) -> int:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    h, w = smart_resize(height, width, factor, image_processor.size["shortest_edge"], image_processor.size["longest_edge"])
    return (h // factor) * (w // factor)


def check_rows(dataset, cfg: dict, processor, max_seq_length: int, split: str, limit: int | None, base_dir):
    """Checks rows in order until `limit` good ones are found; returns the good rows and the report."""
    from datasets import Image as ImageFeature

    if isinstance(dataset.features.get(cfg["image_column"]), ImageFeature):
        # Raw bytes: a row whose image does not decode is then skipped instead of crashing the iterator.
        dataset = dataset.cast_column(cfg["image_column"], ImageFeature(decode=False))
    tokenizer = processor.tokenizer
    prompt_tokens = len(tokenizer(prompt_text(processor, cfg["instruction"]), add_special_tokens=False)["input_ids"])
    report, keep, lengths, prompt_lengths = SplitReport(split), [], [], []
    total = len(dataset) if limit is None else min(limit, len(dataset))
    bar = tqdm(total=total, desc=f"checking {split} rows", unit="row", leave=False)
    for start in range(0, len(dataset), 256):
        chunk = dataset[start : start + 256]
        raw_texts = chunk[cfg["text_column"]]
        texts = [text_of(value) for value in raw_texts]
        answer_ids = tokenizer([(t or "") + END_OF_TURN for t in texts], add_special_tokens=False)["input_ids"]
        columns = zip(chunk["row_id"], chunk[cfg["image_column"]], raw_texts, texts, answer_ids)
        for offset, (row_id, image_value, raw, text, answer) in enumerate(columns):
            report.rows += 1
            if raw is None or (text is not None and not text.strip()):
                report.skip("empty or missing text", row_id)
                continue
            if text is None:
                report.skip("text is not a string or UTF-8 bytes", row_id)
                continue
            try:
                width, height = decode_image(image_value, base_dir).size
            except Image.DecompressionBombError:
                report.skip(f"image over {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's decompression-bomb guard)", row_id)
                continue
            except Exception:
                report.skip("image does not decode", row_id)
                continue
            prompt_length = prompt_tokens - 1 + _image_tokens(processor, width, height)
            length = prompt_length + len(answer)
            if length > max_seq_length:
                if cfg["on_too_long"] == "error":
                    raise DataError(
                        f"split '{split}' row {row_id} is {length} tokens, over model.max_seq_length "
                        f"{max_seq_length}; raise max_seq_length, lower model.image_max_pixels, or set "
                        "dataset.on_too_long: drop"
                    )
                report.skip(f"longer than max_seq_length {max_seq_length}", row_id)
                continue
            keep.append(start + offset)
            lengths.append(length)
            prompt_lengths.append(prompt_length)
            bar.update(1)
            if limit is not None and len(keep) >= limit:
                break
        if limit is not None and len(keep) >= limit:
            break
    bar.close()
    report.kept = len(keep)
    rows = dataset.select(keep).select_columns(["row_id", cfg["image_column"], cfg["text_column"]])
    # `length` (tokens, image tokens included) lets the trainer group samples of similar length; `prompt_length`
    # (the same without the answer) lets the eval step batch prompts of similar length without reading answers.
    if keep:
        rows = rows.add_column("length", lengths).add_column("prompt_length", prompt_lengths)
    return rows, report


def prepare(cfg: dict, processor, max_seq_length: int) -> PreparedData:
    """Runs the data step for the `dataset` section; `processor` and `max_seq_length` come from the model step."""
    source = Path(cfg["id"]).expanduser()
    base_dir = (source if source.is_dir() else source.parent) if source.exists() else None
    train = _load_split(cfg, cfg["train_split"])
    _check_columns(train, cfg, cfg["train_split"])
    train = _with_row_ids(train)
    if cfg["shuffle"]:
        train = train.shuffle(seed=cfg["seed"])
    eval_rows = None
    if cfg["eval_split"] is not None:
        eval_rows = _load_split(cfg, cfg["eval_split"])
        _check_columns(eval_rows, cfg, cfg["eval_split"])
        eval_rows = _with_row_ids(eval_rows)
    elif cfg["eval_fraction"] > 0:
        parts = train.train_test_split(test_size=cfg["eval_fraction"], seed=cfg["seed"], shuffle=False)
        train, eval_rows = parts["train"], parts["test"]

    train, train_report = check_rows(
        train, cfg, processor, max_seq_length, cfg["train_split"], cfg["max_samples"], base_dir
    )
    reports = [train_report]
    if eval_rows is not None:
        eval_rows, eval_report = check_rows(
            eval_rows, cfg, processor, max_seq_length, cfg["eval_split"] or "held-out", None, base_dir
        )
        reports.append(eval_report)
    for report in reports:
        log.info("data %s", report.summary())
    if len(train) == 0:
        raise DataError(f"no usable training rows in {cfg['id']}: {train_report.summary()}")
    return PreparedData(train=train, eval=eval_rows, reports=reports, base_dir=base_dir)
