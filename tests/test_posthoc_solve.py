"""Tests of the post-hoc least-squares solve: inner products, weights, error and validation."""

from __future__ import annotations

import doctest
import itertools
import math

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from funcema._sigma import sigma_rel_to_gamma
from funcema.posthoc import _solve
from funcema.posthoc._solve import inner_product, solve, solve_weights

EPS = np.finfo(np.float64).eps
G05 = sigma_rel_to_gamma(0.05)
G10 = sigma_rel_to_gamma(0.10)


def _grid(n: int, every: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """n snapshot times, each with the two EMAs of sigma_rel 0.05 and 0.10."""
    steps = np.repeat(np.arange(1, n + 1) * float(every), 2)
    gammas = np.tile([G05, G10], n)
    return steps, gammas


def _mp_ip(ta: float, ga: float, tb: float, gb: float) -> mpmath.mpf:
    ta, ga, tb, gb = (mpmath.mpf(float(v)) for v in (ta, ga, tb, gb))
    if ta > tb:
        ta, ga, tb, gb = tb, gb, ta, ga
    return (ga + 1) * (gb + 1) / ((ga + gb + 1) * tb) * (ta / tb) ** gb


def _mp_error(x, steps, gammas, tr, gr) -> float:
    """Relative error of the *given* float64 weights, from the Gram form in 60-digit arithmetic."""
    with mpmath.workdps(60):
        xs = [mpmath.mpf(float(v)) for v in x]
        n = len(xs)
        c = _mp_ip(tr, gr, tr, gr)
        q = c
        for i in range(n):
            q -= 2 * xs[i] * _mp_ip(steps[i], gammas[i], tr, gr)
            for j in range(n):
                q += xs[i] * xs[j] * _mp_ip(steps[i], gammas[i], steps[j], gammas[j])
        return float(mpmath.sqrt(q / c))


def profile(tau: float, step: float, gamma: float) -> float:
    """The power-EMA profile p(tau) = (g+1)/t (tau/t)**g on (0, t], 0 elsewhere."""
    return (gamma + 1.0) / step * (tau / step) ** gamma if 0.0 < tau <= step else 0.0


def _dense_error(x, t, g, gr) -> float:
    """The previous implementation of the error (t in units of t_r = 1), kept as a reference.

    Every profile is evaluated at every node, on uniform panels of width 3 / (2 g_max + 1) in
    log tau between consecutive snapshot times, then a head integrated down to depth 40 (or
    until its closed-form tail is negligible) and the tail in closed form. Slow for large gamma
    (about 2e4 panels per unit of log tau at gamma = 1e4), exact to rounding otherwise.
    """
    nodes, wts = np.polynomial.legendre.leggauss(20)
    c = (gr + 1.0) ** 2 / (2.0 * gr + 1.0)
    log_t = np.log(t)
    breaks = np.unique(np.concatenate([t, [1.0]]))
    rate = 2.0 * max(float(g.max()), gr) + 1.0

    def integrate(s0: float, s1: float) -> float:
        edges = np.linspace(s0, s1, max(1, math.ceil(rate * (s1 - s0) / 3.0)) + 1)
        lo, hi = edges[:-1], edges[1:]
        half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
        s = mid[:, None] + half[:, None] * nodes[None, :]
        with np.errstate(over="ignore", under="ignore"):
            p = np.where(mid[:, None, None] < log_t, (g + 1.0) / t * np.exp(g * (s[:, :, None] - log_t)), 0.0)
        r = p @ x - (gr + 1.0) * np.exp(gr * s)
        return float(np.sum(half[:, None] * wts * np.exp(s) * r * r))

    acc = sum(integrate(math.log(a), math.log(b)) for a, b in itertools.pairwise(breaks))
    exps, coefs, times = np.append(g, gr), np.append(x, -1.0), np.append(t, 1.0)
    top, depth = math.log(breaks[0]), 0.0
    while True:
        a = top - depth
        terms = coefs * (exps + 1.0) / times * np.exp(exps * (a - np.log(times)))
        tail = math.exp(a) * float(terms @ (1.0 / (exps[:, None] + exps[None, :] + 1.0)) @ terms)
        bound = math.exp(a) * float(np.abs(terms).sum()) ** 2 / (2.0 * exps.min() + 1.0)
        if bound <= 1e-3 * acc or bound <= 1e-36 * c or depth >= 40.0:
            return math.sqrt(max(acc + max(tail, 0.0), 0.0) / c)
        acc += integrate(top - min(2 * depth + 1, 40.0), a)
        depth = min(2 * depth + 1, 40.0)


def test_doctests() -> None:
    result = doctest.testmod(_solve, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_profile_integrates_to_one_and_vanishes_after_t() -> None:
    # The profile is a probability density on (0, t]: its integral is 1 (mpmath tanh-sinh quadrature,
    # 30 digits; tolerance 1e-12 leaves room only for float64 evaluation of the integrand).
    for g in (0.0, G10, G05, -0.3):
        total = mpmath.quad(lambda u, g=g: float(profile(float(u), 7.0, g)), [0, 7])
        assert abs(float(total) - 1.0) < 1e-12
    assert profile(7.5, 7.0, G10) == 0.0 and profile(0.0, 7.0, G10) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    times=st.lists(st.integers(1, 300), min_size=1, max_size=10, unique=True),
    gammas=st.lists(st.sampled_from([-0.3, 0.0, 2.0, G10, G05, 60.0, 400.0]), min_size=2, max_size=2, unique=True),
    target=st.sampled_from([-0.2, 1.0, 5.0, 9.0, 20.0, 100.0]),
    last=st.booleans(),
)
def test_error_matches_dense_reference(times, gammas, target, last) -> None:
    # The grouped, adaptive quadrature against the previous per-profile quadrature on uniform
    # panels. Both evaluate the same residual to ~eps * sum_i |x_i p_i| pointwise and integrate it
    # to far below that, so they agree to rounding: 1e-10 relative for errors above 1e-9 (below,
    # the pointwise rounding floor ~1e-15 dominates and only absolute agreement is meaningful).
    steps = np.repeat(np.array(sorted(times), dtype=float), 2)
    gam = np.tile(gammas, len(times))
    tr = steps.max() if last else steps[0]
    keep = steps <= tr
    try:
        sol = solve(steps[keep], gam[keep], tr, target, max_cond=1e12)
    except ValueError:
        assume(False)
        return
    ref = _dense_error(sol.weights, steps[keep] / tr, gam[keep], target)
    assert sol.error == pytest.approx(ref, rel=1e-10, abs=1e-13)


def test_large_gamma_matches_high_precision() -> None:
    # gamma = 1e4: the terms exp(g log tau) vary 1e4 times faster than at gamma = 1; the panels
    # follow each term only as deep as it matters. 60-digit Gram form as the reference (it
    # resolves errors far below these ~1e-2..1e-4).
    steps = np.repeat(np.array([400.0, 700.0, 1000.0]), 2)
    gammas = np.tile([1e4, 3e3], 3)
    for target in (2e3, 5e3, 2e4):
        sol = solve(steps, gammas, 1000.0, target)
        ref = _mp_error(sol.weights, steps, gammas, 1000.0, target)
        assert ref > 1e-8 and sol.error == pytest.approx(ref, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    times=st.lists(st.integers(1, 1000), min_size=1, max_size=8, unique=True),
    target=st.sampled_from([0.02, 0.04, 0.08, 0.13, 0.2, 0.25, 0.28]),
)
def test_weight_sum_and_normalised_error(times, target) -> None:
    steps = np.repeat(np.array(sorted(times), dtype=float), 2)
    gammas = np.tile([G05, G10], len(times))
    tr, gr = steps.max(), sigma_rel_to_gamma(target)
    raw = solve(steps, gammas, tr, gr)
    norm = solve(steps, gammas, tr, gr, normalize=True)
    s, e = raw.weight_sum, raw.error
    assert norm.weight_sum == s and math.fsum(raw.weights.tolist()) == s
    np.testing.assert_allclose(norm.weights, raw.weights / s, rtol=0, atol=0)
    # The profiles integrate to 1, so S - 1 = int r over (0, t_r]; Cauchy-Schwarz with ||1|| =
    # sqrt(t_r) and ||p_r|| = (g+1) / sqrt((2g+1) t_r) gives |S - 1| <= e (g+1) / sqrt(2g+1).
    # Slack: S and e are each computed to ~1e-12 absolute here.
    assert abs(s - 1.0) <= e * (gr + 1) / math.sqrt(2 * gr + 1) * (1 + 1e-9) + 1e-12
    # r is orthogonal to every p_i, so <r, p_r> = -||r||^2 and the rescaled residual
    # r/S + (1/S - 1) p_r has ||.||^2 / c = (e^2 (2S - 1) + (1 - S)^2) / S^2 exactly; the two sides
    # agree to the rounding of e (relative ~1e-12 above 1e-6, absolute ~1e-14 below).
    expected = math.sqrt(max(e * e * (2 * s - 1) + (1 - s) ** 2, 0.0)) / s
    assert norm.error == pytest.approx(expected, rel=1e-7, abs=1e-13)


@pytest.mark.parametrize(
    "ta,ga,tb,gb",
    [
        (10, G10, 10, G10),
        (3, G05, 10, G10),
        (10, G05, 3, G10),
        (1, 0.0, 1000, 96.99),
        (5, -0.4, 6, -0.45),
        (2, 50, 9, 0.3),
    ],
)
def test_inner_product_matches_quadrature(ta, ga, tb, gb) -> None:
    # Independent check: 40-digit tanh-sinh quadrature of p_a * p_b over (0, min t], in the
    # variable s = -log(tau / min t) on [0, inf), where the integrand is a smooth decaying
    # exponential even for negative gammas (tau**(ga+gb) is singular at 0 in tau). 1e-10 relative
    # is ~1e5 float64 ulps, covering the float64 closed form with powers up to ~100.
    with mpmath.workdps(40):
        m = mpmath.mpf(min(ta, tb))

        def f(s):
            u = m * mpmath.exp(-s)
            pa = (mpmath.mpf(ga) + 1) / ta * (u / ta) ** ga
            pb = (mpmath.mpf(gb) + 1) / tb * (u / tb) ** gb
            return pa * pb * u

        ref = float(mpmath.quad(f, [0, 1, 10, 100, mpmath.inf]))
    got = float(inner_product(ta, ga, tb, gb))
    assert got == pytest.approx(ref, rel=1e-10)
    assert float(inner_product(tb, gb, ta, ga)) == got  # symmetric, bit for bit


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("which", [0, 1, -1, -2])
def test_stored_target_gives_one_hot(n: int, which: int) -> None:
    steps, gammas = _grid(n)
    tr = steps.max()
    idx = [i for i in range(steps.size) if steps[i] == tr][which % 2] if which < 0 else which
    if steps[idx] != tr:  # only snapshots at the target time can be targets themselves
        steps = steps[steps <= steps[idx]]
        gammas = gammas[: steps.size]
        tr = steps[idx]
    sol = solve(steps, gammas, tr, gammas[idx])
    onehot = np.zeros(steps.size)
    onehot[idx] = 1.0
    # The backward-stable solve perturbs x by about cond(A) * eps relative; 10x covers the
    # constant of LU with partial pivoting at these sizes.
    assert np.max(np.abs(sol.weights - onehot)) <= 10 * sol.cond * EPS
    # The residual is pointwise rounding only (~eps * sum|x_i p_i| / ||p_r||).
    assert sol.error <= 1e-10


def test_error_is_small_nonzero_and_matches_high_precision() -> None:
    steps, gammas = _grid(16)
    tr = steps.max()
    for sigma in (0.08, 0.07, 0.15, 0.03):
        g = sigma_rel_to_gamma(sigma)
        sol = solve(steps, gammas, tr, g)
        assert 1e-6 < sol.error < 0.05
        ref = _mp_error(sol.weights, steps, gammas, tr, g)
        # Both evaluate the same float64 weights; the quadrature's own rounding is ~eps * |x|
        # relative to ||p_r||, so 1e-9 relative agreement is conservative for errors >= 1e-6.
        assert sol.error == pytest.approx(ref, rel=1e-9)


def test_tiny_error_is_resolved_below_gram_form_cancellation() -> None:
    # A target a hair away from a stored profile has a true error ~1e-9 .. 1e-12, below where
    # (c - 2 x.b + x.A x)/c cancels (~1e-8); the quadrature still matches 60-digit arithmetic.
    steps, gammas = _grid(8)
    tr = steps.max()
    for delta in (1e-7, 1e-9):
        g = G10 + delta
        sol = solve(steps, gammas, tr, g)
        ref = _mp_error(sol.weights, steps, gammas, tr, g)
        assert 0 < ref < 1e-8
        # The floor of the pointwise residual is ~eps * sum_i |x_i| ||p_i|| / ||p_r|| ~ 1e-15 here.
        assert abs(sol.error - ref) <= 1e-3 * ref + 1e-14


_SIGMAS = st.sampled_from([0.03, 0.05, 0.07, 0.10, 0.15, 0.2])
_SNAP = st.tuples(st.integers(1, 1000), _SIGMAS)


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(_SNAP, min_size=1, max_size=8, unique=True),
    extra=st.lists(_SNAP, min_size=1, max_size=8, unique=True),
    target=_SIGMAS,
)
def test_adding_snapshots_never_increases_error(base, extra, target) -> None:
    tr = max(t for t, _ in base + extra)
    base = [(tr, base[0][1])] + [s for s in base if s != (tr, base[0][1])]
    more = base + [s for s in extra if s not in base]
    gt = sigma_rel_to_gamma(target)

    def run(snaps):
        t = [float(s[0]) for s in snaps]
        g = [sigma_rel_to_gamma(s[1]) for s in snaps]
        try:
            return solve(t, g, float(tr), gt, max_cond=1e10)
        except ValueError:
            return None

    a, b = run(base), run(more)
    assume(a is not None and b is not None)
    # The exact minimum can only decrease. The computed weights miss the minimiser by ~cond * eps
    # relative, which raises the residual by at most ~sqrt(cond) * eps * ||x|| (the excess is
    # quadratic in the weight error, measured in the A-norm); with cond <= 1e10 that is < 1e-9.
    assert b.error <= a.error * (1 + 1e-9) + 1e-9


def test_weights_reproduce_constant_and_are_scale_invariant() -> None:
    steps, gammas = _grid(6)
    w1, e1 = solve_weights(steps, gammas, steps.max(), sigma_rel_to_gamma(0.08))
    w2, e2 = solve_weights(steps * 1e6, gammas, steps.max() * 1e6, sigma_rel_to_gamma(0.08))
    # Scaling every time by the same factor leaves the weights unchanged up to rounding of the
    # normalised times (a few ulps amplified by cond ~1e3).
    np.testing.assert_allclose(w1, w2, rtol=1e-9, atol=1e-9)
    assert e1 == pytest.approx(e2, rel=1e-9)


def test_return_shape_and_dtype() -> None:
    w, err = solve_weights([10, 20], [G05, G10], 20, G10)
    assert isinstance(w, np.ndarray) and w.dtype == np.float64 and w.shape == (2,)
    assert isinstance(err, float)


@pytest.mark.parametrize(
    "args,match",
    [
        (([1, 2], [G05], 2, G10), "same length"),
        (([], [], 2, G10), "steps is empty"),
        (([0, 2], [G05, G10], 2, G10), "steps must"),
        (([-1, 2], [G05, G10], 2, G10), "steps must"),
        (([1, np.nan], [G05, G10], 2, G10), "steps must"),
        (([1, 2], [G05, -0.5], 2, G10), "gammas must"),
        (([1, 2], [G05, np.inf], 2, G10), "gammas must"),
        (([1, 2], [G05, G10], 3, G10), "target_step=3 is not one of the steps"),
        (([1, 2], [G05, G10], 0, G10), "target_step must be > 0"),
        (([1, 2, 3], [G05, G10, G05], 2, G10), "<= target_step"),
        (([1, 2], [G05, G10], 2, -0.6), "target_gamma"),
        (([1, 2], [G05, G10], 2, float("nan")), "target_gamma"),
        (([[1, 2]], [G05, G10], 2, G10), "steps must be a 1-d"),
        (([1, 2], [[G05, G10]], 2, G10), "gammas must be a 1-d"),
    ],
)
def test_bad_inputs_name_the_argument(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        solve_weights(*args)


@pytest.mark.parametrize(
    "args", [([1, 2], [G05, G10], True, G10), ([1, 2], [G05, G10], 2, "7"), ([1, 2], [G05, G10], 2, None)]
)
def test_non_numeric_target_is_a_type_error(args) -> None:
    with pytest.raises(TypeError, match="target_"):
        solve_weights(*args)


def test_duplicate_pair_is_singular() -> None:
    with pytest.raises(ValueError, match=r"same \(step, gamma\).*twice.*singular"):
        solve_weights([5, 10, 10], [G10, G05, G05], 10, G10)


def test_ill_conditioned_system_reports_cond() -> None:
    with pytest.raises(ValueError, match=r"ill-conditioned: cond\(A\) = .* > 1e\+14"):
        solve_weights([10, 10], [G10, G10 + 1e-9], 10, G05)
