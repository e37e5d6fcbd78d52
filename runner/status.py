"""How a run ended: `status.json` in every run directory, and `recipe runs`, which lists them.

The file is rewritten atomically (a temporary file, then `os.replace`), so a reader or a kill never sees half of
it. `state` is `running`, `done`, `failed` or `interrupted`; a run killed outright (SIGKILL, a lost Colab VM)
cannot write anything, so it stays `running` with a `pid` that no longer exists, and `recipe runs` shows it as
`killed`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

STATUS_FILE = "status.json"


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, **fields) -> dict:
    """Merges `fields` into the run's status and writes it atomically; returns the new status."""
    status = {**read_status(run_dir), **fields, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    temporary = run_dir / f".{STATUS_FILE}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(status, indent=2, default=str))
    os.replace(temporary, run_dir / STATUS_FILE)
    return status


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def effective_state(status: dict) -> str:
    """The recorded state, except that a `running` run whose process is gone was killed."""
    state = status.get("state", "unknown")
    if state == "running" and not _alive(status.get("pid")):
        return "killed"
    return state


def run_dirs(output_dir: Path, name: str | None = None) -> list[Path]:
    """Run directories under `output_dir` (of one recipe name, or all), oldest first."""
    pattern = f"{name}/*/recipe.resolved.yaml" if name else "*/*/recipe.resolved.yaml"
    return sorted((p.parent for p in Path(output_dir).glob(pattern)), key=lambda d: (d.name, d.parent.name))


def summary_rows(output_dir: Path) -> list[dict]:
    """One row per run: where, state, step, last checkpoint, loss and eval figures, the error if any."""
    rows = []
    for run_dir in run_dirs(output_dir):
        status = read_status(run_dir)
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        after = metrics.get("eval", {}).get("after", {})
        rows.append({
            "run": str(run_dir), "state": effective_state(status),
            "step": f"{status.get('step', 0)}/{status.get('max_steps', '?')}",
            "checkpoint": Path(status["last_checkpoint"]).name if status.get("last_checkpoint") else "-",
            "loss": metrics.get("train", {}).get("final_loss", status.get("loss")),
            "exact_match": after.get("exact_match"), "edit_distance": after.get("edit_distance"),
            "error": status.get("error", ""),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        return "-" if value is None or value == "" else f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = ["run", "state", "step", "checkpoint", "loss", "exact_match", "edit_distance", "error"]
    table = [columns] + [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in table)
