"""Bad input gets a clear error naming the argument or the leaf path, and nothing changes."""

from __future__ import annotations

import optree
import pytest
import torch

import funcema as fe
from funcema import schedules
from tests.conftest import assert_trees_equal


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: schedules.constant(1.5), ValueError, "decay"),
        (lambda: schedules.constant(-0.1), ValueError, "decay"),
        (lambda: schedules.power(sigma_rel=0.5), ValueError, "sigma_rel"),
        (lambda: schedules.power(sigma_rel=0.0), ValueError, "sigma_rel"),
        (lambda: schedules.power(gamma=-0.5), ValueError, "gamma"),
        (lambda: schedules.power(), ValueError, "gamma"),
        (lambda: schedules.power(gamma=1.0, sigma_rel=0.1), ValueError, "sigma_rel"),
        (lambda: fe.init({"x": torch.ones(1)}, every=0), ValueError, "every"),
        (lambda: fe.init({"x": torch.ones(1)}, after=-1), ValueError, "after"),
        (lambda: fe.init({"x": torch.ones(1)}, every=1.5), TypeError, "every"),
        (lambda: fe.init({"x": torch.ones(1)}, on_nonfinite="ignore"), ValueError, "on_nonfinite"),
        (lambda: fe.init({"x": torch.ones(1)}, dtype=torch.int32), ValueError, "dtype"),
        (lambda: fe.init({"x": torch.ones(1)}, schedule=0.999), TypeError, "schedule"),
        (lambda: fe.init({"x": torch.ones(1)}, debias=1), TypeError, "debias"),
        (lambda: fe.init({"x": {"y": 1.0}}), TypeError, "'x.y'"),
        (lambda: fe.init({"x": torch.ones(1), "y": [3]}), TypeError, "'y.0'"),
    ],
)
def test_invalid_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def make_state():
    params = {"enc": {"w": torch.randn(3, 2), "b": torch.zeros(2)}, "n": torch.tensor(0)}
    state = fe.init(params, schedule=schedules.warmup(), debias=True)
    return fe.update(state, params), params


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda p: {"enc": {"w": p["enc"]["w"]}, "n": p["n"]}, ValueError, r"missing paths \['enc\.b'\]"),
        (lambda p: {**p, "extra": torch.ones(1)}, ValueError, r"extra paths \['extra'\]"),
        (lambda p: {"enc": {"w": torch.ones(2, 3), "b": p["enc"]["b"]}, "n": p["n"]}, ValueError, r"'enc\.w' has shape \(2, 3\)"),
        (lambda p: {"enc": p["enc"], "n": torch.tensor(0.5)}, ValueError, r"'n' has dtype torch\.float32"),
        (lambda p: {"enc": {"w": p["enc"]["w"], "b": torch.zeros(2, dtype=torch.int64)}, "n": p["n"]}, ValueError, "'enc.b'"),
        (lambda p: {"enc": {"w": p["enc"]["w"], "b": torch.zeros(2, device="meta")}, "n": p["n"]}, ValueError, "'enc.b' is on device meta"),
        (lambda p: {"enc": {"w": p["enc"]["w"], "b": 0.0}, "n": p["n"]}, TypeError, "'enc.b'"),
        (lambda p: [p["enc"]["w"], p["enc"]["b"], p["n"]], ValueError, "missing paths"),
    ],
)
def test_rejected_update_changes_nothing(mutate, exc, match, donate):
    state, params = make_state()
    before = optree.tree_map(torch.clone, state.ema)
    step, log_a = state.step.clone(), state.log_decay_product.clone()
    with pytest.raises(exc, match=match):
        fe.update(state, mutate(params), donate=donate)
    assert_trees_equal(state.ema, before)
    assert torch.equal(state.step, step) and torch.equal(state.log_decay_product, log_a)
    fe.update(state, params)  # still usable


def test_structure_error_never_prints_tensor_values():
    state, params = make_state()
    marker = torch.full((2,), 123456.0)
    with pytest.raises(ValueError) as info:
        fe.update(state, {"other": marker})
    assert "123456" not in str(info.value) and "tensor(" not in str(info.value)


def test_update_rejects_non_state():
    with pytest.raises(TypeError, match="state"):
        fe.update({"x": torch.ones(1)}, {"x": torch.ones(1)})


def test_duplicate_dotted_paths_are_rejected():
    with pytest.raises(ValueError, match="'a.b'"):
        fe.init({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}})


def test_load_rejects_other_trees_and_bad_files(tmp_path):
    state, params = make_state()
    path = fe.save(state, tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="paths only in the file"):
        fe.load(path, like={"enc": {"w": torch.ones(3, 2)}})
    with pytest.raises(FileNotFoundError, match="cannot read .*missing.safetensors: No such file"):
        fe.load(tmp_path / "missing.safetensors", like=params)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="t.safetensors"):
        fe.load(truncated, like=params)
    pickled = tmp_path / "p.safetensors"
    torch.save({"x": torch.ones(1)}, pickled)
    with pytest.raises(ValueError, match="p.safetensors"):
        fe.load(pickled, like=params)


def test_integer_maximum_is_inclusive_and_named():
    from funcema._validate import integer

    assert integer("seed", 2**63 - 1, minimum=0, maximum=2**63 - 1) == 2**63 - 1
    with pytest.raises(ValueError, match=r"^seed must be <= 9223372036854775807, got 9223372036854775808\.$"):
        integer("seed", 2**63, minimum=0, maximum=2**63 - 1)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32])
def test_floating_dtype_refuses_dtypes_without_a_lerp_kernel(dtype):
    from funcema._validate import floating_dtype

    with pytest.raises(ValueError, match=r"^dtype must be None or one of float16, bfloat16, float32, float64"):
        floating_dtype("dtype", dtype, complex_ok=True)
