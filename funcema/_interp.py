r"""The interpolation weight of one update, in float64, on the host or as a traced tensor.

Owns: the weight `w` of `ema <- ema + w * (params - ema)` for update number `t`, as a Python
float ([`host_weight`][funcema._interp.host_weight], eager) or a 0-d tensor
([`traced_weight`][funcema._interp.traced_weight], under `torch.compile`); and when that
weight is too small for the EMA's dtype ([`stagnation_step`][funcema._interp.stagnation_step],
[`StagnationWarning`][funcema.StagnationWarning]).

Must not import: `_kernels`, `_dtensor`, `_core`, `_io`, `nn`, `posthoc` (it reads the
configuration from `_state` and the schedule it holds, and writes no tensor).

With `t` the number of updates including the current one and `u = t - after`:

- `t <= after`: warm start, the EMA becomes the parameters (weight 1);
- `u % every != 0`: nothing changes (weight 0);
- otherwise the weight is

$$
w = 1 - \beta, \qquad \beta = \prod_{v=u-\text{every}+1}^{u} d(v),
$$

  or with debias \(w = (1 - \beta) / (1 - A\beta)\), where \(A\) is the product of all
  earlier betas; with debias the first averaging step (`u == every`) copies for every beta,
  even beta == 1, and a later step with beta == 1 leaves the EMA unchanged.

`1 - beta` is computed as `-expm1(log beta)` in float64: forming `beta` first and
subtracting it from one would lose about `log10(1 / (1 - beta))` digits (4 at decay 0.9999),
and float32 would leave 3 significant digits of the weight.

When the weight is too small. The update adds `w * (params - ema)` and rounds the sum to the
EMA's dtype. With `rho = |params - ema| / |ema|`, once `w * rho` falls below the dtype's unit
roundoff `u` (2^-24 for float32, 2^-11 for float16) the increments round back to `ema` and a
plain EMA stops following the parameters. A power EMA has `w(t) ≈ (gamma + 1) * every / t`, so it
stalls from about

$$
t^* = \frac{(\gamma + 1)\, \text{every}\, \rho}{u},
$$

1.3e6 for float32 at σ_rel = 0.10 and `rho` = 1%. bfloat16 EMAs are rounded stochastically and
keep moving in expectation; compensated EMAs carry the rounding error and do not stall.
"""

from __future__ import annotations

import enum
import math
import warnings
from typing import NamedTuple

import torch

from ._state import EmaConfig

__all__ = [
    "Action",
    "HostWeight",
    "HORIZON",
    "SPREAD",
    "StagnationWarning",
    "host_weight",
    "stagnation_step",
    "traced_weight",
    "unit_roundoff",
    "warn_if_stagnates",
]


class Action(enum.Enum):
    COPY = "copy"  # warm start, or a weight of exactly 1
    SKIP = "skip"  # not an averaging step, or a weight of exactly 0
    AVERAGE = "average"


class HostWeight(NamedTuple):
    action: Action
    weight: float  # the interpolation weight w in ema <- ema + w * (params - ema)
    log_decay_product: float  # log A after this update


def host_weight(config: EmaConfig, t: int, log_decay_product: float, *, finite: bool = True) -> HostWeight:
    """Compute the action and weight of update number `t` (1-based) with Python floats.

    `finite=False` (parameters holding a NaN or an infinity, `on_nonfinite="skip"`) skips the
    update: weight 0 and `log A` unchanged, whatever the step.
    """
    if not finite:
        return HostWeight(Action.SKIP, 0.0, log_decay_product)
    if t <= config.after:
        return HostWeight(Action.COPY, 1.0, log_decay_product)
    u = t - config.after
    if u % config.every:
        return HostWeight(Action.SKIP, 0.0, log_decay_product)
    log_beta = config.schedule.log_interval_decay(u, config.every)
    new_log = log_decay_product + log_beta
    if config.debias and u == config.every:
        # The first averaging step copies: the initial value has zero weight, so the average of
        # one sample is that sample, for every beta (including beta == 1, where the weight
        # (1 - beta) / (1 - A beta) would be 0 / 0 with A = 1).
        return HostWeight(Action.COPY, 1.0, new_log)
    one_minus_beta = -math.expm1(log_beta)
    if one_minus_beta == 0.0:  # beta == 1: a frozen EMA keeps its value.
        return HostWeight(Action.SKIP, 0.0, log_decay_product)
    weight = one_minus_beta
    if config.debias:
        # 1 - A_new > 0 here: log_beta < 0 and log A <= 0.
        weight = one_minus_beta / -math.expm1(new_log)
    action = Action.COPY if weight == 1.0 else Action.AVERAGE
    return HostWeight(action, weight, new_log)


def traced_weight(
    config: EmaConfig, t: torch.Tensor, log_decay_product: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compute the same weight with tensor ops only (`torch.compile`, `on_nonfinite="skip"`).

    Args:
        t: 0-d integer tensor, the update number (1-based).
        log_decay_product: 0-d float64 tensor, `log A` before this update.

    Returns:
        `(weight, active, new_log_decay_product)`: the float64 weight, a bool telling whether the
        EMA changes at all, and `log A` after the update.
    """
    u = t - config.after
    warm = u <= 0
    averaging = torch.logical_and(~warm, torch.remainder(u, config.every) == 0)
    # Evaluate the schedule at a valid step everywhere and select afterwards: no data-dependent
    # control flow, so one graph serves every step.
    safe_u = torch.where(averaging, u, torch.full_like(u, config.every)).to(torch.float64)
    log_beta = config.schedule.log_interval_decay(safe_u, config.every)
    log_beta = torch.where(averaging, log_beta, torch.zeros_like(log_beta))
    one_minus_beta = -torch.expm1(log_beta)
    new_log = log_decay_product + log_beta
    if config.debias:
        denominator = -torch.expm1(new_log)
        safe = denominator > 0
        weight = torch.where(safe, one_minus_beta / torch.where(safe, denominator, torch.ones_like(denominator)), 0.0)
        # The first averaging step copies, for every beta (see host_weight).
        weight = torch.where(u == config.every, torch.ones_like(weight), weight)
    else:
        weight = one_minus_beta
    weight = torch.where(warm, torch.ones_like(weight), weight)
    active = torch.logical_or(warm, weight > 0)
    return weight, active, new_log


# --------------------------------------------------------------------------------------------
# When the weight is too small for the EMA's dtype

HORIZON = 10**6
"""The run length assumed by the warning at [`init`][funcema.init], in update calls."""

SPREAD = 1e-2
"""The assumed distance `rho = |params - ema| / |ema|` of a parameter from its average late in training."""


class StagnationWarning(UserWarning):
    """A plain EMA will round its updates away within 10^6 updates (see docs/semantics.md).

    Raised by [`init`][funcema.init] and [`posthoc.init`][funcema.posthoc.init] when the weight of
    the schedule at update 10^6 times 1% (a parameter 1% away from its average) is below the unit
    roundoff of the EMA's dtype. Pass `compensated=True`, or silence it with
    `warnings.filterwarnings("ignore", category=funcema.StagnationWarning)`.

    Examples:
        >>> import warnings, torch, funcema as fe
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = fe.init({"w": torch.zeros(2)}, dtype=torch.float16)
        >>> caught[0].category.__name__
        'StagnationWarning'
    """


def unit_roundoff(dtype: torch.dtype) -> float | None:
    """The unit roundoff of an EMA dtype rounded to nearest, or `None` for stochastic rounding (bfloat16).

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


def _weight_at(config: EmaConfig, t: int) -> float:
    """The interpolation weight of the last averaging step at or before update `t` (no debias)."""
    u = t - config.after
    u -= u % config.every
    if u < config.every:
        return 1.0
    return -math.expm1(config.schedule.log_interval_decay(u, config.every))


def stagnation_step(config: EmaConfig, dtype: torch.dtype, spread: float = SPREAD) -> int | None:
    """The first update from which a plain EMA of `dtype` stalls, or `None` if it never does.

    Bisects `w(t) * spread < unit_roundoff(dtype)` over `t` in at most 64 evaluations of the
    schedule: the weight never increases with `t`.

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
    if _weight_at(config, hi) * spread >= u:
        return None
    if _weight_at(config, lo) * spread < u:
        return lo
    while hi - lo > max(1, lo // 1000):  # to 0.1%: a rule of thumb needs no more digits
        mid = (lo + hi) // 2 if hi < 4 * lo else math.isqrt(lo * hi)
        if _weight_at(config, mid) * spread < u:
            hi = mid
        else:
            lo = mid
    return hi


def warn_if_stagnates(config: EmaConfig, dtypes: set[torch.dtype], *, stacklevel: int) -> None:
    """Warn with [`StagnationWarning`][funcema.StagnationWarning] if a plain EMA of `dtypes` stalls within the horizon."""
    if config.compensated:
        return
    for dtype in sorted(dtypes, key=str):
        u = unit_roundoff(dtype)
        weight = _weight_at(config, HORIZON)
        if u is None or weight == 0.0 or weight * SPREAD >= u:  # weight 0: frozen by design (decay 1)
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
