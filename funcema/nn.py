"""`nn.Module` helpers, apart from the pure core: evaluate a module with its EMA weights.

Owns: [`swapped`][funcema.swapped] for plain modules and for FSDP2 (DTensor) modules, with one
shared check of the state against the module.

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

__all__ = ["swapped"]


@contextlib.contextmanager
def swapped(module: torch.nn.Module, state: EmaState) -> Iterator[torch.nn.Module]:
    """Swap the EMA weights into `module` for the duration of a `with` block.

    Each parameter or buffer of `module` named by a path of `state.ema` (a flat dict such as
    `dict(model.named_parameters())` or `model.state_dict()`) gets the EMA's values, cast to
    the module's dtype; on exit, even on an exception, the live tensors are put back exactly
    (the very same storage, so nothing is copied back and nothing can drift).

    FSDP2 modules (DTensor parameters) all-gather from their own sharded buffer, so there the
    EMA's local shard is copied into each parameter's local shard, and the live shard is copied
    back on exit (bit-exact: same dtype).

    Args:
        module: the module the state was created from.
        state: its EMA state.

    Yields:
        `module`, holding the EMA weights.

    Raises:
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
    emas = optree.tree_leaves(state.ema)
    registered = dict(module.state_dict(keep_vars=True))
    sharded = _dtensor.any_dtensor(emas, list(registered.values()))
    if sharded:
        _reshard(module)  # the sharded DTensor parameters are then the registered ones
        registered = dict(module.state_dict(keep_vars=True))
    targets = [registered.get(p) for p in state.config.paths]
    _check_targets(targets, emas, state.config.paths)
    restore: list[Callable[[], None]] = []
    try:
        with torch.no_grad():  # only the exchange itself; the body runs in the caller's grad mode
            for target, ema in zip(targets, emas):
                assert target is not None  # checked above
                restore.append(_swap_in(target, ema))
        yield module
    finally:
        if sharded:
            _reshard(module)  # drop unsharded copies of the EMA gathered by forwards in the block
        with torch.no_grad():
            for undo in reversed(restore):
                undo()


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


def _swap_in(target: torch.Tensor, ema: torch.Tensor) -> Callable[[], None]:
    """Put `ema` into `target` and return the function that restores the live value."""
    if _dtensor.is_dtensor(target):
        # FSDP2 all-gathers from its own padded buffer, of which the local tensor is a view:
        # assigning `.data` would be ignored, so the EMA's shard is copied in.
        local = target.to_local()  # type: ignore[attr-defined]
        saved = local.clone()
        local.copy_(ema.to_local())  # type: ignore[attr-defined]
        return lambda: local.copy_(saved)  # type: ignore[no-any-return]
    data = target.data
    target.data = ema.detach().to(device=target.device, dtype=target.dtype)
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
