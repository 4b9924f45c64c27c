"""The eager update's shortcuts (remembered EMA leaves, flat-dict gather) change no result and lose no error."""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict

import pytest
import torch

import funcema as fe
from funcema import schedules
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
