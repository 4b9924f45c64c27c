"""The EMA state: an immutable pytree of tensors plus static, hashable configuration."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import optree
import torch

from .schedules import Schedule

__all__ = ["EmaConfig", "EmaState", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("propagate", "skip", "raise")


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """Static configuration of an EMA, fixed at :func:`funcema.init` and saved with the state.

    It is hashable and compared by value, so ``torch.compile`` treats it as a constant and an
    ``update`` needs nothing but the state and the parameters.

    Attributes:
        schedule: the per-step decay ``d(u)``.
        every: average once every ``every`` averaging steps (product rule over the interval).
        after: the first ``after`` updates copy the parameters (warm start).
        debias: give the initial value zero weight (normalised weighted average).
        dtype: the requested EMA dtype for floating leaves, or ``None`` for the default policy.
        on_nonfinite: ``"propagate"``, ``"skip"`` or ``"raise"``.
        seed: seed of the counter-based generator used for stochastic rounding.
        compensated: whether the state carries a compensation term beside each averaged leaf.
        treespec: the structure of the parameter tree.
        paths: the dotted path of each leaf, in flattening order.
        averaged: per leaf, whether it is averaged (``True``) or copied from the parameters.
        param_dtypes: per leaf, the dtype of the parameter the EMA was created from.
        groups: indices of the averaged leaves grouped by (device, EMA dtype, parameter dtype),
            so each group is one multi-tensor kernel launch.
    """

    schedule: Schedule
    every: int
    after: int
    debias: bool
    dtype: torch.dtype | None
    on_nonfinite: str
    seed: int
    compensated: bool
    treespec: optree.PyTreeSpec
    paths: tuple[str, ...]
    averaged: tuple[bool, ...]
    param_dtypes: tuple[torch.dtype, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def copied(self) -> tuple[int, ...]:
        """Indices of the leaves copied from the parameters (integer, bool, or rejected by ``average``)."""
        return tuple(i for i, a in enumerate(self.averaged) if not a)


class EmaState(NamedTuple):
    """The state of an exponential moving average; create it with :func:`funcema.init`.

    A ``NamedTuple``: immutable, traced by ``torch.compile``, and a pytree for optree. In the
    ``"funcema"`` optree namespace the configuration is static metadata, so
    ``optree.tree_map(f, state, namespace="funcema")`` maps the tensors only.
    """

    ema: Any
    """The averaged weights: a pytree with the structure of the parameters."""
    compensation: Any
    """``None``, or with ``compensated=True`` the low-order part of the average: a pytree with the
    structure of ``ema`` whose averaged leaves are tensors like the EMA's (the exact average is
    ``ema + compensation``, ``|compensation| <= ulp(ema) / 2``) and whose copied leaves are empty
    tensors of shape ``(0,)``, so its leaves line up with ``ema``'s."""
    step: torch.Tensor  # shape=(), dtype=int64, on the CPU: number of update() calls so far
    """Number of :func:`funcema.update` calls so far (0-d int64 CPU tensor; -1 once donated)."""
    log_decay_product: torch.Tensor  # shape=(), dtype=float64: log A, A = prod of beta (debias)
    """``log A`` with ``A`` the product of the interval decays of all averaging steps (debias)."""
    nonfinite_count: torch.Tensor  # shape=(), dtype=int64: updates skipped for non-finite params
    """Number of updates skipped because a parameter held a NaN or an infinity (``on_nonfinite="skip"``)."""
    config: EmaConfig
    """The static configuration."""


def _flatten_state(state: EmaState) -> tuple[tuple[Any, ...], EmaConfig, tuple[str, ...]]:
    return (state.ema, state.compensation, state.step, state.log_decay_product, state.nonfinite_count), state.config, (
        "ema",
        "compensation",
        "step",
        "log_decay_product",
        "nonfinite_count",
    )


def _unflatten_state(config: EmaConfig, children: Any) -> EmaState:
    ema, compensation, step, log_decay_product, nonfinite_count = children
    return EmaState(ema, compensation, step, log_decay_product, nonfinite_count, config)


with warnings.catch_warnings():
    # optree warns that a NamedTuple subclass is already a node in the global namespace; the
    # "funcema" namespace deliberately overrides it to keep the configuration static.
    warnings.simplefilter("ignore", UserWarning)
    optree.register_pytree_node(
        EmaState,
        _flatten_state,  # type: ignore[arg-type]
        _unflatten_state,  # type: ignore[arg-type]
        namespace="funcema",
    )
