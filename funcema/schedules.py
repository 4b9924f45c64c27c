"""Decay schedules: the per-step decay ``d(u)`` for the averaging step ``u = 1, 2, ...``.

Each averaging step applies ``ema <- d(u) * ema + (1 - d(u)) * params``; updating only every
``D`` steps uses the product of the decays over the interval (see
:meth:`Schedule.log_interval_decay`).

| factory | ``d(u)`` | origin |
|---|---|---|
| ``constant(decay)`` | ``decay`` | timm, AveragedModel |
| ``warmup(max_decay, inv_gamma, power, min_decay)`` | ``clamp(1 - (1 + (u-1)/inv_gamma) ** -power, min_decay, max_decay)`` | ema-pytorch, timm, diffusers |
| ``litema(max_decay)`` | ``min(max_decay, (1 + u) / (10 + u))`` | LitEma, torch-ema, diffusers |
| ``power(gamma=None, sigma_rel=None)`` | ``(1 - 1/u) ** (gamma + 1)`` | Karras et al. 2024 (EDM2) |
| ``halflife(steps, rampup=None)`` | ``0.5 ** (1 / h)``, ``h = min(steps, rampup * u)`` if ``rampup`` else ``steps`` | EDM2 |

Schedules are frozen, hashable, comparable dataclasses (never closures): they live in the EMA
state as static metadata and are saved with it through :meth:`Schedule.to_dict` and
:func:`from_dict`. Every schedule stays in ``[0, 1]`` and is non-decreasing in ``u``.

Calling a schedule with a Python ``int`` step returns a Python ``float`` computed in float64 with
:mod:`math`; calling it with a tensor step returns a float64 tensor built from torch ops only (no
``.item()``, no branching on values), so it traces under ``torch.compile(fullgraph=True)`` without
graph breaks or recompilation. Tensor steps are not validated, since they may be traced.

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
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar, overload

import torch

from funcema import _sigma
from funcema._validate import integer

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


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _real(name: str, value: object, expected: str) -> float:
    """Return ``value`` as a finite float, or raise an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be {expected}, got {value!r} (a bool).")
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__}).")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be {expected}, got {value!r}.") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return result


def _unit(name: str, value: object) -> float:
    result = _real(name, value, "a real number in [0, 1]")
    if not 0.0 <= result <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return result


def _positive(name: str, value: object) -> float:
    result = _real(name, value, "a finite real number > 0")
    if not result > 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    return result


def _log(x: float) -> float:
    """Return ``log(x)`` for ``x >= 0``, with ``log(0) = -inf`` instead of an error."""
    return math.log(x) if x > 0.0 else -math.inf


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


class Schedule(abc.ABC):
    """A per-step decay ``d(u)`` for the averaging step ``u = 1, 2, ...``.

    Subclasses are frozen dataclasses: hashable, comparable, and serialisable with
    :meth:`to_dict` / :func:`from_dict`. They implement ``_decay_float`` (Python float path) and
    ``_decay_tensor`` (float64 tensor path), and may override the ``_log_interval_*`` methods with
    exact closed forms.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def _decay_float(self, u: int) -> float:
        """Return ``d(u)`` for a validated Python int ``u >= 1``."""

    @abc.abstractmethod
    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        """Return ``d(u)`` elementwise for a float64 tensor ``u``, with torch ops only."""

    @overload
    def __call__(self, step: int) -> float: ...

    @overload
    def __call__(self, step: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, step: int | torch.Tensor) -> float | torch.Tensor:
        """Return the decay ``d(step)``.

        Args:
            step: The averaging step ``u >= 1``: a Python int, or a tensor of any shape (not
                validated, since it may be traced by ``torch.compile``).

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
        """Return ``log(beta)``, ``beta = prod_{v = u - every + 1}^{u} d(v)``.

        ``beta`` is the decay over the interval of ``every`` steps ending at ``u``: updating once
        with ``beta`` equals updating every step with ``d(v)`` on parameters held constant over
        the interval. Compute ``beta = exp(log_beta)`` and ``1 - beta = -expm1(log_beta)`` in
        float64.

        Args:
            u: The last averaging step of the interval, ``u >= every``: a Python int, or a tensor
                of any shape (not validated).
            every: The number of steps in the interval, a Python int ``>= 1``.

        Returns:
            ``log(beta) <= 0`` as a Python float (``-inf`` when some ``d(v) == 0``) for an int
            ``u``; a float64 tensor for a tensor ``u``.

        Raises:
            TypeError: If ``every`` or an int ``u`` is a bool or not an integer.
            ValueError: If ``every < 1`` or an int ``u < every``.
        """
        every = integer("every", every, minimum=1)
        if isinstance(u, torch.Tensor):
            return self._log_interval_tensor(u.to(torch.float64), every)
        u = integer("u", u, minimum=1)
        if u < every:
            raise ValueError(f"u must be >= every = {every}, got {u}.")
        return self._log_interval_float(u, every)

    def _log_interval_float(self, u: int, every: int) -> float:
        return math.fsum(_log(self._decay_float(v)) for v in range(u - every + 1, u + 1))

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        offsets = torch.arange(every, dtype=torch.float64, device=u.device)
        v = u.unsqueeze(-1) - offsets
        return torch.log(self._decay_tensor(v)).sum(dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict that :func:`from_dict` turns back into this schedule.

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
    """``d(u) = decay``. Build with :func:`constant`."""

    decay: float
    name: ClassVar[str] = "constant"

    def _decay_float(self, u: int) -> float:
        return self.decay

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return torch.full_like(u, self.decay)

    def _log_interval_float(self, u: int, every: int) -> float:
        return every * _log(self.decay)

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        return torch.full_like(u, every * _log(self.decay))


@dataclasses.dataclass(frozen=True)
class Warmup(Schedule):
    """``d(u) = clamp(1 - (1 + (u-1)/inv_gamma) ** -power, min_decay, max_decay)``.

    Build with :func:`warmup`.
    """

    max_decay: float
    inv_gamma: float
    power: float
    min_decay: float
    name: ClassVar[str] = "warmup"

    def _decay_float(self, u: int) -> float:
        # 1 - x**-p computed as -expm1(-p * log1p(...)), accurate when the decay is near 0.
        value = -math.expm1(-self.power * math.log1p((u - 1) / self.inv_gamma))
        return min(max(value, self.min_decay), self.max_decay)

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        value = -torch.expm1(-self.power * torch.log1p((u - 1.0) / self.inv_gamma))
        return torch.clamp(value, min=self.min_decay, max=self.max_decay)


@dataclasses.dataclass(frozen=True)
class LitEma(Schedule):
    """``d(u) = min(max_decay, (1 + u) / (10 + u))``. Build with :func:`litema`."""

    max_decay: float
    name: ClassVar[str] = "litema"

    def _decay_float(self, u: int) -> float:
        return min(self.max_decay, (1 + u) / (10 + u))

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        return torch.clamp((1.0 + u) / (10.0 + u), max=self.max_decay)


@dataclasses.dataclass(frozen=True, repr=False)
class Power(Schedule):
    """``d(u) = (1 - 1/u) ** (gamma + 1)``. Build with :func:`power`."""

    gamma: float
    name: ClassVar[str] = "power"

    @property
    def sigma_rel(self) -> float:
        """The relative standard deviation of this EMA's weight profile."""
        return _sigma.gamma_to_sigma_rel(self.gamma)

    def __repr__(self) -> str:
        return f"Power(gamma={self.gamma!r}, sigma_rel={self.sigma_rel!r})"

    def _decay_float(self, u: int) -> float:
        if u == 1:
            return 0.0
        # exp((g+1) log1p(-1/u)) keeps full relative accuracy for large u and large gamma.
        return math.exp((self.gamma + 1.0) * math.log1p(-1.0 / u))

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        # At u = 1: log1p(-1) = -inf and exp(-inf) = 0, with no branch.
        return torch.exp((self.gamma + 1.0) * torch.log1p(-1.0 / u))

    # prod_{v=u-D+1}^{u} (1 - 1/v) = prod (v-1)/v telescopes to (u - D)/u = 1 - D/u.
    def _log_interval_float(self, u: int, every: int) -> float:
        if u == every:
            return -math.inf
        return (self.gamma + 1.0) * math.log1p(-every / u)

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        return (self.gamma + 1.0) * torch.log1p(-every / u)


@dataclasses.dataclass(frozen=True)
class HalfLife(Schedule):
    """``d(u) = 0.5 ** (1 / h)``, ``h = min(steps, rampup * u)`` if ``rampup`` else ``steps``.

    Build with :func:`halflife`.
    """

    steps: float
    rampup: float | None = None
    name: ClassVar[str] = "halflife"

    def _decay_float(self, u: int) -> float:
        h = self.steps if self.rampup is None else min(self.steps, self.rampup * u)
        return math.exp(_LOG_HALF / h)

    def _decay_tensor(self, u: torch.Tensor) -> torch.Tensor:
        if self.rampup is None:
            return torch.full_like(u, math.exp(_LOG_HALF / self.steps))
        h = torch.clamp(self.rampup * u, max=self.steps)
        return torch.exp(_LOG_HALF / h)

    def _log_interval_float(self, u: int, every: int) -> float:
        if self.rampup is None:
            return every * _LOG_HALF / self.steps
        return super()._log_interval_float(u, every)

    def _log_interval_tensor(self, u: torch.Tensor, every: int) -> torch.Tensor:
        if self.rampup is None:
            return torch.full_like(u, every * _LOG_HALF / self.steps)
        return super()._log_interval_tensor(u, every)


# --------------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------------


def constant(decay: float) -> Constant:
    """Return the constant schedule ``d(u) = decay``.

    Args:
        decay: The per-step decay, in ``[0, 1]`` (``1`` freezes the EMA, ``0`` copies params).

    Returns:
        A frozen :class:`Constant` schedule.

    Raises:
        ValueError: If ``decay`` is not a finite number in ``[0, 1]``.

    Examples:
        >>> s = constant(0.99)
        >>> s(1), s(1000)
        (0.99, 0.99)
        >>> round(math.exp(s.log_interval_decay(10, every=10)), 6)  # 0.99 ** 10
        0.904382
    """
    return Constant(decay=_unit("decay", decay))


def warmup(
    max_decay: float = 0.9999,
    inv_gamma: float = 1.0,
    power: float = 2 / 3,
    min_decay: float = 0.0,
) -> Warmup:
    """Return the warmup schedule of ema-pytorch / timm / diffusers.

    ``d(u) = clamp(1 - (1 + (u - 1) / inv_gamma) ** -power, min_decay, max_decay)``

    ``power = 2/3`` reaches 0.999 near 31.6K steps and 0.9999 near 1M steps; ``power = 3/4``
    reaches them near 10K and 215K steps.

    Args:
        max_decay: The upper clamp, in ``[0, 1]``.
        inv_gamma: The inverse multiplicative factor of the step, ``> 0``.
        power: The exponent of the warmup, ``> 0``.
        min_decay: The lower clamp, in ``[0, max_decay]``.

    Returns:
        A frozen :class:`Warmup` schedule.

    Raises:
        ValueError: If an argument is out of range, not finite, or ``min_decay > max_decay``.

    Examples:
        >>> s = warmup()
        >>> s(1)
        0.0
        >>> round(s(1001), 6)  # 1 - 1001 ** (-2/3)
        0.990007
    """
    max_decay_f = _unit("max_decay", max_decay)
    min_decay_f = _unit("min_decay", min_decay)
    if min_decay_f > max_decay_f:
        raise ValueError(f"min_decay must be <= max_decay, got min_decay={min_decay!r} > max_decay={max_decay!r}.")
    return Warmup(
        max_decay=max_decay_f,
        inv_gamma=_positive("inv_gamma", inv_gamma),
        power=_positive("power", power),
        min_decay=min_decay_f,
    )


def litema(max_decay: float = 0.9999) -> LitEma:
    """Return LitEma's schedule ``d(u) = min(max_decay, (1 + u) / (10 + u))``.

    Args:
        max_decay: The upper clamp, in ``[0, 1]``.

    Returns:
        A frozen :class:`LitEma` schedule.

    Raises:
        ValueError: If ``max_decay`` is not a finite number in ``[0, 1]``.

    Examples:
        >>> s = litema()
        >>> s(1) == 2 / 11
        True
        >>> s(10 ** 6)
        0.9999
    """
    return LitEma(max_decay=_unit("max_decay", max_decay))


def power(gamma: float | None = None, sigma_rel: float | None = None) -> Power:
    """Return the power-function schedule of Karras et al. 2024 (EDM2).

    ``d(u) = (1 - 1/u) ** (gamma + 1)``, so ``d(1) = 0`` and the EMA at step ``u`` weighs step
    ``tau`` in proportion to ``tau ** gamma``. Over an interval of ``D`` steps the decays
    telescope to ``beta = (1 - D/u) ** (gamma + 1)``. The width is
    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))``.

    Args:
        gamma: The exponent, ``> -1/2``.
        sigma_rel: The relative width instead of ``gamma``, in ``(0, 1/sqrt(12))``; converted
            with :func:`funcema.sigma_rel_to_gamma`. Give exactly one of the two.

    Returns:
        A frozen :class:`Power` schedule; it stores ``gamma`` and exposes ``sigma_rel``.

    Raises:
        ValueError: If both or neither of ``gamma`` and ``sigma_rel`` are given, or the one given
            is out of range.

    Examples:
        >>> s = power(gamma=6.94)
        >>> s(1)
        0.0
        >>> round(s(100), 6)  # 0.99 ** 7.94
        0.923301
        >>> round(power(sigma_rel=0.05).gamma, 4)
        16.9722
    """
    if (gamma is None) == (sigma_rel is None):
        raise ValueError(
            f"power() needs exactly one of gamma and sigma_rel, got gamma={gamma!r} and sigma_rel={sigma_rel!r}."
        )
    if sigma_rel is not None:
        return Power(gamma=_sigma.sigma_rel_to_gamma(sigma_rel))
    gamma_f = _real("gamma", gamma, "a finite real number > -1/2")
    if not gamma_f > -0.5:
        raise ValueError(f"gamma must be > -1/2, got {gamma!r}.")
    return Power(gamma=gamma_f)


def halflife(steps: float, rampup: float | None = None) -> HalfLife:
    """Return the half-life schedule of EDM2's traditional EMA.

    ``d(u) = 0.5 ** (1 / h)`` with ``h = min(steps, rampup * u)`` if ``rampup`` is given, else
    ``h = steps``: the weight of a step halves after ``h`` further steps.

    Args:
        steps: The half-life in averaging steps, ``> 0``.
        rampup: If given (``> 0``), the half-life is at most ``rampup * u``, so early in training
            the EMA forgets faster (EDM's ``ema_rampup_ratio``).

    Returns:
        A frozen :class:`HalfLife` schedule.

    Raises:
        ValueError: If ``steps`` or ``rampup`` is not a finite number ``> 0``.

    Examples:
        >>> halflife(1.0)(5)
        0.5
        >>> round(halflife(1000, rampup=0.05)(100), 6)  # 0.5 ** (1 / 5)
        0.870551
    """
    steps_f = _positive("steps", steps)
    rampup_f = None if rampup is None else _positive("rampup", rampup)
    return HalfLife(steps=steps_f, rampup=rampup_f)


# --------------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------------

_FACTORIES: dict[str, Any] = {
    "constant": constant,
    "warmup": warmup,
    "litema": litema,
    "power": power,
    "halflife": halflife,
}
_CLASSES: dict[str, type[Schedule]] = {cls.name: cls for cls in (Constant, Warmup, LitEma, Power, HalfLife)}


def from_dict(d: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict`'s output, validating every field.

    Floats survive a JSON round trip exactly (JSON writes them with ``repr``), so
    ``from_dict(json.loads(json.dumps(s.to_dict()))) == s``.

    Args:
        d: A mapping with a ``"name"`` key and one key per field of that schedule.

    Returns:
        The schedule.

    Raises:
        ValueError: If ``d`` is not a mapping, names an unknown schedule, lacks a field, has an
            extra field, or holds an invalid value.

    Examples:
        >>> from_dict({"name": "litema", "max_decay": 0.999})
        LitEma(max_decay=0.999)
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"from_dict expects a mapping, got {type(d).__name__}.")
    name = d.get("name")
    if not isinstance(name, str) or name not in _CLASSES:
        raise ValueError(f"unknown schedule name {name!r}; expected one of {sorted(_CLASSES)}.")
    cls = _CLASSES[name]
    assert dataclasses.is_dataclass(cls)
    expected = {field.name for field in dataclasses.fields(cls)}
    given = set(d) - {"name"}
    if given != expected:
        missing = sorted(expected - given)
        extra = sorted(given - expected)
        raise ValueError(f"bad fields for schedule {name!r}: missing {missing}, unexpected {extra}.")
    kwargs = {key: d[key] for key in expected}
    try:
        schedule: Schedule = _FACTORIES[name](**kwargs)
    except TypeError as error:
        raise ValueError(f"bad field for schedule {name!r}: {error}") from None
    return schedule
