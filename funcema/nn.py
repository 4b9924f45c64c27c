"""`nn.Module` helpers, apart from the pure core: evaluate a module with its EMA weights, or keep them.

Owns: [`swapped`][funcema.swapped] and [`copy_to`][funcema.copy_to] for plain modules and for
FSDP2 (DTensor) modules, with one shared check of the state against the module.

Must not import: `_io`, `posthoc`, `_cli` (it needs only the state and `_dtensor`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import optree
import torch

from . import _dtensor
from ._state import EmaState, check_live
from ._tree import format_paths
from ._validate import boolean

__all__ = ["swapped", "copy_to"]


@contextlib.contextmanager
def swapped(module: torch.nn.Module, state: EmaState, *, eval_mode: bool = True) -> Iterator[torch.nn.Module]:
    """Swap the EMA weights into `module` for the duration of a `with` block.

    Each parameter or buffer of `module` named by a path of `state.ema` (a flat dict such as
    `dict(model.named_parameters())` or `model.state_dict()`) gets the EMA's values, cast to
    the module's dtype; on exit, even on an exception, the live tensors are put back exactly
    (the very same storage, so nothing is copied back and nothing can drift).

    The block runs in eval mode (`eval_mode=True`, the default): dropout is off and BatchNorm
    uses the EMA's running statistics. On exit every submodule gets back its own `training`
    flag. Using the EMA never changes it: buffers are swapped in as copies, so even a
    train-mode forward (`eval_mode=False`) updates the copies, not `state.ema`. Parameters are
    swapped in without a copy, so do not step an optimizer inside the block.

    FSDP2 modules (DTensor parameters) get the EMA's local shards copied into theirs, and the
    live shards copied back on exit (bit-exact).

    Args:
        module: the module the state was created from.
        state: its EMA state.
        eval_mode: put `module` in eval mode for the block (restored on exit).

    Yields:
        `module`, holding the EMA weights.

    Raises:
        TypeError: `state` is not an `EmaState`, or `eval_mode` not a bool.
        ValueError: a path of the state names no parameter or buffer of `module`, a shape or
            sharding differs, or the state was consumed by `update(..., donate=True)`.

    Examples:
        >>> import torch, funcema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> state = fe.init(dict(model.named_parameters()))
        >>> with fe.swapped(model, state):
        ...     y = model(torch.ones(1, 2))
    """
    if not isinstance(state, EmaState):
        raise TypeError(f"state must be a funcema.EmaState, got {type(state).__name__}.")
    check_live(state)
    boolean("eval_mode", eval_mode)
    emas = optree.tree_leaves(state.ema)
    targets, sharded = _targets(module, emas, state.config.paths)
    buffers = {id(b) for b in module.buffers()}
    restore: list[Callable[[], None]] = [_set_eval_mode(module, eval_mode)]
    try:
        with torch.no_grad():  # only the exchange itself; the body runs in the caller's grad mode
            for target, ema in zip(targets, emas):
                restore.append(_swap_in(target, ema, copy=id(target) in buffers))
        yield module
    finally:
        if sharded:
            _reshard(module)  # drop unsharded copies of the EMA gathered by forwards in the block
        with torch.no_grad():
            for undo in reversed(restore):
                undo()


def _targets(
    module: torch.nn.Module, emas: Sequence[torch.Tensor], paths: Sequence[str]
) -> tuple[list[torch.Tensor], bool]:
    """The module tensors at the state's paths, checked, and whether they are FSDP2-sharded."""
    registered = dict(module.state_dict(keep_vars=True))
    sharded = _dtensor.any_dtensor(emas, list(registered.values()))
    if sharded:
        _reshard(module)  # the sharded DTensor parameters are then the registered ones
        registered = dict(module.state_dict(keep_vars=True))
    targets = [registered.get(p) for p in paths]
    _check_targets(targets, emas, paths)
    return targets, sharded  # type: ignore[return-value]  # no None left: checked above


def copy_to(module: torch.nn.Module, state: EmaState) -> torch.nn.Module:
    """Write the EMA weights into `module` for good (for export, or at the end of training).

    Each parameter or buffer of `module` named by a path of `state.ema` gets the EMA's values
    copied into its own storage, cast to the module's dtype and device (`target.copy_(ema)`); the
    live values are lost. Unlike [`swapped`][funcema.swapped], nothing is restored afterwards.
    Integer buffers the EMA copied (`num_batches_tracked`) are written back too. On an FSDP2
    module (DTensor parameters) each rank copies the EMA's local shard into the parameter's local
    shard, with no communication; the EMA must be sharded like the module. Everything is checked
    before anything is written, so a rejected call changes nothing.

    Args:
        module: the module the state was created from.
        state: its EMA state.

    Returns:
        `module`, holding the EMA weights.

    Raises:
        TypeError: `state` is not an `EmaState`.
        ValueError: a path of the state names no parameter or buffer of `module`, a shape or
            sharding differs, or the state was consumed by `update(..., donate=True)`.

    Examples:
        >>> import torch, funcema as fe
        >>> model = torch.nn.Linear(2, 1).to(torch.bfloat16)
        >>> state = fe.init(dict(model.named_parameters()))   # a float32 EMA
        >>> _ = fe.copy_to(model, state)
        >>> model.weight.dtype
        torch.bfloat16
    """
    if not isinstance(state, EmaState):
        raise TypeError(f"state must be a funcema.EmaState, got {type(state).__name__}.")
    check_live(state)
    emas = optree.tree_leaves(state.ema)
    targets, sharded = _targets(module, emas, state.config.paths)
    with torch.no_grad():
        for target, ema in zip(targets, emas):
            if _dtensor.is_dtensor(target):
                target.to_local().copy_(ema.to_local())  # type: ignore[attr-defined]
            else:
                target.copy_(ema)
    if sharded:
        _reshard(module)  # a forward that gathered before the copy must gather again
    return module


def _check_targets(targets: Sequence[torch.Tensor | None], emas: Sequence[torch.Tensor], paths: Sequence[str]) -> None:
    """Check that every path names a module tensor of the EMA's shape and sharding."""
    missing = [p for p, t in zip(paths, targets) if t is None]
    if missing:
        raise ValueError(
            f"the EMA state has paths that name no parameter or buffer of the module: {format_paths(missing)}; "
            "create the state from dict(module.named_parameters()) or module.state_dict()."
        )
    for path, target, ema in zip(paths, targets, emas):
        assert target is not None
        if target.shape != ema.shape:
            raise ValueError(f"module tensor {path!r} has shape {tuple(target.shape)}, the EMA has {tuple(ema.shape)}.")
        if _dtensor.is_dtensor(target) != _dtensor.is_dtensor(ema):
            raise ValueError(
                f"module tensor {path!r} is {'a DTensor' if _dtensor.is_dtensor(target) else 'a plain tensor'} but the "
                "EMA's leaf is not; swap a sharded EMA into the sharded (fully_shard-ed) module it was created from."
            )
        if _dtensor.is_dtensor(target) and tuple(target.placements) != tuple(ema.placements):  # type: ignore[attr-defined]
            raise ValueError(
                f"module tensor {path!r} has placements {tuple(target.placements)}, the EMA has "  # type: ignore[attr-defined]
                f"{tuple(ema.placements)}; the EMA must be sharded like the module."  # type: ignore[attr-defined]
            )


def _set_eval_mode(module: torch.nn.Module, enabled: bool) -> Callable[[], None]:
    """Put `module` in eval mode if `enabled`; return the function that restores every submodule's mode."""
    modes = [(m, m.training) for m in module.modules()]
    if enabled:
        module.eval()

    def restore() -> None:
        for m, training in modes:
            m.training = training

    return restore


def _swap_in(target: torch.Tensor, ema: torch.Tensor, *, copy: bool) -> Callable[[], None]:
    """Put `ema` (a copy of it if `copy`) into `target`; return the function that restores the live value."""
    if _dtensor.is_dtensor(target):
        # FSDP2 all-gathers from its own padded buffer, of which the local tensor is a view:
        # assigning `.data` would be ignored, so the EMA's shard is copied in.
        local = target.to_local()  # type: ignore[attr-defined]
        saved = local.clone()
        local.copy_(ema.to_local())  # type: ignore[attr-defined]
        return lambda: local.copy_(saved)  # type: ignore[no-any-return]
    data = target.data
    target.data = ema.detach().to(device=target.device, dtype=target.dtype, copy=copy)
    return lambda: setattr(target, "data", data)


def _reshard(module: torch.nn.Module) -> None:
    """Reshard every FSDP2 module in `module`, freeing unsharded parameters.

    FSDP2 does not reshard the root after forward (`reshard_after_forward` is off for it), and a
    forward skips the all-gather of parameters that are still unsharded: without this, a forward
    after copying into the shards would use stale unsharded values.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
