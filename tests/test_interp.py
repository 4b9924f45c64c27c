"""Tests for funcema._interp: the interpolation weight of one update, on the host and traced."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import funcema as fe
from funcema import _interp, schedules
from funcema._interp import Action, host_weight, traced_weight
from tests.conftest import EXAMPLES, any_schedule

# Both paths evaluate the same float64 expressions (a schedule's log decay, expm1, one division),
# each operation within an ulp or so of the exact value; they differ only in libm vs torch's
# vectorised expm1/log1p. 1e-12 relative is ~4500 ulps: ample for ten operations, and far below
# any change of formula (a weight formed as 1 - beta is off by ~1e-13 already at decay 0.999).
RTOL = 1e-12

configs = st.fixed_dictionaries(
    {
        "schedule": any_schedule,
        "every": st.integers(min_value=1, max_value=4),
        "after": st.integers(min_value=0, max_value=5),
        "debias": st.booleans(),
    }
)


def config(**options: Any) -> fe.EmaConfig:
    with warnings.catch_warnings():  # slow schedules stall a float32 EMA; this file tests the weight
        warnings.simplefilter("ignore", fe.StagnationWarning)
        return fe.init({"w": torch.zeros(1)}, **options).config


def host_run(c: fe.EmaConfig, steps: int) -> list[tuple[Action, float, float]]:
    out, log_a = [], 0.0
    for t in range(1, steps + 1):
        action, weight, log_a = host_weight(c, t, log_a)
        out.append((action, weight, log_a))
    return out


@settings(max_examples=200)
@given(configs, st.integers(min_value=1, max_value=40))
# A frozen debiased EMA: its first averaging step copies although (1 - beta) / (1 - A beta) is 0 / 0.
@example({"schedule": schedules.constant(1.0), "every": 2, "after": 1, "debias": True}, 5)
def test_traced_weight_is_the_host_weight(options: dict[str, Any], steps: int) -> None:
    c = config(**options)
    log_a = torch.zeros((), dtype=torch.float64)
    for t, (action, weight, host_log_a) in enumerate(host_run(c, steps), start=1):
        traced, active, log_a = traced_weight(c, torch.tensor(t), log_a)
        assert traced.dtype == torch.float64 and traced.shape == ()
        assert bool(active) == (action is not Action.SKIP), (t, action, float(traced))
        if action is not Action.SKIP:  # a traced skip may carry any weight: `active` masks it
            assert math.isclose(float(traced), weight, rel_tol=RTOL, abs_tol=0.0), (t, float(traced), weight)
        # log A: a skipped step leaves it, an averaging step adds log beta, whatever path.
        assert math.isclose(float(log_a), host_log_a, rel_tol=RTOL, abs_tol=1e-300) or float(log_a) == host_log_a


@settings(max_examples=200)
@given(configs, st.integers(min_value=1, max_value=60))
def test_weight_is_a_convex_coefficient_and_the_action_says_which(options: dict[str, Any], steps: int) -> None:
    c = config(**options)
    for t, (action, weight, _) in enumerate(host_run(c, steps), start=1):
        assert 0.0 <= weight <= 1.0
        assert (action is Action.COPY) == (weight == 1.0), (t, action, weight)
        assert (action is Action.SKIP) == (weight == 0.0), (t, action, weight)
        u = t - c.after
        if u <= 0:
            assert action is Action.COPY  # the warm start copies the parameters
        elif u % c.every:
            assert action is Action.SKIP  # between two averaging steps nothing changes
        elif c.debias and u == c.every:
            assert action is Action.COPY  # the first debiased average is the one sample


@pytest.mark.parametrize("schedule", EXAMPLES, ids=repr)
def test_a_non_finite_step_is_skipped_whatever_the_step(schedule: schedules.Schedule) -> None:
    c = config(schedule=schedule, after=1, debias=True)
    for t in (1, 2, 3, 10):
        assert host_weight(c, t, -0.5, finite=False) == (Action.SKIP, 0.0, -0.5)


# -- when the weight is too small for the EMA's dtype -------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
@pytest.mark.parametrize("every", [1, 4])
def test_stagnation_step_is_where_the_weight_falls_below_resolution(sigma_rel: float, every: int) -> None:
    c = config(schedule=schedules.power(sigma_rel=sigma_rel), every=every)
    u = _interp.unit_roundoff(torch.float32)
    t_star = _interp.stagnation_step(c, torch.float32)
    assert u == 2.0**-24 and t_star is not None

    def weight(t: int) -> float:  # the weight of the last averaging step at or before t
        return host_weight(c, t - t % every, 0.0).weight

    # The bisection stops within 0.1%: below resolution at t*, and still above it 0.2% earlier.
    assert weight(t_star) * _interp.SPREAD < u <= weight(int(t_star * 0.998)) * _interp.SPREAD
    # The rule of thumb t* = (gamma + 1) every rho / u: the power weight is (gamma + 1) every / t
    # up to O(every / t) relative, and the bisection stops at 0.1%, so the two agree to 1%.
    gamma = fe.sigma_rel_to_gamma(sigma_rel)
    assert t_star == pytest.approx((gamma + 1) * every * _interp.SPREAD / u, rel=1e-2)
    assert _interp.stagnation_step(c, torch.bfloat16) is None  # stochastic rounding never stalls
    assert _interp.stagnation_step(c, torch.float64) > 10**14
