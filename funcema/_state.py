"""The EMA state: an immutable pytree of tensors plus static, hashable configuration."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import optree
import torch

from .schedules import Schedule

__all__ = ["EmaConfig", "EmaState", "NONFINITE_POLICIES", "config_by_key"]

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
        treespec: the structure of the parameter tree.
        paths: the dotted path of each leaf, in flattening order.
        averaged: per leaf, whether it is averaged (``True``) or copied from the parameters.
        param_dtypes: per leaf, the dtype of the parameter the EMA was created from.
        groups: indices of the averaged leaves grouped by (device, EMA dtype, parameter dtype),
            so each group is one multi-tensor kernel launch.
        key: a process-wide name of this configuration (equal configurations share it): the
            compiled update passes it to its custom ops, which take no Python objects.
        dict_keys: for a flat dict of tensors, its keys in leaf order (else ``None``).
        dict_order: for a flat dict of tensors, the leaf indices in the dict's key order.
        dict_insertion_keys: for a flat dict of tensors, its keys in the dict's key order.
        dict_positions: for a flat dict of tensors, the key-order position of each leaf.
    """

    schedule: Schedule
    every: int
    after: int
    debias: bool
    dtype: torch.dtype | None
    on_nonfinite: str
    seed: int
    treespec: optree.PyTreeSpec
    paths: tuple[str, ...]
    averaged: tuple[bool, ...]
    param_dtypes: tuple[torch.dtype, ...]
    groups: tuple[tuple[int, ...], ...]
    key: str = dataclasses.field(default="", compare=False, repr=False)
    dict_keys: tuple[Any, ...] | None = dataclasses.field(default=None, compare=False, repr=False)
    dict_order: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)
    dict_insertion_keys: tuple[Any, ...] = dataclasses.field(default=(), compare=False, repr=False)
    dict_positions: tuple[int, ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        # Equal configurations share one key, by which compiled code finds this configuration
        # again (see ``config_by_key``); the field is excluded from equality and hashing.
        object.__setattr__(self, "key", _REGISTRY.setdefault(self, f"cfg{len(_REGISTRY)}"))
        _BY_KEY.setdefault(self.key, self)
        # A flat dict of tensors (``named_parameters()``, ``state_dict()``): its keys in leaf
        # order, and the leaf indices in the dict's own key order, so that compiled code can
        # read and rebuild it without tracing a generic flatten (which costs seconds per
        # thousand leaves in dynamo).
        spec = self.treespec
        if spec.kind in (optree.PyTreeKind.DICT, optree.PyTreeKind.ORDEREDDICT) and all(c.is_leaf() for c in spec.children()):
            order = optree.tree_unflatten(spec, list(range(spec.num_leaves)))
            object.__setattr__(self, "dict_keys", tuple(spec.entries()))
            object.__setattr__(self, "dict_order", tuple(order.values()))
            object.__setattr__(self, "dict_insertion_keys", tuple(order.keys()))
            positions = [0] * len(order)
            for position, leaf in enumerate(order.values()):
                positions[leaf] = position
            object.__setattr__(self, "dict_positions", tuple(positions))

    @property
    def copied(self) -> tuple[int, ...]:
        """Indices of the leaves copied from the parameters (integer, bool, or rejected by ``average``)."""
        return tuple(i for i, a in enumerate(self.averaged) if not a)


# Every configuration built in this process, by value and by key. Configurations are small and a
# program builds a handful, so they are kept for the life of the process: a compiled graph that
# names a key can always find its configuration.
_REGISTRY: dict[EmaConfig, str] = {}
_BY_KEY: dict[str, EmaConfig] = {}


def config_by_key(key: str) -> EmaConfig:
    """The configuration registered under ``key`` (see ``EmaConfig.key``)."""
    return _BY_KEY[key]


class EmaState(NamedTuple):
    """The state of an exponential moving average; create it with :func:`funcema.init`.

    A ``NamedTuple``: immutable, traced by ``torch.compile``, and a pytree for optree. In the
    ``"funcema"`` optree namespace the configuration is static metadata, so
    ``optree.tree_map(f, state, namespace="funcema")`` maps the tensors only.
    """

    ema: Any
    """The averaged weights: a pytree with the structure of the parameters."""
    step: torch.Tensor  # shape=(), dtype=int64, on the CPU: number of update() calls so far
    """Number of :func:`funcema.update` calls so far (0-d int64 CPU tensor; -1 once donated)."""
    log_decay_product: torch.Tensor  # shape=(), dtype=float64: log A, A = prod of beta (debias)
    """``log A`` with ``A`` the product of the interval decays of all averaging steps (debias)."""
    nonfinite_count: torch.Tensor  # shape=(), dtype=int64: updates skipped for non-finite params
    """Number of updates skipped because a parameter held a NaN or an infinity (``on_nonfinite="skip"``)."""
    config: EmaConfig
    """The static configuration."""


def _flatten_state(state: EmaState) -> tuple[tuple[Any, ...], EmaConfig, tuple[str, ...]]:
    return (state.ema, state.step, state.log_decay_product, state.nonfinite_count), state.config, (
        "ema",
        "step",
        "log_decay_product",
        "nonfinite_count",
    )


def _unflatten_state(config: EmaConfig, children: Any) -> EmaState:
    ema, step, log_decay_product, nonfinite_count = children
    return EmaState(ema, step, log_decay_product, nonfinite_count, config)


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
