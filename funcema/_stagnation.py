r"""When a plain EMA stops moving: the rule of thumb and the warning of [`init`][funcema.init].

An update adds ``w * (params - ema)`` to ``ema`` and rounds the sum to the EMA's dtype. With
``rho = |params - ema| / |ema|`` the increment is ``w * rho`` relative to the EMA; when it falls
below the dtype's unit roundoff ``u`` (2^-24 for float32, 2^-11 for float16) every increment rounds
back to ``ema`` and the EMA stops following the parameters:

$$ w(t) \, \rho < u . $$

A power EMA has ``w(t) ≈ (gamma + 1) * every / t``, so it stalls from about step
``t* = (gamma + 1) * every * rho / u``: 1.3e6 for a float32 EMA at σ_rel = 0.10 and rho = 1%.
A constant decay ``d`` has ``w = 1 - d ** every`` at every step: it stalls from the start, or never.

bfloat16 EMAs are rounded stochastically: they keep moving in expectation, with noise, so no
warning is given for them. Compensated EMAs carry the rounding error and never stall.
"""

from __future__ import annotations

import math
import warnings

import torch

from ._state import EmaConfig

__all__ = ["StagnationWarning", "HORIZON", "SPREAD", "unit_roundoff", "stagnation_step", "warn_if_stagnates"]

HORIZON = 10**6
"""The run length assumed by the warning at [`init`][funcema.init], in update calls."""

SPREAD = 1e-2
"""The assumed distance ``rho = |params - ema| / |ema|`` of a parameter from its average late in training."""


class StagnationWarning(UserWarning):
    """A plain EMA will round its updates away within 10^6 updates (see docs/semantics.md).

    Raised by [`init`][funcema.init] and [`posthoc.init`][funcema.posthoc.init] when the weight of
    the schedule at update 10^6 times 1% (a parameter 1% away from its average) is below the unit
    roundoff of the EMA's dtype. Pass ``compensated=True``, or silence it with
    ``warnings.filterwarnings("ignore", category=funcema.StagnationWarning)``.

    Examples:
        >>> import warnings, torch, funcema as fe
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = fe.init({"w": torch.zeros(2)}, dtype=torch.float16)
        >>> caught[0].category.__name__
        'StagnationWarning'
    """


def unit_roundoff(dtype: torch.dtype) -> float | None:
    """The unit roundoff of an EMA dtype rounded to nearest, or ``None`` for stochastic rounding (bfloat16).

    Examples:
        >>> import torch
        >>> unit_roundoff(torch.float32) == 2.0**-24
        True
    """
    if dtype == torch.bfloat16:
        return None
    if dtype.is_complex:
        dtype = torch.empty((), dtype=dtype).real.dtype
    return torch.finfo(dtype).eps / 2


def _weight(config: EmaConfig, t: int) -> float:
    """The interpolation weight of the last averaging step at or before update ``t`` (no debias)."""
    u = t - config.after
    u -= u % config.every
    if u < config.every:
        return 1.0
    return -math.expm1(config.schedule.log_interval_decay(u, config.every))


def stagnation_step(config: EmaConfig, dtype: torch.dtype, spread: float = SPREAD) -> int | None:
    """The first update from which a plain EMA of ``dtype`` stalls, or ``None`` if it never does.

    Bisects ``w(t) * spread < unit_roundoff(dtype)`` over ``t`` in at most 64 evaluations of the
    schedule: the weight never increases with ``t``.

    Examples:
        >>> import torch, funcema as fe
        >>> state = fe.init({"w": torch.zeros(1)}, schedule=fe.schedules.power(sigma_rel=0.10))
        >>> f"{stagnation_step(state.config, torch.float32):.2g}"
        '1.3e+06'
    """
    u = unit_roundoff(dtype)
    if u is None:
        return None
    lo, hi = config.after + config.every, 2**62
    if _weight(config, hi) * spread >= u:
        return None
    if _weight(config, lo) * spread < u:
        return lo
    while hi - lo > max(1, lo // 1000):  # to 0.1%: a rule of thumb needs no more digits
        mid = (lo + hi) // 2 if hi < 4 * lo else math.isqrt(lo * hi)
        if _weight(config, mid) * spread < u:
            hi = mid
        else:
            lo = mid
    return hi


def warn_if_stagnates(config: EmaConfig, dtypes: set[torch.dtype], *, stacklevel: int) -> None:
    """Warn with [`StagnationWarning`][funcema.StagnationWarning] if a plain EMA of ``dtypes`` stalls within the horizon."""
    if config.compensated:
        return
    for dtype in sorted(dtypes, key=str):
        u = unit_roundoff(dtype)
        if u is None or _weight(config, HORIZON) * SPREAD >= u:
            continue
        start = stagnation_step(config, dtype)
        warnings.warn(
            f"a {str(dtype).removeprefix('torch.')} EMA with {config.schedule!r} (every={config.every}) stops following "
            f"parameters that are {SPREAD:.0%} away from it from about update {start:.2g}: its weight falls below the "
            f"dtype's resolution ({u:.2g}). Pass compensated=True to fe.init (or fe.posthoc.init), or silence this with "
            "warnings.filterwarnings('ignore', category=funcema.StagnationWarning).",
            StagnationWarning,
            stacklevel=stacklevel,
        )
