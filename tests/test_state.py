"""Tests for funcema._state: the state pytree, its fields, and the one configuration builder."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch
from safetensors import safe_open

import funcema as fe
from funcema import _state, schedules
from tests.conftest import trees


def test_state_is_a_pytree_with_static_config():
    state = fe.init({"x": torch.ones(2)}, schedule=schedules.power(sigma_rel=0.1), every=4)
    leaves, spec = optree.tree_flatten(state, namespace="funcema")
    assert len(leaves) == 4 and all(isinstance(x, torch.Tensor) for x in leaves)
    rebuilt = optree.tree_unflatten(spec, leaves)
    assert rebuilt.config == state.config and hash(rebuilt.config) == hash(state.config)
    moved = optree.tree_map(lambda t: t.clone(), state, namespace="funcema")
    assert isinstance(moved, fe.EmaState) and moved.config is state.config
    assert state.step.dtype == torch.int64 and state.step.device.type == "cpu" and state.step.dim() == 0


def test_repr_is_a_short_summary_for_any_model():
    # thousands of leaves of several dtypes: the repr counts them, never lists them
    params = {f"block{i}.{kind}": torch.zeros(16, dtype=dtype) for i in range(3000) for kind, dtype in
              (("w", torch.bfloat16), ("b", torch.float64), ("n", torch.int64))}
    state = fe.update(fe.init(params, schedule=schedules.power(sigma_rel=0.05), debias=True), params)
    text, config_text = repr(state), repr(state.config)
    assert len(text) < 300 and len(config_text) < 300, (text, config_text)
    assert "step=1" in text and "leaves=9000" in text and "numel=144.0k" in text
    assert "dtypes=[float32, float64, int64]" in text and "Power(" in text
    assert "leaves=9000" in config_text and "averaged=6000" in config_text and "debias=True" in config_text
    fe.update(state, params, donate=True)
    assert "step=consumed" in repr(state)


def test_the_field_list_is_the_state():
    # FIELDS drives saving, loading and the pytree registration: it must name every tensor
    # field of EmaState, in order, with the dtype and place each field has.
    assert [f.name for f in _state.FIELDS] == [n for n in fe.EmaState._fields if n != "config"]
    state = fe.init({"x": torch.ones(2)}, compensated=True)
    for f in _state.SCALAR_FIELDS:
        value = getattr(state, f.name)
        assert value.dtype == f.dtype and value.shape == () and (not f.host or value.device.type == "cpu")
    assert [f.name for f in _state.tree_fields(state.config)] == ["ema", "compensation"]
    assert [f.name for f in _state.tree_fields({"compensated": "yes"})] == ["ema"]  # a header says True or nothing


OPTIONS = [
    {},
    {"compensated": True},
    {"debias": True, "on_nonfinite": "skip", "every": 3, "after": 2},
    {"dtype": torch.bfloat16, "seed": 7, "schedule": schedules.power(sigma_rel=0.1)},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_a_file_holds_exactly_the_fields_of_the_state(tmp_path, options: dict[str, Any]):
    params = trees()["mixed-dtypes"]
    state = fe.update(fe.init(params, **options), params)
    path = fe.save(state, tmp_path / "ema.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys == _state.state_keys(state.config.paths, state.config)
    trees_saved = {"ema", "compensation"} if options.get("compensated") else {"ema"}
    assert keys == {f"{name}/{p}" for name in trees_saved for p in params} | {"step", "log_decay_product", "nonfinite_count"}


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_load_builds_the_configuration_init_builds(tmp_path, options: dict[str, Any]):
    params = trees()["mixed-dtypes"]
    state = fe.init(params, **options)
    loaded = fe.load(fe.save(state, tmp_path / "ema.safetensors"), like=params)
    assert loaded.config == state.config and loaded.config.groups == state.config.groups
    assert loaded.config.key == state.config.key  # equal configurations share one key...
    assert _state.config_by_key(state.config.key) == state.config  # ...by which compiled code finds them


def test_scalars_live_on_the_host_unless_the_skip_is_decided_on_the_device():
    meta = [torch.empty(3, device="meta")]
    plain = fe.init({"w": torch.ones(3)}).config
    skip = fe.init({"w": torch.ones(3)}, on_nonfinite="skip").config
    assert _state.scalar_device(plain, meta).type == "cpu"
    assert _state.scalar_device(skip, meta).type == "meta"  # beside the EMA: no update reads it
    assert _state.scalar_device(skip, []).type == "cpu"  # an empty tree has no device of its own
