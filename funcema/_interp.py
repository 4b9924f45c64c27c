r"""The interpolation weight of one update, in float64, on the host or as a traced tensor.

Owns: the weight `w` of `ema <- ema + w * (params - ema)` for update number `t`, as a Python
float ([`host_weight`][funcema._interp.host_weight], eager) or a 0-d tensor
([`traced_weight`][funcema._interp.traced_weight], under `torch.compile`).

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
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch

from ._state import EmaConfig

__all__ = ["Action", "HostWeight", "host_weight", "traced_weight"]


class Action(enum.Enum):
    COPY = "copy"  # warm start, or a weight of exactly 1
    SKIP = "skip"  # not an averaging step, or a weight of exactly 0
    AVERAGE = "average"


class HostWeight(NamedTuple):
    action: Action
    weight: float  # the interpolation weight w in ema <- ema + w * (params - ema)
    log_decay_product: float  # log A after this update


def host_weight(config: EmaConfig, t: int, log_decay_product: float) -> HostWeight:
    """Compute the action and weight of update number `t` (1-based) with Python floats."""
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
