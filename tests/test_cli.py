"""Tests of the ``funcema`` command line, run in-process through ``main``."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch
from safetensors.torch import load_file

from funcema._cli import main
from funcema._sigma import gamma_to_sigma_rel, sigma_rel_to_gamma
from funcema.posthoc import scan_snapshots, synthesize, write_snapshot


@pytest.fixture(scope="module")
def snaps(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(1)
    ema = {s: torch.zeros(10) for s in (0.05, 0.10)}
    for t in range(1, 121):
        theta = torch.randn(10, generator=gen) + t / 10
        for s in ema:
            beta = (1 - 1 / t) ** (sigma_rel_to_gamma(s) + 1)
            ema[s] = beta * ema[s] + (1 - beta) * theta
        if t % 20 == 0:
            for s, e in ema.items():
                g = sigma_rel_to_gamma(s)
                write_snapshot(d, {"w": e.clone(), "n": torch.tensor(t)}, step=t, gamma=g, sigma_rel=s, every=1)
    return d


def _header(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(json.loads(f.read(n))["__metadata__"]["funcema"])


def test_synthesize_writes_one_file_per_target(snaps, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["synthesize", str(snaps), "--sigma-rel", "0.07", "0.08", "--out", str(out), "--no-progress"]) == 0
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 2 and not list(out.glob(".*"))
    text = capsys.readouterr().out
    assert "sigma_rel" in text and "cond" in text and "0.0700" in text and "0.0800" in text
    for path, sigma in zip(files, (0.07, 0.08)):
        meta = _header(path)
        ref = synthesize(snaps, sigma_rel=sigma)
        assert meta["format"] == "funcema.posthoc.synthesized"
        assert (meta["sigma_rel"], meta["step"], meta["error"], meta["cond"]) == (sigma, 120, ref.error, ref.cond)
        assert meta["gamma"] == sigma_rel_to_gamma(sigma) and len(meta["snapshots"]) == 12
        assert meta["weights"] == ref.weights.tolist()
        tensors = load_file(path)
        assert torch.equal(tensors["w"], ref.ema["w"]) and int(tensors["n"]) == 120
    # Synthesized files are not snapshots: a scan of OUT skips them with a warning.
    with pytest.warns(UserWarning, match="not a snapshot"), pytest.raises(ValueError, match="no funcema snapshots"):
        scan_snapshots(out)


def test_synthesize_with_gamma_and_step(snaps, tmp_path, capsys) -> None:
    out = tmp_path / "o"
    g = sigma_rel_to_gamma(0.09)
    assert main(["synthesize", str(snaps), "--gamma", str(g), "--step", "60", "--out", str(out)]) == 0
    (path,) = out.glob("*.safetensors")
    meta = _header(path)
    assert meta["step"] == 60 and meta["gamma"] == g and meta["sigma_rel"] == gamma_to_sigma_rel(g)
    assert int(load_file(path)["n"]) == 60


def test_inspect_prints_snapshots_and_error_grid(snaps, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    png = tmp_path / "err.png"
    assert main(["inspect", str(snaps), "--grid", "7", "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert f"12 snapshots in {snaps}" in text
    assert "ema-g6.94-0000000120.safetensors" in text
    grid_lines = text.split("reconstruction error")[1].split("\n\n")[0].strip().splitlines()[3:]
    # the 7 grid points (0.05 = 0.01 * 25 ** (3/6) is one of them) and the tracked width 0.10
    assert len(grid_lines) == 8 and grid_lines[0].startswith("0.0100") and grid_lines[-1].startswith("0.2500")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_grid_holds_each_tracked_width_with_zero_error(snaps, capsys) -> None:
    assert main(["inspect", str(snaps), "--grid", "5"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.split("reconstruction error")[1].splitlines()]
    tracked = [r for r in rows if r and r[-1] == "*"]
    assert [float(r[0]) for r in tracked] == [0.05, 0.10]
    # a tracked width is reproduced by its own snapshot: the profile error is 0 up to rounding
    # of the float64 least-squares solve (cond ~1e3 here, so a few 1e-13 at most)
    assert all(float(r[2]) < 1e-10 for r in tracked)
    others = [float(r[2]) for r in rows if len(r) == 4 and r[2] != "error" and not r[0].startswith("-")]
    assert min(others) > 1e-6  # off the tracked widths the fit is not exact, so the dip is visible


def test_inspect_without_matplotlib_says_how_to_install(snaps, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["inspect", str(snaps), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["funcema: error: --plot needs matplotlib: pip install funcema[plot]"]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["synthesize", "{missing}", "--sigma-rel", "0.1", "--out", "{tmp}/o"], "does not exist"),
        (["synthesize", "{snaps}", "--out", "{tmp}/o"], "one of the arguments --sigma-rel --gamma is required"),
        (["synthesize", "{snaps}", "--sigma-rel", "0.1", "--gamma", "3", "--out", "{tmp}/o"], "not allowed with"),
        (["synthesize", "{snaps}", "--sigma-rel", "0.5", "--out", "{tmp}/o"], "sigma_rel must be in"),
        (
            ["synthesize", "{snaps}", "--sigma-rel", "0.1", "--step", "7", "--out", "{tmp}/o"],
            "step=7 is not a snapshot",
        ),
        (["synthesize", "{snaps}", "--sigma-rel", "x", "--out", "{tmp}/o"], "invalid float value"),
        (["inspect", "{snaps}", "--grid", "0"], "--grid must be >= 1"),
        (["inspect", "{snaps}", "--step", "7"], "--step 7 is not a snapshot time"),
        (["inspect", "{tmp}"], "no funcema snapshots"),
        (["frobnicate"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_errors_exit_2_with_one_line(snaps, tmp_path, capsys, argv, match) -> None:
    argv = [a.format(missing=tmp_path / "nope", snaps=snaps, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("funcema: error: ") and match in lines[0]
    assert "Traceback" not in captured.err


def test_warnings_are_one_line_each(snaps, tmp_path, capsys) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for p in snaps.glob("*.safetensors"):
        (d / p.name).write_bytes(p.read_bytes())
    (d / "notes.txt").write_text("x")
    assert main(["inspect", str(d), "--grid", "2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"funcema: warning: ignoring {d / 'notes.txt'}: not a funcema snapshot (.safetensors) file."]


def test_help_returns_zero(capsys) -> None:
    assert main(["--help"]) == 0
    assert "synthesize" in capsys.readouterr().out


def test_python_dash_m_entry_point_exists() -> None:
    import funcema.__main__  # noqa: F401  (importing does not run main: guarded by __name__)


@pytest.mark.parametrize(
    "damage",
    [
        dict(raw_meta="[1]"),
        dict(raw_meta='{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        dict(edit_meta=lambda m: m.update(step=1e400)),
        dict(edit_meta=lambda m: m.update(version=[1])),
        dict(edit_meta=lambda m: m.update(gamma="6.94")),
    ],
    ids=["not-an-object", "deep-nesting", "step-1e400", "version-a-list", "gamma-a-string"],
)
def test_damaged_snapshots_give_one_line_and_exit_2(snaps, tmp_path, capsys, damage) -> None:
    from tests.conftest import rewrite_safetensors

    d = tmp_path / "d"
    d.mkdir()
    for p in snaps.glob("*.safetensors"):
        (d / p.name).write_bytes(p.read_bytes())
    victim = d / "ema-g6.94-0000000060.safetensors"
    rewrite_safetensors(victim, **damage)
    for argv in (["inspect", str(d)], ["synthesize", str(d), "--sigma-rel", "0.08", "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and victim.name in lines[0] and "Traceback" not in captured.err
    # the explicit opt-in skips it and lists it
    assert main(["inspect", str(d), "--skip-invalid", "--grid", "2"]) == 0
    assert "skipped 1 files" in capsys.readouterr().out


def test_an_unexpected_error_is_one_line_too(snaps, capsys, monkeypatch) -> None:
    from funcema.posthoc import _files

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(_files, "read_header", broken)
    assert main(["inspect", str(snaps)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["funcema: error: RuntimeError: something unexpected"]
