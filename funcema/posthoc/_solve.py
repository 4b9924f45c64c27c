"""Least-squares weights that combine stored power-EMA profiles into a new one.

A power EMA with exponent ``g`` read at time ``t`` is the weighted average of the parameters
``theta(tau)`` with the profile (Karras et al. 2024, arXiv 2312.02696, eq. 3)

    p_{t,g}(tau) = (g + 1) / t * (tau / t) ** g     for 0 < tau <= t, and 0 after t.

Two profiles have the closed-form L2 inner product (``t_a <= t_b`` without loss of generality)

    <p_a, p_b> = (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) * t_b) * (t_a / t_b) ** g_b,

i.e. the exponent of the ratio is the gamma of the *longer* profile. Given stored profiles
``p_i`` and a target ``p_r``, the weights ``x`` minimise ``||sum_i x_i p_i - p_r||`` and solve
``A x = b`` with ``A_ij = <p_i, p_j>`` and ``b_i = <p_i, p_r>``, all in float64.

The relative reconstruction error ``||sum_i x_i p_i - p_r|| / ||p_r||`` is *not* computed from
the Gram form ``(c - 2 x.b + x.A x) / c`` (``c = <p_r, p_r>``), which cancels catastrophically
and loses everything below ~1e-8. The residual ``r(tau)`` is instead integrated directly: it is
smooth between consecutive snapshot times, and in the variable ``s = log tau`` every term of
``r(tau)**2 dtau`` is an exponential ``exp((g_i + g_j + 1) s) ds``, which composite
Gauss-Legendre integrates to full precision on panels short enough for the fastest rate. The
tail near ``tau = 0`` is added in closed form once it is negligible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["MAX_COND", "Solution", "inner_product", "profile", "solve", "solve_weights"]

#: Systems whose condition number exceeds this are rejected: their weights would carry relative
#: errors of ``cond * eps ~ 1e-2`` or worse, and the huge alternating weights amplify the rounding
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


@dataclass(frozen=True)
class Solution:
    """Least-squares weights with their diagnostics.

    Attributes:
        weights: float64 array ``x`` of shape ``(n,)``, one weight per stored profile.
        error: relative L2 reconstruction error ``||sum_i x_i p_i - p_r|| / ||p_r||``.
        cond: 2-norm condition number of the Gram matrix ``A``.
    """

    weights: NDArray[np.float64]
    error: float
    cond: float


def profile(tau: ArrayLike, step: float, gamma: float) -> NDArray[np.float64]:
    """Evaluate the power-EMA profile ``p(tau) = (g+1)/t * (tau/t)**g`` on ``(0, t]`` (0 elsewhere).

    Args:
        tau: Times at which to evaluate (any shape).
        step: The time ``t`` at which the EMA is read.
        gamma: The exponent ``g``.

    Returns:
        float64 array of the shape of ``tau``.
    """
    tau = np.asarray(tau, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inside = (tau > 0) & (tau <= step)
        ratio = np.where(inside, tau / step, 1.0)
        return np.where(inside, (gamma + 1.0) / step * ratio**gamma, 0.0)


def inner_product(step_a: ArrayLike, gamma_a: ArrayLike, step_b: ArrayLike, gamma_b: ArrayLike) -> NDArray[np.float64]:
    """Return ``<p_a, p_b> = (ga+1)(gb+1) / ((ga+gb+1) max(ta, tb)) * (min/max) ** g_longer``.

    ``g_longer`` is the gamma of the profile with the larger ``t``. Arguments broadcast.

    Examples:
        >>> float(inner_product(10.0, 0.0, 10.0, 0.0))  # ||uniform on (0, 10]||^2 = 1/10
        0.1
    """
    ta, ga, tb, gb = (np.asarray(v, dtype=np.float64) for v in (step_a, gamma_a, step_b, gamma_b))
    t_max = np.maximum(ta, tb)
    t_min = np.minimum(ta, tb)
    g_longer = np.where(ta >= tb, ga, gb)
    return (ga + 1.0) * (gb + 1.0) / ((ga + gb + 1.0) * t_max) * (t_min / t_max) ** g_longer


def _validate(
    steps: Sequence[float] | ArrayLike,
    gammas: Sequence[float] | ArrayLike,
    target_step: float,
    target_gamma: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], float, float]:
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
    tr, gr = float(target_step), float(target_gamma)
    if not (math.isfinite(tr) and tr > 0):
        raise ValueError(f"target_step must be finite and > 0, got {target_step!r}.")
    if not (math.isfinite(gr) and gr > -0.5):
        raise ValueError(f"target_gamma must be finite and > -1/2, got {target_gamma!r}.")
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
    return t, g, tr, gr


def solve(
    steps: Sequence[float] | ArrayLike,
    gammas: Sequence[float] | ArrayLike,
    target_step: float,
    target_gamma: float,
    *,
    max_cond: float = MAX_COND,
) -> Solution:
    """Solve for the weights, and report the reconstruction error and ``cond(A)``.

    This is :func:`solve_weights` with the condition number; synthesis uses it.

    Args:
        steps: Times ``t_i`` of the stored profiles (all ``<= target_step``).
        gammas: Exponents ``g_i`` of the stored profiles (all ``> -1/2``).
        target_step: Time ``t_r`` of the target profile; must be one of ``steps``.
        target_gamma: Exponent ``g_r`` of the target profile (``> -1/2``).
        max_cond: Reject systems with ``cond(A)`` above this.

    Returns:
        A :class:`Solution` with ``weights``, ``error`` and ``cond``.

    Raises:
        ValueError: On invalid inputs (the message names the argument), on duplicate
            ``(step, gamma)`` pairs, or when ``cond(A) > max_cond``.
    """
    t, g, tr, gr = _validate(steps, gammas, target_step, target_gamma)
    pairs = list(zip(t.tolist(), g.tolist()))
    if len(set(pairs)) != len(pairs):
        seen: set[tuple[float, float]] = set()
        dup = next(p for p in pairs if p in seen or seen.add(p))  # type: ignore[func-returns-value]
        raise ValueError(
            f"the stored profiles contain the same (step, gamma) = ({dup[0]:g}, {dup[1]:g}) twice, so "
            "the Gram matrix is singular (cond = inf); remove the duplicate snapshot."
        )
    # Work in units of the target time: inner products scale by 1/t_r, weights are unchanged.
    t = t / tr
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
    x = d * np.linalg.solve(A * d[:, None] * d[None, :], b * d)
    error = _relative_error(x, t, g, gr)
    return Solution(weights=x, error=error, cond=cond)


def solve_weights(
    steps: Sequence[float] | ArrayLike,
    gammas: Sequence[float] | ArrayLike,
    target_step: float,
    target_gamma: float,
) -> tuple[NDArray[np.float64], float]:
    """Return least-squares weights combining stored power-EMA profiles into a target profile.

    Minimises ``||sum_i x_i p_i - p_r||`` over ``x`` with
    ``p_{t,g}(tau) = (g+1)/t * (tau/t)**g`` on ``(0, t]``, by solving ``A x = b`` in float64 with
    ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_r>`` and

    ``<p_a, p_b> = (ga+1)(gb+1) / ((ga+gb+1) * max(ta, tb)) * (min(ta, tb)/max(ta, tb)) ** g_longer``.

    Args:
        steps: Times ``t_i`` of the stored profiles, all ``> 0`` and ``<= target_step``.
        gammas: Exponents ``g_i`` of the stored profiles, all ``> -1/2``.
        target_step: Time ``t_r`` of the target; must be one of ``steps``.
        target_gamma: Exponent ``g_r`` of the target, ``> -1/2``.

    Returns:
        ``(weights, error)``: the float64 weights, shape ``(len(steps),)``, and the relative L2
        reconstruction error ``||sum_i x_i p_i - p_r|| / ||p_r||``, computed without cancellation.

    Raises:
        ValueError: If an argument is invalid (the message names it), or the system is singular
            (duplicate ``(step, gamma)`` pairs) or ill-conditioned (``cond(A) > 1e14``).

    Examples:
        >>> w, err = solve_weights([100, 100], [6.9372, 16.9722], 100, 6.9372)
        >>> [round(float(v), 12) for v in w], err < 1e-10
        ([1.0, 0.0], True)
        >>> w, err = solve_weights([50, 100, 50, 100], [6.94, 6.94, 16.97, 16.97], 100, 10.0)
        >>> 1e-6 < err < 0.05
        True
    """
    sol = solve(steps, gammas, target_step, target_gamma)
    return sol.weights, sol.error


def _relative_error(x: NDArray[np.float64], t: NDArray[np.float64], g: NDArray[np.float64], gr: float) -> float:
    """Return ``||sum_i x_i p_i - p_r|| / ||p_r||`` with ``t`` in units of ``t_r = 1``.

    ``r(tau)`` is evaluated pointwise (rounding ~eps * sum_i |x_i p_i(tau)|) and ``r**2`` is
    integrated panel by panel in ``s = log tau``; no large terms are subtracted after squaring.
    """
    c = (gr + 1.0) ** 2 / (2.0 * gr + 1.0)  # <p_r, p_r> at t_r = 1
    log_t = np.log(t)
    breaks = np.unique(np.concatenate([t, [1.0]]))  # sorted; the last is 1
    g_all_max = max(float(g.max()), gr)
    # Panels over [breaks[k-1], breaks[k]]: active profiles there are those with t_i >= breaks[k].
    lo_list: list[NDArray[np.float64]] = []
    hi_list: list[NDArray[np.float64]] = []
    for k in range(1, breaks.size):
        s0, s1 = math.log(breaks[k - 1]), math.log(breaks[k])
        active = t >= breaks[k]
        rate = 2.0 * max(float(g[active].max()) if active.any() else gr, gr) + 1.0
        n = max(1, math.ceil(rate * (s1 - s0) / _PANEL_RATE_WIDTH))
        edges = np.linspace(s0, s1, n + 1)
        lo_list.append(edges[:-1])
        hi_list.append(edges[1:])

    def integrate(lo: NDArray[np.float64], hi: NDArray[np.float64]) -> float:
        if lo.size == 0:
            return 0.0
        half = 0.5 * (hi - lo)
        s = (0.5 * (hi + lo))[:, None] + half[:, None] * _GL_NODES[None, :]  # (panels, nodes)
        # Each panel lies inside one interval between breakpoints, so the midpoint decides
        # which profiles are active (tau <= t_i) without rounding trouble at the edges.
        mid = 0.5 * (hi + lo)
        active = mid[:, None, None] < log_t[None, None, :]
        with np.errstate(over="ignore", under="ignore"):
            p = (g + 1.0) / t * np.exp(g * (s[:, :, None] - log_t))
        p = np.where(active, p, 0.0)
        pr = (gr + 1.0) * np.exp(gr * s)
        r = p @ x - pr
        return float(np.sum(half[:, None] * _GL_WEIGHTS[None, :] * np.exp(s) * r * r))

    acc = integrate(np.concatenate(lo_list), np.concatenate(hi_list)) if lo_list else 0.0

    # Head (0, t_min]: every profile is active, r(tau) = sum_k D_k (tau/a)**g_k for groups k of
    # equal gamma, and int_0^a r^2 dtau = a * sum_kl D_k D_l / (g_k + g_l + 1) exactly.
    t_min = float(breaks[0])
    exps = np.concatenate([g, [gr]])
    coefs = np.concatenate([x, [-1.0]])
    gs, inv = np.unique(exps, return_inverse=True)
    g_min = float(gs[0])

    def tail(a_log: float) -> tuple[float, float]:
        # D_k = sum_{i in k} x_i (g_i+1)/t_i (a/t_i)**g_i; returns (closed form, bound).
        terms = (
            coefs * (exps + 1.0) / np.concatenate([t, [1.0]]) * np.exp(exps * (a_log - np.concatenate([log_t, [0.0]])))
        )
        D = np.zeros(gs.size)
        np.add.at(D, inv, terms)
        a = math.exp(a_log)
        exact = a * float(D @ (1.0 / (gs[:, None] + gs[None, :] + 1.0)) @ D)
        bound = a * float(np.abs(terms).sum()) ** 2 / (2.0 * g_min + 1.0)
        return exact, bound

    head_top = math.log(t_min)
    depth = 0.0
    rate = 2.0 * g_all_max + 1.0
    step = 1.0
    while True:
        _, bound = tail(head_top - depth)
        if bound <= 1e-3 * acc or bound <= 1e-36 * c or depth >= _HEAD_MAX_LOG:
            break
        new_depth = min(depth + step, _HEAD_MAX_LOG)
        n = max(1, math.ceil(rate * (new_depth - depth) / _PANEL_RATE_WIDTH))
        edges = np.linspace(head_top - new_depth, head_top - depth, n + 1)
        acc += integrate(edges[:-1], edges[1:])
        depth = new_depth
        step *= 2.0
    exact_tail, _ = tail(head_top - depth)
    total = acc + max(exact_tail, 0.0)
    return math.sqrt(max(total, 0.0) / c)
