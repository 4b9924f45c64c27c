"""Property-based fuzzing of init / update / swap / save / load with hypothesis.

Generated inputs: pytrees nesting dicts, lists, tuples and NamedTuples with ``None`` holes and
empty containers; leaves of dtype float16 / bfloat16 / float32 / float64 / int64 / bool /
complex64, of shapes including 0-d and 0-size, contiguous, transposed, sliced (non-dense) or
channels-last; random configurations (schedule, every, after, debias, dtype, on_nonfinite,
``average`` predicate). Every call either works and satisfies the identities of DESIGN.md, or
raises ``ValueError`` / ``TypeError`` / ``FloatingPointError`` with a message naming the argument
or the leaf path, and leaves the state bit-identical.

The number of examples is bounded so the file runs in well under a minute on 2 CPU cores;
``EXAMPLES`` counts the examples actually run (reported in docs/reliability.md).
"""

from __future__ import annotations

import collections
import os
import tempfile
import threading
from typing import Any, NamedTuple

import optree
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import funcema as fe
from funcema import schedules
from tests.conftest import bit_equal, trees_bit_equal

ALLOWED = (ValueError, TypeError, FloatingPointError)
EXAMPLES: collections.Counter[str] = collections.Counter()
SETTINGS = dict(
    deadline=None,
    database=None,  # no example database in the repository: every run draws fresh examples
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ARG_NAMES = (
    "params",
    "like",
    "state",
    "schedule",
    "every",
    "after",
    "debias",
    "dtype",
    "average",
    "on_nonfinite",
    "seed",
)


class Pair(NamedTuple):
    first: Any
    second: Any


# ---------------------------------------------------------------------------------------------
# Strategies


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool, torch.complex64]
SHAPES = [(), (0,), (3,), (2, 3), (3, 0), (2, 3, 4), (2, 3, 2, 2), (1, 1)]
LAYOUTS = ["contiguous", "transposed", "sliced", "channels_last"]


class LeafSpec(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: str
    seed: int


leaf_specs = st.builds(
    LeafSpec,
    st.sampled_from(DTYPES),
    st.sampled_from(SHAPES),
    st.sampled_from(LAYOUTS),
    st.integers(0, 2**16),
)
keys = st.sampled_from(["a", "b", "w", "bias", "x1", "norm"])


def containers(children):
    return st.one_of(
        st.dictionaries(keys, children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Pair, children, children),
    )


spec_trees = st.recursive(st.one_of(leaf_specs, st.none()), containers, max_leaves=6)


def is_spec(x: Any) -> bool:
    return isinstance(x, LeafSpec)


def make_leaf(spec: LeafSpec, step: int, scale: float = 1.0) -> torch.Tensor:
    """A tensor of ``spec`` whose values depend on ``step`` (a random walk of the seed)."""
    gen = torch.Generator().manual_seed(spec.seed * 1000 + step)
    shape = spec.shape
    layout = spec.layout
    if layout == "transposed" and len(shape) >= 2:
        base_shape = (shape[1], shape[0], *shape[2:])
    elif layout == "sliced" and len(shape) >= 1:
        base_shape = (shape[0] * 2, *shape[1:])
    else:
        base_shape = shape
    if spec.dtype == torch.bool:
        base = torch.rand(base_shape, generator=gen) > 0.5
    elif spec.dtype == torch.int64:
        base = torch.randint(-5, 5, base_shape, generator=gen)
    elif spec.dtype.is_complex:
        base = (torch.randn(base_shape, generator=gen, dtype=torch.complex64) * scale).to(spec.dtype)
    else:
        base = (torch.randn(base_shape, generator=gen, dtype=torch.float64) * scale).to(spec.dtype)
    if layout == "transposed" and len(shape) >= 2:
        out = base.transpose(0, 1)
    elif layout == "sliced" and len(shape) >= 1:
        out = base[::2]
    elif layout == "channels_last" and len(shape) == 4:
        out = base.contiguous(memory_format=torch.channels_last)
    else:
        out = base
    assert tuple(out.shape) == shape
    return out


def materialize(tree: Any, step: int, constant: bool = False) -> Any:
    return optree.tree_map(lambda s: make_leaf(s, 0 if constant else step), tree, is_leaf=is_spec, none_is_leaf=False)


def schedules_strategy():
    return st.one_of(
        st.floats(0.0, 1.0).map(schedules.constant),
        st.builds(
            lambda m, g, p: schedules.warmup(max_decay=m, inv_gamma=g, power=p),
            st.floats(0.5, 0.9999),
            st.floats(0.1, 10.0),
            st.floats(0.1, 1.0),
        ),
        st.floats(0.5, 0.9999).map(schedules.litema),
        st.floats(0.0, 20.0).map(lambda g: schedules.power(gamma=g)),
        st.builds(
            lambda h, r: schedules.halflife(h, rampup=r),
            st.floats(0.5, 100.0),
            st.one_of(st.none(), st.floats(0.05, 1.0)),
        ),
    )


def _reject_b(path: str, tensor: torch.Tensor) -> bool:
    return "b" not in path


def _reject_all(path: str, tensor: torch.Tensor) -> bool:
    return False


configs = st.fixed_dictionaries(
    {
        "schedule": schedules_strategy(),
        "every": st.integers(1, 4),
        "after": st.integers(0, 3),
        "debias": st.booleans(),
        "dtype": st.sampled_from([None, torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]),
        "on_nonfinite": st.sampled_from(["propagate", "skip", "raise"]),
        "average": st.sampled_from([None, _reject_b, _reject_all]),
    }
)


# ---------------------------------------------------------------------------------------------
# Helpers


def snapshot_state(state: fe.EmaState) -> tuple:
    """Clones of every tensor of a state, to compare after a call."""
    leaves = [x.clone() for x in optree.tree_leaves(state.ema)]
    return leaves, state.step.clone(), state.log_decay_product.clone(), state.nonfinite_count.clone()


def state_unchanged(state: fe.EmaState, before: tuple) -> bool:
    leaves, step, log_a, count = before
    now = optree.tree_leaves(state.ema)
    return (
        len(now) == len(leaves)
        and all(bit_equal(x, y) for x, y in zip(now, leaves))
        and bit_equal(state.step, step)
        and bit_equal(state.log_decay_product, log_a)
        and bit_equal(state.nonfinite_count, count)
    )


def states_equal(a: fe.EmaState, b: fe.EmaState) -> bool:
    return (
        trees_bit_equal(a.ema, b.ema)
        and bit_equal(a.step, b.step)
        and bit_equal(a.log_decay_product, b.log_decay_product)
        and bit_equal(a.nonfinite_count, b.nonfinite_count)
    )


def paths_of(tree: Any) -> list[str]:
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return [".".join(str(p) for p in path) if path else "<root>" for path in paths]


def check_error(err: BaseException, tree: Any) -> None:
    """An allowed error type, with a message naming an argument or a leaf path."""
    assert isinstance(err, ALLOWED), f"unexpected {type(err).__name__}: {err}"
    msg = str(err)
    names = [*ARG_NAMES, *paths_of(tree)]
    assert any(repr(n) in msg or n in msg for n in names), f"message names no argument or path: {msg!r}"


def expect_ok_or_allowed(fn, tree: Any):
    """Run ``fn``; return (True, result) or (False, error) for an allowed, well-named error."""
    try:
        return True, fn()
    except Exception as err:
        check_error(err, tree)
        return False, err


def has_nonfinite(tree: Any) -> bool:
    return any(
        (x.is_floating_point() or x.is_complex()) and x.numel() and not bool(torch.isfinite(x).all())
        for x in optree.tree_leaves(tree)
    )


# ---------------------------------------------------------------------------------------------
# Regression tests for bugs this file found (fixed)


def test_skip_keeps_the_dtype_of_a_0d_leaf():
    params = {"scale": torch.ones(()), "w": torch.ones(3)}
    state = fe.init(params, schedule=schedules.constant(0.5), on_nonfinite="skip")
    new = fe.update(state, {"scale": torch.zeros(()), "w": torch.zeros(3)})
    assert new.ema["w"].dtype == torch.float32
    assert new.ema["scale"].dtype == torch.float32, new.ema["scale"].dtype


def test_skip_detects_a_donated_state():
    params = {"w": torch.ones(3)}
    state = fe.init(params, schedule=schedules.constant(0.5), on_nonfinite="skip")
    fe.update(state, params, donate=True)
    with pytest.raises(ValueError, match="donate"):
        fe.update(state, params)


# ---------------------------------------------------------------------------------------------
# The main property: init -> update x N (pure and donated) -> swap -> save / load -> resume


@settings(max_examples=300, **SETTINGS)
@given(spec=spec_trees, config=configs, steps=st.integers(1, 7), resume=st.integers(1, 3))
def test_lifecycle(spec, config, steps, resume):
    params0 = materialize(spec, 0)
    EXAMPLES["lifecycle"] += 1
    ok, pure = expect_ok_or_allowed(lambda: fe.init(params0, **config), params0)
    if not ok:
        EXAMPLES["lifecycle: init raised (allowed)"] += 1
        return
    donated = fe.init(params0, **config)
    assert states_equal(pure, donated)
    assert trees_bit_equal(params0, materialize(spec, 0))  # init changes nothing
    for step in range(1, steps + 1):
        params = materialize(spec, step)
        params_before = [x.clone() for x in optree.tree_leaves(params)]
        before = snapshot_state(pure)
        ok, new = expect_ok_or_allowed(lambda p=params, s=pure: fe.update(s, p), params)
        # donate=False never changes its inputs, bit for bit, whatever happened
        assert state_unchanged(pure, before)
        assert all(bit_equal(x, y) for x, y in zip(optree.tree_leaves(params), params_before))
        if not ok:
            assert config["on_nonfinite"] == "raise" and isinstance(new, FloatingPointError), new
            d_before = snapshot_state(donated)
            with pytest.raises(FloatingPointError):
                fe.update(donated, params, donate=True)
            assert state_unchanged(donated, d_before)
            EXAMPLES["lifecycle: update raised (allowed)"] += 1
            return
        old_donated = donated
        donated = fe.update(donated, params, donate=True)
        assert states_equal(new, donated), "pure and donated updates disagree"
        if config["on_nonfinite"] != "skip":  # known bug with "skip": see test_skip_detects_a_donated_state
            with pytest.raises(ValueError, match="donate"):
                fe.update(old_donated, params)  # the consumed state is detected
        pure = new
    assert int(pure.step) == steps

    # swap twice is the identity (no tensor copied)
    live = materialize(spec, steps)
    s1, evaluated = fe.swap(pure, live)
    s2, back = fe.swap(s1, evaluated)
    assert all(x is y for x, y in zip(optree.tree_leaves(back), optree.tree_leaves(live)))
    assert all(x is y for x, y in zip(optree.tree_leaves(s2.ema), optree.tree_leaves(pure.ema)))
    assert optree.tree_structure(evaluated) == optree.tree_structure(live)

    # save / load: bit-exact round trip, and resuming gives bit-identical results
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ema.safetensors")
        fe.save(pure, path)
        loaded = fe.load(path, like=pure)
        assert states_equal(loaded, pure)
        assert loaded.config == pure.config
        loaded_from_params = fe.load(path, like=params0)
        assert states_equal(loaded_from_params, pure)
        a, b = pure, loaded
        for step in range(steps + 1, steps + 1 + resume):
            params = materialize(spec, step)
            ok_a, a_new = expect_ok_or_allowed(lambda p=params, s=a: fe.update(s, p), params)
            ok_b, b_new = expect_ok_or_allowed(lambda p=params, s=b: fe.update(s, p), params)
            assert ok_a == ok_b
            if not ok_a:
                break
            a, b = a_new, b_new
            assert states_equal(a, b), "resuming from a loaded state diverged"
    EXAMPLES["lifecycle: full round trip"] += 1


@settings(max_examples=80, **SETTINGS)
@given(spec=spec_trees, config=configs, steps=st.integers(1, 8))
def test_constant_params_stay_constant_with_debias(spec, config, steps):
    """With debias=True a constant sequence stays exactly constant (when the EMA dtype holds the
    parameters exactly, i.e. no narrowing and hence no stochastic rounding)."""
    EXAMPLES["constant+debias"] += 1
    config = {**config, "debias": True, "on_nonfinite": "propagate"}
    params = materialize(spec, 0, constant=True)
    ok, state = expect_ok_or_allowed(lambda: fe.init(params, **config), params)
    if not ok:
        return
    for _ in range(steps):
        state = fe.update(state, materialize(spec, 0, constant=True))
    for e, p in zip(optree.tree_leaves(state.ema), optree.tree_leaves(params)):
        if e.dtype.is_complex != p.dtype.is_complex or (e.is_floating_point() and e.dtype.itemsize < p.dtype.itemsize):
            continue  # narrowing: stochastic rounding may legitimately move the value
        if e.dtype in (torch.bfloat16, torch.float16) and e.dtype != p.dtype:
            continue
        assert torch.equal(e, p.to(e.dtype)), "a constant sequence moved under debias=True"
    EXAMPLES["constant+debias: checked"] += 1


# ---------------------------------------------------------------------------------------------
# Non-finite inputs under each policy


@settings(max_examples=150, **SETTINGS)
@given(
    spec=spec_trees,
    config=configs,
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    which=st.integers(0, 100),
    at=st.integers(1, 4),
)
def test_nonfinite_policies(spec, config, bad, which, at):
    params0 = materialize(spec, 0)
    floating = [
        i for i, x in enumerate(optree.tree_leaves(params0)) if (x.is_floating_point() or x.is_complex()) and x.numel()
    ]
    assume(floating)
    ok, state = expect_ok_or_allowed(lambda: fe.init(params0, **config), params0)
    if not ok:
        return
    policy = config["on_nonfinite"]
    EXAMPLES[f"nonfinite: {policy}"] += 1
    for step in range(1, at + 4):
        params = materialize(spec, step)
        if step == at:
            leaves, treespec = optree.tree_flatten(params)
            i = floating[which % len(floating)]
            leaves[i] = leaves[i].clone()
            leaves[i][(0,) * leaves[i].dim()] = bad
            params = optree.tree_unflatten(treespec, leaves)
            path = paths_of(params)[i]
        before = snapshot_state(state)
        if step == at and policy == "raise":
            with pytest.raises(FloatingPointError) as info:
                fe.update(state, params)
            assert path in str(info.value)
            assert state_unchanged(state, before)
            with pytest.raises(FloatingPointError):
                fe.update(state, params, donate=True)
            assert state_unchanged(state, before)
            EXAMPLES["nonfinite: raised"] += 1
            return
        new = fe.update(state, params)
        if step == at and policy == "skip":
            assert trees_bit_equal(new.ema, state.ema), "a skipped update changed the EMA"
            assert int(new.nonfinite_count) == int(state.nonfinite_count) + 1
            assert int(new.step) == int(state.step) + 1
            EXAMPLES["nonfinite: skipped"] += 1
        if policy == "skip":
            assert not has_nonfinite(new.ema)
        state = new
    if policy == "skip":
        assert int(state.nonfinite_count) == 1


# ---------------------------------------------------------------------------------------------
# Params that do not match the state


MUTATIONS = ["dtype_kind", "shape", "extra_key", "missing_key", "not_a_tensor", "device_meta"]


@settings(max_examples=150, **SETTINGS)
@given(
    spec=spec_trees,
    config=configs,
    mutation=st.sampled_from(MUTATIONS),
    which=st.integers(0, 100),
    donate=st.booleans(),
)
def test_mismatched_params(spec, config, mutation, which, donate):
    EXAMPLES["mismatch"] += 1
    params0 = materialize(spec, 0)
    ok, state = expect_ok_or_allowed(lambda: fe.init(params0, **config), params0)
    if not ok:
        return
    params = materialize(spec, 1)
    paths_leaves, leaves, treespec = optree.tree_flatten_with_path(params)
    paths = paths_of(params)
    if mutation in ("extra_key", "missing_key"):
        if mutation == "extra_key":
            bad = {"__root__": params, "extra": torch.zeros(2)}
        else:
            assume(leaves)
            i = which % len(leaves)
            bad = dict(zip(paths, leaves))
            del bad[paths[i]]
    else:
        assume(leaves)
        i = which % len(leaves)
        x = leaves[i]
        if mutation == "dtype_kind":
            kinds = {
                "f": torch.int64,
                "c": torch.float32,
                "i": torch.float32,
                "b": torch.float32,
            }
            k = "c" if x.is_complex() else "f" if x.is_floating_point() else "b" if x.dtype == torch.bool else "i"
            new = x.to(kinds[k]) if k != "c" else x.real.float()
        elif mutation == "shape":
            new = torch.zeros((*x.shape, 2), dtype=x.dtype)
        elif mutation == "not_a_tensor":
            new = 1.5
        else:
            new = torch.empty(x.shape, dtype=x.dtype, device="meta")
        leaves = list(leaves)
        leaves[i] = new
        bad = optree.tree_unflatten(treespec, leaves)
    before = snapshot_state(state)
    try:
        fe.update(state, bad, donate=donate)
    except ALLOWED as err:
        msg = str(err)
        assert "params" in msg or any(p in msg for p in paths), msg
        if mutation in ("dtype_kind", "shape", "not_a_tensor", "device_meta"):
            assert repr(paths[i]) in msg or paths[i] in msg, msg
        EXAMPLES["mismatch: rejected"] += 1
    else:
        pytest.fail(f"{mutation} was accepted silently")
    assert state_unchanged(state, before), "a rejected update changed the state"


# ---------------------------------------------------------------------------------------------
# Invalid configurations


@settings(max_examples=60, **SETTINGS)
@given(
    name=st.sampled_from(["every", "after", "debias", "dtype", "on_nonfinite", "average", "schedule", "seed"]),
    value=st.one_of(
        st.integers(-3, 0),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.none(),
        st.just(torch.int64),
        st.booleans(),
    ),
)
def test_invalid_configuration(name, value):
    EXAMPLES["invalid config"] += 1
    params = {"w": torch.ones(3), "n": torch.zeros((), dtype=torch.int64)}
    try:
        state = fe.init(params, **{name: value})
    except ALLOWED as err:
        assert name in str(err), str(err)
        EXAMPLES["invalid config: rejected"] += 1
        return
    # accepted: it must be a valid value for that argument, and the state must work
    fe.update(state, params)


# ---------------------------------------------------------------------------------------------
# Concurrency: one state used from two threads (donate=False) gives the sequential results


@settings(max_examples=25, **SETTINGS)
@given(spec=spec_trees, config=configs)
def test_two_threads_share_a_state(spec, config):
    EXAMPLES["threads"] += 1
    config = {**config, "on_nonfinite": "propagate"}
    params0 = materialize(spec, 0)
    ok, state = expect_ok_or_allowed(lambda: fe.init(params0, **config), params0)
    if not ok:
        return
    inputs = [materialize(spec, s) for s in range(1, 9)]
    sequential = [fe.update(state, p) for p in inputs]
    results: dict[int, fe.EmaState] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(indices):
        try:
            barrier.wait()
            for _ in range(3):
                for i in indices:
                    results[i] = fe.update(state, inputs[i])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(range(k, 8, 2),)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for i, expected in enumerate(sequential):
        assert states_equal(results[i], expected)
    assert int(state.step) == 0


def test_examples_were_run():
    """Print the counts of generated examples (run last in this file; see docs/reliability.md)."""
    print("\nfuzz examples:", dict(EXAMPLES))
