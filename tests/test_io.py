"""fe.save / fe.load: exact round trip, resume is bit-identical, no pickle."""

from __future__ import annotations

import json

import optree
import pytest
import torch
from safetensors import safe_open

import funcema as fe
from funcema import schedules
from tests.conftest import assert_trees_equal, perturb, trees


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(schedule=schedules.power(sigma_rel=0.05), every=3),
        dict(schedule=schedules.warmup(inv_gamma=2.0), debias=True, after=2),
        dict(schedule=schedules.halflife(10, rampup=0.1), dtype=torch.bfloat16, seed=7),
        dict(schedule=schedules.litema(0.999), on_nonfinite="skip", average=lambda p, t: "bf16" not in p),
    ],
)
def test_resume_after_load_is_bit_identical(kwargs, tmp_path):
    params = trees()["mixed-dtypes"]
    uninterrupted = fe.init(params, **kwargs)
    for i in range(7):
        uninterrupted = fe.update(uninterrupted, perturb(params, seed=i))
    saved = uninterrupted
    path = fe.save(saved, tmp_path / "ema.safetensors")
    resumed = fe.load(path, like=params)
    assert resumed.config == saved.config
    assert torch.equal(resumed.step, saved.step)
    assert torch.equal(resumed.log_decay_product, saved.log_decay_product)
    assert torch.equal(resumed.nonfinite_count, saved.nonfinite_count)
    for i in range(7, 15):
        uninterrupted = fe.update(uninterrupted, perturb(params, seed=i))
        resumed = fe.update(resumed, perturb(params, seed=i))
    assert_trees_equal(resumed.ema, uninterrupted.ema)


def test_file_is_plain_safetensors_with_json_config(tmp_path):
    state = fe.init({"w": torch.ones(2)}, schedule=schedules.constant(0.99), every=2)
    path = fe.save(state, tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["funcema"])
        assert set(f.keys()) == {"ema/w", "step", "log_decay_product", "nonfinite_count"}
    assert header["schedule"] == {"name": "constant", "decay": 0.99} and header["every"] == 2
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_load_like_a_state_and_onto_its_devices(tmp_path):
    params = {"a": torch.randn(3), "b": [torch.randn(2), None]}
    state = fe.update(fe.init(params), perturb(params))
    loaded = fe.load(fe.save(state, tmp_path / "s.safetensors"), like=state)
    assert_trees_equal(loaded.ema, state.ema)
    assert optree.tree_structure(loaded.ema) == optree.tree_structure(state.ema)


def test_save_rejects_a_donated_state(tmp_path):
    state = fe.init({"w": torch.ones(2)})
    fe.update(state, {"w": torch.ones(2)}, donate=True)
    with pytest.raises(ValueError, match="donate"):
        fe.save(state, tmp_path / "s.safetensors")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from funcema import _format

    path = fe.save(fe.init({"w": torch.ones(2)}), tmp_path / "s.safetensors")
    before = path.read_bytes()

    def boom(f, leaf):
        raise OSError("disk full")

    monkeypatch.setattr(_format, "_write_tensor", boom)
    with pytest.raises(OSError, match="disk full"):
        fe.save(fe.init({"w": torch.zeros(2)}), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
