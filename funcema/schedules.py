r"""Decay schedules: the per-step decay `d(u)` for the averaging step `u = 1, 2, ...`.

Each averaging step applies `ema <- d(u) * ema + (1 - d(u)) * params`; updating only every `D`
steps uses the product of the decays over the interval (see
[`Schedule.log_interval_decay`][funcema.schedules.Schedule.log_interval_decay]).

| schedule | `d(u)` | origin |
|---|---|---|
| `constant(decay)` | `decay` | timm, AveragedModel |
| `warmup(max_decay, inv_gamma, power, min_decay)` | `clamp(1 - (1 + (u-1)/inv_gamma) ** -power, min_decay, max_decay)` | ema-pytorch, timm, diffusers |
| `litema(max_decay)` | `min(max_decay, (1 + u) / (10 + u))` | LitEma, torch-ema, diffusers |
| `power(gamma=None, sigma_rel=None)` | `(1 - 1/u) ** (gamma + 1)` | Karras et al. 2024 (EDM2) |
| `halflife(steps, rampup=None)` | `0.5 ** (1 / h)`, `h = min(steps, rampup * u)` if `rampup` else `steps` | EDM2 |

Each schedule is one frozen, hashable, comparable dataclass (never a closure) that checks its own
arguments; the lower-case name is the class itself (`schedules.constant is schedules.Constant`).
Schedules live in the EMA state as static metadata and are saved with it through
[`Schedule.to_dict`][funcema.schedules.Schedule.to_dict] and
[`from_dict`][funcema.schedules.from_dict]. Every schedule stays in `[0, 1]` and is non-decreasing
in `u`. Defining a subclass with a `name` registers it for `from_dict`: a new schedule is one class.

Accuracy: every schedule computes `log d(u)` directly, never by forming `d(u)` and taking its log
(which loses `log10(1 / (1 - d))` digits near `d = 1`), so the weight `1 - beta = -expm1(log beta)`
that the update uses is within 1e-14 relative of its exact value for every step (a worst-case
bound of 84 unit roundoffs; `tests/test_schedules.py` derives it per schedule).

An `int` step gives a Python float computed in float64 with `math`; a tensor step gives a float64
tensor built from torch ops only (no `.item()`, no branching on values), so it traces under
`torch.compile(fullgraph=True)` without graph breaks or recompilation. Tensor steps are not
validated, since they may be traced.

Owns: the decay schedules, their log decays, and the registry that `from_dict` reads.

Must not import: any funcema module except `_validate` and `_sigma`.

Examples:
    >>> from funcema import schedules
    >>> s = schedules.power(sigma_rel=0.10)
    >>> round(s.gamma, 4)
    6.9372
    >>> s(1)
    0.0
    >>> schedules.from_dict(s.to_dict()) == s
    True
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, overload

import torch

from funcema._sigma import SIGMA_REL_MAX, gamma_for_width, gamma_to_sigma_rel
from funcema._validate import bounded_float, integer

__all__ = [
    "Constant",
    "HalfLife",
    "LitEma",
    "Power",
    "Schedule",
    "Warmup",
    "constant",
    "from_dict",
    "halflife",
    "litema",
    "power",
    "warmup",
]

_LOG_HALF = math.log(0.5)
_LN2 = math.log(2.0)

#: Every schedule class by its `name`, filled as the classes are defined.
_REGISTRY: dict[str, type[Schedule]] = {}


def _log(x: float) -> float:
    """Return `log(x)` for `x >= 0`, with `log(0) = -inf` instead of an error."""
    return math.log(x) if x > 0.0 else -math.inf


def _set(obj: object, **values: Any) -> None:
    """Store checked values on a frozen dataclass from its `__post_init__`."""
    for key, value in values.items():
        object.__setattr__(obj, key, value)


def _unit(name: str, value: object) -> float:
    return bounded_float(name, value, low=0.0, high=1.0)


def _positive(name: str, value: object) -> float:
    return bounded_float(name, value, low=0.0, low_open=True)


def _log_one_minus_ratio_float(num: float, den: float) -> float:
    """Return `log(1 - num/den)` for `0 <= num <= den` to a few ulps relative (host path).

    `log1p(-q)` has condition number `q / ((1 - q) |log(1 - q)|) <= 1.45` for `q <= 1/2`;
    above that, `log((den - num) / den)` is used, whose argument is one rounding from exact
    (`den - num` is exact for the integers used here) and `log` has condition `1/|log r| <= 1.45`.
    """
    q = num / den
    return math.log1p(-q) if q <= 0.5 else _log((den - num) / den)


def _log_one_minus_ratio_tensor(num: torch.Tensor | float, den: torch.Tensor) -> torch.Tensor:
    """The tensor form of `_log_one_minus_ratio_float`, branch-free."""
    q = num / den
    return torch.where(q <= 0.5, torch.log1p(-q), torch.log((den - num) / den))


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


class Schedule(abc.ABC):
    """A per-step decay `d(u)` for the averaging step `u = 1, 2, ...`.

    Subclasses are frozen dataclasses that check their fields in `__post_init__`. They implement
    `log d(u)` twice, `_log_decay_float` (Python floats, `math`) and `_log_decay_tensor` (float64
    tensors, torch ops only), with the same expression; `d(u)` defaults to `exp(log d(u))`, and
    the interval decay to the sum of `log d(v)`. Subclasses may override either with a closed form.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls

    @abc.abstractmethod
    def _log_decay_float(self, u: int) -> float:
        """Return `log d(u) <= 0` for a validated Python int `u >= 1`."""

    @abc.abstractmethod
    def _log_decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        """Return `log d(u)` elementwise for a float64 tensor `u >= 1`, with torch ops only."""

    def _decay_float(self, u: int) -> float:
        return math.exp(self._log_decay_float(u))

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_decay_tensor(u))

    @overload
    def __call__(self, step: int) -> float: ...

    @overload
    def __call__(self, step: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """Return the decay `d(step)`.

        Args:
            step: The averaging step `u >= 1`: a Python int, or a tensor of any shape (not
                validated, since it may be traced by `torch.compile`).

        Returns:
            A Python float in float64 for an int step; a float64 tensor of the same shape and
                device for a tensor step.

        Raises:
            TypeError: If an int step is a bool or not an integer.
            ValueError: If an int step is smaller than 1.
        """
        if isinstance(step, torch.Tensor):
            return self._decay_tensor(step.to(torch.float64))
        return self._decay_float(integer("step", step, minimum=1))

    @overload
    def log_interval_decay(self, u: int, every: int) -> float: ...

    @overload
    def log_interval_decay(self, u: torch.Tensor, every: int) -> torch.Tensor: ...

    def log_interval_decay(self, u: int | torch.Tensor, every: int) -> float | torch.Tensor:
        r"""Return `log(beta)` for the decay `beta` over the `every` steps that end at `u`.

        $$ \log\beta = \sum_{v=u-D+1}^{u} \log d(v), \qquad D = \text{every}. $$

        Updating once with `beta` equals updating every step with `d(v)` on parameters held
        constant over the interval. The caller forms `beta = exp(log_beta)` and the weight
        `1 - beta = -expm1(log_beta)` in float64; `log d` is computed without forming `d`, so the
        weight keeps its relative accuracy even when `beta` rounds to 1.

        Args:
            u: The last averaging step of the interval, `u >= every`: a Python int, or a tensor
                of any shape (not validated).
            every: The number of steps in the interval, a Python int `>= 1`.

        Returns:
            `log(beta) <= 0` as a Python float (`-inf` when some `d(v) == 0`) for an int `u`;
                a float64 tensor for a tensor `u`.

        Raises:
            TypeError: If `every` or an int `u` is a bool or not an integer.
            ValueError: If `every < 1` or an int `u < every`.

        Examples:
            >>> round(math.exp(constant(0.99).log_interval_decay(10, every=10)), 6)  # 0.99 ** 10
            0.904382
        """
        every = integer("every", every, minimum=1)
        if isinstance(u, torch.Tensor):
            return self._log_interval_tensor(u.to(torch.float64), every)
        u = integer("u", u, minimum=1)
        if u < every:
            raise ValueError(f"u must be >= every = {every}, got {u}.")
        return self._log_interval_float(u, every)

    def _log_interval_float(self, u: int, every: int) -> float:
        # Terms of one sign: fsum rounds once, so the sum is as accurate as its worst term.
        return math.fsum(self._log_decay_float(v) for v in range(u - every + 1, u + 1))

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        offsets = torch.arange(every, dtype=torch.float64, device=u.device)
        return self._log_decay_tensor(u.unsqueeze(-1) - offsets).sum(dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict that [`from_dict`][funcema.schedules.from_dict] turns back into this schedule.

        Examples:
            >>> constant(0.999).to_dict()
            {'name': 'constant', 'decay': 0.999}
        """
        assert dataclasses.is_dataclass(self)
        out: dict[str, Any] = {"name": self.name}
        for field in dataclasses.fields(self):
            out[field.name] = getattr(self, field.name)
        return out


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    """The constant decay `d(u) = decay` (timm `ModelEmaV2`, `AveragedModel`).

    Args:
        decay: The per-step decay, in `[0, 1]` (`1` freezes the EMA, `0` copies the parameters).

    Raises:
        TypeError: If `decay` is a bool or not a real number.
        ValueError: If `decay` is not finite or outside `[0, 1]`.

    Examples:
        >>> s = constant(0.99)
        >>> s(1), s(1000)
        (0.99, 0.99)
    """

    decay: float
    name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        _set(self, decay=_unit("decay", self.decay))

    def _decay_float(self, u: int) -> float:
        return self.decay

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return torch.full_like(u, self.decay)

    def _log_decay_float(self, u: int) -> float:
        return _log(self.decay)

    def _log_decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return torch.full_like(u, _log(self.decay))

    def _log_interval_float(self, u: int, every: int) -> float:
        return every * _log(self.decay)

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        return torch.full_like(u, every * _log(self.decay))


@dataclasses.dataclass(frozen=True)
class Warmup(Schedule):
    r"""The warmup schedule of ema-pytorch, timm `ModelEmaV3` and diffusers.

    $$ d(u) = \operatorname{clamp}\left(1 - \left(1 + \frac{u - 1}{\text{inv\_gamma}}\right)^{-\text{power}},
    \text{min\_decay}, \text{max\_decay}\right) $$

    `power = 2/3` reaches 0.999 near 31.6K steps and 0.9999 near 1M steps; `power = 3/4` reaches
    them near 10K and 215K steps.

    Args:
        max_decay: The upper clamp, in `[0, 1]`.
        inv_gamma: The inverse multiplicative factor of the step, `> 0`.
        power: The exponent of the warmup, `> 0`.
        min_decay: The lower clamp, in `[0, max_decay]`.

    Raises:
        TypeError: If an argument is a bool or not a real number.
        ValueError: If an argument is not finite or out of range, or `min_decay > max_decay`.

    Examples:
        >>> s = warmup()
        >>> s(1)
        0.0
        >>> round(s(1001), 6)  # 1 - 1001 ** (-2/3)
        0.990007
    """

    max_decay: float = 0.9999
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0
    name: ClassVar[str] = "warmup"

    def __post_init__(self) -> None:
        max_decay = _unit("max_decay", self.max_decay)
        min_decay = _unit("min_decay", self.min_decay)
        if min_decay > max_decay:
            raise ValueError(
                f"min_decay must be <= max_decay, got min_decay={self.min_decay!r} > max_decay={self.max_decay!r}."
            )
        inv_gamma = _positive("inv_gamma", self.inv_gamma)
        power = _positive("power", self.power)
        _set(self, max_decay=max_decay, inv_gamma=inv_gamma, power=power, min_decay=min_decay)

    def _decay_float(self, u: int) -> float:
        # 1 - x**-p as -expm1(-p * log1p(...)): full relative accuracy when the decay is near 0.
        value = -math.expm1(-self.power * math.log1p((u - 1) / self.inv_gamma))
        return min(max(value, self.min_decay), self.max_decay)

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        value = -torch.expm1(-self.power * torch.log1p((u - 1.0) / self.inv_gamma))
        return torch.clamp(value, min=self.min_decay, max=self.max_decay)

    # log d = log(1 - x**-p) with x = 1 + z, z = (u - 1) / inv_gamma and y = -p log1p(z) = log x**-p.
    # While d < 1/2 (y > -ln 2), log(-expm1(y)) loses nothing (log's condition is <= 1.45 there).
    # Above, log1p(-x**-p) with pow for x**-p: pow's relative error is ~p ulps of x, where
    # exp(y) would turn y's few ulps into |y| ulps (|y| reaches 10 at step 1e7 with the defaults).
    def _log_decay_float(self, u: int) -> float:
        z = (u - 1) / self.inv_gamma
        y = -self.power * math.log1p(z)
        raw = _log(-math.expm1(y)) if y > -_LN2 else math.log1p(-((1.0 + z) ** -self.power))
        return min(max(raw, _log(self.min_decay)), _log(self.max_decay))

    def _log_decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        z = (u - 1.0) / self.inv_gamma
        y = -self.power * torch.log1p(z)
        raw = torch.where(y > -_LN2, torch.log(-torch.expm1(y)), torch.log1p(-torch.pow(1.0 + z, -self.power)))
        return torch.clamp(raw, min=_log(self.min_decay), max=_log(self.max_decay))


@dataclasses.dataclass(frozen=True)
class LitEma(Schedule):
    """LitEma's schedule `d(u) = min(max_decay, (1 + u) / (10 + u))` (latent diffusion, torch-ema).

    Args:
        max_decay: The upper clamp, in `[0, 1]`.

    Raises:
        TypeError: If `max_decay` is a bool or not a real number.
        ValueError: If `max_decay` is not finite or outside `[0, 1]`.

    Examples:
        >>> s = litema()
        >>> s(1) == 2 / 11
        True
        >>> s(10 ** 6)
        0.9999
    """

    max_decay: float = 0.9999
    name: ClassVar[str] = "litema"

    def __post_init__(self) -> None:
        _set(self, max_decay=_unit("max_decay", self.max_decay))

    def _decay_float(self, u: int) -> float:
        return min(self.max_decay, (1 + u) / (10 + u))

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return torch.clamp((1.0 + u) / (10.0 + u), max=self.max_decay)

    # log d = log(1 - 9 / (10 + u)).
    def _log_decay_float(self, u: int) -> float:
        return min(_log_one_minus_ratio_float(9.0, 10.0 + u), _log(self.max_decay))

    def _log_decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return torch.clamp(_log_one_minus_ratio_tensor(9.0, 10.0 + u), max=_log(self.max_decay))


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Power(Schedule):
    r"""The power-function schedule of Karras et al. 2024 (EDM2).

    $$ d(u) = \left(1 - \frac{1}{u}\right)^{\gamma + 1} $$

    so `d(1) = 0` and the EMA at step `u` weighs step `tau` in proportion to `tau ** gamma`. Over
    an interval of `D` steps the decays telescope to `beta = (1 - D/u) ** (gamma + 1)`. The width
    is `sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))`.

    Args:
        gamma: The exponent, `> -1/2`.
        sigma_rel: The relative width instead of `gamma`, in `(0, 1/sqrt(12))`; converted with
            [`sigma_rel_to_gamma`][funcema.sigma_rel_to_gamma]. Give exactly one of the two.

    Raises:
        TypeError: If the one given is a bool or not a real number.
        ValueError: If both or neither of `gamma` and `sigma_rel` are given, or the one given is
            out of range.

    Examples:
        >>> s = power(gamma=6.94)
        >>> s(1)
        0.0
        >>> round(s(100), 6)  # 0.99 ** 7.94
        0.923301
        >>> round(power(sigma_rel=0.05).gamma, 4)
        16.9722
    """

    gamma: float
    name: ClassVar[str] = "power"

    def __init__(self, gamma: float | None = None, sigma_rel: float | None = None) -> None:
        if (gamma is None) == (sigma_rel is None):
            raise ValueError(
                f"power() needs exactly one of gamma and sigma_rel, got gamma={gamma!r} and sigma_rel={sigma_rel!r}."
            )
        if sigma_rel is not None:
            hint = f"for a wider EMA (up to {SIGMA_REL_MAX!r}) give its gamma in (-1/2, 0) instead"
            _set(self, gamma=gamma_for_width(sigma_rel, allow_negative=False, wider_hint=hint))
        else:
            _set(self, gamma=bounded_float("gamma", gamma, low=-0.5, low_open=True))

    @property
    def sigma_rel(self) -> float:
        """The relative standard deviation of this EMA's weight profile."""
        return gamma_to_sigma_rel(self.gamma)

    def __repr__(self) -> str:
        return f"Power(gamma={self.gamma!r}, sigma_rel={self.sigma_rel!r})"

    # prod_{v=u-D+1}^{u} (1 - 1/v) = prod (v-1)/v telescopes to 1 - D/u: log d(u) is the case D = 1.
    def _log_decay_float(self, u: int) -> float:
        return self._log_interval_float(u, 1)

    def _log_decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return self._log_interval_tensor(u, 1)

    def _log_interval_float(self, u: int, every: int) -> float:
        return (self.gamma + 1.0) * _log_one_minus_ratio_float(float(every), float(u))

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        return (self.gamma + 1.0) * _log_one_minus_ratio_tensor(float(every), u)


@dataclasses.dataclass(frozen=True)
class HalfLife(Schedule):
    """The half-life schedule of EDM2's traditional EMA: `d(u) = 0.5 ** (1 / h)`.

    `h = min(steps, rampup * u)` if `rampup` is given, else `h = steps`: the weight of a step
    halves after `h` further steps.

    Args:
        steps: The half-life in averaging steps, `> 0`.
        rampup: If given (`> 0`), the half-life is at most `rampup * u`, so early in training the
            EMA forgets faster (EDM's `ema_rampup_ratio`).

    Raises:
        TypeError: If `steps` or `rampup` is a bool or not a real number.
        ValueError: If `steps` or `rampup` is not finite or not `> 0`.

    Examples:
        >>> halflife(1.0)(5)
        0.5
        >>> round(halflife(1000, rampup=0.05)(100), 6)  # 0.5 ** (1 / 5)
        0.870551
    """

    steps: float
    rampup: float | None = None
    name: ClassVar[str] = "halflife"

    def __post_init__(self) -> None:
        rampup = None if self.rampup is None else _positive("rampup", self.rampup)
        _set(self, steps=_positive("steps", self.steps), rampup=rampup)

    def _log_decay_float(self, u: int) -> float:
        h = self.steps if self.rampup is None else min(self.steps, self.rampup * u)
        return _LOG_HALF / h

    def _log_decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        if self.rampup is None:  # a static field, not a tensor value: one graph either way
            return torch.full_like(u, _LOG_HALF / self.steps)
        return _LOG_HALF / torch.clamp(self.rampup * u, max=self.steps)

    def _log_interval_float(self, u: int, every: int) -> float:
        if self.rampup is None:
            return every * _LOG_HALF / self.steps
        return super()._log_interval_float(u, every)

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        if self.rampup is None:
            return torch.full_like(u, every * _LOG_HALF / self.steps)
        return super()._log_interval_tensor(u, every)


# The public factory names are the classes themselves: `constant(0.99)` builds and checks a Constant.
constant = Constant
warmup = Warmup
litema = LitEma
power = Power
halflife = HalfLife


def from_dict(d: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from [`Schedule.to_dict`][funcema.schedules.Schedule.to_dict]'s output, checking every field.

    Floats survive a JSON round trip exactly (JSON writes them with `repr`), so
    `from_dict(json.loads(json.dumps(s.to_dict()))) == s`. A field of the wrong type is reported
    as a `ValueError` too: the dict comes from a file, and the file is what is wrong.

    Args:
        d: A mapping with a `"name"` key and one key per field of that schedule.

    Returns:
        The schedule.

    Raises:
        ValueError: If `d` is not a mapping, names an unknown schedule, lacks a field, has an
            extra field, or holds an invalid value.

    Examples:
        >>> from_dict({"name": "litema", "max_decay": 0.999})
        LitEma(max_decay=0.999)
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"from_dict expects a mapping, got {type(d).__name__}.")
    name = d.get("name")
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown schedule name {name!r}; expected one of {sorted(_REGISTRY)}.")
    cls = _REGISTRY[name]
    assert dataclasses.is_dataclass(cls)
    expected = {field.name for field in dataclasses.fields(cls)}
    given = set(d) - {"name"}
    if given != expected:
        missing = sorted(expected - given)
        extra = sorted(given - expected)
        raise ValueError(f"bad fields for schedule {name!r}: missing {missing}, unexpected {extra}.")
    try:
        return cls(**{key: d[key] for key in expected})
    except TypeError as error:
        raise ValueError(f"bad field for schedule {name!r}: {error}") from None
