"""Tests for the sigma_rel <-> gamma conversion of power-function EMAs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from funcema._sigma import (
    GAMMA_AT_SIGMA_REL_MAX,
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
)

SIGMA_AT_ZERO = 1.0 / math.sqrt(12.0)


def reference_sigma_rel(g: float) -> float:
    """The definition, written independently of the library."""
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def cubic(g: float, s: float) -> tuple[float, float, float]:
    """Return (p(g), p'(g), a scale for p's rounding error) for the defining cubic."""
    c = 16 - s**-2
    d = 12 - s**-2
    value = g**3 + 7 * g**2 + c * g + d
    slope = 3 * g**2 + 14 * g + c
    scale = abs(g) ** 3 + 7 * g**2 + abs(c * g) + abs(d)
    return value, slope, scale


# -- known values ----------------------------------------------------------------------------------


def test_known_values() -> None:
    assert round(sigma_rel_to_gamma(0.05), 4) == 16.9722
    assert round(sigma_rel_to_gamma(0.10), 4) == 6.9372
    assert round(gamma_to_sigma_rel(16.9722), 4) == 0.05
    assert round(gamma_to_sigma_rel(6.9372), 4) == 0.10


@pytest.mark.parametrize(
    ("gamma", "sigma_rel"),
    [
        (0.0, math.sqrt(1 / 12)),
        (1.0, math.sqrt(2 / 36)),  # sqrt(2 / (3**2 * 4))
        (2.0, math.sqrt(3 / 80)),  # sqrt(3 / (4**2 * 5))
        (-1 / 3, 0.3),  # (2/3) / ((5/3)**2 (8/3)) = 0.09
    ],
)
def test_exact_pairs(gamma: float, sigma_rel: float) -> None:
    # Closed-form pairs: the forward map is a few float64 operations (error ~1e-16).
    assert math.isclose(gamma_to_sigma_rel(gamma), sigma_rel, rel_tol=1e-14)
    # The inverse near gamma = -1/3 has slope 1 / |dlog(sigma)/dgamma| ~ 27, so 1e-12 absolute.
    assert math.isclose(sigma_rel_to_gamma(sigma_rel, allow_negative=gamma < 0), gamma, rel_tol=1e-12, abs_tol=1e-12)


def test_maximum_of_the_curve() -> None:
    # gamma* = (sqrt(5) - 3) / 2 solves g**2 + 3g + 1 = 0 and sigma_rel(gamma*) = phi ** -2.5.
    phi = (1 + math.sqrt(5)) / 2
    assert math.isclose(GAMMA_AT_SIGMA_REL_MAX, (math.sqrt(5) - 3) / 2, rel_tol=1e-15)
    assert math.isclose(SIGMA_REL_MAX, phi**-2.5, rel_tol=1e-14)
    assert round(SIGMA_REL_MAX, 6) == 0.300283
    for delta in (1e-3, 1e-2, 1e-1):
        assert reference_sigma_rel(GAMMA_AT_SIGMA_REL_MAX + delta) < SIGMA_REL_MAX
        assert reference_sigma_rel(GAMMA_AT_SIGMA_REL_MAX - delta) < SIGMA_REL_MAX
    assert sigma_rel_to_gamma(SIGMA_REL_MAX, allow_negative=True) == GAMMA_AT_SIGMA_REL_MAX


# -- round trips -----------------------------------------------------------------------------------


@given(st.floats(min_value=1e-300, max_value=SIGMA_AT_ZERO, exclude_max=True))
def test_sigma_gamma_sigma_round_trip(s: float) -> None:
    g = sigma_rel_to_gamma(s)
    assert g > 0
    # sigma_rel(gamma) is well conditioned (|dlog sigma / dgamma| <= 1/6 near 0, ~1/gamma for
    # large gamma), so a root accurate to a few ulps maps back to within ~1e-15 relative;
    # 1e-12 leaves a wide margin. (The literal definition overflows beyond gamma ~ 1e102.)
    if g < 1e100:
        assert math.isclose(reference_sigma_rel(g), s, rel_tol=1e-12)
    assert math.isclose(gamma_to_sigma_rel(g), s, rel_tol=1e-12)


@given(st.floats(min_value=1e-6, max_value=SIGMA_REL_MAX))
def test_returns_the_largest_root_of_the_cubic(s: float) -> None:
    g = sigma_rel_to_gamma(s, allow_negative=True)
    value, slope, scale = cubic(g, s)
    # The residual of a float64 cubic evaluation is ~eps * scale; 1e-10 allows for the root's own
    # rounding, amplified near the maximum where the root is double.
    assert abs(value) <= 1e-10 * scale
    # p is convex for g > -7/3 and p(g) = 0, so p' >= 0 at g means no larger root exists.
    assert slope >= -1e-10 * scale
    assert g >= GAMMA_AT_SIGMA_REL_MAX > -0.5


@given(st.floats(min_value=0.0, max_value=1e6))
def test_gamma_sigma_gamma_round_trip(g: float) -> None:
    s = gamma_to_sigma_rel(g)
    # |dlog sigma / dgamma| >= min(1/6, ~1/(gamma + 3)) on gamma >= 0, so a relative error of a few
    # ulps in sigma moves gamma by at most ~1e-15 absolute near 0 and ~1e-15 relative for large
    # gamma; 1e-12 (relative and absolute) leaves a wide margin.
    assert math.isclose(sigma_rel_to_gamma(s, allow_negative=True), g, rel_tol=1e-12, abs_tol=1e-12)


@given(st.floats(min_value=GAMMA_AT_SIGMA_REL_MAX + 0.01, max_value=0.0))
def test_negative_gamma_round_trip(g: float) -> None:
    s = gamma_to_sigma_rel(g)
    h = sigma_rel_to_gamma(s, allow_negative=True)
    assert h > -0.5
    # dlog sigma / dgamma >= ~0.008 at gamma* + 0.01 (it vanishes at the maximum), so gamma is
    # recovered to ~4e-14 absolute there; 1e-11 leaves margin.
    assert math.isclose(h, g, abs_tol=1e-11)
    assert math.isclose(gamma_to_sigma_rel(h), s, rel_tol=1e-12)


@given(st.floats(min_value=SIGMA_AT_ZERO, max_value=SIGMA_REL_MAX))
def test_allow_negative_range(s: float) -> None:
    g = sigma_rel_to_gamma(s, allow_negative=True)
    assert GAMMA_AT_SIGMA_REL_MAX <= g <= 1e-15
    assert math.isclose(gamma_to_sigma_rel(g), s, rel_tol=1e-12)


def test_accepts_numpy_and_int() -> None:
    assert sigma_rel_to_gamma(np.float64(0.1)) == sigma_rel_to_gamma(0.1)
    assert gamma_to_sigma_rel(np.float32(1.0)) == gamma_to_sigma_rel(1)
    assert isinstance(sigma_rel_to_gamma(np.float64(0.1)), float)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "allow_negative"),
    [
        (0.0, False),
        (-0.1, False),
        (SIGMA_AT_ZERO, False),
        (0.29, False),
        (0.5, False),
        (0.0, True),
        (SIGMA_REL_MAX * (1 + 1e-12), True),
        (0.31, True),
        (math.nan, False),
        (math.inf, False),
        (-math.inf, True),
        (1e-320, False),  # gamma would overflow float64
    ],
)
def test_sigma_rel_out_of_range(value: float, allow_negative: bool) -> None:
    with pytest.raises(ValueError, match="sigma_rel") as info:
        sigma_rel_to_gamma(value, allow_negative=allow_negative)
    assert repr(value) in str(info.value)


def test_sigma_rel_error_names_interval() -> None:
    with pytest.raises(ValueError, match=r"\(0, 1/sqrt\(12\)\)"):
        sigma_rel_to_gamma(0.29)
    with pytest.raises(ValueError, match=r"0\.30028"):
        sigma_rel_to_gamma(0.31, allow_negative=True)


@pytest.mark.parametrize("value", [True, "0.1", None, [0.1], 1 + 0j])
def test_sigma_rel_bad_type(value: object) -> None:
    with pytest.raises(TypeError, match="sigma_rel"):
        sigma_rel_to_gamma(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-0.5, -0.75, -1.0, -2.0, math.nan, math.inf, -math.inf])
def test_gamma_out_of_range(value: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        gamma_to_sigma_rel(value)


@pytest.mark.parametrize("value", [False, "1", None, 1j])
def test_gamma_bad_type(value: object) -> None:
    with pytest.raises(TypeError, match="gamma"):
        gamma_to_sigma_rel(value)  # type: ignore[arg-type]
