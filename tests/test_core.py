"""Exact update semantics of init / update / swap against float64 references."""

from __future__ import annotations

import hypothesis.strategies as st
import optree
import pytest
import torch
from hypothesis import example, given, settings

import funcema as fe
from funcema import schedules
from tests.conftest import assert_trees_equal, decay_rule, force_traced_skip, perturb, reference_ema, trees

SCHEDULES = st.one_of(
    st.floats(0.0, 1.0).map(schedules.constant),
    st.builds(schedules.warmup, max_decay=st.floats(0.5, 1.0), inv_gamma=st.floats(0.5, 10.0), power=st.floats(0.3, 1.0)),
    st.floats(0.5, 1.0).map(schedules.litema),
    st.floats(0.0, 30.0).map(lambda g: schedules.power(gamma=g)),
    st.builds(schedules.halflife, steps=st.floats(0.5, 50.0), rampup=st.one_of(st.none(), st.floats(0.05, 1.0))),
)


# The paths of an eager update: the host-weight path ("propagate", and "skip" on CPU tensors, whose
# skip flag is read on the host) and the traced update (what torch.compile traces; eager "skip"
# takes it where the flag lives on an accelerator), forced on the CPU as "skip-traced".
PATHS = ["propagate", "skip", "skip-traced"]


def policy_of(path, monkeypatch):
    """The `on_nonfinite` option of one of `PATHS`, forcing the traced update for "skip-traced"."""
    if path == "skip-traced":
        force_traced_skip(monkeypatch)
        return "skip"
    return path


def run(trajectory, schedule, **kwargs):
    state = fe.init({"x": trajectory[0]}, schedule=schedule, **kwargs)
    for theta in trajectory[1:]:
        state = fe.update(state, {"x": theta})
    return state


def trajectory(n, size=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g, dtype=torch.float64).to(dtype) for _ in range(n + 1)]


@settings(max_examples=60, deadline=None)
@given(schedule=SCHEDULES, every=st.integers(1, 5), after=st.integers(0, 5), debias=st.booleans(), n=st.integers(0, 30))
def test_update_matches_float64_reference(schedule, every, after, debias, n):
    traj = trajectory(n, seed=n)
    state = run(traj, schedule, every=every, after=after, debias=debias)
    rule = decay_rule(schedule, every=every, after=after, debias=debias)
    expected = reference_ema({"x": traj[0]}, [{"x": x} for x in traj[1:]], rule)["x"]
    # float64 EMA against a float64 reference that forms beta by multiplication instead of
    # exp(sum log): the two differ by a few ulps per step, far below 1e-12 over 30 steps.
    torch.testing.assert_close(state.ema["x"], expected, rtol=1e-12, atol=1e-12)
    assert int(state.step) == n


@settings(max_examples=60, deadline=None)
@given(decay=st.floats(0.0, 0.999), every=st.integers(1, 4), n=st.integers(1, 40), seed=st.integers(0, 99))
def test_debias_is_normalised_weighted_average(decay, every, n, seed):
    # debias=True: ema_n = sum_k w_k theta_k / sum_k w_k, with w_k the weight the recursion gives
    # theta_k: (1 - beta_k) * prod_{j > k} beta_j over the averaging steps (the initial value has
    # weight zero). Computed here directly from the whole trajectory.
    traj = trajectory(n, seed=seed)
    state = run(traj, schedules.constant(decay), every=every, debias=True)
    averaging = [t for t in range(1, n + 1) if t % every == 0]
    if not averaging:
        assert torch.equal(state.ema["x"], traj[0])
        return
    beta = decay**every
    weights = [(1 - beta) * beta ** (len(averaging) - 1 - i) for i in range(len(averaging))]
    if sum(weights) == 0:  # decay == 1 can't occur here; decay == 0 gives weight 1 to the last
        return
    expected = sum(w * traj[t] for w, t in zip(weights, averaging)) / sum(weights)
    # Both sides are float64; the recursion's rounding grows by ~1 ulp per step, so 1e-11
    # relative over 40 steps is ample, and 1e-12 absolute covers values near zero.
    torch.testing.assert_close(state.ema["x"], expected, rtol=1e-11, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(schedule=SCHEDULES, every=st.integers(1, 4), n=st.integers(1, 25), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_debias_keeps_a_constant_sequence_exactly_constant(schedule, every, n, dtype):
    value = torch.randn(5).to(dtype)
    state = fe.init({"x": torch.zeros(5, dtype=dtype)}, schedule=schedule, every=every, debias=True)
    for _ in range(n):
        state = fe.update(state, {"x": value})
    if n >= every:  # exact: lerp(v, v, w) == v, and the first averaging step copies
        assert torch.equal(state.ema["x"], value.to(state.ema["x"].dtype))


def test_debias_first_averaging_step_copies():
    state = fe.init({"x": torch.full((3,), 100.0)}, schedule=schedules.constant(0.9999), debias=True, every=2)
    theta = torch.tensor([1.0, -2.0, 3.5])
    state = fe.update(state, {"x": torch.zeros(3)})  # u = 1: not an averaging step
    assert torch.equal(state.ema["x"], torch.full((3,), 100.0))
    state = fe.update(state, {"x": theta})
    assert torch.equal(state.ema["x"], theta)


@pytest.mark.parametrize("path", PATHS)
def test_debias_with_frozen_ema_copies_once_then_holds(monkeypatch, path):
    # constant(1.0): the interval decay is exactly 1. The first averaging step still copies (the
    # weight would be 0 / 0 there), and every later step leaves the EMA unchanged.
    policy = policy_of(path, monkeypatch)
    state = fe.init({"x": torch.zeros(3)}, schedule=schedules.constant(1.0), debias=True, on_nonfinite=policy)
    state = fe.update(state, {"x": torch.full((3,), 5.0)})
    assert torch.equal(state.ema["x"], torch.full((3,), 5.0))
    for value in (7.0, -1.0):
        state = fe.update(state, {"x": torch.full((3,), value)})
    assert torch.equal(state.ema["x"], torch.full((3,), 5.0))


@settings(max_examples=60, deadline=None)
@given(schedule=SCHEDULES, every=st.integers(1, 4), after=st.integers(0, 3), later=st.integers(0, 6))
@example(schedule=schedules.constant(1.0), every=1, after=0, later=2)  # found by hypothesis: the EMA never moved
@example(schedule=schedules.constant(1.0), every=3, after=2, later=4)
def test_debias_first_averaging_step_copies_for_every_schedule(schedule, every, after, later):
    # Exact identities, no tolerance: the first averaging step (u == every) sets the EMA to the
    # parameters bit for bit, and a step whose interval decay is exactly 1 changes nothing.
    state = fe.init({"x": torch.zeros(3, dtype=torch.float64)}, schedule=schedule, every=every, after=after, debias=True)
    for t in range(1, after + every):  # warm-start copies and non-averaging steps
        state = fe.update(state, {"x": torch.full((3,), float(t), dtype=torch.float64)})
    theta = torch.tensor([1.0, -2.5, 3.25], dtype=torch.float64)
    state = fe.update(state, {"x": theta})
    assert torch.equal(state.ema["x"], theta)
    for k in range(later):
        u = every * (k + 2)
        before = state.ema["x"].clone()
        for _ in range(every):
            state = fe.update(state, {"x": theta + k + 1})
        if schedule.log_interval_decay(u, every) == 0.0:  # beta == 1 exactly
            assert torch.equal(state.ema["x"], before)


@settings(max_examples=40, deadline=None)
@given(schedule=SCHEDULES, every=st.integers(1, 6), intervals=st.integers(1, 8), seed=st.integers(0, 99))
def test_product_rule_equals_every_step_on_held_parameters(schedule, every, intervals, seed):
    # Updating every D steps must equal updating every step on parameters held constant over
    # each interval. Both runs are float64; the every-step run multiplies D lerps where the other
    # does one with the product decay, so they agree to rounding: 1e-12.
    held = trajectory(intervals, seed=seed)
    sparse = fe.init({"x": held[0]}, schedule=schedule, every=every)
    dense = fe.init({"x": held[0]}, schedule=schedule, every=1)
    for theta in held[1:]:
        for _ in range(every):
            sparse = fe.update(sparse, {"x": theta})
            dense = fe.update(dense, {"x": theta})
    torch.testing.assert_close(sparse.ema["x"], dense.ema["x"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("every", [1, 2, 5])
@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97])
def test_power_with_every_uses_the_interval_decay(every, gamma):
    # At each averaging step u the weight of the new parameters is 1 - (1 - D/u) ** (gamma + 1).
    state = fe.init({"x": torch.zeros((), dtype=torch.float64)}, schedule=schedules.power(gamma=gamma), every=every)
    ema = 0.0
    for t in range(1, 6 * every + 1):
        theta = float(t) ** 1.5
        state = fe.update(state, {"x": torch.tensor(theta, dtype=torch.float64)})
        if t % every == 0:
            beta = (1 - every / t) ** (gamma + 1)
            ema = beta * ema + (1 - beta) * theta
        # float64 on both sides; tolerance covers a few ulps of rounding per step.
        assert state.ema["x"].item() == pytest.approx(ema, rel=1e-13)


def test_after_copies_params_then_averages():
    state = fe.init({"x": torch.zeros(2)}, schedule=schedules.constant(0.5), after=2)
    state = fe.update(state, {"x": torch.full((2,), 4.0)})
    assert torch.equal(state.ema["x"], torch.full((2,), 4.0))
    state = fe.update(state, {"x": torch.full((2,), 8.0)})
    assert torch.equal(state.ema["x"], torch.full((2,), 8.0))
    state = fe.update(state, {"x": torch.full((2,), 0.0)})  # u = 1: d(1) = 0.5
    assert torch.equal(state.ema["x"], torch.full((2,), 4.0))


def test_donated_skipped_steps_touch_no_memory():
    ema_leaf = torch.zeros(3)
    state = fe.init({"x": ema_leaf}, schedule=schedules.constant(0.5), every=3)
    before = state.ema["x"]
    version = before._version
    state2 = fe.update(state, {"x": torch.ones(3)}, donate=True)
    assert state2.ema["x"] is before and before._version == version  # not written
    state3 = fe.update(state2, {"x": torch.ones(3)})
    assert state3.ema["x"] is not before and torch.equal(state3.ema["x"], before)  # pure: an exact copy
    assert before._version == version


def test_leaf_policy_integers_copied_and_predicate():
    params = {"w": torch.zeros(2), "n": torch.tensor(0), "mask": torch.tensor([True, False]), "frozen": torch.zeros(2)}
    state = fe.init(params, schedule=schedules.constant(0.5), average=lambda path, t: path != "frozen")
    assert state.config.averaged == (False, True, False, False) or state.config.averaged == tuple(
        p not in ("n", "mask", "frozen") for p in state.config.paths
    )
    new = {"w": torch.ones(2), "n": torch.tensor(5), "mask": torch.tensor([False, True]), "frozen": torch.ones(2)}
    state = fe.update(state, new)
    assert torch.equal(state.ema["w"], torch.full((2,), 0.5))
    assert torch.equal(state.ema["n"], torch.tensor(5)) and state.ema["n"].dtype == torch.int64
    assert torch.equal(state.ema["mask"], new["mask"])
    assert torch.equal(state.ema["frozen"], torch.ones(2))
    assert state.ema["frozen"] is not new["frozen"]  # copied, not aliased


def test_predicate_receives_dotted_paths():
    seen = []
    fe.init({"blocks": [{"norm": {"weight": torch.ones(1)}}]}, average=lambda p, t: seen.append(p) or True)
    assert seen == ["blocks.0.norm.weight"]


@pytest.mark.parametrize(
    ("param_dtype", "requested", "expected"),
    [
        (torch.bfloat16, None, torch.float32),
        (torch.float16, None, torch.float32),
        (torch.float32, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.float32, torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.complex64, None, torch.complex64),
    ],
)
def test_dtype_policy(param_dtype, requested, expected):
    params = {"x": torch.randn(4).to(param_dtype)}
    state = fe.init(params, dtype=requested, schedule=schedules.constant(0.5))
    assert state.ema["x"].dtype == expected
    state = fe.update(state, {"x": torch.ones(4).to(param_dtype)})
    assert state.ema["x"].dtype == expected
    # The EMA is the lerp of the parameters converted to the EMA dtype (exact in float32 for a
    # bf16 input with weight 1/2; stochastic rounding for a bf16 EMA may move it by 1 bf16 ulp).
    want = (params["x"].to(expected) + torch.ones(4, dtype=expected)) / 2
    tol = 2**-7 if expected == torch.bfloat16 else 1e-6
    torch.testing.assert_close(state.ema["x"].to(torch.complex128 if expected.is_complex else torch.float64),
                               want.to(torch.complex128 if expected.is_complex else torch.float64), rtol=tol, atol=tol)


def test_bfloat16_ema_with_stochastic_rounding_keeps_moving():
    # At decay 0.9999 a bf16 EMA with round-to-nearest never moves from 1.0 towards 1.01 (each
    # update is ~1e-6, below half a bf16 ulp of 2**-8); stochastic rounding moves it in expectation.
    # After 2000 steps the float64 EMA is 1 + 0.01 * (1 - 0.9999**2000) = 1.0018; the mean over
    # 4096 elements has a standard error of about one bf16 ulp / sqrt(4096) = 1.2e-4.
    state = fe.init({"x": torch.ones(4096)}, dtype=torch.bfloat16, schedule=schedules.constant(0.9999))
    target = {"x": torch.full((4096,), 1.01)}
    for _ in range(2000):
        state = fe.update(state, target, donate=True)
    expected = 1 + 0.01 * (1 - 0.9999**2000)
    assert state.ema["x"].dtype == torch.bfloat16
    assert abs(state.ema["x"].double().mean().item() - expected) < 6e-4


def test_stochastic_rounding_is_reproducible_and_pure():
    params = {"x": torch.randn(100)}
    a = fe.update(fe.init(params, dtype=torch.bfloat16, seed=3), perturb(params))
    b = fe.update(fe.init(params, dtype=torch.bfloat16, seed=3), perturb(params))
    assert torch.equal(a.ema["x"], b.ema["x"])


@pytest.mark.parametrize("policy", ["propagate", "skip", "raise"])
def test_on_nonfinite(policy):
    params = {"a": torch.ones(3), "b": {"c": torch.zeros(2)}}
    state = fe.init(params, schedule=schedules.constant(0.5), on_nonfinite=policy)
    state = fe.update(state, {"a": torch.full((3,), 3.0), "b": {"c": torch.ones(2)}})
    before = optree.tree_map(torch.clone, state.ema)
    bad = {"a": torch.full((3,), 5.0), "b": {"c": torch.tensor([1.0, float("nan")])}}
    if policy == "raise":
        with pytest.raises(FloatingPointError, match=r"'b\.c'"):
            fe.update(state, bad)
        assert_trees_equal(state.ema, before)
        return
    new = fe.update(state, bad)
    if policy == "skip":
        assert_trees_equal(new.ema, before)
        assert int(new.nonfinite_count) == 1 and int(new.step) == 2
        donated = fe.update(state, {"a": torch.full((3,), float("inf")), "b": {"c": torch.ones(2)}}, donate=True)
        assert_trees_equal(donated.ema, before)
        ok = fe.update(donated, {"a": torch.full((3,), 5.0), "b": {"c": torch.ones(2)}})
        assert torch.equal(ok.ema["a"], torch.full((3,), 3.5))
    else:
        assert torch.isnan(new.ema["b"]["c"][1]) and torch.equal(new.ema["a"], torch.full((3,), 3.5))


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # foreach lerp; stochastic rounding
def test_eager_skip_on_the_cpu_decides_on_the_host(monkeypatch, donate, dtype):
    """On CPU tensors an eager "skip" update never enters the traced update or its ops: a finite
    step runs the kernels of "propagate" (bit-identical EMAs), a non-finite one is a host-side skip
    (step + 1, EMA untouched, log A kept, one more skip counted), pure or donated."""
    from funcema import _core, _ops

    def traced(*args, **kwargs):
        raise AssertionError("the eager skip path entered the traced update")

    monkeypatch.setattr(_core, "_update_traced", traced)
    for name in ("advance", "lerp"):
        monkeypatch.setattr(_ops, name, traced)
    params = {"a": torch.randn(5, 3).to(dtype), "n": torch.tensor(0), "b": {"c": torch.randn(4, dtype=torch.float64)}}
    options = dict(schedule=schedules.warmup(), every=2, after=1, debias=True, dtype=dtype, seed=7)
    skip, plain = fe.init(params, on_nonfinite="skip", **options), fe.init(params, **options)
    for step in range(1, 10):
        p = perturb(params, seed=step)
        if step not in (4, 7):
            skip, plain = fe.update(skip, p, donate=donate), fe.update(plain, p, donate=donate)
            assert_trees_equal(skip.ema, plain.ema)
            assert torch.equal(skip.log_decay_product, plain.log_decay_product) and int(skip.step) == step
            continue
        p["b"]["c"][step % 4] = float("nan") if step == 4 else float("-inf")  # an averaging step, a step between
        before = optree.tree_map(torch.clone, skip.ema)
        log_a, count = skip.log_decay_product.clone(), int(skip.nonfinite_count)
        skip = fe.update(skip, p, donate=donate)
        assert_trees_equal(skip.ema, before)
        assert int(skip.step) == step and int(skip.nonfinite_count) == count + 1
        assert torch.equal(skip.log_decay_product, log_a)
        plain = optree.tree_map(torch.clone, skip, namespace="funcema")._replace(config=plain.config)  # goes on from there
    assert int(skip.nonfinite_count) == 2


@pytest.mark.parametrize("name", list(trees()))
def test_awkward_trees_through_the_api(name, tmp_path):
    params = trees()[name]
    originals = optree.tree_map(torch.clone, params)
    for donate in (False, True):
        state = fe.init(params, schedule=schedules.warmup(), every=2, after=1, debias=True)
        for i in range(4):
            state = fe.update(state, perturb(params, seed=i), donate=donate)
        assert optree.tree_structure(state.ema) == optree.tree_structure(params)
        swapped_state, evaluated = fe.swap(state, params)
        back_state, back = fe.swap(swapped_state, evaluated)
        for x, y in zip(optree.tree_leaves(back), optree.tree_leaves(params)):
            assert x is y
        for x, y in zip(optree.tree_leaves(back_state.ema), optree.tree_leaves(state.ema)):
            assert x is y
        path = fe.save(state, tmp_path / f"{donate}.safetensors")
        loaded = fe.load(path, like=params)
        assert_trees_equal(loaded.ema, state.ema)
        assert loaded.config == state.config
    assert_trees_equal(params, originals)  # nothing touched the inputs


def test_pure_update_leaves_inputs_bit_identical_and_matches_donated():
    params = trees()["mixed-dtypes"]
    state = fe.init(params, schedule=schedules.warmup(), debias=True)
    state = fe.update(state, perturb(params, seed=5))
    snapshot_state = optree.tree_map(torch.clone, state.ema)
    new_params = perturb(params, seed=6)
    snapshot_params = optree.tree_map(torch.clone, new_params)
    pure = fe.update(state, new_params)
    assert_trees_equal(state.ema, snapshot_state)
    assert_trees_equal(new_params, snapshot_params)
    assert int(state.step) == 1
    donated = fe.update(state, new_params, donate=True)
    assert_trees_equal(pure.ema, donated.ema)
    assert all(x is y for x, y in zip(optree.tree_leaves(donated.ema), optree.tree_leaves(state.ema)))


@pytest.mark.parametrize(
    "options, step_params",
    [
        (dict(every=2), {"x": torch.ones(3)}),  # the first update falls between two averaging steps
        (dict(on_nonfinite="skip"), {"x": torch.tensor([1.0, float("nan"), 1.0])}),
        (dict(every=2, compensated=True), {"x": torch.ones(3)}),
    ],
    ids=["interval", "nonfinite-skip", "compensated-interval"],
)
def test_pure_skipped_step_returns_tensors_the_input_state_does_not_hold(options, step_params):
    # Regression: a skipped pure step handed back the input state's tensors, so donating the
    # new state later wrote into the old one.
    old = fe.init({"x": torch.zeros(3)}, schedule=schedules.constant(0.5), **options)
    skipped = fe.update(old, step_params)
    snapshot = optree.tree_map(torch.clone, (old.ema, old.compensation))
    assert not _tree_shares_memory((old.ema, old.compensation), (skipped.ema, skipped.compensation))
    fe.update(skipped, {"x": torch.full((3,), 4.0)}, donate=True)
    assert_trees_equal((old.ema, old.compensation), snapshot)


def _tree_shares_memory(a, b):
    pointers = {t.data_ptr() for t in optree.tree_leaves(a) if t.numel()}
    return any(t.data_ptr() in pointers for t in optree.tree_leaves(b) if t.numel())


def test_donated_state_cannot_be_reused():
    state = fe.init({"x": torch.zeros(2)})
    fe.update(state, {"x": torch.ones(2)}, donate=True)
    assert int(state.step) == -1
    with pytest.raises(ValueError, match="donate"):
        fe.update(state, {"x": torch.ones(2)})


def test_params_matched_by_key_not_position():
    import collections

    params = {"b": torch.zeros(2), "a": torch.ones(2)}
    state = fe.init(params, schedule=schedules.constant(0.0))
    reordered = collections.OrderedDict([("b", torch.full((2,), 5.0)), ("a", torch.full((2,), 7.0))])
    state = fe.update(state, reordered)
    assert torch.equal(state.ema["a"], torch.full((2,), 7.0)) and torch.equal(state.ema["b"], torch.full((2,), 5.0))
    model = torch.nn.Linear(3, 2)
    state = fe.init(dict(model.named_parameters()))
    state = fe.update(state, model.state_dict())  # OrderedDict with the same keys
    assert torch.equal(state.ema["weight"], model.weight.detach())


def test_update_runs_without_grad_history():
    model = torch.nn.Linear(3, 2)
    state = fe.init(dict(model.named_parameters()))
    for donate in (False, True):
        state = fe.update(state, dict(model.named_parameters()), donate=donate)
        assert all(not t.requires_grad and t.grad_fn is None for t in state.ema.values())


# ---------------------------------------------------------------------------------------------
# Hardening: what init refuses, donated failures, aliasing, exact finiteness, consumed states


@pytest.mark.parametrize("kind", ["float8_e4m3fn", "float8_e5m2", "sparse_coo", "sparse_csr", "quantized", "nested"])
def test_init_refuses_leaves_update_could_not_write(kind):
    from tests.test_tree import unsupported_leaves

    with pytest.raises((TypeError, ValueError), match=r"params leaf 'enc\.w'"):
        fe.init({"enc": {"w": unsupported_leaves()[kind]}, "b": torch.zeros(2)})


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex32])
def test_init_refuses_an_ema_dtype_without_a_lerp_kernel(dtype):
    with pytest.raises(ValueError, match=r"^dtype must be None or one of float16, bfloat16, float32, float64"):
        fe.init({"w": torch.zeros(2)}, dtype=dtype)


def test_init_refuses_a_seed_outside_int64():
    with pytest.raises(ValueError, match=r"seed must be <= 9223372036854775807"):
        fe.init({"w": torch.zeros(2)}, seed=2**63)


@pytest.mark.parametrize("seed", [0, 2**40 + 12345, 2**63 - 1])
def test_largest_seeds_round_alike_in_the_eager_and_the_traced_path(monkeypatch, seed):
    """The rounding key reduces the seed's term on the host, so the traced path (int64 step tensor)
    accepts every seed and draws the very same rounding as the eager path: bit-identical results."""
    force_traced_skip(monkeypatch)
    params = {"w": torch.randn(64)}
    eager = fe.init(params, dtype=torch.bfloat16, seed=seed, schedule=schedules.constant(0.9))
    traced = fe.init(params, dtype=torch.bfloat16, seed=seed, schedule=schedules.constant(0.9), on_nonfinite="skip")
    for i in range(3):
        eager, traced = fe.update(eager, perturb(params, seed=i)), fe.update(traced, perturb(params, seed=i))
    assert_trees_equal(eager.ema, traced.ema)


def _two_groups():
    """A tree of two kernel groups (float32 and float64 leaves), so a donated update writes twice."""
    return {"a": torch.zeros(4), "b": torch.zeros(4, dtype=torch.float64)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("donate", [False, True])
def test_kernel_failure_leaves_the_state_unchanged_or_consumed(monkeypatch, path, donate):
    """A failure after the first group's write: a pure update changed nothing, a donated state is
    marked consumed (never half-updated with its old step and still accepted)."""
    from funcema import _kernels

    calls = []

    def failing(real):
        def fail_on_second_group(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected kernel failure")
            return real(*args, **kwargs)

        return fail_on_second_group

    state = fe.init(_two_groups(), schedule=schedules.constant(0.5), on_nonfinite=policy_of(path, monkeypatch))
    before = optree.tree_map(torch.clone, state.ema)
    for name in ("lerp", "lerp_tensor_weight"):  # host-weight and device-weight kernels, whichever runs
        monkeypatch.setattr(_kernels, name, failing(getattr(_kernels, name)))
    with pytest.raises(RuntimeError, match="injected"):
        fe.update(state, optree.tree_map(torch.ones_like, _two_groups()), donate=donate)
    assert len(calls) == 2
    if donate:
        assert int(state.step) == -1
        with pytest.raises(ValueError, match="consumed"):
            fe.update(state, _two_groups())
    else:
        assert int(state.step) == 0
        assert_trees_equal(state.ema, before)


@pytest.mark.parametrize("policy", ["propagate", "skip", "raise"])
def test_rejected_donated_update_leaves_the_state_live_and_unchanged(policy):
    state = fe.init(_two_groups(), schedule=schedules.constant(0.5), on_nonfinite=policy)
    before = optree.tree_map(torch.clone, state.ema)
    bad_inputs = [
        {"a": torch.zeros(5), "b": torch.zeros(4, dtype=torch.float64)},  # shape
        {"a": torch.zeros(4).to_sparse(), "b": torch.zeros(4, dtype=torch.float64)},  # layout, same dtype
        {"a": torch.zeros(4, dtype=torch.float8_e4m3fn), "b": torch.zeros(4, dtype=torch.float64)},  # dtype
    ]
    if policy == "raise":
        bad_inputs.append({"a": torch.ones(4), "b": torch.full((4,), float("nan"), dtype=torch.float64)})
    for bad in bad_inputs:
        with pytest.raises((ValueError, TypeError, FloatingPointError), match=r"'[ab]'"):
            fe.update(state, bad, donate=True)
        assert int(state.step) == 0
        assert_trees_equal(state.ema, before)
    fe.update(state, _two_groups(), donate=True)  # still live


def test_init_from_tied_parameters_gives_each_path_its_own_leaf():
    tied = torch.randn(3)
    state = fe.init({"embed": tied, "head": tied})
    assert state.ema["embed"].data_ptr() != state.ema["head"].data_ptr()
    assert state.config.aliased == ()


@pytest.mark.parametrize("path", PATHS)  # in-place foreach lerp and the traced select
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # plain lerp and stochastic rounding
@pytest.mark.parametrize("donate", [False, True])
def test_tied_leaves_after_swap_are_averaged_exactly_once(monkeypatch, path, dtype, donate):
    """`swap` in of a `state_dict()` with tied weights makes two EMA leaves share memory; the next
    update must average that memory once, giving both paths the update of one untied leaf."""
    params = {"embed": torch.zeros(8, dtype=dtype), "head": torch.zeros(8, dtype=dtype), "b": torch.zeros(2, dtype=dtype)}
    state = fe.init(params, schedule=schedules.constant(0.5), dtype=dtype, on_nonfinite=policy_of(path, monkeypatch), seed=1)
    live = torch.full((8,), 2.0, dtype=dtype)
    swapped, evaluated = fe.swap(state, {"embed": live, "head": live, "b": torch.zeros(2, dtype=dtype)})
    assert swapped.config.aliased == (2,)  # "head" (index 2 in key order b, embed, head) shares "embed"'s memory
    back, _ = fe.swap(swapped, evaluated)
    assert back.config == state.config  # swapping back to unshared leaves clears the record
    untied = swapped._replace(ema={"b": swapped.ema["b"].clone(), "embed": live.clone(), "head": live.clone()})
    untied = untied._replace(config=state.config)
    target = {"embed": torch.full((8,), 4.0, dtype=dtype), "head": torch.full((8,), 4.0, dtype=dtype), "b": torch.ones(2, dtype=dtype)}
    expected = fe.update(untied, target)
    got = fe.update(swapped, target, donate=donate)
    assert_trees_equal(got.ema, expected.ema)  # 3.0 for a weight of 0.5 applied once (twice would give 3.5)
    assert got.config == state.config and got.ema["embed"].data_ptr() != got.ema["head"].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_skip_counts_finite_float64_values_above_float32_max_as_finite(dtype):
    big = torch.full((3,), 1e300, dtype=dtype)
    state = fe.init({"w": torch.zeros(3, dtype=dtype)}, schedule=schedules.constant(0.5), on_nonfinite="skip")
    state = fe.update(state, {"w": big})
    assert int(state.nonfinite_count) == 0 and torch.equal(state.ema["w"], big / 2)
    state = fe.update(state, {"w": torch.full((3,), float("inf"), dtype=dtype)})
    assert int(state.nonfinite_count) == 1 and torch.equal(state.ema["w"], big / 2)


@pytest.mark.parametrize("call", ["update", "swap", "update-donated"])
def test_consumed_state_refused_by_core_functions_with_one_message(call):
    from tests.conftest import consumed_message, consumed_state

    state = consumed_state()
    with pytest.raises(ValueError) as info:
        if call == "swap":
            fe.swap(state, {"w": torch.ones(3)})
        else:
            fe.update(state, {"w": torch.ones(3)}, donate=call == "update-donated")
    assert str(info.value) == consumed_message()


def _module():
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))


@pytest.mark.parametrize(
    ("call", "given"),
    # A list of tensors is a valid tree for init (paths 0, 1, ...); it is wrong only for a named state.
    [(c, g) for c in ("init", "update", "swap") for g in ("module", "generator", "unnamed-list") if (c, g) != ("init", "unnamed-list")],
)
def test_modules_and_unnamed_parameters_say_what_to_pass(call, given):
    model = _module()
    value = {"module": model, "generator": model.parameters(), "unnamed-list": list(model.parameters())}[given]
    state = fe.init(dict(model.named_parameters()))
    with pytest.raises((TypeError, ValueError), match=r"dict\(\w+\.named_parameters\(\)\)"):
        {"init": lambda: fe.init(value), "update": lambda: fe.update(state, value), "swap": lambda: fe.swap(state, value)}[call]()


def test_vmap_of_init_and_update_points_to_the_stacked_ema():
    from torch.func import vmap

    stacked = {"w": torch.randn(4, 3)}
    state = fe.init({"w": torch.zeros(3)})
    for call in (
        lambda: vmap(fe.init)(stacked),
        lambda: vmap(lambda p: fe.init(p).ema)(stacked),
        lambda: vmap(fe.update, in_dims=(None, 0))(state, stacked),
        lambda: vmap(lambda p: fe.update(state, p).ema)(stacked),
        lambda: vmap(lambda p: fe.swap(state, p)[1])(stacked),
    ):
        with pytest.raises(TypeError, match=r"torch\.func\.stack_module_state"):
            call()
