r"""Conversion between the EMA width `sigma_rel` and the power exponent `gamma`.

A power-function EMA (Karras et al. 2024, arXiv 2312.02696) averages with the per-step decay
`(1 - 1/u) ** (gamma + 1)`. Its weight profile at time `t` is `p(tau) = (g+1)/t * (tau/t)**g`
on `(0, t]`, whose standard deviation relative to `t` is

$$ \sigma_\text{rel}(g) = \sqrt{\frac{g + 1}{(g + 2)^2 (g + 3)}}. $$

`sigma_rel` is zero at `g = -1`, rises to its maximum `phi**-2.5 ~= 0.300283` at
`g = (sqrt(5) - 3) / 2 ~= -0.382` (`phi` is the golden ratio), equals `1/sqrt(12)` at `g = 0`
and decreases to zero as `g` grows. The inverse is therefore the largest real root of
`g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2) = 0`, found here by a bracketed Newton iteration on
`log sigma_rel` in float64 (`np.roots` returns garbage above the maximum, where the wanted roots
are complex).

Owns: the conversion between `sigma_rel` and `gamma`.

Must not import: any funcema module except `_validate`.
"""

from __future__ import annotations

import math

from ._validate import finite_float

__all__ = [
    "GAMMA_AT_SIGMA_REL_MAX",
    "SIGMA_REL_MAX",
    "gamma_for_width",
    "gamma_to_sigma_rel",
    "sigma_rel_to_gamma",
]

#: `gamma` where `sigma_rel(gamma)` is largest: the root of `g**2 + 3 g + 1 = 0` in (-1, 0).
GAMMA_AT_SIGMA_REL_MAX: float = (math.sqrt(5.0) - 3.0) / 2.0

_SIGMA_REL_AT_ZERO = 1.0 / math.sqrt(12.0)


def _log_sigma_rel(g: float) -> float:
    """Return `log sigma_rel(g)` for `g > -1` without overflow for large `g`."""
    return 0.5 * (math.log1p(g) - 2.0 * math.log(g + 2.0) - math.log(g + 3.0))


def _dlog_sigma_rel(g: float) -> float:
    """Return `d log sigma_rel / d g`, which is negative for `g > GAMMA_AT_SIGMA_REL_MAX`."""
    return 0.5 * (1.0 / (g + 1.0) - 2.0 / (g + 2.0) - 1.0 / (g + 3.0))


def _sigma_rel(g: float) -> float:
    # sqrt((g+1)/(g+3)) / (g+2): the same value as the definition, finite for every finite g > -1.
    return math.sqrt((g + 1.0) / (g + 3.0)) / (g + 2.0)


#: The largest `sigma_rel` any power EMA reaches (`phi**-2.5 ~= 0.300283`).
SIGMA_REL_MAX: float = _sigma_rel(GAMMA_AT_SIGMA_REL_MAX)


def gamma_to_sigma_rel(gamma: float) -> float:
    r"""Return the relative standard deviation of the power EMA with exponent `gamma`.

    $$ \sigma_\text{rel} = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2 (\gamma + 3)}} $$

    Args:
        gamma: The exponent of the power profile; must be finite and greater than -1/2 (post-hoc
            synthesis needs `gamma_a + gamma_b + 1 > 0` for every pair of profiles).

    Returns:
        `sigma_rel` as a Python float, in `(0, SIGMA_REL_MAX]`.

    Raises:
        TypeError: If `gamma` is not a real number (or is a bool).
        ValueError: If `gamma` is not finite or not greater than -1/2.

    Examples:
        >>> round(gamma_to_sigma_rel(6.9372), 4)
        0.1
        >>> round(gamma_to_sigma_rel(0.0) ** -2, 12)  # 1/sqrt(12) at gamma = 0
        12.0
    """
    g = finite_float("gamma", gamma)
    if not g > -0.5:
        raise ValueError(
            f"gamma must be greater than -1/2, got {gamma!r}: the post-hoc Gram matrix needs gamma_a + gamma_b + 1 > 0."
        )
    return _sigma_rel(g)


def sigma_rel_to_gamma(sigma_rel: float, *, allow_negative: bool = False) -> float:
    r"""Return the exponent `gamma` of the power EMA whose relative width is `sigma_rel`.

    Solves

    $$ \sigma_\text{rel} = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2 (\gamma + 3)}} $$

    for its largest real root, i.e. the largest root of
    `g**3 + 7 g**2 + (16 - s**-2) g + (12 - s**-2) = 0`, by Newton's method on `log sigma_rel`
    safeguarded by bisection, in float64 (relative accuracy ~1e-15).

    Args:
        sigma_rel: The EMA width relative to the training length. Must lie in
            `(0, 1/sqrt(12))` (which gives `gamma > 0`), or in `(0, SIGMA_REL_MAX]`
            (`SIGMA_REL_MAX ~= 0.300283`) when `allow_negative` is true.
        allow_negative: Accept widths that need a negative `gamma`. The root returned is then
            at least `(sqrt(5) - 3) / 2 ~= -0.382`, so always greater than -1/2.

    Returns:
        `gamma` as a Python float.

    Raises:
        TypeError: If `sigma_rel` is not a real number (or is a bool).
        ValueError: If `sigma_rel` is not finite, is outside the valid interval, or is so small
            that `gamma` would overflow float64.

    Examples:
        >>> round(sigma_rel_to_gamma(0.05), 4)
        16.9722
        >>> round(sigma_rel_to_gamma(0.10), 4)
        6.9372
    """
    hint = f"pass allow_negative=True to accept up to {SIGMA_REL_MAX!r} (gamma < 0)"
    return gamma_for_width(sigma_rel, allow_negative=allow_negative, wider_hint=hint)


def gamma_for_width(sigma_rel: object, *, allow_negative: bool, wider_hint: str) -> float:
    """Check `sigma_rel` and return its `gamma`; `wider_hint` says how the caller reaches wider EMAs.

    [`sigma_rel_to_gamma`][funcema.sigma_rel_to_gamma] with an error message fitted to the
    caller: `schedules.power` and `posthoc.synthesize` have no `allow_negative` but take `gamma`.
    """
    s = finite_float("sigma_rel", sigma_rel)
    if allow_negative:
        if not 0.0 < s <= SIGMA_REL_MAX:
            raise ValueError(
                f"sigma_rel must be in (0, {SIGMA_REL_MAX!r}] with allow_negative=True, "
                f"got {sigma_rel!r}: no power EMA is wider."
            )
    elif not 0.0 < s < _SIGMA_REL_AT_ZERO:
        raise ValueError(
            f"sigma_rel must be in (0, 1/sqrt(12)) = (0, {_SIGMA_REL_AT_ZERO!r}), got {sigma_rel!r}; {wider_hint}."
        )
    if not math.isfinite(1.0 / s):
        raise ValueError(f"sigma_rel={sigma_rel!r} is too small: gamma would overflow float64.")
    return _solve_log_sigma_rel(math.log(s), 1.0 / s)


def _solve_log_sigma_rel(log_s: float, hi: float) -> float:
    """Return the root `g >= GAMMA_AT_SIGMA_REL_MAX` of `log sigma_rel(g) = log_s`, `g <= hi`."""
    # f(g) = log sigma_rel(g) - log s is strictly decreasing on [lo, inf) with f(lo) >= 0, and
    # sigma_rel(g) < 1/g for g > 0, so f(1/s) < 0: the root lies in [lo, 1/s].
    lo = GAMMA_AT_SIGMA_REL_MAX
    if _log_sigma_rel(lo) - log_s <= 0.0:
        return lo  # s is the maximum itself (up to rounding).
    # sigma_rel ~ (1/g)(1 - 3/g) for large g gives the first guess 1/s - 3.
    g = min(max(hi - 3.0, lo), hi)
    if g == lo:
        g = 0.5 * (lo + hi)
    for _ in range(200):
        f = _log_sigma_rel(g) - log_s
        if f == 0.0:
            return g
        if f > 0.0:
            lo = g
        else:
            hi = g
        df = _dlog_sigma_rel(g)
        newton = g - f / df if df < 0.0 else math.nan
        # Bisect when Newton leaves the bracket (or the slope vanishes near the maximum).
        g_new = newton if lo < newton < hi else 0.5 * (lo + hi)
        if abs(g_new - g) <= 1e-16 * max(abs(g_new), 1.0) or g_new in (lo, hi):
            return g_new
        g = g_new
    return g
