"""``nn.Module`` helpers, apart from the pure core: evaluate a module with its EMA weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import optree
import torch
from torch import nn

from . import _distributed  # sharded-EMA hook (DTensor parameters), see swapped
from ._state import EmaState

__all__ = ["swapped", "copy_to"]


@contextlib.contextmanager
def swapped(module: nn.Module, state: EmaState) -> Iterator[nn.Module]:
    """Swap the EMA weights into ``module`` for the duration of a ``with`` block.

    Each parameter or buffer of ``module`` named by a path of ``state.ema`` (a flat dict such as
    ``dict(model.named_parameters())`` or ``model.state_dict()``) gets the EMA's values, cast to
    the module's dtype; on exit, even on an exception, the live tensors are put back exactly
    (the very same storage, so nothing is copied back and nothing can drift).

    Args:
        module: the module the state was created from.
        state: its EMA state.

    Yields:
        ``module``, holding the EMA weights.

    Raises:
        ValueError: a path of the state names no parameter or buffer of ``module``, or a shape differs.

    Examples:
        >>> import torch, funcema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> state = fe.init(dict(model.named_parameters()))
        >>> with fe.swapped(model, state):
        ...     y = model(torch.ones(1, 2))
    """
    if not isinstance(state, EmaState):
        raise TypeError(f"state must be a funcema.EmaState, got {type(state).__name__}.")
    targets = dict(module.state_dict(keep_vars=True))
    emas = optree.tree_leaves(state.ema)
    if _distributed.any_dtensor(emas, list(targets.values())):  # sharded-EMA hook: FSDP2 modules
        with _distributed.swapped(module, state):
            yield module
        return
    missing = [p for p in state.config.paths if p not in targets]
    if missing:
        raise ValueError(
            f"the EMA state has paths that name no parameter or buffer of the module: {missing[:8]}; "
            "create the state from dict(module.named_parameters()) or module.state_dict()."
        )
    for path, ema in zip(state.config.paths, emas):
        target = targets[path]
        if target.shape != ema.shape:
            raise ValueError(f"module tensor {path!r} has shape {tuple(target.shape)}, the EMA has {tuple(ema.shape)}.")
    live: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():  # only the exchange itself; the body runs in the caller's grad mode
            for path, ema in zip(state.config.paths, emas):
                target = targets[path]
                live.append((target, target.data))
                target.data = ema.detach().to(device=target.device, dtype=target.dtype)
        yield module
    finally:
        with torch.no_grad():
            for target, data in reversed(live):
                target.data = data


def copy_to(module: nn.Module, state: EmaState) -> nn.Module:
    """Write the EMA weights into ``module`` for good (for export or the end of training).

    Each parameter or buffer of ``module`` named by a path of ``state.ema`` gets the EMA's values
    copied into its own storage, cast to the module's dtype and device
    (``target.copy_(ema)``); the live values are lost. Unlike [`swapped`][funcema.swapped],
    nothing is restored afterwards. Integer buffers the EMA copied (``num_batches_tracked``) are
    written back too. On an FSDP2 module (DTensor parameters) each rank copies its local shard of
    the EMA into the local shard of the parameter, with no communication; the EMA must be sharded
    like the module. Everything is checked before anything is written, so a rejected call changes
    nothing.

    Args:
        module: the module the state was created from.
        state: its EMA state.

    Returns:
        ``module``, holding the EMA weights.

    Raises:
        TypeError: ``state`` is not an `EmaState`.
        ValueError: a path of the state names no parameter or buffer of ``module``, a shape
            differs, a sharded EMA meets an unsharded tensor (or the reverse), or the state was
            donated.

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
    if int(state.step) < 0:
        raise ValueError("state was donated to update(..., donate=True) and is consumed; pass the state it returned.")
    _reshard_fsdp(module)  # FSDP2: the registered parameters are then the sharded DTensors
    targets = dict(module.state_dict(keep_vars=True))
    emas = optree.tree_leaves(state.ema)
    pairs: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    missing = [p for p in state.config.paths if p not in targets]
    if missing:
        raise ValueError(
            f"the EMA state has paths that name no parameter or buffer of the module: {missing[:8]}; "
            "create the state from dict(module.named_parameters()) or module.state_dict()."
        )
    for path, ema in zip(state.config.paths, emas):
        target = targets[path]
        if target.shape != ema.shape:
            raise ValueError(f"module tensor {path!r} has shape {tuple(target.shape)}, the EMA has {tuple(ema.shape)}.")
        sharded = _distributed.is_dtensor(target)
        if sharded != _distributed.is_dtensor(ema):
            raise ValueError(
                f"module tensor {path!r} is {'a DTensor' if sharded else 'a plain tensor'} but the EMA's leaf is not; "
                "copy a sharded EMA into the sharded (fully_shard-ed) module it was created from."
            )
        if sharded and tuple(target.placements) != tuple(ema.placements):  # type: ignore[attr-defined]
            raise ValueError(
                f"module tensor {path!r} has placements {tuple(target.placements)}, the EMA has "  # type: ignore[attr-defined]
                f"{tuple(ema.placements)}; the EMA must be sharded like the module."  # type: ignore[attr-defined]
            )
        pairs.append((target, ema, sharded))
    with torch.no_grad():
        for target, ema, sharded in pairs:
            if sharded:
                target.to_local().copy_(ema.to_local())  # type: ignore[attr-defined]
            else:
                target.copy_(ema)
    return module


def _reshard_fsdp(module: nn.Module) -> None:
    """Reshard every FSDP2 module in ``module``, so that a later forward all-gathers the new shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
