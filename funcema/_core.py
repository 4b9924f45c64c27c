r"""The pure core: [`init`][funcema.init], [`update`][funcema.update] and [`swap`][funcema.swap].

Owns: creating a state, the update of one state (flatten once, match by path, check, weight,
kernels per group, unflatten) and the swap of EMA and live weights. Sharded (DTensor) leaves are
updated on their local views, asked of `_dtensor` (a call down, no callback).

Must not import: `_io`, `nn`, `posthoc`, `_cli` (everything above it).
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from typing import Any

import optree
import torch

from . import _dtensor, _kernels, _tree
from ._interp import Action, host_weight, traced_weight
from ._state import (
    AveragePredicate,
    EmaConfig,
    EmaState,
    build_config,
    check_live,
    check_options,
    initial_scalars,
    make_state,
)
from ._tree import Params, ParamsT
from ._validate import callable_or_none
from .schedules import Schedule, constant

__all__ = ["init", "match_params", "swap", "update", "update_matched"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def init(
    params: ParamsT,
    *,
    schedule: Schedule | None = None,
    every: int = 1,
    after: int = 0,
    debias: bool = False,
    dtype: torch.dtype | None = None,
    average: AveragePredicate | None = None,
    on_nonfinite: str = "propagate",
    seed: int = 0,
) -> EmaState[ParamsT]:
    """Create the EMA state of a parameter tree.

    The EMA starts as a copy of `params`; nothing of `params` is aliased or modified.

    Args:
        params: a pytree of tensors (`dict(model.named_parameters())`, `model.state_dict()`,
            nested dicts, lists, tuples, NamedTuples) with `None` holes.
        schedule: the per-step decay `d(u)` from [`funcema.schedules`][funcema.schedules];
            default `schedules.constant(0.9999)`.
        every: average once every `every` averaging steps, with the decay of the whole interval
            (`beta = prod d(v)` over the interval); the steps in between touch no memory.
        after: the first `after` updates copy the parameters (warm start).
        debias: give the initial value zero weight, so the EMA is always the normalised weighted
            average of the parameters it has seen.
        dtype: dtype of the EMA of floating leaves. `None` keeps float32/float64 leaves as they
            are and averages float16/bfloat16 leaves in float32. A bfloat16 EMA is averaged in
            float32 and rounded back stochastically, so updates smaller than its resolution still
            count in expectation; a float16 EMA is rounded to nearest (prefer float32 or bfloat16).
        average: a predicate `average(path, tensor) -> bool`; leaves it rejects are copied from
            the parameters instead of averaged (integer and bool leaves are always copied).
        on_nonfinite: `"propagate"` (no check), `"skip"` (an update whose parameters hold a NaN
            or an infinity leaves the EMA unchanged and is counted in `state.nonfinite_count`,
            without a host synchronisation) or `"raise"` (`FloatingPointError` naming the leaf).
        seed: seed of the stochastic rounding of low-precision EMAs.

    Returns:
        The state: `state.ema` has the structure of `params`; `state.step` is 0.

    Raises:
        TypeError: an argument or a leaf of the wrong type (a bool for an int included), named.
        ValueError: an argument out of range, or two leaves with the same path.

    Examples:
        >>> import torch, funcema as fe
        >>> state = fe.init({"w": torch.ones(2), "b": None}, schedule=fe.schedules.constant(0.9))
        >>> state.ema["w"], int(state.step)
        (tensor([1., 1.]), 0)
    """
    schedule = constant(0.9999) if schedule is None else schedule
    options = dict(schedule=schedule, every=every, after=after, debias=debias, dtype=dtype, on_nonfinite=on_nonfinite)
    options = check_options(**options, seed=seed)
    callable_or_none("average", average, "(path, tensor) -> bool")
    leaves, paths, spec = _tree.flatten(params, "params")
    averaged = tuple(_is_averaged(leaf, path, average) for leaf, path in zip(leaves, paths))
    ema_dtypes = [_ema_dtype(leaf.dtype, dtype) if avg else leaf.dtype for leaf, avg in zip(leaves, averaged)]
    ema_leaves = [leaf.detach().to(dtype=d, copy=True) for leaf, d in zip(leaves, ema_dtypes)]  # detach: no grad
    config = build_config(options, spec, paths, averaged, [leaf.dtype for leaf in leaves], ema_leaves)
    return make_state(config, {"ema": ema_leaves}, initial_scalars())


def update(state: EmaState[ParamsT], params: Params, *, donate: bool = False) -> EmaState[ParamsT]:
    """Average `params` into the EMA and return the new state.

    $$
    \\text{ema} \\leftarrow \\text{decay} \\cdot \\text{ema} + (1 - \\text{decay}) \\cdot \\text{params}
    $$

    With `t` the update count including this call and `u = t - after`: while `t <= after` the
    EMA is a copy of `params`; if `u % every != 0` nothing changes and no tensor is touched;
    otherwise `decay = prod_{v=u-every+1..u} d(v)` (computed in float64 on the host). With
    `debias=True` the weight of `params` is `(1 - decay) / (1 - A * decay)`, `A` the product
    of all earlier decays. Integer, bool and `average`-rejected leaves are copied. The EMA keeps
    its dtype (float32 for bfloat16/float16 parameters by default); parameters are converted inside
    the update.

    Parameters are matched to the state by path, so any tree with the same paths works.

    `donate=False` (default) is pure: no input changes, bit for bit, and the new state owns new
    tensors. `donate=True` updates the state's tensors in place and returns a state that shares
    them; the old state is consumed (its `step` becomes -1 and passing it again raises).

    Under `torch.compile(fullgraph=True)` the update is traced with the step as a tensor: one graph
    serves every step and every schedule, with no recompilation. In eager mode it performs no
    host-device synchronisation (except `on_nonfinite="raise"`, which must read the values).

    Args:
        state: the EMA state from [`init`][funcema.init] or a previous [`update`][funcema.update].
        params: the current parameters, a tree with the state's paths.
        donate: reuse the state's storage (in-place update).

    Returns:
        The new state, with `step` incremented.

    Raises:
        ValueError: `params` differ in structure (missing/extra paths are listed), or a leaf in
            shape, dtype kind or device (the path is named); the state was already donated.
        TypeError: a leaf of `params` is not a tensor.
        FloatingPointError: with `on_nonfinite="raise"`, a leaf holds a NaN or an infinity.

    Examples:
        >>> import torch, funcema as fe
        >>> state = fe.init({"w": torch.zeros(2)}, schedule=fe.schedules.constant(0.5))
        >>> state = fe.update(state, {"w": torch.ones(2)})
        >>> state.ema["w"], int(state.step)
        (tensor([0.5000, 0.5000]), 1)
    """
    _check_state(state)
    emas, leaves = match_params(state, params)
    return update_matched(state, emas, leaves, donate)


def _check_state(state: object) -> None:
    if not isinstance(state, EmaState):
        raise TypeError(f"state must be a funcema.EmaState from funcema.init, got {type(state).__name__}.")


def match_params(state: EmaState, params: Params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return the state's EMA leaves and the leaves of `params` matched to them by path and checked.

    Raises:
        ValueError: `params` differ in structure, or a leaf in shape, dtype kind or device.
        TypeError: a leaf of `params` is not a tensor.
    """
    config = state.config
    emas = optree.tree_leaves(state.ema)
    leaves = _tree.match_leaves(params, config.treespec, config.paths)
    # Eager fast path: parameters with their init dtypes are validated by C-level list
    # comparisons; the per-leaf check (and its path-named error) runs only if that fails.
    fast_dtypes = None if torch.compiler.is_compiling() else config.param_dtypes
    _tree.check_leaves(leaves, emas, config.paths, dtypes=fast_dtypes)
    return emas, leaves


def update_matched(state: EmaState, emas: list[torch.Tensor], leaves: list[torch.Tensor], donate: bool) -> EmaState:
    """Update `state` with parameter leaves already matched and checked by [`match_params`][funcema._core.match_params].

    DTensor leaves (FSDP2) are updated on their local shards, with no communication, and
    rewrapped like the EMA's leaves.
    """
    config = state.config
    compiling = torch.compiler.is_compiling()
    sharded = False
    if not compiling:
        check_live(state)
        sharded = _dtensor.any_dtensor(emas, leaves)
    if sharded:
        _dtensor.check_pairs(emas, leaves, config.paths)
        local_emas, local_leaves = _dtensor.local_views(emas), _dtensor.local_views(leaves)
    else:
        local_emas, local_leaves = emas, leaves
    if compiling or config.on_nonfinite == "skip":
        new_emas, new_log, new_count = _update_traced(config, state, local_emas, local_leaves, donate)
        new_step = state.step + 1
    else:
        new_emas, new_log, new_count, new_step = _update_eager(config, state, local_emas, local_leaves, donate)
    if sharded:
        new_emas = _dtensor.rewrap(new_emas, emas, local_emas)
    if donate and not compiling:
        state.step.fill_(-1)  # mark the donated state as consumed
    # Dynamo traces a structure rebuilt from the state's own tree, not the stored spec object.
    spec = optree.tree_structure(state.ema) if compiling else config.treespec
    ema = optree.tree_unflatten(spec, new_emas)
    return EmaState(ema=ema, step=new_step, log_decay_product=new_log, nonfinite_count=new_count, config=config)


def swap(state: EmaState[ParamsT], params: ParamsT) -> tuple[EmaState[ParamsT], ParamsT]:
    """Exchange the averaged and the live weights: `(state, params) -> (state', params')`.

    `params'` is the EMA (in the EMA's dtype) with the structure of `params`, and `state'.ema`
    holds the live tensors of `params`. No tensor is copied or modified, so swapping twice
    returns the original tensors. Use it to evaluate with the EMA, then swap back before training
    on; in an `nn.Module` use [`swapped`][funcema.swapped], which also casts to the module's dtypes.

    Examples:
        >>> import torch, funcema as fe
        >>> live = {"w": torch.ones(2)}
        >>> state = fe.update(fe.init({"w": torch.zeros(2)}, schedule=fe.schedules.constant(0.5)), live)
        >>> state, evaluated = fe.swap(state, live)
        >>> evaluated["w"]
        tensor([0.5000, 0.5000])
        >>> state, back = fe.swap(state, evaluated)
        >>> back["w"] is live["w"]
        True
    """
    _check_state(state)
    check_live(state)
    config = state.config
    emas, leaves = match_params(state, params)
    _, params_spec = optree.tree_flatten(params)  # type: ignore[arg-type]  # ParamsT is a pytree
    by_path = dict(zip(config.paths, emas))
    live_order = _tree.flatten(params, "params")[1] if params_spec != config.treespec else config.paths
    swapped_params: ParamsT = optree.tree_unflatten(params_spec, [by_path[p] for p in live_order])  # type: ignore[assignment]
    new_ema: ParamsT = optree.tree_unflatten(config.treespec, leaves)  # type: ignore[assignment]
    return state._replace(ema=new_ema), swapped_params


# --------------------------------------------------------------------------------------------
# Update paths


def _update_eager(
    config: EmaConfig, state: EmaState, emas: list[torch.Tensor], leaves: list[torch.Tensor], donate: bool
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager update with the weight computed on the host: no device synchronisation."""
    t = int(state.step) + 1  # the step lives on the CPU: reading it never syncs the device
    if config.on_nonfinite == "raise":
        bad = _kernels.first_nonfinite(leaves)
        if bad is not None:
            raise FloatingPointError(f"params leaf {config.paths[bad]!r} holds a NaN or an infinity (on_nonfinite='raise').")
    log_a = float(state.log_decay_product)
    action, weight, new_log = host_weight(config, t, log_a)
    step = torch.full((), t, dtype=torch.int64)
    log_tensor = torch.full((), new_log, dtype=torch.float64) if new_log != log_a else state.log_decay_product
    if action is Action.SKIP:
        return list(emas), log_tensor, state.nonfinite_count, step
    new = list(emas)  # every slot is overwritten below: averaged groups, then copied leaves
    whole = len(config.groups) == 1 and len(config.groups[0]) == len(emas)  # groups list indices ascending
    for group in config.groups:
        if whole:  # the common single-dtype model: no per-leaf gathering at all
            e, p = list(emas), list(leaves)
        else:
            e, p = _gather(emas, group), _gather(leaves, group)
        if action is Action.COPY:
            out = _kernels.copy(e, p, inplace=donate)
        elif e[0].dtype in _LOW_PRECISION:
            out = _low_precision_lerp(config, e, p, weight, group, t, donate)
        else:
            out = _kernels.lerp(e, p, weight, inplace=donate)
        if whole:
            new = list(out)
        else:
            for i, o in zip(group, out):
                new[i] = o
    copied = () if whole else config.copied  # one group of every leaf leaves nothing to copy
    out = _kernels.copy([emas[i] for i in copied], [leaves[i] for i in copied], inplace=donate)
    for i, o in zip(copied, out):
        new[i] = o
    return new, log_tensor, state.nonfinite_count, step


def _gather(items: Sequence[torch.Tensor], indices: tuple[int, ...]) -> list[torch.Tensor]:
    """`[items[i] for i in indices]` in one C-level call."""
    if len(indices) == 1:
        return [items[indices[0]]]
    return list(operator.itemgetter(*indices)(items))


def _update_traced(
    config: EmaConfig, state: EmaState, emas: list[torch.Tensor], leaves: list[torch.Tensor], donate: bool
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Branch-free update with tensor weights: for `torch.compile` and `on_nonfinite="skip"`.

    Every step runs the same operations; a step that must not change the EMA selects the old
    values with `torch.where`, so skipped steps stay bit-identical.
    """
    t = state.step + 1
    weight, active, new_log = traced_weight(config, t, state.log_decay_product.to(torch.float64))
    device = state.log_decay_product.device
    weight, active, new_log = weight.to(device), active.to(device), new_log.to(device)
    count = state.nonfinite_count
    if config.on_nonfinite == "skip":
        finite = _kernels.all_finite(leaves, device)
        active = torch.logical_and(active, finite)
        new_log = torch.where(finite, new_log, state.log_decay_product)
        count = count + (~finite).to(count.dtype)
    new: list[torch.Tensor] = list(emas)
    for group in config.groups:
        e = [emas[i] for i in group]
        p = [leaves[i] for i in group]
        # A low-precision EMA is averaged in float32 and rounded back stochastically.
        wide = [x.float() if x.dtype in _LOW_PRECISION else x for x in e]
        lerped = _kernels.lerp_tensor_weight(wide, p, weight)
        for k, i in enumerate(group):
            value = lerped[k]
            if e[k].dtype in _LOW_PRECISION:
                value = _kernels.stochastic_round(value, e[k].dtype, _rounding_key(config, t, i))
            new[i] = _select(active, value, emas[i], donate)
    for i in config.copied:
        new[i] = _select(active, leaves[i].to(emas[i].dtype), emas[i], donate)
    return new, new_log.to(state.log_decay_product.device), count


def _select(active: torch.Tensor, value: torch.Tensor, old: torch.Tensor, donate: bool) -> torch.Tensor:
    with torch.no_grad():
        # value.to(old.dtype): a 0-d EMA lerped with the float64 0-d weight would promote.
        chosen = torch.where(active.to(old.device), value.to(old.dtype), old)
        if donate:
            old.copy_(chosen)
            return old
        return chosen


def _low_precision_lerp(
    config: EmaConfig,
    emas: list[torch.Tensor],
    params: list[torch.Tensor],
    weight: float,
    group: tuple[int, ...],
    t: int,
    donate: bool,
) -> list[torch.Tensor]:
    """Average in float32 and round back to the EMA's low-precision dtype stochastically."""
    wide = _kernels.lerp([e.float() for e in emas], params, weight, inplace=True)
    out = []
    for e, w, i in zip(emas, wide, group):
        rounded = _kernels.stochastic_round(w, e.dtype, _rounding_key(config, t, i))
        if donate:
            with torch.no_grad():
                e.copy_(rounded)
            out.append(e)
        else:
            out.append(rounded)
    return out


def _rounding_key(config: EmaConfig, t: Any, leaf_index: int) -> Any:
    """The random stream of one leaf at one step: distinct for every (seed, step, leaf)."""
    return (t * 0x632BE5AB + config.seed * 0x2545F491 + leaf_index * 0x9E3779B9) & 0x7FFFFFFFFFFF


# --------------------------------------------------------------------------------------------
# Helpers


def _is_averaged(leaf: torch.Tensor, path: str, average: AveragePredicate | None) -> bool:
    if not (leaf.is_floating_point() or leaf.is_complex()):
        return False
    if average is None:
        return True
    verdict = average(path, leaf)
    if not isinstance(verdict, (bool, numbers.Integral)) and not (isinstance(verdict, torch.Tensor) and verdict.numel() == 1):
        raise TypeError(f"average({path!r}, tensor) must return a bool, got {type(verdict).__name__}.")
    return bool(verdict)


def _ema_dtype(param_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if param_dtype.is_complex:
        if requested is not None and requested.is_complex:
            return requested
        return torch.complex64 if param_dtype == torch.complex32 else param_dtype
    if requested is not None and requested.is_floating_point:
        return requested
    return torch.float32 if param_dtype in _LOW_PRECISION else param_dtype
