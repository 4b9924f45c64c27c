"""The EMA state: an immutable pytree of tensors plus static, hashable configuration.

Owns: [`EmaState`][funcema.EmaState] and its fields ([`FIELDS`][funcema._state.FIELDS], the one
list that saving, loading and the pytree registration read), [`EmaConfig`][funcema.EmaConfig]
and the one function that builds it ([`build_config`][funcema._state.build_config], used by
`init` and `load`), where the scalar fields live, and the "consumed state" check.

Must not import: `_interp`, `_kernels`, `_dtensor`, `_core`, `_io`, `nn`, `posthoc` (everything
above it). It imports `_validate` and `schedules` only.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, NamedTuple

import optree
import torch

from ._tree import ParamsT
from ._validate import boolean, floating_dtype, integer, one_of
from .schedules import Schedule

__all__ = [
    "AveragePredicate",
    "EmaConfig",
    "EmaState",
    "FIELDS",
    "Field",
    "NONFINITE_POLICIES",
    "SCALAR_FIELDS",
    "TREE_FIELDS",
    "build_config",
    "check_live",
    "check_options",
    "initial_scalars",
    "make_state",
    "scalar_device",
    "state_keys",
]

NONFINITE_POLICIES = ("propagate", "skip", "raise")

AveragePredicate = Callable[[str, torch.Tensor], bool]
"""`average(path, tensor) -> bool`: whether a floating leaf is averaged (else copied)."""


@dataclasses.dataclass(frozen=True, repr=False)
class EmaConfig:
    """Static configuration of an EMA, fixed at [`init`][funcema.init] and saved with the state.

    It is hashable and compared by value, so `torch.compile` treats it as a constant and an
    `update` needs nothing but the state and the parameters.

    Attributes:
        schedule: the per-step decay `d(u)`.
        every: average once every `every` averaging steps (product rule over the interval).
        after: the first `after` updates copy the parameters (warm start).
        debias: give the initial value zero weight (normalised weighted average).
        dtype: the requested EMA dtype for floating leaves, or `None` for the default policy.
        on_nonfinite: `"propagate"`, `"skip"` or `"raise"`.
        seed: seed of the counter-based generator used for stochastic rounding.
        treespec: the structure of the parameter tree.
        paths: the dotted path of each leaf, in flattening order.
        averaged: per leaf, whether it is averaged (`True`) or copied from the parameters.
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
    treespec: optree.PyTreeSpec
    paths: tuple[str, ...]
    averaged: tuple[bool, ...]
    param_dtypes: tuple[torch.dtype, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def copied(self) -> tuple[int, ...]:
        """Indices of the leaves copied from the parameters (integer, bool, or rejected by `average`)."""
        return tuple(i for i, a in enumerate(self.averaged) if not a)

    def __repr__(self) -> str:
        # The options and a count of the layout, never the per-leaf tuples (thousands of entries).
        dtype = "None" if self.dtype is None else _dtype_name(self.dtype)
        return (
            f"EmaConfig(schedule={self.schedule!r}, every={self.every}, after={self.after}, debias={self.debias}, "
            f"dtype={dtype}, on_nonfinite={self.on_nonfinite!r}, seed={self.seed}, leaves={len(self.paths)}, "
            f"averaged={sum(self.averaged)}, groups={len(self.groups)})"
        )


class EmaState(NamedTuple, Generic[ParamsT]):
    """The state of an exponential moving average; create it with [`init`][funcema.init].

    A `NamedTuple`: immutable, traced by `torch.compile`, and a pytree for optree. In the
    `"funcema"` optree namespace the configuration is static metadata, so
    `optree.tree_map(f, state, namespace="funcema")` maps the tensors only. It is generic in the
    parameter tree: `fe.init(params)` with `params: dict[str, Tensor]` gives an
    `EmaState[dict[str, Tensor]]`, whose `ema` a type checker knows to be that dict.
    """

    ema: ParamsT
    """The averaged weights: a pytree with the structure of the parameters."""
    step: torch.Tensor  # shape=(), dtype=int64, on the CPU: number of update() calls so far
    """Number of [`update`][funcema.update] calls so far (0-d int64 CPU tensor; -1 once donated)."""
    log_decay_product: torch.Tensor  # shape=(), dtype=float64: log A, A = prod of beta (debias)
    """`log A` with `A` the product of the interval decays of all averaging steps (debias)."""
    nonfinite_count: torch.Tensor  # shape=(), dtype=int64: updates skipped for non-finite params
    """Number of updates skipped because a parameter held a NaN or an infinity (`on_nonfinite="skip"`)."""
    config: EmaConfig
    """The static configuration."""

    def __repr__(self) -> str:
        # A summary that stays short for any model: counts and dtypes, never the leaves' values.
        leaves: list[torch.Tensor] = optree.tree_leaves(self.ema)  # type: ignore[arg-type]  # ParamsT is a pytree
        dtypes = ", ".join(sorted({_dtype_name(leaf.dtype) for leaf in leaves}))
        step = int(self.step)  # a CPU scalar: reading it never syncs the device
        return (
            f"EmaState(step={'consumed' if step < 0 else step}, leaves={len(leaves)}, "
            f"numel={_count(sum(leaf.numel() for leaf in leaves))}, dtypes=[{dtypes}], "
            f"schedule={self.config.schedule!r}, every={self.config.every}, debias={self.config.debias})"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count(n: int) -> str:
    """`n` with an SI suffix: 124439808 -> "124.4M"."""
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


@dataclasses.dataclass(frozen=True)
class Field:
    """One tensor field of [`EmaState`][funcema.EmaState], as saving and loading see it.

    Attributes:
        name: the attribute of the state.
        tree: a tree with the parameters' paths (saved as `"<name>/<path>"`), or a 0-d scalar.
        dtype: a scalar's dtype (`None` for trees, which keep their own dtypes).
        host: a scalar that always lives on the CPU, so reading it never syncs the device.
    """

    name: str
    tree: bool
    dtype: torch.dtype | None = None
    host: bool = False


FIELDS: tuple[Field, ...] = (
    Field("ema", tree=True),
    Field("step", tree=False, dtype=torch.int64, host=True),
    Field("log_decay_product", tree=False, dtype=torch.float64),
    Field("nonfinite_count", tree=False, dtype=torch.int64),
)
"""Every tensor field of the state, in `EmaState` order: add a field here and in `EmaState`,
and saving, loading (plain files and DCP directories) and the pytree registration follow."""

TREE_FIELDS = tuple(f for f in FIELDS if f.tree)
SCALAR_FIELDS = tuple(f for f in FIELDS if not f.tree)


def state_keys(paths: Sequence[str]) -> set[str]:
    """The tensor names of a saved state with these leaf paths."""
    return {f"{f.name}/{p}" for f in TREE_FIELDS for p in paths} | {f.name for f in SCALAR_FIELDS}


def check_options(
    *, schedule: object, every: object, after: object, debias: object, dtype: object, on_nonfinite: object, seed: object
) -> dict[str, Any]:
    """Validate the static options of an EMA and return them normalised.

    Raises:
        TypeError: an option has the wrong type (a bool where an int is expected included).
        ValueError: an option is out of range.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(
            "schedule must be a funcema.schedules.Schedule (e.g. schedules.constant(0.999)), "
            f"got {type(schedule).__name__}."
        )
    return {
        "schedule": schedule,
        "every": integer("every", every, minimum=1),
        "after": integer("after", after, minimum=0),
        "debias": boolean("debias", debias),
        "dtype": floating_dtype("dtype", dtype, complex_ok=True),
        "on_nonfinite": one_of("on_nonfinite", on_nonfinite, NONFINITE_POLICIES),
        "seed": integer("seed", seed, minimum=0),
    }


def build_config(
    options: Mapping[str, Any],
    treespec: optree.PyTreeSpec,
    paths: tuple[str, ...],
    averaged: Sequence[bool],
    param_dtypes: Sequence[torch.dtype],
    emas: Sequence[torch.Tensor],
) -> EmaConfig:
    """Build the configuration of a state from its options and the layout of its EMA leaves.

    Used by [`init`][funcema.init] and [`load`][funcema.load] alike, so a loaded state has the
    very configuration (groups included) that `init` would have built.
    """
    return EmaConfig(
        **check_options(**options),
        treespec=treespec,
        paths=paths,
        averaged=tuple(averaged),
        param_dtypes=tuple(param_dtypes),
        groups=_groups(emas, param_dtypes, averaged),
    )


def _groups(
    emas: Sequence[torch.Tensor], param_dtypes: Sequence[torch.dtype], averaged: Sequence[bool]
) -> tuple[tuple[int, ...], ...]:
    """Indices of the averaged leaves grouped by (device, EMA dtype, parameter dtype)."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (e, param_dtype, avg) in enumerate(zip(emas, param_dtypes, averaged)):
        if avg:
            groups.setdefault((e.device, e.dtype, param_dtype), []).append(i)
    return tuple(tuple(g) for g in groups.values())


def scalar_device(config: EmaConfig, emas: Sequence[torch.Tensor]) -> torch.device:
    """Where the non-host scalars (debias accumulator, skip counter) live.

    On the CPU (read without synchronising), except with `on_nonfinite="skip"`, whose decision is
    made on the device: there they live beside the first EMA tensor, so no update reads them.
    """
    if config.on_nonfinite == "skip" and emas:
        return emas[0].device
    return torch.device("cpu")


def make_state(config: EmaConfig, trees: Mapping[str, Sequence[torch.Tensor]], scalars: Mapping[str, torch.Tensor]) -> EmaState:
    """Assemble a state from its tree fields' leaves (in `config.paths` order) and its scalars.

    Each scalar is converted to its field's dtype and placed on its field's device.
    """
    device = scalar_device(config, trees["ema"])
    values: dict[str, Any] = {f.name: optree.tree_unflatten(config.treespec, list(trees[f.name])) for f in TREE_FIELDS}
    for f in SCALAR_FIELDS:
        values[f.name] = scalars[f.name].to(dtype=f.dtype, device=torch.device("cpu") if f.host else device)
    return EmaState(**values, config=config)


def initial_scalars() -> dict[str, torch.Tensor]:
    """The scalars of a fresh state: every one zero (on the CPU; `make_state` places them)."""
    return {f.name: torch.zeros((), dtype=f.dtype) for f in SCALAR_FIELDS}


def check_live(state: EmaState) -> None:
    """Raise if `state` was consumed by an `update(..., donate=True)`.

    Its step is a CPU scalar, so the check never synchronises the device.

    Raises:
        ValueError: the state was donated.
    """
    if int(state.step) < 0:
        raise ValueError(
            "state was donated to an earlier update(..., donate=True) and is consumed; "
            "continue with the state that call returned."
        )


_TENSOR_FIELDS = tuple(f.name for f in FIELDS)


def _flatten_state(state: EmaState) -> tuple[tuple[Any, ...], EmaConfig, tuple[str, ...]]:
    return tuple(getattr(state, name) for name in _TENSOR_FIELDS), state.config, _TENSOR_FIELDS


def _unflatten_state(config: EmaConfig, children: Any) -> EmaState:
    return EmaState(*children, config)  # type: ignore[call-arg]  # children: every field in FIELDS order


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
