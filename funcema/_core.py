r"""The pure core: [`init`][funcema.init], [`update`][funcema.update] and [`swap`][funcema.swap].

Owns: creating a state, the update of one state (flatten once, match by path, check, weight,
kernels per group, unflatten) and the swap of EMA and live weights. Sharded (DTensor) leaves are
updated on their local views, asked of `_dtensor` (a call down, no callback).

Must not import: `_io`, `nn`, `posthoc`, `_cli` (everything above it).
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch

from . import _dtensor, _kernels, _ops, _tree
from ._interp import Action, host_weight, warn_if_stagnates
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
    compensated: bool = False,
    kernel: str = "auto",
) -> EmaState[ParamsT]:
    """Create the EMA state of a parameter tree.

    The EMA starts as a copy of `params`; nothing of `params` is aliased or modified.

    Args:
        params: a pytree of tensors (`dict(model.named_parameters())`, `model.state_dict()`,
            nested dicts, lists, tuples, NamedTuples) with `None` holes.
        schedule: the per-step decay `d(u)` from [`funcema.schedules`][funcema.schedules];
            default `schedules.constant(0.9999)`.
        every: average once every `every` averaging steps, with the decay of the whole interval
            (`beta = prod d(v)` over the interval); a donated update between them touches no
            memory (a pure one returns copies).
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
        seed: seed of the stochastic rounding of low-precision EMAs, in `[0, 2**63 - 1]`.
        compensated: keep `state.compensation` beside the EMA (twice the memory), so that the
            average `ema + compensation` takes increments below the EMA's resolution (a two-sum
            step; docs/semantics.md). Without it, `init` warns with
            [`StagnationWarning`][funcema.StagnationWarning] if the EMA would stall within 10^6 updates.
        kernel: what averages each dtype group: `"foreach"` (torch's `_foreach_lerp_`), `"triton"`
            (fused; CUDA and the `triton` package) or `"auto"` (today `"foreach"` everywhere).
            A compensated state's pairs always take the two-sum `_foreach` passes.

    Returns:
        The state (`step` 0); `state.ema` has the structure of `params`, each leaf a new tensor.

    Raises:
        TypeError: a wrong type, named: a bool for an int, a module or `model.parameters()` for
            a tree, a sparse, nested, quantized or vmap-batched leaf.
        ValueError: a value out of range, a float8 leaf, two leaves with the same path, or
            `kernel="triton"` off CUDA.

    Examples:
        >>> import torch, funcema as fe
        >>> state = fe.init({"w": torch.ones(2), "b": None}, schedule=fe.schedules.constant(0.9))
        >>> state.ema["w"], int(state.step)
        (tensor([1., 1.]), 0)
    """
    # long: the docstring documents every option of an EMA; the body is 12 lines.
    schedule = constant(0.9999) if schedule is None else schedule
    options = dict(schedule=schedule, every=every, after=after, debias=debias, dtype=dtype, on_nonfinite=on_nonfinite)
    options = check_options(**options, seed=seed, compensated=compensated, kernel=kernel)
    callable_or_none("average", average, "(path, tensor) -> bool")
    leaves, paths, spec = _flatten_supported(params)
    averaged = tuple(_is_averaged(leaf, path, average) for leaf, path in zip(leaves, paths))
    ema_dtypes = [_ema_dtype(leaf.dtype, dtype) if avg else leaf.dtype for leaf, avg in zip(leaves, averaged)]
    _ops.check_kernel(kernel, leaves)
    trees = _initial_trees(leaves, ema_dtypes, averaged, compensated)
    config = build_config(options, spec, paths, averaged, [leaf.dtype for leaf in leaves], trees["ema"])
    warn_if_stagnates(config, {d for d, avg in zip(ema_dtypes, averaged) if avg}, stacklevel=3)
    return make_state(config, trees, initial_scalars())


def _initial_trees(
    leaves: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype], averaged: Sequence[bool], compensated: bool
) -> dict[str, list[torch.Tensor]]:
    """The first tree fields of a state: the EMA (copies of `leaves`) and, if compensated, its compensation.

    A float32 parameter of a bfloat16 compensated EMA starts as the nearest bfloat16 pair; copied
    leaves get a compensation of zeros that no update touches.
    """
    if not compensated:
        return {"ema": [leaf.detach().to(dtype=d, copy=True) for leaf, d in zip(leaves, dtypes)]}  # detach: no grad
    emas, comps = _kernels.split(leaves, dtypes)
    comps = [c if avg else torch.zeros_like(e) for c, e, avg in zip(comps, emas, averaged)]
    return {"ema": emas, "compensation": comps}


def _flatten_supported(params: Params) -> tuple[list[torch.Tensor], tuple[str, ...], optree.PyTreeSpec]:
    """Flatten `params` for `init`, refusing what `update` could not write (not found mid-update)."""
    leaves, paths, spec = _tree.flatten(params, "params")
    _tree.check_not_vmapped(leaves)
    _tree.check_supported(leaves, paths)
    return leaves, paths, spec


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
    the update. A compensated state (`compensated=True`) updates the pair `ema + compensation` with
    a two-sum step, so increments below the EMA's resolution are kept. Parameters are matched to
    the state by path, so any tree with the same paths works.

    `donate=False` (default) is pure: no input changes, bit for bit, and the new state owns new
    tensors. `donate=True` updates the state's tensors in place and returns a state that shares
    them; the old state is consumed (its `step` becomes -1 and passing it again raises).

    A donated update checks everything first (structure, shapes, dtypes, layouts, devices,
    sharding, a consumed state, non-finite values with `on_nonfinite="raise"`): a rejected call
    leaves the state unchanged and live. Only then is the state marked consumed, before its first
    write, so a failure while writing (out of memory, a device error) leaves it consumed, never
    half-updated with its old `step`: restore it from a checkpoint. A pure update that fails
    changes nothing. EMA leaves that share memory (after a [`swap`][funcema.swap] in of tied
    parameters) are first given their own copies, so each is averaged exactly once.

    Under `torch.compile(fullgraph=True)` the update is traced with the step as a tensor: one graph
    serves every step and every schedule, with no recompilation. In eager mode it performs no
    host-device synchronisation (except `on_nonfinite="raise"`, which must read the values): with
    `on_nonfinite="skip"` it reads the finiteness of CPU parameters on the host, where that is
    free, and on an accelerator selects the skip on the device.

    Args:
        state: the EMA state from [`init`][funcema.init] or a previous [`update`][funcema.update].
        params: the current parameters, a tree with the state's paths.
        donate: reuse the state's storage (in-place update).

    Returns:
        The new state, with `step` incremented.

    Raises:
        ValueError: `params` differ in structure (missing/extra paths are listed), or a leaf in
            shape, dtype kind or device (the path is named); the state was already donated.
        TypeError: a leaf of `params` is not a dense tensor (a module or a generator instead
            of a tree, a sparse tensor, a batched tensor of `torch.func.vmap`).
        FloatingPointError: with `on_nonfinite="raise"`, a leaf holds a NaN or an infinity.

    Examples:
        >>> import torch, funcema as fe
        >>> state = fe.init({"w": torch.zeros(2)}, schedule=fe.schedules.constant(0.5))
        >>> state = fe.update(state, {"w": torch.ones(2)})
        >>> state.ema["w"], int(state.step)
        (tensor([0.5000, 0.5000]), 1)
    """
    _check_state(state)
    emas, leaves, exact, read = _match(state, params)
    return _update_matched(state, emas, leaves, donate, exact, read)


def _check_state(state: object) -> None:
    if not isinstance(state, EmaState):
        raise TypeError(f"state must be a funcema.EmaState from funcema.init, got {type(state).__name__}.")


def match_params(state: EmaState, params: Params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return the state's EMA leaves and the leaves of `params` matched to them by path and checked.

    In eager mode a flat dict with the state's keys in the state's order (the state's own EMA,
    and parameters) is gathered by key instead of flattened; the parameters are checked in both
    cases, and anything unusual takes the general path, which raises the path-named errors.

    Raises:
        ValueError: `params` differ in structure, or a leaf in shape, dtype kind or device.
        TypeError: a leaf of `params` is not a tensor.
    """
    emas, leaves, _, _ = _match(state, params)
    return emas, leaves


def _match(
    state: EmaState, params: Params
) -> tuple[list[torch.Tensor], list[torch.Tensor], bool, list[torch.Tensor] | None]:
    """`match_params`, whether every parameter has exactly the dtype recorded at `init`, and
    the EMA leaves again if they were gathered from a flat dict by key (else `None`)."""
    config = state.config
    if torch.compiler.is_compiling():
        return (*_match_traced(state, params), False, None)
    keys, positions = config.dict_insertion_keys, config.dict_positions
    read = _tree.dict_leaves(state.ema, keys, positions)  # a flat dict, read like the parameters below
    emas = optree.tree_leaves(state.ema) if read is None else read
    leaves = _tree.dict_leaves(params, keys, positions)
    _tree.check_not_vmapped(emas, leaves or ())  # one C call outside functorch transforms
    if leaves is not None:
        try:
            # Parameters with the layout of the last ones that passed are validated by one C++
            # guard, others by C-level list comparisons; the per-leaf check (and its path-named
            # error) runs only if those fail.
            return emas, leaves, _tree.check_leaves(leaves, emas, config.paths, dtypes=config.param_dtypes), read
        except (AttributeError, TypeError):  # a value is not a tensor: the general path names it
            pass
    leaves = _tree.match_leaves(params, config.treespec, config.paths)
    _tree.check_not_vmapped(leaves)
    return emas, leaves, _tree.check_leaves(leaves, emas, config.paths, dtypes=config.param_dtypes), read


def _match_traced(state: EmaState, params: Params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`match_params` under dynamo, tracing as little Python per leaf as possible.

    Flat dicts with the state's keys in the state's order are read by key: a generic pytree
    flatten costs dynamo seconds per thousand leaves, and a membership test per key installs a
    guard per key (quadratic). Their shapes, dtypes and devices are checked when the update's
    ops are traced (`_ops`), and dynamo's guards re-trace, so re-check, any call whose tensors
    differ. Other trees take the general path.
    """
    config, ema = state.config, state.ema
    keys, order = config.dict_keys, config.dict_insertion_keys
    if keys is not None and isinstance(ema, dict) and isinstance(params, dict) and tuple(params) == order == tuple(ema):
        return [ema[k] for k in keys], [params[k] for k in keys]
    emas = optree.tree_leaves(ema)
    leaves = _tree.match_leaves(params, config.treespec, config.paths)
    _tree.check_leaves(leaves, emas, config.paths)
    return emas, leaves


def update_matched(
    state: EmaState, emas: list[torch.Tensor], leaves: list[torch.Tensor], donate: bool, *, exact: bool = False
) -> EmaState:
    """Update `state` with parameter leaves already matched and checked by [`match_params`][funcema._core.match_params].

    DTensor leaves (FSDP2) are updated on their local shards, with no communication, and
    rewrapped like the EMA's leaves. `exact`: every parameter has exactly its recorded dtype
    (the check proved it), which spares the kernels their own dtype test.
    """
    return _update_matched(state, emas, leaves, donate, exact, None)


def _update_matched(
    state: EmaState,
    emas: list[torch.Tensor],
    leaves: list[torch.Tensor],
    donate: bool,
    exact: bool,
    read: list[torch.Tensor] | None,
) -> EmaState:
    """`update_matched`; `read`: `emas` if `_match` gathered them from the state's flat dict in this call.

    When the update returns that very list (a donated update of one dtype group writes in place;
    a donated step that averages nothing writes nothing), the new EMA holds the same tensors under
    the same keys: it is a copy of the state's dict (one C-level copy), not a tree rebuilt from leaves.
    """
    config = state.config
    compiling = torch.compiler.is_compiling()
    sharded = False
    if not compiling:
        check_live(state)
        sharded = _dtensor.any_dtensor(emas, leaves)
    if config.aliased:  # after a swap in of tied parameters: averaged memory must not be shared
        emas = _own_copies(emas, config.aliased)
        config = dataclasses.replace(config, aliased=())
    comps = None if state.compensation is None else _compensation_leaves(config, state.compensation)
    local_emas, local_leaves, local_comps = emas, leaves, comps
    if sharded:
        _dtensor.check_pairs(emas, leaves, config.paths)
        local_emas, local_leaves = _dtensor.local_views(emas), _dtensor.local_views(leaves)
        local_comps = None if comps is None else _dtensor.local_views(comps)
    inputs = _Inputs(config, state, local_emas, local_comps, local_leaves, donate, exact)
    # Traced code cannot branch on values; eager code decides on the host where that is free.
    update_path = _update_traced if compiling else _update_eager
    new_emas, new_comps, new_step, new_log, new_count = update_path(inputs)
    if sharded:
        new_emas = _dtensor.rewrap(new_emas, emas, local_emas)
        if comps is not None and local_comps is not None and new_comps is not None:
            new_comps = _dtensor.rewrap(new_comps, comps, local_comps)
    ema = state.ema.copy() if read is not None and new_emas is read else _rebuilt(config, state.ema, new_emas)
    compensation = None if new_comps is None else _rebuilt(config, state.compensation, new_comps)
    return EmaState(ema, compensation, new_step, new_log, new_count, config)


def _compensation_leaves(config: EmaConfig, compensation: Any) -> list[torch.Tensor]:
    """The compensation's leaves in leaf order; under dynamo a flat dict is read by key, as in `_match_traced`.

    Read from the state itself, so it always belongs to the EMA it is updated with.
    """
    keys = config.dict_keys
    if torch.compiler.is_compiling() and keys is not None and type(compensation) in (dict, OrderedDict):
        return [compensation[k] for k in keys]
    return optree.tree_leaves(compensation)


def _rebuilt(config: EmaConfig, ema: Any, leaves: list[torch.Tensor]) -> Any:
    """The EMA tree holding `leaves` (in leaf order), with the structure of `ema`."""
    if not torch.compiler.is_compiling():
        return optree.tree_unflatten(config.treespec, leaves)
    if config.dict_keys is not None and type(ema) in (dict, OrderedDict):  # read by key in _match_traced
        keys = config.dict_keys
        return type(ema)((keys[i], leaves[i]) for i in config.dict_order)
    # Dynamo traces a structure rebuilt from the state's own tree, not the stored spec object.
    return optree.tree_unflatten(optree.tree_structure(ema), leaves)


def swap(state: EmaState[ParamsT], params: ParamsT) -> tuple[EmaState[ParamsT], ParamsT]:
    """Exchange the averaged and the live weights: `(state, params) -> (state', params')`.

    `params'` is the EMA (in the EMA's dtype) with the structure of `params`, and `state'.ema`
    holds the live tensors of `params`. No tensor is copied or modified, so swapping twice
    returns the original tensors. If `params` holds tied tensors (one tensor under two paths, as
    in `model.state_dict()` of a model with tied embeddings), `state'.config.aliased` lists them
    and the next update of `state'` gives each its own copy before writing. Use it to evaluate with the EMA, then swap back before training
    on; in an `nn.Module` use [`swapped`][funcema.swapped], which also casts to the module's dtypes.
    A compensated state keeps its `compensation`, which belongs to the EMA values now in `params'`
    (`ema` is the pair rounded to the EMA's dtype): swapping back restores the pair bit for bit.

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
    # Tied parameters (one tensor under two paths) become EMA leaves that share memory: the
    # configuration records them, so the next update averages that memory once, not twice.
    aliased = () if torch.compiler.is_compiling() else _tree.shared_memory(_dtensor.local_views(leaves))
    if aliased != config.aliased:
        config = dataclasses.replace(config, aliased=aliased)
    return state._replace(ema=new_ema, config=config), swapped_params


# --------------------------------------------------------------------------------------------
# Update paths


_Outputs = tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor, torch.Tensor, torch.Tensor]
"""`(ema leaves, compensation leaves or None, step, log A, skip count)` of the new state."""


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What one update works on, as both paths take it.

    `emas`, `comps` (`None` unless compensated) and `leaves` are in leaf order, the tensors the
    kernels write and read (the local shards of sharded leaves). `exact`: every parameter has
    exactly its recorded dtype (the check proved it), which spares the plain kernels their test.
    """

    config: EmaConfig
    state: EmaState
    emas: list[torch.Tensor]
    comps: list[torch.Tensor] | None
    leaves: list[torch.Tensor]
    donate: bool
    exact: bool = False

    def device(self) -> torch.device:
        """Where the kernels run: a traced weight and skip flag live there."""
        return self.emas[0].device if self.emas else self.state.log_decay_product.device

    def leaves_at(self, indices: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, list[torch.Tensor]]:
        """`(emas, comps, params)` at `indices`; the lists themselves when they are all the leaves
        (no caller modifies them)."""
        if len(indices) == len(self.emas):  # one group of every leaf: indices ascend, 0..n-1
            return self.emas, self.comps, self.leaves
        comps = None if self.comps is None else _gather(self.comps, indices)
        return _gather(self.emas, indices), comps, _gather(self.leaves, indices)


class _Weight(NamedTuple):
    """The step a group is updated with: host numbers (eager) or 0-d tensors (traced)."""

    t: Any  # the update number t (1-based); an int64 tensor when traced
    weight: Any  # w in ema <- ema + w * (params - ema); 0 keeps the EMA, 1 copies the parameters
    finite: torch.Tensor | None = None  # traced with on_nonfinite="skip": false keeps the EMA


_GroupUpdate = Callable[[_Inputs, _Weight, int, tuple[int, ...]], tuple[list[torch.Tensor], list[torch.Tensor] | None]]
"""The update of group `g` (`-1`: the copied leaves) at its leaf indices: new EMA and compensation leaves."""


def _update_eager(u: _Inputs) -> _Outputs:
    """Eager update with the weight computed on the host: no device synchronisation.

    With `on_nonfinite="skip"` the parameters' finite flag decides on the host where reading it
    is free (the flag and the scalar state on the CPU): a non-finite step is then a skip like a
    step between two averaging steps (weight 0: no tensor touched, `log A` kept), counted in
    `nonfinite_count`, and a finite step runs the very kernels of `on_nonfinite="propagate"`.
    Where reading it would synchronise (parameters on an accelerator, whose scalar state lives
    beside them), the device selects instead: the update of `_update_traced`, run eagerly.
    `on_nonfinite="raise"` must read the values, so it synchronises.
    """
    config, state = u.config, u.state
    finite = True
    if config.on_nonfinite == "raise":
        bad = _kernels.first_nonfinite(u.leaves)
        if bad is not None:
            raise FloatingPointError(f"params leaf {config.paths[bad]!r} holds a NaN or an infinity (on_nonfinite='raise').")
    elif config.on_nonfinite == "skip":
        flag = _ops.all_finite(u.leaves, u.device())
        if not _readable_on_host(flag, state):
            return _update_traced(u, flag)
        finite = bool(flag)
    t = int(state.step) + 1  # the step lives on the CPU: reading it never syncs the device
    log_a = float(state.log_decay_product)
    action, weight, new_log = host_weight(config, t, log_a, finite=finite)
    step = torch.full((), t, dtype=torch.int64)
    log_tensor = torch.full((), new_log, dtype=torch.float64) if new_log != log_a else state.log_decay_product
    count = state.nonfinite_count if finite else state.nonfinite_count + 1
    if u.donate:
        _consume(state)
    if action is Action.SKIP:  # no tensor changes; a pure update still returns tensors of its own
        emas, comps = _kept(u.emas, u.donate), None if u.comps is None else _kept(u.comps, u.donate)
        return emas, comps, step, log_tensor, count
    return *_write_groups(u, _Weight(t, weight), _host_group), step, log_tensor, count


def _kept(tensors: list[torch.Tensor], donate: bool) -> list[torch.Tensor]:
    """The leaves of a skipped step: the very list if donated (nothing was written), else copies.

    A pure update's state must own its tensors: were they shared with the input state, a later
    donated update of the new state would write into the old one.
    """
    return tensors if donate else [t.clone() for t in tensors]


def _readable_on_host(flag: torch.Tensor, state: EmaState) -> bool:
    """Whether the eager update may read the skip flag and the scalar state without a device sync."""
    return _ops.on_host(flag, state.log_decay_product, state.nonfinite_count)


def _update_traced(u: _Inputs, finite: torch.Tensor | None = None) -> _Outputs:
    """Branch-free update with a tensor weight: under `torch.compile`, and for a skip decided on the device.

    Every step runs the same operations: `advance` (the scalar state and the weight), then one
    kernel op per group and one for the copied leaves (see `_ops`); a step that must not change
    the EMA has weight 0 (or a false finite flag), which leaves it bit-identical. Compensated
    pairs and low-precision EMAs are traced torch operations instead of a kernel op.
    `finite`: the skip flag, if the caller has computed it.
    """
    config, device = u.config, u.device()
    if finite is None and config.on_nonfinite == "skip":
        finite = _ops.all_finite(u.leaves, device)
    scalars = (u.state.step, u.state.log_decay_product, u.state.nonfinite_count)
    t, weight, new_log, count = _ops.advance(scalars, finite, config.key, device)
    if u.donate and not torch.compiler.is_compiling():
        _consume(u.state)
    return *_write_groups(u, _Weight(t, weight, finite), _traced_group), t, new_log, count


def _write_groups(u: _Inputs, w: _Weight, update_group: _GroupUpdate) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The new EMA and compensation leaves: `update_group` of every group, then of the copied leaves.

    Every EMA slot is overwritten (averaged groups, then copied leaves); the compensation of a
    copied leaf keeps its placeholder. One group of every leaf returns its update's lists as they
    are: in place, `u.emas` itself, so the caller knows that no leaf was replaced.
    """
    config = u.config
    if len(config.groups) == 1 and len(config.groups[0]) == len(u.emas):  # then no leaf is copied
        out, out_c = update_group(u, w, 0, config.groups[0])
        return (out if type(out) is list else list(out)), out_c
    new = list(u.emas)
    new_comps = None if u.comps is None else list(u.comps)
    for g in [*range(len(config.groups)), *([-1] if config.copied else [])]:
        indices = config.groups[g] if g >= 0 else config.copied
        out, out_c = update_group(u, w, g, indices)
        _scatter(new, indices, out)
        if new_comps is not None and out_c is not None:
            _scatter(new_comps, indices, out_c)
    return new, new_comps


def _scatter(items: list[torch.Tensor], indices: tuple[int, ...], values: Sequence[torch.Tensor]) -> None:
    """`items[i] = value` for every index and value (one C-level copy when they are all the items)."""
    if len(indices) == len(items):  # indices ascend, 0..n-1
        items[:] = values
        return
    for i, value in zip(indices, values):
        items[i] = value


def _host_group(u: _Inputs, w: _Weight, g: int, indices: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The eager update of group `g` with the host weight `w.weight` (1, and the copied leaves: a copy).

    `exact` spares the plain kernels their dtype test; compensated pairs always take the two-sum
    kernels of `_kernels`, whatever `config.kernel`.
    """
    config = u.config
    if g >= 0 and u.comps is not None:
        return _compensated_group(u, w, indices)
    e, _, p = u.leaves_at(indices)
    if g < 0 or w.weight == 1.0:
        return _kernels.copy(e, p, inplace=u.donate), None
    if e[0].dtype in _LOW_PRECISION:  # averaged in float32, rounded back stochastically
        keys = [_rounding_key(config, w.t, i) for i in indices]
        return _kernels.lerp_round(e, p, w.weight, keys, inplace=u.donate), None
    same = u.exact and e[0].dtype == config.param_dtypes[indices[0]]  # one dtype pair per group
    return _ops.kernel_lerp(config.kernel, e, p, w.weight, inplace=u.donate, same_dtype=same), None


def _compensated_group(u: _Inputs, w: _Weight, group: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The eager update of one group of compensated pairs `(emas, comps)`."""
    emas, comps, params = u.leaves_at(group)
    assert comps is not None  # a compensated state's group
    if w.weight == 1.0:
        return _kernels.compensated_copy(emas, comps, params, inplace=u.donate)
    if emas[0].dtype not in _LOW_PRECISION:
        return _kernels.compensated_lerp(emas, comps, params, w.weight, inplace=u.donate)
    out_e, out_c = [], []
    for e, c, p, i in zip(emas, comps, params, group):
        hi, lo = _kernels.compensated_lerp_wide(e, c, p, w.weight, _rounding_key(u.config, w.t, i))
        if u.donate:
            with torch.no_grad():
                e.copy_(hi)
                c.copy_(lo)
            hi, lo = e, c
        out_e.append(hi)
        out_c.append(lo)
    return out_e, out_c


def _traced_group(u: _Inputs, w: _Weight, g: int, indices: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The traced update of group `g`: one kernel op (`_ops.lerp`), or traced torch operations."""
    if g >= 0 and u.comps is not None:
        return _compensated_traced(u, w, indices)
    e, _, p = u.leaves_at(indices)
    if g >= 0 and e[0].dtype in _LOW_PRECISION:
        return _low_precision_traced(u, w, indices), None
    return _ops.lerp(e, p, w.weight, w.finite, u.config.key, g, inplace=u.donate), None


def _consume(state: EmaState) -> None:
    """Mark a donated state consumed: after every check, before the first write of its tensors."""
    state.step.fill_(-1)


def _own_copies(emas: list[torch.Tensor], aliased: tuple[int, ...]) -> list[torch.Tensor]:
    """`emas` with each leaf listed in `aliased` replaced by its own copy (taken before any write)."""
    out = list(emas)
    with torch.no_grad():
        for i in aliased:
            out[i] = emas[i].clone()
    return out


def _gather(items: Sequence[torch.Tensor], indices: tuple[int, ...]) -> list[torch.Tensor]:
    """`[items[i] for i in indices]` in one C-level call."""
    if len(indices) == 1:
        return [items[indices[0]]]
    return list(operator.itemgetter(*indices)(items))


def _active(w: _Weight, device: torch.device) -> torch.Tensor:
    """Whether a traced step changes the EMA: a positive weight and, if checked, finite parameters."""
    active = w.weight > 0 if w.finite is None else torch.logical_and(w.weight > 0, w.finite.to(w.weight.device))
    return active.to(device)


def _low_precision_traced(u: _Inputs, w: _Weight, group: tuple[int, ...]) -> list[torch.Tensor]:
    """A low-precision EMA group, averaged in float32 and rounded back stochastically (traced)."""
    emas, _, params = u.leaves_at(group)
    active = _active(w, emas[0].device)
    lerped = _kernels.lerp_tensor_weight([x.float() for x in emas], params, w.weight)
    out = []
    for e, value, i in zip(emas, lerped, group):
        rounded = _kernels.stochastic_round(value, e.dtype, _rounding_key(u.config, w.t, i))
        out.append(_select(active, rounded, e, u.donate))
    return out


def _compensated_traced(u: _Inputs, w: _Weight, group: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One group of compensated pairs `(emas, comps)` (traced torch operations, no custom op).

    The two-sum step with the tensor weight of `advance`; a weight of exactly 1 (warm start, the
    first debiased step) selects the exact copy of the parameters (`split`), as the eager path's
    copy does; a weight of 0 or non-finite parameters (a skip) select the old pair, bit for bit.
    """
    emas, comps, params = u.leaves_at(group)
    assert comps is not None  # a compensated state's group
    if emas[0].dtype in _LOW_PRECISION:
        pairs = [
            _kernels.compensated_lerp_wide(e, c, p, w.weight, _rounding_key(u.config, w.t, i))
            for e, c, p, i in zip(emas, comps, params, group)
        ]
        values, values_c = [hi for hi, _ in pairs], [lo for _, lo in pairs]
    else:
        values, values_c = _kernels.compensated_lerp_tensor_weight(emas, comps, params, w.weight)
    his, los = _kernels.split(params, [e.dtype for e in emas])
    copy, active = (w.weight == 1).to(emas[0].device), _active(w, emas[0].device)
    values = [torch.where(copy, hi, v) for hi, v in zip(his, values)]
    values_c = [torch.where(copy, lo, v) for lo, v in zip(los, values_c)]
    out = [_select(active, v, e, u.donate) for v, e in zip(values, emas)]  # every value is computed by now
    out_c = [_select(active, v, c, u.donate) for v, c in zip(values_c, comps)]
    return out, out_c


def _select(active: torch.Tensor, value: torch.Tensor, old: torch.Tensor, donate: bool) -> torch.Tensor:
    with torch.no_grad():
        # value.to(old.dtype): a 0-d EMA lerped with the float64 0-d weight would promote.
        chosen = torch.where(active.to(old.device), value.to(old.dtype), old)
        if donate:
            old.copy_(chosen)
            return old
        return chosen


_KEY_MASK = 0x7FFFFFFFFFFF  # 47-bit keys


def _rounding_key(config: EmaConfig, t: Any, leaf_index: int) -> Any:
    """The random stream of one leaf at one step: distinct for every (seed, step, leaf).

    `(t * A + seed * B + leaf * C) mod 2**47`. The seed's term is reduced on the host first (the
    same key, since reduction commutes with the sum), so under tracing, where `t` is an int64
    tensor, every Python operand fits in int64 for any seed up to `SEED_MAX`; for `t < 2**31`
    and fewer than `2**30` leaves the int64 sum cannot overflow either.
    """
    return (t * 0x632BE5AB + (config.seed * 0x2545F491 & _KEY_MASK) + leaf_index * 0x9E3779B9) & _KEY_MASK


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
