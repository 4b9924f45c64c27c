r"""Least-squares weights that combine stored power-EMA profiles into a new one.

A power EMA with exponent `g` read at time `t` is the weighted average of the parameters
`theta(tau)` with the profile (Karras et al. 2024, arXiv 2312.02696, eq. 3)

$$ p_{t,g}(\tau) = \frac{g + 1}{t} \left(\frac{\tau}{t}\right)^{g} \quad (0 < \tau \le t), \qquad 0 \text{ after } t. $$

Two profiles have the closed-form L2 inner product (`t_a <= t_b` without loss of generality)

$$ \langle p_a, p_b \rangle = \frac{(g_a + 1)(g_b + 1)}{(g_a + g_b + 1)\, t_b} \left(\frac{t_a}{t_b}\right)^{g_b}, $$

i.e. the exponent of the ratio is the gamma of the *longer* profile. Given stored profiles `p_i`
and a target `p_r`, the weights `x` minimise `||sum_i x_i p_i - p_r||` and solve `A x = b` with
`A_ij = <p_i, p_j>` and `b_i = <p_i, p_r>`, all in float64.

The relative reconstruction error `||sum_i x_i p_i - p_r|| / ||p_r||` is *not* computed from the
Gram form `(c - 2 x.b + x.A x) / c` (`c = <p_r, p_r>`), which cancels catastrophically and loses
everything below ~1e-8. The residual `r(tau)` is integrated directly instead: between consecutive
snapshot times it is a sum of one power of `tau` per distinct exponent, which composite
Gauss-Legendre integrates to full precision in `log tau` on panels short enough for the fastest
term that still matters there. A term `exp(G s)` matters only within `~log(1/tol) / G` of the top of
an interval, so the cost does not grow with `G` (128 snapshots at `G = 1e4` take milliseconds).

Owns: the Gram system, its weights and the error of their profile.

Must not import: any funcema module except `_validate` (it is numpy arithmetic on times and
exponents, and reads no file).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._validate import boolean, bounded_float

__all__ = ["MAX_COND", "Solution", "inner_product", "solve", "solve_weights"]

#: Systems whose condition number exceeds this are rejected: their weights would carry relative
#: errors of `cond * eps ~ 1e-2` or worse, and the huge alternating weights amplify the rounding
#: of stored float32/float16 snapshots far beyond any reconstruction benefit.
MAX_COND: float = 1e14

# Gauss-Legendre rule used for every panel, and the largest exponential rate times panel width
# (in s = log tau). For exp(lam s) on a panel of width h the n-point rule errs by about
# (lam h / 2)**(2n) / (2n)!, i.e. (1.5)**40 / 40! ~ 1e-41 relative here: far below float64.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(20)
_PANEL_RATE_WIDTH = 3.0
# The head (0, t_min] is integrated down to a point a where the closed-form tail bound is below
# 1e-3 of what has been integrated (the closed form is then exact to ~1e-3 * eps relative), or
# below 1e-36 of <p_r, p_r>, or at most _HEAD_MAX_LOG below t_min.
_HEAD_MAX_LOG = 40.0
# Panels integrated per numpy call: 4096 x 20 nodes x (distinct exponents) doubles.
_CHUNK = 4096


@dataclass(frozen=True)
class Solution:
    """Least-squares weights with their diagnostics.

    Attributes:
        weights: float64 array `x` of shape `(n,)`, one weight per stored profile (divided by
            `weight_sum` when the solve was asked to normalise).
        error: relative L2 reconstruction error `||sum_i x_i p_i - p_r|| / ||p_r||` of `weights`.
        cond: 2-norm condition number of the Gram matrix `A`.
        weight_sum: sum of the least-squares weights before any normalisation: the mass of the
            reconstructed profile (the target's is 1).
    """

    weights: NDArray[np.float64]
    error: float
    cond: float
    weight_sum: float


def inner_product(step_a: ArrayLike, gamma_a: ArrayLike, step_b: ArrayLike, gamma_b: ArrayLike) -> NDArray[np.float64]:
    """Return `<p_a, p_b> = (ga+1)(gb+1) / ((ga+gb+1) max(ta, tb)) * (min/max) ** g_longer`.

    `g_longer` is the gamma of the profile with the larger `t`. Arguments broadcast.

    Examples:
        >>> float(inner_product(10.0, 0.0, 10.0, 0.0))  # ||uniform on (0, 10]||^2 = 1/10
        0.1
    """
    ta, ga, tb, gb = (np.asarray(v, dtype=np.float64) for v in (step_a, gamma_a, step_b, gamma_b))
    t_max = np.maximum(ta, tb)
    t_min = np.minimum(ta, tb)
    g_longer = np.where(ta >= tb, ga, gb)
    return (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * t_max) * (t_min / t_max) ** g_longer


def _checked_profiles(
    steps: Sequence[float] | ArrayLike, gammas: Sequence[float] | ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    t = np.asarray(steps, dtype=np.float64).reshape(-1) if np.ndim(steps) <= 1 else None
    g = np.asarray(gammas, dtype=np.float64).reshape(-1) if np.ndim(gammas) <= 1 else None
    if t is None:
        raise ValueError(f"steps must be a 1-d sequence of numbers, got shape {np.shape(steps)}.")
    if g is None:
        raise ValueError(f"gammas must be a 1-d sequence of numbers, got shape {np.shape(gammas)}.")
    if t.size == 0:
        raise ValueError("steps is empty: at least one stored profile is needed.")
    if t.size != g.size:
        raise ValueError(f"steps and gammas must have the same length, got {t.size} and {g.size}.")
    if not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise ValueError("steps must all be finite and > 0.")
    if not (np.all(np.isfinite(g)) and np.all(g > -0.5)):
        raise ValueError("gammas must all be finite and > -1/2 (the Gram matrix needs ga + gb + 1 > 0).")
    pairs = list(zip(t.tolist(), g.tolist()))
    if len(set(pairs)) != len(pairs):
        seen: set[tuple[float, float]] = set()
        dup = next(p for p in pairs if p in seen or seen.add(p))  # type: ignore[func-returns-value]
        raise ValueError(
            f"the stored profiles contain the same (step, gamma) = ({dup[0]:g}, {dup[1]:g}) twice, so "
            "the Gram matrix is singular (cond = inf); remove the duplicate snapshot."
        )
    return t, g


def _checked_target(t: NDArray[np.float64], target_step: object, target_gamma: object) -> tuple[float, float]:
    tr = bounded_float("target_step", target_step, low=0.0, low_open=True)
    gr = bounded_float("target_gamma", target_gamma, low=-0.5, low_open=True)
    if not np.any(t == tr):
        raise ValueError(
            f"target_step={target_step!r} is not one of the steps: the target profile must end at a "
            "snapshot time (the stored profiles cannot describe the weights after their last time)."
        )
    if np.any(t > tr):
        raise ValueError(
            f"steps must all be <= target_step={target_step!r}; drop the later snapshots first "
            f"(largest step given: {float(t.max())!r})."
        )
    return tr, gr


def _least_squares(
    t: NDArray[np.float64], g: NDArray[np.float64], gr: float, max_cond: float
) -> tuple[NDArray[np.float64], float]:
    """Return the weights and `cond(A)` for profiles at times `t` in units of `t_r = 1`."""
    A = inner_product(t[:, None], g[:, None], t[None, :], g[None, :])
    b = inner_product(t, g, 1.0, gr)
    cond = float(np.linalg.cond(A))
    if not (cond <= max_cond):
        raise ValueError(
            f"the least-squares system is singular or too ill-conditioned: cond(A) = {cond:.3g} > "
            f"{max_cond:.3g}; use fewer or more distinct snapshots (steps and gammas further apart)."
        )
    # Jacobi scaling equalises the diagonal (norms differ by t_i ratios) before the solve.
    d = 1.0 / np.sqrt(np.diag(A))
    return d * np.linalg.solve(A * d[:, None] * d[None, :], b * d), cond


def solve(
    steps: Sequence[float] | ArrayLike,
    gammas: Sequence[float] | ArrayLike,
    target_step: float,
    target_gamma: float,
    *,
    max_cond: float = MAX_COND,
    normalize: bool = False,
) -> Solution:
    """Solve for the weights, and report the reconstruction error, `cond(A)` and the weights' sum.

    This is [`solve_weights`][funcema.posthoc.solve_weights] with the diagnostics; synthesis uses it.

    Args:
        steps: Times `t_i` of the stored profiles (all `<= target_step`).
        gammas: Exponents `g_i` of the stored profiles (all `> -1/2`).
        target_step: Time `t_r` of the target profile; must be one of `steps`.
        target_gamma: Exponent `g_r` of the target profile (`> -1/2`).
        max_cond: Reject systems with `cond(A)` above this.
        normalize: Divide the weights by their sum, so that they sum to 1 (the error is then that
            of the rescaled weights).

    Returns:
        A `Solution` with `weights`, `error`, `cond` and `weight_sum`.

    Raises:
        TypeError: If `target_step` or `target_gamma` is not a real number, or `normalize` not a bool.
        ValueError: On invalid inputs (the message names the argument), on duplicate
            `(step, gamma)` pairs, when `cond(A) > max_cond`, or when normalising weights whose
            sum is not positive.

    Examples:
        >>> sol = solve([50, 100, 50, 100], [6.94, 6.94, 16.97, 16.97], 100, 10.0, normalize=True)
        >>> round(float(sol.weights.sum()), 12), round(sol.weight_sum, 4)
        (1.0, 1.0327)
    """
    normalize = boolean("normalize", normalize)
    t, g = _checked_profiles(steps, gammas)
    tr, gr = _checked_target(t, target_step, target_gamma)
    t = t / tr  # units of the target time: inner products scale by 1/t_r, weights are unchanged
    x, cond = _least_squares(t, g, gr, max_cond)
    weight_sum = math.fsum(x.tolist())
    if normalize:
        if not weight_sum > 0.0:
            raise ValueError(f"cannot normalise weights that sum to {weight_sum:.3g}; pass normalize=False.")
        x = x / weight_sum
    return Solution(weights=x, error=_relative_error(x, t, g, gr), cond=cond, weight_sum=weight_sum)


def solve_weights(
    steps: Sequence[float] | ArrayLike,
    gammas: Sequence[float] | ArrayLike,
    target_step: float,
    target_gamma: float,
) -> tuple[NDArray[np.float64], float]:
    r"""Return least-squares weights combining stored power-EMA profiles into a target profile.

    Minimises `||sum_i x_i p_i - p_r||` over `x` with `p_{t,g}(tau) = (g+1)/t * (tau/t)**g` on
    `(0, t]`, by solving `A x = b` in float64 with `A_ij = <p_i, p_j>`, `b_i = <p_i, p_r>` and

    $$ \langle p_a, p_b \rangle = \frac{(g_a+1)(g_b+1)}{(g_a+g_b+1)\max(t_a, t_b)}
    \left(\frac{\min(t_a, t_b)}{\max(t_a, t_b)}\right)^{g_\text{longer}}. $$

    These are the plain least-squares weights: they sum to 1 only up to the reconstruction error
    (`|sum - 1| <= error * (g_r + 1) / sqrt(2 g_r + 1)`). EDM2's `solve_posthoc_coefficients`
    divides them by their sum, and so does [`synthesize`][funcema.posthoc.synthesize] by default.

    Args:
        steps: Times `t_i` of the stored profiles, all `> 0` and `<= target_step`.
        gammas: Exponents `g_i` of the stored profiles, all `> -1/2`.
        target_step: Time `t_r` of the target; must be one of `steps`.
        target_gamma: Exponent `g_r` of the target, `> -1/2`.

    Returns:
        `(weights, error)`: the float64 weights, shape `(len(steps),)`, and the relative L2
        reconstruction error `||sum_i x_i p_i - p_r|| / ||p_r||`, computed without cancellation.

    Raises:
        ValueError: If an argument is invalid (the message names it), or the system is singular
            (duplicate `(step, gamma)` pairs) or ill-conditioned (`cond(A) > 1e14`).

    Examples:
        >>> w, err = solve_weights([100, 100], [6.9372, 16.9722], 100, 6.9372)
        >>> [round(float(v), 12) + 0.0 for v in w], err < 1e-10  # + 0.0: the solver may give -0.0
        ([1.0, 0.0], True)
        >>> w, err = solve_weights([50, 100, 50, 100], [6.94, 6.94, 16.97, 16.97], 100, 10.0)
        >>> 1e-6 < err < 0.05
        True
    """
    sol = solve(steps, gammas, target_step, target_gamma)
    return sol.weights, sol.error


def _relative_error(x: NDArray[np.float64], t: NDArray[np.float64], g: NDArray[np.float64], gr: float) -> float:
    """Return `||sum_i x_i p_i - p_r|| / ||p_r||` with `t` in units of `t_r = 1`.

    The residual is integrated interval by interval between consecutive snapshot times, and on
    the head `(0, t_min]`, in `sigma = log(tau / b)` where `b` is the interval's upper end. There
    `r = sum_j C_j exp(G_j sigma)` over the distinct exponents `G_j`, each `C_j` summing the
    active profiles of that exponent (rounding ~eps * sum_i |x_i p_i(b)|, as a pointwise
    evaluation would), so a node costs one exponential per distinct exponent, not per profile.
    """
    c = (gr + 1.0) ** 2 / (2.0 * gr + 1.0)  # <p_r, p_r> at t_r = 1
    ends = np.unique(np.concatenate([t, [1.0]]))  # upper ends: t_min (the head), ..., 1
    exps, coef = _grouped_coefficients(x, t, g, gr, ends)
    log_ends = np.log(ends)
    widths = np.concatenate([[_HEAD_MAX_LOG], np.diff(log_ends)])
    # Below this L2 norm a term is dropped from the panel-width rule: 1e-20 of ||p_r||, so the
    # squared error moves by at most ~2e-20 of itself.
    log_tol = math.log(1e-20) + 0.5 * math.log(c)
    lo, hi, rows = _panels(exps, coef, log_ends, widths, log_tol)
    total = _integrate(lo, hi, rows, exps, coef, ends)
    total += _head_tail(exps, coef[0], ends[0], min(widths[0], _death_depth(exps, coef[0], log_ends[0], log_tol)))
    return math.sqrt(max(total, 0.0) / c)


def _grouped_coefficients(
    x: NDArray[np.float64], t: NDArray[np.float64], g: NDArray[np.float64], gr: float, ends: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return the distinct exponents `G` (m,) and `C` (len(ends), m) with `r = sum_j C_kj (tau/b_k)**G_j`.

    On the interval ending at `b_k` the active profiles are those with `t_i >= b_k`;
    `x_i p_i(tau) = x_i (g_i + 1) / t_i (b_k / t_i)**g_i (tau / b_k)**g_i` (no overflow: `b_k <= t_i`).
    """
    exps, group = np.unique(np.concatenate([g, [gr]]), return_inverse=True)
    times = np.concatenate([t, [1.0]])
    weights = np.concatenate([x, [-1.0]]) * (np.concatenate([g, [gr]]) + 1.0) / times
    log_ratio = np.log(ends)[:, None] - np.log(times)[None, :]  # (K, n + 1), <= 0 where active
    gam = np.concatenate([g, [gr]])
    with np.errstate(over="ignore", under="ignore"):
        terms = np.where(log_ratio <= 0.0, weights * np.exp(gam * np.minimum(log_ratio, 0.0)), 0.0)
    coef = np.zeros((ends.size, exps.size))
    np.add.at(coef.T, group, terms.T)
    return exps, coef


def _death_depth(exps: NDArray[np.float64], coef: NDArray[np.float64], log_end: float, log_tol: float) -> float:
    """Depth in `sigma` below which every term's L2 norm over the rest of `(0, b]` is below the tolerance.

    `||C exp(G sigma)||` over `sigma < -d` (with `dtau = b e^sigma dsigma`) is
    `|C| sqrt(b / (2G + 1)) exp(-(G + 1/2) d)`.
    """
    return float(np.max(_depths(exps, coef[None, :], np.array([log_end]), log_tol), initial=0.0))


def _depths(
    exps: NDArray[np.float64], coef: NDArray[np.float64], log_ends: NDArray[np.float64], log_tol: float
) -> NDArray[np.float64]:
    with np.errstate(divide="ignore"):
        log_norm = np.log(np.abs(coef)) + 0.5 * (log_ends[:, None] - np.log(2.0 * exps + 1.0))
    return np.maximum((log_norm - log_tol) / (exps + 0.5), 0.0)  # -inf (C = 0) gives 0


def _panels(
    exps: NDArray[np.float64],
    coef: NDArray[np.float64],
    log_ends: NDArray[np.float64],
    widths: NDArray[np.float64],
    log_tol: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.intp]]:
    """Return the panels `[lo, hi]` in `sigma <= 0` of every interval, and the interval of each.

    A term matters down to its death depth; between consecutive death depths the fastest living
    term sets the panel width `_PANEL_RATE_WIDTH / (2 G_max + 1)`. Each term thus costs about
    `log(|C| / tol) / _PANEL_RATE_WIDTH` panels whatever its exponent, where uniform panels would
    cost `(2 G + 1) * width / _PANEL_RATE_WIDTH` (2e4 per unit of `log tau` at `G = 1e4`).
    """
    depths = np.minimum(_depths(exps, coef, log_ends, log_tol), widths[:, None])  # (K, m)
    rates = 2.0 * exps + 1.0
    lo_all, hi_all, rows = [], [], []
    for k in range(log_ends.size):
        d = depths[k]
        cuts = np.unique(np.concatenate([[0.0], d]))
        for top, bottom in itertools.pairwise(cuts):
            rate = float(rates[d >= bottom].max())
            n = max(1, math.ceil(rate * (bottom - top) / _PANEL_RATE_WIDTH))
            edges = np.linspace(-bottom, -top, n + 1)
            lo_all.append(edges[:-1])
            hi_all.append(edges[1:])
            rows.append(np.full(n, k))
    if not lo_all:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.intp)
    return np.concatenate(lo_all), np.concatenate(hi_all), np.concatenate(rows)


def _integrate(
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    rows: NDArray[np.intp],
    exps: NDArray[np.float64],
    coef: NDArray[np.float64],
    ends: NDArray[np.float64],
) -> float:
    """Gauss-Legendre sum of `int r(tau)**2 dtau` over the panels, in chunks of bounded memory."""
    total = 0.0
    for start in range(0, lo.size, _CHUNK):
        a, b, k = lo[start : start + _CHUNK], hi[start : start + _CHUNK], rows[start : start + _CHUNK]
        half = 0.5 * (b - a)
        s = (0.5 * (a + b))[:, None] + half[:, None] * _GL_NODES[None, :]  # (panels, nodes)
        with np.errstate(under="ignore"):
            r = np.einsum("pnm,pm->pn", np.exp(s[:, :, None] * exps), coef[k])
            total += float(np.sum((ends[k] * half)[:, None] * _GL_WEIGHTS * np.exp(s) * r * r))
    return total


def _head_tail(exps: NDArray[np.float64], coef: NDArray[np.float64], end: float, depth: float) -> float:
    """Return `int_0^a r**2 dtau` in closed form, `a = end * exp(-depth)`.

    There `r = sum_j D_j (tau / a)**G_j` with `D_j = C_j exp(-G_j depth)`, and the integral is
    `a * sum_jl D_j D_l / (G_j + G_l + 1)`; only used where it is below the tolerance or the
    head has reached `_HEAD_MAX_LOG`.
    """
    a = end * math.exp(-depth)
    with np.errstate(over="ignore", under="ignore"):
        d = coef * np.exp(-exps * depth)
    return max(a * float(d @ (1.0 / (exps[:, None] + exps[None, :] + 1.0)) @ d), 0.0)
