"""The eager update's shortcuts change no result and lose no error.

They are: a flat dict (the EMA's and the parameters') read by key instead of flattened; the
layout check of parameters that match the last accepted ones by a C++ guard
(`_tree._fast_check`); the new EMA of an in-place update as a copy of the state's dict.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections import OrderedDict

import pytest
import torch

import funcema as fe
from funcema import _tree, schedules
from tests.conftest import decay_rule, reference_ema


def _params(n: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    # Insertion order differs from sorted order, so the key-order gather is really a permutation.
    return {f"layer{(7 * i) % n}.w": torch.randn(4, generator=gen) for i in range(n)}


@pytest.mark.parametrize("donate", [False, True])
def test_repeated_updates_match_the_reference(donate):
    params = _params()
    state = fe.init(params, schedule=schedules.constant(0.75))
    seen = []
    for step in range(5):
        p = {k: v + step for k, v in params.items()}
        seen.append(p)
        state = fe.update(state, p, donate=donate)
    for k, v in reference_ema(params, seen, decay_rule(lambda u: 0.75)).items():
        # float32 lerp vs a float64 reference: a few ulps over 5 steps of values below 10.
        torch.testing.assert_close(state.ema[k], v.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("donate", [False, True])
def test_a_replaced_ema_entry_is_used(donate):
    params = _params()
    state = fe.update(fe.init(params, schedule=schedules.constant(0.5)), params, donate=donate)
    key = next(iter(params))
    state.ema[key] = torch.full((4,), 8.0)  # mutate the returned tree: the remembered leaves are stale
    state = fe.update(state, {k: torch.zeros(4) for k in params}, donate=donate)
    torch.testing.assert_close(state.ema[key], torch.full((4,), 4.0))


def test_any_key_order_and_mapping_type_matches_by_key():
    params = _params()
    state = fe.init(params, schedule=schedules.constant(0.5))
    reordered = OrderedDict(sorted(params.items(), reverse=True))
    a = fe.update(state, {k: v + 1 for k, v in params.items()})
    b = fe.update(state, OrderedDict((k, v + 1) for k, v in reordered.items()))
    for k in params:
        assert torch.equal(a.ema[k], b.ema[k])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda p, k: p.__setitem__(k, None), ValueError, "missing paths"),
        (lambda p, k: p.__setitem__(k, 3.0), TypeError, "is a float"),
        (lambda p, k: p.__setitem__(k, torch.zeros(5)), ValueError, "has shape"),
        (lambda p, k: p.__setitem__(k, torch.zeros(4, dtype=torch.int32)), ValueError, "dtype"),
        (lambda p, k: setattr(p[k], "data", torch.zeros(4, 1)), ValueError, "has shape"),
    ],
)
def test_a_changed_leaf_is_rejected_by_path_and_changes_nothing(change, error, match):
    params = _params()
    state = fe.update(fe.init(params, schedule=schedules.constant(0.5)), params)  # warm the shortcuts
    state = fe.update(state, params)
    before = {k: v.clone() for k, v in state.ema.items()}
    bad = {k: v.clone() for k, v in params.items()}
    key = sorted(params)[3]
    change(bad, key)
    with pytest.raises(error, match=match) as info:
        fe.update(state, bad, donate=True)
    assert key in str(info.value)  # the error names the leaf's path
    assert int(state.step) == 2
    for k, v in before.items():
        assert torch.equal(state.ema[k], v)


def test_remembered_leaves_do_not_keep_a_dropped_state_alive():
    params = _params()
    state = fe.update(fe.init(params), params)
    leaf = weakref.ref(next(iter(state.ema.values())))
    del state
    gc.collect()
    assert leaf() is None


def _guard_of(state: fe.EmaState) -> object:
    """The layout guard the fast check keeps for this state's configuration (`None` if none)."""
    layout = _tree._LAYOUTS.get(id(state.config.param_dtypes))
    return None if layout is None or layout.key is not state.config.param_dtypes else layout.guard


def _guarded_state(params: dict[str, torch.Tensor]) -> fe.EmaState:
    """A state whose next update takes the guard: two updates have built it and passed it."""
    state = fe.update(fe.update(fe.init(params, schedule=schedules.constant(0.5)), params), params)
    if _tree._TensorGuards is None:  # pragma: no cover - every torch 2.x build with dynamo has it
        pytest.skip("this torch build has no torch._C._dynamo.guards.TensorGuards: no guard to test")
    assert _guard_of(state) is not None
    return state


def _nested(shape: tuple[int, ...]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns (once) that the nested API is a prototype
        return torch.nested.nested_tensor([torch.zeros(shape)])


_PARAMETER_MISMATCHES = [
    ("missing key", lambda p, k: p.pop(k), ValueError, r"missing paths \['{k}'\], extra paths \[\]"),
    ("extra key", lambda p, k: p.__setitem__("zz.extra", torch.zeros(4)), ValueError, r"extra paths \['zz.extra'\]"),
    (
        "renamed key",
        lambda p, k: p.__setitem__(k + "x", p.pop(k)),
        ValueError,
        r"missing paths \['{k}'\], extra paths \['{k}x'\]",
    ),
    ("None", lambda p, k: p.__setitem__(k, None), ValueError, r"missing paths \['{k}'\]"),
    ("float", lambda p, k: p.__setitem__(k, 3.0), TypeError, r"'{k}' is a float"),
    ("module", lambda p, k: p.__setitem__(k, torch.nn.Linear(2, 2)), TypeError, r"'{k}' is a Linear \(an nn.Module\)"),
    ("shape", lambda p, k: p.__setitem__(k, torch.zeros(5)), ValueError, r"'{k}' has shape \(5,\), expected \(4,\)"),
    ("broadcastable shape", lambda p, k: p.__setitem__(k, torch.zeros(1, 4)), ValueError, r"'{k}' has shape \(1, 4\)"),
    (
        "scalar shape",
        lambda p, k: p.__setitem__(k, torch.zeros(())),
        ValueError,
        r"'{k}' has shape \(\), expected \(4,\)",
    ),
    (
        "dtype kind",
        lambda p, k: p.__setitem__(k, torch.zeros(4, dtype=torch.int32)),
        ValueError,
        r"'{k}' has dtype torch.int32",
    ),
    ("device", lambda p, k: p.__setitem__(k, torch.zeros(4, device="meta")), ValueError, r"'{k}' is on device meta"),
    (
        "sparse",
        lambda p, k: p.__setitem__(k, torch.zeros(4).to_sparse()),
        TypeError,
        r"'{k}' is a torch.sparse_coo tensor",
    ),
    ("nested", lambda p, k: p.__setitem__(k, _nested((4,))), TypeError, r"'{k}' is a nested tensor"),
    ("resized in place", lambda p, k: p[k].resize_(2, 2), ValueError, r"'{k}' has shape \(2, 2\)"),
    (
        "shape changed via .data",
        lambda p, k: setattr(p[k], "data", torch.zeros(4, 1)),
        ValueError,
        r"'{k}' has shape \(4, 1\)",
    ),
    (
        "dtype changed via .data",
        lambda p, k: setattr(p[k], "data", torch.zeros(4, dtype=torch.int64)),
        ValueError,
        r"'{k}' has dtype torch.int64",
    ),
]


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize(
    ("change", "error", "match"), [m[1:] for m in _PARAMETER_MISMATCHES], ids=[m[0] for m in _PARAMETER_MISMATCHES]
)
def test_each_mismatch_raises_through_the_guarded_path_and_changes_nothing(change, error, match, donate):
    """With the guard built and passing, every mismatch still gets its path-named error, and the
    rejected call leaves the state live and bit-identical."""
    params = _params()
    state = _guarded_state(params)
    before = {k: v.clone() for k, v in state.ema.items()}
    bad = {k: v.clone() for k, v in params.items()}
    key = sorted(params)[3]
    change(bad, key)
    with pytest.raises(error, match=match.format(k=key)):
        fe.update(state, bad, donate=donate)
    assert int(state.step) == 2  # still live
    assert all(torch.equal(state.ema[k], v) for k, v in before.items())
    state = fe.update(state, params, donate=donate)  # and the guard still serves the good tree
    assert int(state.step) == 3


def test_a_consumed_state_is_refused_through_the_guarded_path():
    params = _params()
    state = _guarded_state(params)
    fe.update(state, params, donate=True)
    with pytest.raises(ValueError, match="consumed"):
        fe.update(state, params, donate=True)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.requires_grad_(True),  # another requires_grad
        lambda p: torch.nn.Parameter(p),  # another type
        lambda p: torch.full((4, 2), 2.0)[:, 1],  # other strides, the same shape
        lambda p: torch.full((5,), 2.0)[1:],  # a storage offset
        lambda p: p.double(),  # another dtype of the same kind: converted
    ],
    ids=["requires_grad", "Parameter", "strided view", "offset view", "float64"],
)
def test_an_accepted_change_of_layout_takes_the_comparisons_and_matches(change):
    """A leaf the guard does not know but the per-leaf rules accept is averaged as before."""
    params = _params()
    state = _guarded_state(params)
    key = sorted(params)[2]
    changed = dict(params)
    changed[key] = change(torch.full((4,), 2.0))
    expected = {k: torch.lerp(v, changed[k].float(), 0.5) for k, v in state.ema.items()}
    for donate in (False, True):
        new = fe.update(state, changed, donate=donate)
        assert all(torch.equal(new.ema[k], v) for k, v in expected.items())
        if donate:
            break
        assert _guard_of(new) is not None  # rebuilt from the accepted leaves


def test_the_guard_never_accepts_what_the_comparisons_reject():
    """For leaves of every kind, the guarded fast check answers what the comparisons answer."""
    base = [torch.zeros(4), torch.zeros(2, 3), torch.zeros(()), torch.zeros(4)]
    dtypes = tuple(t.dtype for t in base)
    layout = _tree._reference_layout(base, dtypes)
    a, b, c, d = base
    variants = {
        "same": base,
        "copies": [t.clone() for t in base],
        "shape": [torch.zeros(5), b, c, d],
        "transposed": [a, torch.zeros(3, 2).t(), c, d],
        "one element": [a, b, torch.zeros(1), d],
        "dtype": [a.double(), b, c, d],
        "device": [a, torch.zeros(2, 3, device="meta"), c, d],
        "sparse": [a.to_sparse(), b, c, d],
        "nested": [a, b, c, _nested((4,))],
        "parameter": [torch.nn.Parameter(a), b, c, d],
        "requires grad": [a, b, torch.zeros((), requires_grad=True), d],
        "conjugate view": [torch.zeros(4, dtype=torch.complex64).conj(), b, c, d],
        "one tensor twice": [a, b, c, a],
    }
    for name, leaves in variants.items():
        assert _tree._fast_check(base, base, dtypes)  # (re)build the guard from the base leaves
        if _tree._TensorGuards is not None:
            assert layout.guard is not None or layout.builds >= _tree._GUARD_BUILDS_MAX
        layout.builds = 0
        fresh = _tree._Layout(dtypes, layout.sizes, layout.devices)  # no guard: the comparisons alone
        assert _tree._fast_check(leaves, base, dtypes) == _tree._compare_layout(leaves, fresh), name


def test_tied_parameters_get_no_guard_and_still_match():
    """One tensor under two paths can never pass a guard (it wants distinct objects): none is kept."""
    shared = torch.randn(4)
    params = {"a": shared, "b": torch.randn(4), "c": shared}
    state = fe.init(params, schedule=schedules.constant(0.5))
    for _ in range(3):
        state = fe.update(state, params, donate=True)
    assert _guard_of(state) is None
    torch.testing.assert_close(state.ema["a"], shared)


def test_without_a_guard_the_comparisons_serve(monkeypatch):
    """A torch without dynamo's TensorGuards (or with another signature) loses only the shortcut."""

    def broken(*args, **kwargs):
        raise TypeError("changed signature")

    for replacement in (None, broken):
        monkeypatch.setattr(_tree, "_TensorGuards", replacement)
        params = _params()
        state = fe.update(fe.update(fe.init(params, schedule=schedules.constant(0.5)), params), params)
        assert _guard_of(state) is None
        bad = dict(params, **{sorted(params)[0]: torch.zeros(1, 4)})
        with pytest.raises(ValueError, match="has shape"):
            fe.update(state, bad, donate=True)
        state = fe.update(state, {k: v + 1 for k, v in params.items()}, donate=True)
        torch.testing.assert_close(state.ema[sorted(params)[0]], params[sorted(params)[0]] + 0.5)


def test_the_guard_keeps_no_parameter_alive():
    params = _params()
    state = _guarded_state(params)
    leaf = weakref.ref(params[sorted(params)[0]])
    del params
    gc.collect()
    assert leaf() is None
    assert int(state.step) == 2


def test_inference_mode_takes_the_comparisons_and_matches():
    """Under `torch.inference_mode` the dispatch state differs, so the guard fails: the comparisons accept."""
    params = _params()
    state = _guarded_state(params)
    with torch.inference_mode():
        inner = {k: v + 1 for k, v in params.items()}
        state = fe.update(state, inner)
    state = fe.update(state, params)
    assert int(state.step) == 4


@pytest.mark.parametrize("kind", [dict, OrderedDict])
def test_an_in_place_update_copies_the_dict_not_the_tensors(kind):
    params = kind(_params())
    state = fe.update(fe.init(params, schedule=schedules.constant(0.5)), params)
    old_ema, old_leaves = state.ema, dict(state.ema)
    new = fe.update(state, params, donate=True)
    assert type(new.ema) is kind and new.ema is not old_ema
    assert list(new.ema) == list(old_ema)
    assert all(new.ema[k] is v for k, v in old_leaves.items())  # written in place
    assert all(old_ema[k] is v for k, v in old_leaves.items())  # the consumed state's dict is unchanged
    pure = fe.update(new, params)
    assert type(pure.ema) is kind and list(pure.ema) == list(old_ema)
    assert not any(pure.ema[k] is v for k, v in new.ema.items())


@pytest.mark.parametrize("donate", [False, True])
def test_a_replaced_leaf_of_a_nested_ema_is_used(donate):
    """Only a flat dict's values are read by key: a nested tree is flattened, so a replaced inner leaf counts."""
    params = {"enc": {"w": torch.zeros(4), "b": torch.zeros(2)}}
    state = fe.update(fe.init(params, schedule=schedules.constant(0.5)), params, donate=donate)
    state.ema["enc"]["w"] = torch.full((4,), 8.0)
    state = fe.update(state, params, donate=donate)
    torch.testing.assert_close(state.ema["enc"]["w"], torch.full((4,), 4.0))
