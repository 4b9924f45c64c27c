"""Smoke tests of the examples: they run end to end with few steps and report finite numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"funcema_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_train_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    example = _load("train_digits")
    threads = torch.get_num_threads()
    summary = example.main(["--steps", "60", "--snapshots", "6", "--out", str(tmp_path), "--quiet"])
    assert torch.get_num_threads() == threads  # the example's --threads is undone on return
    out = capsys.readouterr().out
    assert "raw weights" in out and "plain EMA" in out and "post-hoc EMA" in out
    assert re.search(r"^wall time \d+\.\d s \(1 CPU thread\(s\)\)$", out, flags=re.MULTILINE)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["posthoc"] == summary["posthoc"]
    assert len(results["posthoc"]) == len(example.SIGMA_RELS) >= 8
    for row in [results["raw"], results["plain_ema"], *results["posthoc"]]:
        assert math.isfinite(row["val_loss"]) and 0.0 <= row["accuracy"] <= 1.0
    for row in results["posthoc"]:
        assert math.isfinite(row["error"]) and row["error"] >= 0.0
        if row["sigma_rel"] in example.TRACKED:  # a tracked EMA is reproduced exactly
            assert row["error"] < 1e-9
    snapshots = sorted((tmp_path / "snapshots").glob("*.safetensors"))
    assert len(snapshots) == 2 * 6  # two tracked EMAs, six snapshot times
    if results["plot"] is not None:
        assert (tmp_path / "digits_sigma_rel.png").stat().st_size > 0


def test_module_ema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = _load("module_ema")
    threads = torch.get_num_threads()
    summary = example.main(["--steps", "40", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert "wall time" in capsys.readouterr().out
    assert summary["resumed_identical"] and summary["resumed_max_abs_diff"] == 0.0
    assert summary["step"] == 40
    assert math.isfinite(summary["live_val_mse"]) and math.isfinite(summary["ema_val_mse"])
    assert (tmp_path / "checkpoint" / "ema.safetensors").is_file()
    assert json.loads((tmp_path / "results.json").read_text()) == summary
