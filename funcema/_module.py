"""``nn.Module`` helpers, apart from the pure core: evaluate a module with its EMA weights."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import optree
import torch
from torch import nn

from . import _distributed  # sharded-EMA hook (DTensor parameters), see swapped
from ._state import EmaState

__all__ = ["swapped"]


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
