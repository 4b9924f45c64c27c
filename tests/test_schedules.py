"""Tests for funcema.schedules: formulas, monotonicity, tensor path, serialisation, compilation."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcema import schedules
from funcema._sigma import gamma_to_sigma_rel, sigma_rel_to_gamma
from funcema.schedules import (
    Constant,
    HalfLife,
    LitEma,
    Power,
    Schedule,
    Warmup,
    from_dict,
)
from tests.conftest import EXAMPLES, any_schedule, powers, unit

EPS = sys.float_info.epsilon

# -- strategies ------------------------------------------------------------------------------------

steps = st.integers(min_value=1, max_value=10**7)

def reference(s: Schedule, u: int) -> float:
    """d(u) written literally from DESIGN.md, independently of the library's rearrangements."""
    if isinstance(s, Constant):
        return s.decay
    if isinstance(s, Warmup):
        value = 1 - (1 + (u - 1) / s.inv_gamma) ** -s.power
        return min(max(value, s.min_decay), s.max_decay)
    if isinstance(s, LitEma):
        return min(s.max_decay, (1 + u) / (10 + u))
    if isinstance(s, Power):
        return (1 - 1 / u) ** (s.gamma + 1)
    if isinstance(s, HalfLife):
        h = min(s.steps, s.rampup * u) if s.rampup else s.steps
        return 0.5 ** (1 / h)
    raise AssertionError(s)


def log0(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def tensor_value(s: Schedule, u: int) -> float:
    out = s(torch.tensor(u))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float64
    assert out.shape == ()
    return float(out)


# -- formulas and properties -----------------------------------------------------------------------


@given(any_schedule, steps)
def test_in_unit_interval(s: Schedule, u: int) -> None:
    value = s(u)
    assert isinstance(value, float)
    assert 0.0 <= value <= 1.0


@given(any_schedule, steps, st.integers(min_value=1, max_value=10**6))
def test_non_decreasing(s: Schedule, u: int, k: int) -> None:
    assert s(u) <= s(u + 1) <= s(u + k)


@settings(deadline=None)
@given(any_schedule, st.integers(min_value=1, max_value=10**6))
def test_non_decreasing_tensor(s: Schedule, u: int) -> None:
    values = s(torch.arange(u, u + 64))
    assert bool((values.diff() >= 0).all())
    assert bool(((values >= 0) & (values <= 1)).all())


@given(any_schedule, steps)
def test_matches_formula(s: Schedule, u: int) -> None:
    # Both sides evaluate the same formula in float64, the library with log1p/expm1
    # rearrangements. Each operation is within a few ulps; the largest amplification is the
    # exponent (gamma + 1 <= ~1e3, power <= 10) applied to a rounded base, and the cancellation in
    # the literal `1 - x ** -power`, which together stay below ~1e-13 in [0, 1]. 1e-12 keeps a
    # margin while any formula error (off by one step, wrong exponent) shows at small u.
    assert math.isclose(s(u), reference(s, u), rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("schedule", "u", "expected"),
    [
        (schedules.constant(0.5), 7, 0.5),
        (schedules.warmup(), 1, 0.0),
        (schedules.warmup(min_decay=0.1), 1, 0.1),
        (schedules.warmup(inv_gamma=1.0, power=1.0), 4, 0.75),  # 1 - 1/4
        (schedules.warmup(max_decay=0.9), 10**9, 0.9),
        (schedules.litema(), 1, 2 / 11),
        (schedules.litema(), 8, 0.5),
        (schedules.litema(max_decay=0.9), 10**6, 0.9),
        (schedules.power(gamma=0.0), 1, 0.0),
        (schedules.power(gamma=0.0), 4, 0.75),  # 1 - 1/u: the plain running mean
        (schedules.power(gamma=1.0), 2, 0.25),
        (schedules.halflife(1.0), 3, 0.5),
        (schedules.halflife(4.0, rampup=0.5), 2, 0.5),  # h = min(4, 1)
        (schedules.halflife(4.0, rampup=0.5), 100, 0.5**0.25),
    ],
)
def test_known_values(schedule: Schedule, u: int, expected: float) -> None:
    # Exact up to the rounding of one transcendental call.
    assert math.isclose(schedule(u), expected, rel_tol=4 * EPS, abs_tol=0.0)
    assert math.isclose(tensor_value(schedule, u), expected, rel_tol=4 * EPS, abs_tol=0.0)


@settings(deadline=None)
@given(any_schedule, steps)
def test_int_and_tensor_paths_agree(s: Schedule, u: int) -> None:
    # Same float64 expression on both paths; only libm and torch's exp/log1p/expm1 may differ by an
    # ulp or two. Amplified through exp(x) that is <= ~|x| e^x * eps <= eps absolute, and a few
    # ulps relative elsewhere: rel 1e-13 / abs 1e-15 is ample.
    assert math.isclose(s(u), tensor_value(s, u), rel_tol=1e-13, abs_tol=1e-15)


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_tensor_shapes_and_devices(schedule: Schedule) -> None:
    u = torch.arange(1, 13, dtype=torch.int64).reshape(3, 4)
    out = schedule(u)
    assert out.shape == (3, 4)
    assert out.dtype == torch.float64
    expected = torch.tensor([schedule(int(v)) for v in u.flatten()], dtype=torch.float64)
    torch.testing.assert_close(out.flatten(), expected, rtol=1e-13, atol=1e-15)
    log_beta = schedule.log_interval_decay(u + 3, 4)
    assert log_beta.shape == (3, 4)
    assert log_beta.dtype == torch.float64
    # Float steps work too (the state may keep the counter in another dtype).
    assert math.isclose(float(schedule(torch.tensor(5.0))), schedule(5), rel_tol=1e-13, abs_tol=1e-15)


# -- log_interval_decay ----------------------------------------------------------------------------


def sum_of_logs(s: Schedule, u: int, every: int) -> float:
    return math.fsum(log0(s(v)) for v in range(u - every + 1, u + 1))


def assert_log_close(got: float, want: float, every: int) -> None:
    if want == -math.inf:
        assert got == -math.inf
        return
    # Each log d(v) of the reference comes from a d(v) rounded to ~eps absolute, so near d = 1 it
    # carries ~eps absolute error (the closed forms do not): abs 4 * every * eps. Elsewhere both
    # sums of `every` non-positive terms agree to ~every ulps relative: rel 1e-12.
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=4 * every * EPS)


@settings(deadline=None)
@given(any_schedule, st.integers(min_value=1, max_value=50), st.integers(min_value=0, max_value=10**6))
def test_log_interval_decay_is_sum_of_logs(s: Schedule, every: int, extra: int) -> None:
    u = every + extra
    got = s.log_interval_decay(u, every)
    assert isinstance(got, float)
    assert got <= 0.0
    want = sum_of_logs(s, u, every)
    assert_log_close(got, want, every)
    got_tensor = s.log_interval_decay(torch.tensor(u), every)
    assert isinstance(got_tensor, torch.Tensor)
    assert got_tensor.dtype == torch.float64
    assert_log_close(float(got_tensor), want, every)


@given(powers, st.integers(min_value=1, max_value=1000), st.integers(min_value=0, max_value=10**6))
def test_power_interval_closed_form(s: Power, every: int, extra: int) -> None:
    u = every + extra
    beta = math.exp(s.log_interval_decay(u, every))
    # EDM2's rule; the base 1 - every/u is rounded once and raised to gamma + 1 <= ~1e3, so the
    # two agree to ~1e3 ulps relative: 1e-12 (and exact 0 at u == every).
    assert math.isclose(beta, (1 - every / u) ** (s.gamma + 1), rel_tol=1e-12, abs_tol=0.0)


@given(st.builds(schedules.constant, unit), st.integers(min_value=1, max_value=1000))
def test_constant_interval_closed_form(s: Constant, every: int) -> None:
    log_beta = s.log_interval_decay(every + 5, every)
    # decay ** every against exp(every * log(decay)): exp turns the ~ulp rounding of its argument
    # into a relative error of |log_beta| ulps, plus a few ulps for pow and exp themselves.
    rel_tol = 4 * EPS * (every + abs(log_beta))
    assert math.isclose(math.exp(log_beta), s.decay**every, rel_tol=rel_tol, abs_tol=1e-300)


def test_halflife_interval_closed_form() -> None:
    s = schedules.halflife(100.0)
    assert math.isclose(s.log_interval_decay(1000, 100), math.log(0.5), rel_tol=4 * EPS)


def test_log_interval_decay_zero_decay_gives_minus_inf() -> None:
    # d(1) = 0 for power and default warmup; constant(0) is zero everywhere. No error on log(0).
    for s in (schedules.power(gamma=7.0), schedules.warmup(), schedules.constant(0.0)):
        assert s.log_interval_decay(3, 3) == -math.inf
        assert float(s.log_interval_decay(torch.tensor(3), 3)) == -math.inf
        assert -math.expm1(s.log_interval_decay(3, 3)) == 1.0  # 1 - beta, as the caller does it
    assert schedules.constant(1.0).log_interval_decay(10, 5) == 0.0


# -- accuracy of the weight against 60-digit arithmetic --------------------------------------------
#
# The update's weight is w = 1 - beta = -expm1(log beta). Every schedule computes log d(v) directly
# (never log of a rounded d(v)), so each term carries a few rounding errors amplified by condition
# numbers that stay bounded (u_r = 2**-53 is the unit roundoff):
# - constant: log(decay) of an exact float, times `every`: 2 u_r;
# - power: D/u (1 u_r), then log1p(-q) for q <= 1/2 or log((u - D)/u) above (condition <= 1.45
#   either way), times g + 1 (rounded once): about 5 u_r;
# - litema: the same with 9 / (10 + u): about 4 u_r;
# - halflife: log(0.5) / min(steps, rampup * v): 3 u_r per term;
# - warmup: below d = 1/2, log(-expm1(y)) with y = -p log1p(z) (3 u_r; expm1 has condition <= 1
#   for y < 0 and log condition <= 1.45 there): about 7 u_r. Above, log1p(-pow(1 + z, -p)): 1 + z
#   is within 2 u_r, pow multiplies that by p <= 10 and adds its own ulp (22 u_r), and log1p(-q)
#   with q <= 1/2 has condition <= 1.45: about 33 u_r.
# The terms of the interval sum all have one sign, so the sum is as accurate as its worst term
# plus the summation: fsum rounds once on the host; torch's sum of `every <= 50` terms adds at most
# 49 u_r. Finally -expm1 has condition |x| / (e^|x| - 1) <= 1 for x < 0 and adds 1 u_r. The worst
# case is therefore 33 + 49 + 2 = 84 u_r = 9.3e-15 < 1e-14 relative, for every step and every
# parameter in the strategies (warmup's power <= 10). The previous log(d) form lost
# log10(1 / (1 - d)) digits: 2.3e-11 relative for warmup at step 1e7.

WEIGHT_RTOL = 1e-14


def mp_log(x: float) -> mpmath.mpf:
    return mpmath.log(mpmath.mpf(x)) if x > 0 else mpmath.mpf("-inf")


def mp_log_decay(s: Schedule, v: int) -> mpmath.mpf:
    """log d(v) at 60 digits, from the schedule's float fields taken as exact."""
    mpf = mpmath.mpf
    if isinstance(s, Constant):
        d = mpf(s.decay)
    elif isinstance(s, Warmup):
        # log1p, not log(1 - q): q = x**-p reaches 1e-60 and below, where 1 - q has no digits left.
        raw = mpmath.log1p(-((1 + (v - 1) / mpf(s.inv_gamma)) ** -mpf(s.power)))
        return min(max(raw, mp_log(s.min_decay)), mp_log(s.max_decay))
    elif isinstance(s, LitEma):
        d = min(mpf(s.max_decay), mpf(1 + v) / (10 + v))
    elif isinstance(s, Power):
        return (mpf(s.gamma) + 1) * mpmath.log(1 - mpf(1) / v) if v > 1 else mpf("-inf")
    elif isinstance(s, HalfLife):
        h = mpf(s.steps) if s.rampup is None else min(mpf(s.steps), mpf(s.rampup) * v)
        return mpmath.log(mpf("0.5")) / h
    else:
        raise AssertionError(s)
    return mpmath.log(d) if d > 0 else mpf("-inf")


def mp_weight(s: Schedule, u: int, every: int) -> float:
    with mpmath.workdps(60):
        log_beta = mpmath.fsum(mp_log_decay(s, v) for v in range(u - every + 1, u + 1))
        return float(-mpmath.expm1(log_beta))


def assert_weight_close(got: float, want: float) -> None:
    assert math.isclose(got, want, rel_tol=WEIGHT_RTOL, abs_tol=0.0), (got, want, abs(got - want) / want)


@settings(deadline=None, max_examples=300)
@given(any_schedule, st.integers(min_value=1, max_value=50), st.integers(min_value=0, max_value=10**7))
def test_weight_matches_mpmath(s: Schedule, every: int, extra: int) -> None:
    u = every + extra
    want = mp_weight(s, u, every)
    assert_weight_close(-math.expm1(s.log_interval_decay(u, every)), want)
    assert_weight_close(-float(torch.expm1(s.log_interval_decay(torch.tensor(u), every))), want)


@pytest.mark.parametrize(
    "s",
    [
        schedules.warmup(max_decay=1.0),
        schedules.warmup(max_decay=1.0, power=0.75),
        schedules.warmup(max_decay=1.0, inv_gamma=1e-3, power=10.0),
        schedules.litema(max_decay=1.0),
        schedules.halflife(1e6, rampup=0.05),
        schedules.power(sigma_rel=0.05),
        schedules.power(gamma=1e4),
    ],
    ids=repr,
)
@pytest.mark.parametrize("u", [2, 3, 10, 1000, 10**5, 10**7, 10**9])
@pytest.mark.parametrize("every", [1, 2])
def test_weight_matches_mpmath_late_steps(s: Schedule, u: int, every: int) -> None:
    # The steps where d is closest to 1 (the weight smallest): where forming d first loses most.
    want = mp_weight(s, u, every)
    assert_weight_close(-math.expm1(s.log_interval_decay(u, every)), want)
    assert_weight_close(-float(torch.expm1(s.log_interval_decay(torch.tensor(u), every))), want)


# -- argument checking -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
@pytest.mark.parametrize(
    ("step", "error"),
    [(0, ValueError), (-3, ValueError), (True, TypeError), (2.0, TypeError), ("2", TypeError)],
)
def test_bad_step(schedule: Schedule, step: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="step"):
        schedule(step)


def test_bad_interval() -> None:
    s = schedules.power(gamma=7.0)
    with pytest.raises(ValueError, match="every"):
        s.log_interval_decay(5, 0)
    with pytest.raises(TypeError, match="every"):
        s.log_interval_decay(5, 2.0)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="u must be >= every"):
        s.log_interval_decay(2, 3)
    with pytest.raises(TypeError, match="u"):
        s.log_interval_decay(True, 1)


BAD_ARGUMENTS = [
    (schedules.constant, {"decay": 1.5}, "decay"),
    (schedules.constant, {"decay": -0.1}, "decay"),
    (schedules.constant, {"decay": math.nan}, "decay"),
    (schedules.constant, {"decay": math.inf}, "decay"),
    (schedules.warmup, {"max_decay": 1.01}, "max_decay"),
    (schedules.warmup, {"max_decay": math.nan}, "max_decay"),
    (schedules.warmup, {"min_decay": -0.5}, "min_decay"),
    (schedules.warmup, {"min_decay": 0.5, "max_decay": 0.4}, "min_decay"),
    (schedules.warmup, {"inv_gamma": 0.0}, "inv_gamma"),
    (schedules.warmup, {"inv_gamma": -1.0}, "inv_gamma"),
    (schedules.warmup, {"inv_gamma": math.inf}, "inv_gamma"),
    (schedules.warmup, {"power": 0.0}, "power"),
    (schedules.warmup, {"power": math.nan}, "power"),
    (schedules.litema, {"max_decay": 2.0}, "max_decay"),
    (schedules.litema, {"max_decay": -math.inf}, "max_decay"),
    (schedules.power, {}, "gamma"),
    (schedules.power, {"gamma": 1.0, "sigma_rel": 0.1}, "sigma_rel"),
    (schedules.power, {"gamma": -0.5}, "gamma"),
    (schedules.power, {"gamma": -2.0}, "gamma"),
    (schedules.power, {"gamma": math.nan}, "gamma"),
    (schedules.power, {"sigma_rel": 0.0}, "sigma_rel"),
    (schedules.power, {"sigma_rel": 0.29}, "sigma_rel"),
    (schedules.power, {"sigma_rel": math.inf}, "sigma_rel"),
    (schedules.halflife, {"steps": 0.0}, "steps"),
    (schedules.halflife, {"steps": -10.0}, "steps"),
    (schedules.halflife, {"steps": math.inf}, "steps"),
    (schedules.halflife, {"steps": 10.0, "rampup": 0.0}, "rampup"),
    (schedules.halflife, {"steps": 10.0, "rampup": math.nan}, "rampup"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    BAD_ARGUMENTS,
    ids=[f"{f.__name__}-{k}" for f, k, _ in BAD_ARGUMENTS],
)
def test_invalid_argument(factory: Any, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        factory(**kwargs)
    if name in kwargs:  # the message shows the offending value
        assert repr(kwargs[name]) in str(info.value)


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (schedules.constant, {"decay": "0.9"}, "decay"),
        (schedules.constant, {"decay": None}, "decay"),
        (schedules.warmup, {"power": torch.tensor(1.0)}, "power"),
        (schedules.halflife, {"steps": "10"}, "steps"),
        (schedules.power, {"gamma": "1"}, "gamma"),
        # A bool is a wrong type, not a wrong value: TypeError, like every funcema argument.
        (schedules.constant, {"decay": True}, "decay"),
        (schedules.warmup, {"power": False}, "power"),
        (schedules.power, {"gamma": True}, "gamma"),
        (schedules.power, {"sigma_rel": True}, "sigma_rel"),
        (schedules.halflife, {"steps": 10.0, "rampup": True}, "rampup"),
    ],
)
def test_non_numeric_argument(factory: Any, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(TypeError, match=name):
        factory(**kwargs)


# -- objects: frozen, hashable, serialisable -------------------------------------------------------


@given(any_schedule)
def test_dict_round_trip(s: Schedule) -> None:
    d = s.to_dict()
    text = json.dumps(d, allow_nan=False)  # only JSON-native values
    back = from_dict(json.loads(text))
    # Floats round-trip exactly through JSON (written with repr), so equality is exact.
    assert back == s
    assert type(back) is type(s)
    assert hash(back) == hash(s)
    assert back.to_dict() == d


def test_equality_and_hash() -> None:
    assert schedules.constant(1) == schedules.constant(1.0)
    assert hash(schedules.constant(1)) == hash(schedules.constant(1.0))
    assert schedules.power(sigma_rel=0.1) == schedules.power(gamma=sigma_rel_to_gamma(0.1))
    assert schedules.litema(0.5) != schedules.constant(0.5)
    assert schedules.halflife(10.0) != schedules.halflife(10.0, rampup=0.1)
    assert len(set(EXAMPLES)) == len(EXAMPLES)


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_frozen_and_repr(schedule: Schedule) -> None:
    field = dataclasses.fields(schedule)[0].name  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(schedule, field, 0.5)
    text = repr(schedule)
    assert text.startswith(type(schedule).__name__ + "(")
    assert f"{field}=" in text


def test_power_sigma_rel_property() -> None:
    s = schedules.power(sigma_rel=0.1)
    assert math.isclose(s.sigma_rel, 0.1, rel_tol=1e-12)
    assert s.sigma_rel == gamma_to_sigma_rel(s.gamma)
    assert "sigma_rel=" in repr(s)
    assert s.to_dict() == {"name": "power", "gamma": s.gamma}


def test_schedule_is_abstract() -> None:
    with pytest.raises(TypeError):
        Schedule()  # type: ignore[abstract]


@pytest.mark.parametrize(
    "d",
    [
        {"name": "cosine", "decay": 0.9},
        {"decay": 0.9},
        {"name": 3},
        {"name": "constant"},
        {"name": "constant", "decay": 0.9, "extra": 1},
        {"name": "constant", "decay": 1.5},
        {"name": "constant", "decay": "0.9"},
        {"name": "power", "gamma": None},
        {"name": "warmup", "max_decay": 0.9, "inv_gamma": 1.0, "power": 1.0},
        {"name": "halflife", "steps": 10.0},
        [("name", "constant"), ("decay", 0.9)],
    ],
)
def test_from_dict_rejects(d: Any) -> None:
    with pytest.raises(ValueError):
        from_dict(d)


def test_public_factory_names_are_the_classes() -> None:
    pairs = [
        (schedules.constant, Constant),
        (schedules.warmup, Warmup),
        (schedules.litema, LitEma),
        (schedules.power, Power),
        (schedules.halflife, HalfLife),
    ]
    for factory, cls in pairs:
        assert factory is cls
    assert Warmup() == schedules.warmup(0.9999, 1.0, 2 / 3, 0.0)  # defaults and positional order kept
    assert Power(7.0) == schedules.power(gamma=7.0)
    assert repr(schedules.constant(0.5)) == "Constant(decay=0.5)"


def test_a_new_schedule_is_one_class() -> None:
    # Subclassing with a `name` is all from_dict needs; the registry is cleaned up afterwards.
    @dataclasses.dataclass(frozen=True)
    class Linear(Schedule):
        slope: float
        name = "test-linear"

        def _log_decay_float(self, u: int) -> float:
            return math.log1p(-1.0 / (1.0 + self.slope * u))

        def _log_decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
            return torch.log1p(-1.0 / (1.0 + self.slope * u))

    try:
        s = Linear(slope=2.0)
        assert from_dict(json.loads(json.dumps(s.to_dict()))) == s
        assert math.isclose(s(3), 6 / 7, rel_tol=4 * EPS)
        assert math.isclose(s.log_interval_decay(3, 2), math.log(4 / 5) + math.log(6 / 7), rel_tol=4 * EPS)
        assert math.isclose(
            float(s.log_interval_decay(torch.tensor(3), 2)), s.log_interval_decay(3, 2), rel_tol=4 * EPS
        )
    finally:
        schedules._REGISTRY.pop("test-linear", None)


def test_public_names() -> None:
    for name in schedules.__all__:
        assert hasattr(schedules, name)
    assert {"constant", "warmup", "litema", "power", "halflife", "from_dict", "Schedule"} <= set(schedules.__all__)


# -- torch.compile ---------------------------------------------------------------------------------


def _compile_once(schedule: Schedule, backend: str) -> None:
    torch._dynamo.reset()

    def decays(step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return schedule(step), schedule.log_interval_decay(step, 3)

    compiled = torch.compile(decays, fullgraph=True, backend=backend)
    compiled(torch.tensor(3))
    # Any recompilation over new step values raises from here on.
    with torch.compiler.set_stance("fail_on_recompile"):
        for u in range(4, 24):
            d, log_beta = compiled(torch.tensor(u))
            # Same float64 ops as eager (inductor may fuse them): few-ulp agreement.
            assert math.isclose(float(d), schedule(u), rel_tol=1e-13, abs_tol=1e-15)
            assert math.isclose(float(log_beta), schedule.log_interval_decay(u, 3), rel_tol=1e-13, abs_tol=1e-15)


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_compiles_once_aot_eager(schedule: Schedule) -> None:
    # aot_eager traces with dynamo + AOTAutograd (graph breaks, recompiles) without C++ codegen,
    # which keeps this test at ~0.1 s per schedule.
    _compile_once(schedule, "aot_eager")


def test_compiles_once_inductor() -> None:
    # One schedule through the full inductor backend (~1 s).
    _compile_once(schedules.power(sigma_rel=0.05), "inductor")


def test_power_width_error_names_an_option_power_has() -> None:
    # power() has no allow_negative; the way to a wider power EMA is its gamma.
    with pytest.raises(ValueError, match=r"give its gamma in \(-1/2, 0\) instead") as info:
        schedules.power(sigma_rel=0.29)
    assert "allow_negative" not in str(info.value)
    assert schedules.power(gamma=-0.3).sigma_rel > 0.29
