"""`recipe pairs` and DPO through `recipe run` on the tiny model (recipes/dpo_tiny.yaml)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from runner.metrics import exact_match

from .conftest import REPO, refused_output, run_cli, smoke_overrides

RECIPE = str(REPO / "recipes" / "dpo_tiny.yaml")


@pytest.mark.slow
def test_pairs_from_a_runs_mistakes_then_dpo_widens_the_preference_margin(tiny_assets, half_trained, tmp_path):
    pairs_file = tmp_path / "pairs.parquet"
    result = run_cli(["pairs", str(half_trained.parent), "--out", str(pairs_file)])  # a runs directory: its newest
    assert result.exit_code == 0, result.output
    pairs = pq.read_table(pairs_file).to_pylist()
    predictions = [json.loads(line) for line in pairs_file.with_name("pairs.predictions.jsonl").read_text().splitlines()]
    wrong = [p for p in predictions if not exact_match(p["reference"], p["prediction"])]
    assert len(predictions) == 16 and 0 < len(pairs) == len(wrong) < 16  # half-trained: some right, some wrong
    assert f"{len(pairs)} pairs from 16 training rows" in result.output
    for pair in pairs:
        assert pair["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and exact_match(pair["chosen"], pair["chosen"])
        assert not exact_match(pair["chosen"], pair["rejected"])

    args = ["run", RECIPE, "--set", f"model.adapter={half_trained}", "--set", f"dpo.pairs={pairs_file}"]
    for override in smoke_overrides(tiny_assets, tmp_path / "runs"):
        args += ["--set", override]
    result = run_cli(args, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    (run_dir,) = list((tmp_path / "runs").glob("*/*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    margins = {int(step): m for step, m in metrics["train"]["preference_curve"]["margin"].items()}
    # At step 1 the policy is the reference (a frozen copy of the SFT adapter, not the bare model), so the margin
    # is 0; 12 steps of 4 pairs at lr 5e-4 widen it (measured 0 -> 3.7 on this machine).
    assert abs(margins[1]) < 1e-4, margins
    assert metrics["train"]["final_margin"] > 1.0 and max(margins.values()) == max(margins[s] for s in range(7, 13))
    assert {"before", "after"} <= set(metrics["eval"])
    assert not (run_dir / "adapter" / "ref").exists()  # trl's frozen reference copy is not part of the result


@pytest.mark.parametrize("overrides, message", [
    (["dpo.pairs=null"], "dpo.pairs: train.method is dpo but there are no pairs"),
    (["dpo.beta=0"], "dpo.beta: must be > 0, got 0"),
    (["dpo.loss_type=sigmod"], "dpo.loss_type: must be one of"),
])
def test_bad_dpo_settings_fail_before_anything_runs(tmp_path, overrides, message):
    output = refused_output(RECIPE, overrides, tmp_path)
    assert message in output, output


def test_pairs_without_the_columns_dpo_needs_are_refused(tmp_path):
    import pyarrow as pa

    from runner.dpo import PairsError, load_pairs

    pq.write_table(pa.table({"image": [b"x"], "text": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(PairsError, match="no column chosen, rejected"):
        load_pairs(str(tmp_path / "p.parquet"))
