"""DTensor (FSDP2) support: local views, rewrapping and gathering of sharded leaves.

Owns: recognising DTensors without importing `torch.distributed`, the local shard of a DTensor
leaf, rewrapping an updated shard with the EMA leaf's mesh and placements, and gathering full
tensors. The core updates sharded EMAs by asking this module for local views (a call down):
no collective runs, whatever the placements, because the EMA is an elementwise function of the
parameter, so each rank owns the EMA of exactly its shard.

Must not import: any funcema module (it imports `torch` and `optree` only). DCP checkpoints live
in `_io`, the FSDP2 `swapped` in `nn`.

`torch.distributed` is imported lazily: if `torch.distributed.tensor` was never imported, no
DTensor can exist, and the plain path pays one dictionary lookup.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

import optree
import torch

__all__ = ["any_dtensor", "check_pairs", "gather", "is_dtensor", "is_main_process", "local_views", "rewrap"]


def _dtensor_class() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(x: Any) -> bool:
    """Whether `x` is a `torch.distributed.tensor.DTensor` (never imports torch.distributed)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(x, cls)


def any_dtensor(*sequences: Sequence[Any]) -> bool:
    """Whether any element of any of the sequences is a DTensor."""
    cls = _dtensor_class()
    if cls is None:
        return False
    # The set of leaf types is tiny (Tensor, Parameter): C-level `map(type)` is ~10x cheaper
    # than an `isinstance` per leaf on tensor subclasses.
    return any(issubclass(t, cls) for t in set(map(type, itertools.chain(*sequences))))


def is_main_process() -> bool:
    """True on rank 0 of the default process group, or where there is no process group."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    return torch.distributed.get_rank() == 0


def check_pairs(emas: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], paths: Sequence[str]) -> None:
    """Check that each parameter leaf is sharded exactly like the EMA leaf at the same path.

    Raises:
        ValueError: a leaf is a DTensor where the other is not, or their mesh or placements differ.
    """
    for e, p, path in zip(emas, leaves, paths):
        e_dt, p_dt = is_dtensor(e), is_dtensor(p)
        if e_dt != p_dt:
            which = "a DTensor" if p_dt else "a plain tensor"
            raise ValueError(
                f"params leaf {path!r} is {which} but the EMA's leaf is not; create the state with fe.init from "
                "the same (sharded or unsharded) parameters you update it with."
            )
        if e_dt and (e.device_mesh != p.device_mesh or tuple(e.placements) != tuple(p.placements)):  # type: ignore[attr-defined]
            raise ValueError(
                f"params leaf {path!r} has placements {tuple(p.placements)} on {p.device_mesh}, but the EMA's leaf has "  # type: ignore[attr-defined]
                f"{tuple(e.placements)} on {e.device_mesh}; the EMA must be sharded like the parameters."  # type: ignore[attr-defined]
            )


def local_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard of each DTensor of `tensors` (the tensor itself for plain tensors)."""
    return [_local(x) for x in tensors]


def rewrap(results: Sequence[torch.Tensor], emas: Sequence[torch.Tensor], local: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Wrap updated local shards back into DTensors like the EMA leaves they came from.

    `local` are the views `local_views(emas)` that the update received: a result that *is* its
    local view was updated in place (donated) or left unchanged, so the original EMA leaf is
    returned; any other result of a DTensor leaf gets that leaf's mesh, placements, global shape
    and stride.
    """
    out = []
    for e, view, result in zip(emas, local, results):
        if result is view:
            out.append(e)
        elif is_dtensor(e):
            out.append(_rewrap_one(result, e))
        else:
            out.append(result)
    return out


def _local(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself, not a differentiable view), or `x`."""
    if not is_dtensor(x):
        return x
    local = getattr(x, "_local_tensor", None)  # ~20x cheaper than to_local(); same tensor
    if isinstance(local, torch.Tensor):
        return local
    with torch.no_grad():  # to_local() is differentiable; its output must be writable in place
        return x.to_local()  # type: ignore[attr-defined]


def _rewrap_one(local: torch.Tensor, like: Any) -> Any:
    """A DTensor with `local` as its shard and the mesh, placements, shape and stride of `like`."""
    from torch.distributed.tensor import DTensor

    spec = getattr(like, "_spec", None)
    if spec is not None and local.dtype == like.dtype:
        try:  # reuse the EMA leaf's spec: same mesh, placements, global shape, stride and dtype
            return DTensor(local, spec, requires_grad=False)
        except TypeError:  # pragma: no cover - private constructor changed
            pass
    with torch.no_grad():
        return DTensor.from_local(
            local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
        )


def gather(tree: Any, *, cpu: bool = False) -> Any:
    """Return the pytree `tree` with every DTensor leaf replaced by its full tensor.

    A collective: every rank must call it, with the same tree. Leaves are gathered one at a time;
    the result holds the whole tree unsharded on every rank (on the CPU with `cpu=True`), so
    call it just before writing, on one EMA at a time. Plain leaves are returned as they are.
    """
    leaves, spec = optree.tree_flatten(tree)
    out = []
    with torch.no_grad():
        for leaf in leaves:
            full = leaf.full_tensor() if is_dtensor(leaf) else leaf
            out.append(full.cpu() if cpu else full)
    return optree.tree_unflatten(spec, out)
