"""Compensated EMAs (``compensated=True``): the pair ``ema + compensation`` against float64.

The reference is a float64 EMA of the same parameters (same schedule, same step), whose own
rounding (2^-53) is negligible here. Error bound of one compensated float32 step (see
``funcema._kernels``): ``params - ema``, the lerp's product and its sum each round once, relative to
the increment ``w * |params - ema|``, and the Fast2Sum that follows is exact; the pair itself is
exact to ``u * ulp(ema) / 2``. So after the steps ``k`` the pair is within

    5 u * sum_k w_k |params_k - x_k|  +  4 * steps * u^2 * |x|          (u = 2^-24)

of the float64 EMA, elementwise (5 instead of 3 covers the weight's rounding to float32 and the
lerp's own formula). A plain float32 EMA has no such bound: every step may lose ``ulp(ema) / 2``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import funcema as fe
from tests.conftest import force_traced_skip

U32 = 2.0**-24


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # the large-t states below are built on purpose
        warnings.simplefilter("ignore", fe.StagnationWarning)
        yield


def _at_step(state: fe.EmaState, t: int) -> fe.EmaState:
    """``state`` as if ``t`` updates had run (``EmaState`` is a NamedTuple; no debias, so nothing else changes)."""
    return state._replace(step=torch.tensor(t))


def _pair(state: fe.EmaState, key: str = "w") -> torch.Tensor:
    x = state.ema[key].double()
    return x + state.compensation[key].double() if state.compensation is not None else x


def _drift(n: int, steps: int, spread: float, seed: int):
    """Order-one float32 parameters ``spread`` away from the start, drifting slowly (as scripts/stagnation.py)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    e0 = sign * torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g))
    e0 = e0.float()
    offset = spread * torch.randn(n, generator=g, dtype=torch.float64)
    drift = 1e-6 * torch.randn(n, generator=g, dtype=torch.float64)
    noise = [1e-4 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(steps)]
    return e0, [(e0.double() * (1 + offset + noise[k]) + drift * k).float() for k in range(steps)]


def _run(e0, trajectory, t0, schedule, **kinds):
    """Update one state per keyword (init options) from step ``t0``; returns their final states."""
    states = {name: _at_step(fe.init({"w": e0}, schedule=schedule, **opts), t0) for name, opts in kinds.items()}
    for p in trajectory:
        states = {name: fe.update(s, {"w": p}, donate=True) for name, s in states.items()}
    return states


def _bound(e0, trajectory, t0, schedule):
    """The elementwise error bound of the module docstring, accumulated along the float64 reference."""
    ref = _at_step(fe.init({"w": e0}, schedule=schedule, dtype=torch.float64), t0)
    total = torch.zeros(e0.shape, dtype=torch.float64)
    for k, p in enumerate(trajectory):
        w = -math.expm1(schedule.log_interval_decay(t0 + k + 1, 1))
        total += w * (p.double() - ref.ema["w"]).abs()
        ref = fe.update(ref, {"w": p})
    steps = len(trajectory)
    return 5 * U32 * total + 4 * steps * U32**2 * ref.ema["w"].abs(), ref


# --------------------------------------------------------------------------------------------
# Accuracy


@given(
    sigma_rel=st.floats(0.03, 0.25),
    log_t0=st.floats(3.0, 8.5),
    steps=st.integers(20, 80),
    spread=st.sampled_from([1e-3, 1e-2, 1e-1]),
    seed=st.integers(0, 2**16),
)
def test_compensated_float32_tracks_float64_far_better_than_plain(sigma_rel, log_t0, steps, spread, seed):
    schedule = fe.schedules.power(sigma_rel=sigma_rel)
    t0 = int(10**log_t0)
    e0, trajectory = _drift(64, steps, spread, seed)
    bound, ref = _bound(e0, trajectory, t0, schedule)
    states = _run(e0, trajectory, t0, schedule, plain={}, comp={"compensated": True})
    comp_err = (_pair(states["comp"]) - ref.ema["w"]).abs()
    assert bool((comp_err <= bound).all()), float((comp_err / bound).max())
    # Far better than plain once the increments are below float32's resolution: from t0 = 1e6
    # every increment is below ~2e-5 |ema| (w <= 1.9e-5, spread <= 0.1 plus the drift), so a plain
    # step loses a fraction of an ulp that is >= 2^-24 / 2e-5 ~ 3e-3 of its increment on average,
    # while the pair's bound is 5 * 2^-24 ~ 3e-7 of it: 100x is a wide margin.
    if t0 >= 10**6:
        plain_err = (_pair(states["plain"]) - ref.ema["w"]).norm()
        assert float(comp_err.norm()) * 100 <= float(plain_err), (float(comp_err.norm()), float(plain_err))


def test_plain_float32_stalls_exactly_where_increments_are_below_half_an_ulp():
    schedule = fe.schedules.power(sigma_rel=0.10)
    e0, trajectory = _drift(256, 50, 0.02, seed=1)
    t0 = 10**8  # w = 7.9e-8: increments <= 7.9e-8 * 0.1 |ema|, below half an ulp (>= 2^-24 |ema|)
    states = _run(e0, trajectory, t0, schedule, plain={}, comp={"compensated": True})
    bound, ref = _bound(e0, trajectory, t0, schedule)
    assert torch.equal(states["plain"].ema["w"], e0)  # not one bit moved
    assert bool(((_pair(states["comp"]) - ref.ema["w"]).abs() <= bound).all())
    assert bool(((_pair(states["comp"]) - e0.double()) != 0).all())  # every element moved


def _movement_errors(e0, trajectory, sigma_rel, **kinds):
    """Each kind's error of its movement against a float64 EMA's, relative to that movement."""
    states = _run(e0, trajectory, 10**7, fe.schedules.power(sigma_rel=sigma_rel), ref={"dtype": torch.float64}, **kinds)
    moved = _pair(states["ref"]) - e0.double()
    # The start of each pair: e0 itself, except a plain bfloat16 EMA, which starts rounded (a
    # compensated bfloat16 pair holds e0 to 2^-17, see the init test below).
    start = {name: e0.bfloat16().double() if opts == {"dtype": torch.bfloat16} else e0.double() for name, opts in kinds.items()}
    return {name: float(((_pair(states[name]) - start[name]) - moved).norm() / moved.norm()) for name in kinds}


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_stagnation_targets(sigma_rel):
    """The targets of docs/semantics.md: 20,000 updates from t = 1e7, as scripts/stagnation.py
    (256 parameters instead of 4096; bfloat16 over the first 4,000 updates, its eager stochastic
    rounding being ~6x slower per call than a float32 update)."""
    e0, trajectory = _drift(256, 20_000, 0.01, seed=0)
    errors = _movement_errors(e0, trajectory, sigma_rel, plain={}, comp={"compensated": True})
    # Compensated float32: the target is 1e-3 of the movement; the bound of the module
    # docstring allows ~5 * 2^-24 = 3e-7 of it, and the script measures ~4e-10.
    assert errors["comp"] <= 1e-3
    # Plain float32 loses most of the movement (the script measures 0.62 and 0.95 at these
    # widths): each increment, ~1e-8 |ema|, is below half an ulp for most elements.
    assert errors["plain"] >= 0.5
    bf16 = {"sr": {"dtype": torch.bfloat16}, "comp": {"dtype": torch.bfloat16, "compensated": True}}
    errors = _movement_errors(e0, trajectory[:4000], sigma_rel, **bf16)
    # Compensated bfloat16 beats stochastically rounded bfloat16: its low word carries the
    # increments with 16 bits instead of 8 (the script: 0.11-0.16 against 1.3-1.9 over 20,000).
    assert errors["comp"] < errors["sr"]


def test_compensated_low_precision_init_holds_float32_params_to_16_bits():
    p = torch.randn(1000) * 3
    for dtype in (torch.bfloat16, torch.float16):
        state = fe.init({"w": p}, dtype=dtype, compensated=True)
        hi, lo = state.ema["w"], state.compensation["w"]
        assert hi.dtype == lo.dtype == dtype
        assert torch.equal(hi, p.to(dtype))  # the high word is the parameter rounded to nearest
        # lo rounds the exact remainder (|r| <= ulp(hi)/2) to nearest: an error <= 2^-9 |r|
        # (bfloat16) or 2^-12 |r| (float16), i.e. within 2^-17 |p| (2^-22 for float16), plus
        # half of float16's subnormal spacing (2^-25) where the remainder is subnormal.
        err = (_pair(state) - p.double()).abs()
        bits, floor = (17, 0.0) if dtype == torch.bfloat16 else (22, 2.0**-25)
        assert bool((err <= 2.0**-bits * p.double().abs() + floor).all())


# --------------------------------------------------------------------------------------------
# Paths: eager / traced / compiled / donated / low precision / copies


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 3, generator=g),
        "b": torch.randn(3, generator=g).bfloat16(),
        "n": torch.tensor(7),
    }


def _trajectory(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    base = _params()
    return [
        {
            "w": base["w"] * (1 + 0.01 * torch.randn(5, 3, generator=g)),
            "b": (base["b"].float() * (1 + 0.01 * torch.randn(3, generator=g))).bfloat16(),
            "n": torch.tensor(7 + k),
        }
        for k in range(n)
    ]


@pytest.mark.parametrize("dtype", [None, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, {"after": 2, "every": 2}, {"debias": True}])
def test_eager_traced_and_donated_paths_agree(monkeypatch, dtype, options):
    """The host-weight path, the traced path (forced for ``on_nonfinite="skip"``) and donation.

    Pure and donated eager updates are the same kernels: bit for bit. The traced path takes a
    0-d float64 weight where the eager one takes a Python float; for float32, bfloat16 and float16
    pairs (computed in float32) both are rounded to float32 inside ``lerp`` and the pairs agree bit
    for bit (stochastic rounding draws the same key on both paths). A float64 ``lerp`` with a
    tensor weight may round the product differently: one float64 ulp of the increment per step.
    """
    force_traced_skip(monkeypatch)
    schedule = fe.schedules.power(sigma_rel=0.1)
    params = _params()
    pure = fe.init(params, schedule=schedule, dtype=dtype, compensated=True, **options)
    donated = fe.init(params, schedule=schedule, dtype=dtype, compensated=True, **options)
    traced = fe.init(params, schedule=schedule, dtype=dtype, compensated=True, on_nonfinite="skip", **options)
    for p in _trajectory(6):
        before = [t.clone() for t in (*pure.ema.values(), *pure.compensation.values())]
        new = fe.update(pure, p)
        after = [*pure.ema.values(), *pure.compensation.values()]
        assert all(torch.equal(a, b) for a, b in zip(before, after))  # pure: inputs unchanged
        pure = new
        old = donated
        donated = fe.update(donated, p, donate=True)
        assert int(old.step) == -1
        traced = fe.update(traced, p)
    for k in params:
        for tree in ("ema", "compensation"):
            a, b, c = getattr(pure, tree)[k], getattr(donated, tree)[k], getattr(traced, tree)[k]
            assert a.dtype == b.dtype == c.dtype
            assert torch.equal(a, b), (k, tree)
            assert dtype == torch.float64 or torch.equal(a, c), (k, tree)
        # float64: 6 steps, each within one ulp (2^-52 relative) of values of order 1.
        assert float((_pair(pure, k) - _pair(traced, k)).abs().max()) <= 6 * 2.0**-52 * 4


@pytest.mark.parametrize("traced", [False, True])
def test_copies_are_exact_pairs(monkeypatch, traced):
    """Warm start and the first debiased step copy the parameters exactly: compensation zero."""
    if traced:
        force_traced_skip(monkeypatch)
    p = _trajectory(3)
    for options in ({"after": 3}, {"debias": True, "on_nonfinite": "skip"}, {"after": 3, "on_nonfinite": "skip"}):
        state = fe.init(_params(), compensated=True, **options)
        steps = 3 if "after" in options else 1
        for k in range(steps):
            state = fe.update(state, p[k])
        assert torch.equal(state.ema["w"], p[steps - 1]["w"]), options
        assert not state.compensation["w"].any(), options
        assert torch.equal(state.ema["b"], p[steps - 1]["b"].float()), options  # bf16 -> fp32: exact


def test_copied_leaves_keep_a_zero_compensation():
    state = fe.init(_params(), compensated=True, average=lambda path, t: path != "b")
    for k, e in state.ema.items():  # a tree like ema: same structure, shapes, dtypes
        assert state.compensation[k].shape == e.shape and state.compensation[k].dtype == e.dtype, k
    for p in _trajectory(3):
        state = fe.update(state, p)
    assert not state.compensation["n"].any() and not state.compensation["b"].any()
    assert state.compensation["w"].any()
    assert torch.equal(state.ema["n"], torch.tensor(9)) and torch.equal(state.ema["b"], _trajectory(3)[2]["b"])


@pytest.mark.parametrize("traced", [False, True])
def test_nonfinite_skip_leaves_the_pair_unchanged(monkeypatch, traced):
    if traced:
        force_traced_skip(monkeypatch)
    state = fe.init(_params(), compensated=True, on_nonfinite="skip", schedule=fe.schedules.constant(0.5))
    state = fe.update(state, _trajectory(1)[0])
    bad = dict(_trajectory(2)[1])
    bad["w"] = bad["w"].clone()
    bad["w"][0, 0] = float("nan")
    new = fe.update(state, bad)
    assert int(new.nonfinite_count) == 1
    for tree in ("ema", "compensation"):
        assert all(torch.equal(getattr(new, tree)[k], getattr(state, tree)[k]) for k in state.ema)


def test_compiled_update_compiles_once_and_keeps_the_compensation():
    """Under torch.compile the pair still tracks float64 within the bound: the compiler keeps the
    two-sum (no reassociation of ``y - (s - ema)``); and one graph serves every step."""
    schedule = fe.schedules.power(sigma_rel=0.10)
    e0, trajectory = _drift(64, 30, 0.02, seed=3)
    t0 = 10**7
    bound, ref = _bound(e0, trajectory, t0, schedule)
    torch._dynamo.reset()
    step = torch.compile(lambda s, p: fe.update(s, {"w": p}), fullgraph=True, backend="inductor")
    state = _at_step(fe.init({"w": e0}, schedule=schedule, compensated=True), t0)
    state = step(state, trajectory[0])
    with torch.compiler.set_stance("fail_on_recompile"):
        for p in trajectory[1:]:
            state = step(state, p)
    assert int(state.step) == t0 + len(trajectory)
    assert bool(((_pair(state) - ref.ema["w"]).abs() <= bound).all())
    assert not torch.equal(state.ema["w"], e0)


def test_compiled_low_precision_and_copies():
    """bfloat16 pairs and a warm start under torch.compile give the eager path's values."""
    torch._dynamo.reset()
    step = torch.compile(lambda s, p: fe.update(s, p), fullgraph=True, backend="aot_eager")
    for dtype in (torch.bfloat16, None):
        compiled = eager = fe.init(_params(), dtype=dtype, compensated=True, after=1)
        for p in _trajectory(4):
            compiled, eager = step(compiled, p), fe.update(eager, p)
        for tree in ("ema", "compensation"):
            for k in eager.ema:
                assert torch.equal(getattr(compiled, tree)[k], getattr(eager, tree)[k]), (dtype, tree, k)


def test_compiled_skip_and_donation_match_eager():
    """``on_nonfinite="skip"`` with ``donate=True`` under torch.compile: the skip flag of
    ``funcema::advance`` keeps the pair bit for bit at a NaN step, and every other step is the
    eager two-sum with the same host weight, so the two agree exactly; one graph for every step."""
    torch._dynamo.reset()
    step = torch.compile(lambda s, p: fe.update(s, p, donate=True), fullgraph=True, backend="aot_eager")
    options = dict(compensated=True, on_nonfinite="skip", kernel="foreach", schedule=fe.schedules.constant(0.9))
    compiled, eager = fe.init(_params(), **options), fe.init(_params(), **options)
    trajectory = _trajectory(5)
    trajectory[2] = dict(trajectory[2], w=trajectory[2]["w"].clone().fill_(float("nan")))
    compiled = step(compiled, trajectory[0])
    eager = fe.update(eager, trajectory[0], donate=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        for p in trajectory[1:]:
            compiled, eager = step(compiled, p), fe.update(eager, p, donate=True)
    assert int(compiled.nonfinite_count) == int(eager.nonfinite_count) == 1
    for tree in ("ema", "compensation"):
        for k in eager.ema:
            assert torch.equal(getattr(compiled, tree)[k], getattr(eager, tree)[k]), (tree, k)


def test_remembered_ema_leaves_take_the_state_own_compensation():
    """An eager update remembers the EMA leaves of the state it returns; the compensation is
    always read from the state passed in. A state whose compensation was replaced (same EMA
    dict, so the remembered leaves are used) updates exactly like the same state rebuilt from
    scratch (a new dict, so they are not)."""
    state = fe.init(_params(), compensated=True, kernel="foreach")
    trajectory = _trajectory(3)
    for p in trajectory[:2]:
        state = fe.update(state, p)
    zeros = {k: torch.zeros_like(c) for k, c in state.compensation.items()}
    remembered = fe.update(state._replace(compensation=zeros), trajectory[2])
    rebuilt = state._replace(ema=dict(state.ema), compensation={k: z.clone() for k, z in zeros.items()})
    fresh = fe.update(rebuilt, trajectory[2])
    assert remembered.config.kernel == "foreach" and remembered.config.compensated
    for tree in ("ema", "compensation"):
        for k in state.ema:
            assert torch.equal(getattr(remembered, tree)[k], getattr(fresh, tree)[k]), (tree, k)
    assert not torch.equal(remembered.compensation["w"], fe.update(state, trajectory[2]).compensation["w"])


# --------------------------------------------------------------------------------------------
# Save / load, swap, post-hoc


def test_save_load_round_trip_and_resume(tmp_path):
    state = fe.init(_params(), dtype=torch.bfloat16, compensated=True, kernel="foreach")
    for p in _trajectory(3):
        state = fe.update(state, p)
    path = fe.save(state, tmp_path / "ema.safetensors")
    loaded = fe.load(path, like=state)
    assert loaded.config == state.config and loaded.config.compensated and loaded.config.kernel == "foreach"
    for tree in ("ema", "compensation"):
        for k in state.ema:
            a, b = getattr(state, tree)[k], getattr(loaded, tree)[k]
            assert a.dtype == b.dtype and torch.equal(a, b), (tree, k)
    p = _trajectory(4)[3]
    resumed, never_stopped = fe.update(loaded, p), fe.update(state, p)
    assert all(torch.equal(resumed.compensation[k], never_stopped.compensation[k]) for k in state.ema)
    plain = fe.init(_params())
    assert fe.load(fe.save(plain, tmp_path / "plain.safetensors"), like=plain).compensation is None


def test_load_rejects_a_compensation_of_the_wrong_shape(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = fe.init(_params(), compensated=True)
    path = fe.save(state, tmp_path / "ema.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["compensation/w"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="compensation leaf 'w' was saved with shape"):
        fe.load(tmp_path / "bad.safetensors", like=state)
    tensors["compensation/w"] = torch.zeros(5, 3, dtype=torch.float64)
    save_file(tensors, str(tmp_path / "dtype.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="compensation leaf 'w' has dtype torch.float64"):
        fe.load(tmp_path / "dtype.safetensors", like=state)
    del tensors["compensation/w"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="do not match its header"):
        fe.load(tmp_path / "missing.safetensors", like=state)


def test_swap_keeps_the_compensation_with_the_state():
    state = fe.init(_params(), compensated=True)
    for p in _trajectory(3):
        state = fe.update(state, p)
    live = _trajectory(4)[3]
    swapped, evaluated = fe.swap(state, live)
    assert swapped.compensation is state.compensation  # the low words stay; nothing is copied
    assert all(evaluated[k] is state.ema[k] for k in live)  # evaluation uses ema, the rounded pair
    back, restored = fe.swap(swapped, evaluated)
    assert all(restored[k] is live[k] and back.ema[k] is state.ema[k] for k in live)
    assert back.compensation is state.compensation


def test_posthoc_compensated_snapshots_store_the_pair_rounded_once(tmp_path):
    params = {"w": torch.randn(64)}
    ph = fe.posthoc.init(params, compensated=True, dtype=torch.bfloat16)
    assert all(m.config.compensated for m in ph.emas)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ph = fe.posthoc.update(ph, {"w": params["w"] + 0.1 * torch.randn(64, generator=g)}, donate=True)
    for dtype in (None, torch.float32):
        out = tmp_path / str(dtype)
        files = fe.posthoc.snapshot(ph, out, dtype=dtype)
        from safetensors.torch import load_file

        for file, member in zip(files, ph.emas):
            saved = load_file(str(file))["w"]
            expected = _pair(member).to(dtype or torch.bfloat16)
            assert saved.dtype == expected.dtype and torch.equal(saved, expected)
    result = fe.posthoc.synthesize(tmp_path / "torch.float32", sigma_rel=0.07)
    assert result.ema["w"].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The warning


def test_stagnation_warning_when_the_weight_falls_below_resolution_within_the_horizon():
    params = {"w": torch.zeros(3)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fe.init(params, schedule=fe.schedules.power(sigma_rel=0.2))  # t* ~ 6e5 < 1e6
        fe.init(params, dtype=torch.float16, schedule=fe.schedules.constant(0.999))  # never moves
        fe.init(params, dtype=torch.float16, schedule=fe.schedules.constant(0.999), compensated=True)
        fe.init(params, schedule=fe.schedules.constant(0.999))  # float32: fine at any step
        fe.init(params, schedule=fe.schedules.power(sigma_rel=0.05))  # t* ~ 3e6 > 1e6
        fe.init(params, dtype=torch.bfloat16, schedule=fe.schedules.power(sigma_rel=0.2))  # stochastic rounding
        fe.init(params, dtype=torch.float64, schedule=fe.schedules.power(sigma_rel=0.2))
        fe.posthoc.init(params, sigma_rels=(0.2, 0.25))
    stagnation = [w for w in caught if issubclass(w.category, fe.StagnationWarning)]
    assert len(stagnation) == 4, [str(w.message) for w in stagnation]
    assert all(w.filename == __file__ for w in stagnation)  # points at the caller
    assert "compensated=True" in str(stagnation[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=fe.StagnationWarning)
        fe.init(params, schedule=fe.schedules.power(sigma_rel=0.2))  # silenced by the filter


def test_compensated_must_be_a_bool():
    with pytest.raises(TypeError, match="compensated must be a bool"):
        fe.init({"w": torch.zeros(1)}, compensated=1)
    with pytest.raises(TypeError, match="compensated must be a bool"):
        fe.posthoc.init({"w": torch.zeros(1)}, compensated="yes")


def test_compensation_doubles_the_memory_of_the_ema():
    params = {"w": torch.zeros(1000), "n": torch.zeros(4, dtype=torch.int64)}
    state = fe.init(params, compensated=True)
    nbytes = [sum(t.numel() * t.element_size() for t in tree.values()) for tree in (state.ema, state.compensation)]
    assert nbytes[0] == nbytes[1] == 4000 + 32


def test_stateful_ema_checkpoints_the_compensation():
    """`fe.EMA(..., compensated=True)`: its state dict carries the compensation of the EMA and of
    the tracked post-hoc EMAs, and a load restores the pairs bit for bit; a plain EMA rejects it."""
    model = torch.nn.Linear(3, 2)
    ema = fe.EMA(model, compensated=True, posthoc=(0.05, 0.10))
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(0.01)
        ema.update(model)
    sd = ema.state_dict()
    assert set(sd["compensation"]) == set(sd["ema"]) and "compensation" in sd["posthoc"]["0"]
    other = fe.EMA(torch.nn.Linear(3, 2), compensated=True, posthoc=(0.05, 0.10))
    other.load_state_dict(sd)
    for k in sd["ema"]:
        assert torch.equal(other.state.compensation[k], ema.state.compensation[k]), k
    assert any(bool(c.any()) for c in ema.state.compensation.values())
    with pytest.raises(ValueError, match="compensation"):
        fe.EMA(torch.nn.Linear(3, 2), posthoc=(0.05, 0.10)).load_state_dict(sd)
