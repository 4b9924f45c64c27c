"""Sharded EMA: DTensor leaves (FSDP2) and ``torch.distributed.checkpoint`` (DCP).

Everything funcema knows about ``torch.distributed`` lives here, behind small hooks in the core:

- :func:`apply` (called by ``_core._apply``): an update with DTensor leaves runs the ordinary
  kernels on the local shards (``to_local()``) and rewraps the results with the EMA's own mesh,
  placements, global shape and stride. No collective runs, whatever the placements: the EMA is an
  elementwise function of the parameter, so each rank owns the EMA of exactly its shard.
- :func:`save` / :func:`load` (called by ``_io.save`` / ``_io.load``): a state with any DTensor leaf
  is a DCP checkpoint directory (each rank writes its shards) plus ``funcema.safetensors``, the
  configuration and scalars written atomically by rank 0 after DCP has finished, so its presence
  marks a complete checkpoint. ``load`` reshards to whatever ``like`` holds: DTensors on any mesh,
  or plain tensors on a single process without a process group.
- :func:`swapped` (called by ``_module.swapped``): FSDP2 all-gathers from its own sharded buffer,
  so the EMA is copied into the local shards of the parameters and the live values are copied
  back on exit.
- :func:`gather` / :func:`is_main_process`: full tensors for post-hoc snapshots of a sharded run.

``torch.distributed`` is imported lazily: if ``torch.distributed.tensor`` was never imported, no
DTensor can exist, and the plain path pays one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import optree
import torch

from ._state import EmaState

__all__ = ["is_dtensor", "any_dtensor", "apply", "save", "load", "swapped", "gather", "is_main_process", "HEADER"]

HEADER = "funcema.safetensors"
"""Name of the file, inside a sharded checkpoint directory, with the configuration and scalars."""

_DCP_PREFIX = "ema/"
_COMP_PREFIX = "compensation/"


def _dtensor_class() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (never imports torch.distributed)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(x, cls)


def any_dtensor(*sequences: Sequence[Any]) -> bool:
    """Whether any element of any of the sequences is a DTensor."""
    cls = _dtensor_class()
    if cls is None:
        return False
    # The set of leaf types is tiny (Tensor, Parameter): C-level ``map(type)`` is ~10x cheaper
    # than an ``isinstance`` per leaf on tensor subclasses.
    return any(issubclass(t, cls) for t in set(map(type, itertools.chain(*sequences))))


def is_main_process() -> bool:
    """True on rank 0 of the default process group, or where there is no process group."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return True
    return torch.distributed.get_rank() == 0


# --------------------------------------------------------------------------------------------
# Update on the local shards


def _check_pairs(emas: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], paths: Sequence[str]) -> None:
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


def apply(
    state: EmaState,
    emas: list[torch.Tensor],
    leaves: list[torch.Tensor],
    donate: bool,
    apply_local: Callable[[EmaState, list[torch.Tensor], list[torch.Tensor], bool], EmaState],
) -> EmaState:
    """Update a state with DTensor leaves on the local shards, with no communication.

    ``apply_local`` is the core's update of plain leaves; it receives ``state`` unchanged (its
    scalars and configuration are per process anyway) and the local tensors. The results are
    rewrapped with each EMA leaf's mesh, placements, global shape and stride; with ``donate=True``
    the local tensors were updated in place and the original DTensor objects are returned.

    ``on_nonfinite="skip"`` therefore decides on each rank's own shards: a rank whose shard holds a
    NaN skips the update and counts it, the other ranks average (see docs/sharding.md).
    """
    _check_pairs(emas, leaves, state.config.paths)
    local_emas = [_local(e) for e in emas]
    local_leaves = [_local(p) for p in leaves]
    spec = state.config.treespec
    comps = optree.tree_leaves(state.compensation) if state.config.compensated else None
    local_comps = None if comps is None else [_local(c) for c in comps]
    if local_comps is not None:  # the compensation is sharded like the EMA: update its local shards too
        state = state._replace(compensation=optree.tree_unflatten(spec, local_comps))
    new = apply_local(state, local_emas, local_leaves, donate)
    out = _rewrapped(emas, local_emas, optree.tree_leaves(new.ema))
    if comps is None or local_comps is None:
        return new._replace(ema=optree.tree_unflatten(spec, out))
    out_c = _rewrapped(comps, local_comps, optree.tree_leaves(new.compensation))
    return new._replace(ema=optree.tree_unflatten(spec, out), compensation=optree.tree_unflatten(spec, out_c))


def _rewrapped(originals: Sequence[Any], locals_: Sequence[torch.Tensor], results: Sequence[torch.Tensor]) -> list[Any]:
    """The results of a local update as DTensors like ``originals`` (the originals where updated in place)."""
    out = []
    for e, local, result in zip(originals, locals_, results):
        if not is_dtensor(e) or result is local:  # plain, or updated in place (donated) or unchanged
            out.append(e if result is local else result)
        else:
            out.append(_rewrap(result, e))
    return out


def _local(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself, not a differentiable view), or ``x``."""
    if not is_dtensor(x):
        return x
    local = getattr(x, "_local_tensor", None)  # ~20x cheaper than to_local(); same tensor
    if isinstance(local, torch.Tensor):
        return local
    with torch.no_grad():  # to_local() is differentiable; its output must be writable in place
        return x.to_local()  # type: ignore[attr-defined]


def _rewrap(local: torch.Tensor, like: Any) -> Any:
    """A DTensor with ``local`` as its shard and the mesh, placements, shape and stride of ``like``."""
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


# --------------------------------------------------------------------------------------------
# Full tensors (post-hoc snapshots, evaluation on one process)


def gather(tree: EmaState | Any, *, cpu: bool = False) -> EmaState | Any:
    """Return ``tree`` (an EMA state or a pytree) with every DTensor leaf replaced by its full tensor.

    A collective: every rank must call it, with the same tree. Leaves are gathered one at a time;
    the result holds the whole tree unsharded on every rank (on the CPU with ``cpu=True``), so
    call it just before writing, on one EMA at a time. Plain leaves are returned as they are.
    """
    if isinstance(tree, EmaState):
        compensation = None if tree.compensation is None else gather(tree.compensation, cpu=cpu)
        return tree._replace(ema=gather(tree.ema, cpu=cpu), compensation=compensation)
    leaves, spec = optree.tree_flatten(tree)
    out = []
    with torch.no_grad():
        for leaf in leaves:
            full = leaf.full_tensor() if is_dtensor(leaf) else leaf
            out.append(full.cpu() if cpu else full)
    return optree.tree_unflatten(spec, out)


# --------------------------------------------------------------------------------------------
# Checkpoints


def save(state: EmaState, path: str | os.PathLike[str]) -> Path:
    """Save a state with DTensor leaves as a DCP checkpoint directory; every rank must call it.

    Rank 0 first removes ``funcema.safetensors``, then all ranks write their shards with
    ``torch.distributed.checkpoint.save`` (plain leaves are treated as replicated and written once),
    then rank 0 writes ``funcema.safetensors`` atomically and all ranks wait at a barrier.
    """
    import torch.distributed.checkpoint as dcp

    from . import _io

    path = Path(path)
    if int(state.step) < 0:
        raise ValueError("state was donated to update(..., donate=True) and is consumed; save the state it returned.")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: a sharded EMA state is saved as a directory, but this path is a file.")
    config = state.config
    emas = optree.tree_leaves(state.ema)
    main = is_main_process()
    if main:
        path.mkdir(parents=True, exist_ok=True)
        (path / HEADER).unlink(missing_ok=True)  # a half-overwritten checkpoint is never read as complete
    writer = dcp.FileSystemWriter(path, overwrite=True)
    shards = {_DCP_PREFIX + p: e for p, e in zip(config.paths, emas)}
    if config.compensated:
        shards.update({_COMP_PREFIX + p: c for p, c in zip(config.paths, optree.tree_leaves(state.compensation))})
    dcp.save(shards, storage_writer=writer)
    if main:
        # The header is an ordinary funcema state file whose EMA leaves are empty placeholders that
        # keep each leaf's dtype; the tensors themselves are in the DCP files beside it.
        placeholders = optree.tree_unflatten(config.treespec, [torch.empty(0, dtype=e.dtype) for e in emas])
        comp_placeholders = placeholders if config.compensated else None
        _io.save(state._replace(ema=placeholders, compensation=comp_placeholders), path / HEADER)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def load(path: str | os.PathLike[str], like: EmaState | Any) -> EmaState:
    """Load a DCP checkpoint directory written by :func:`save`, resharded like ``like``.

    Each DTensor leaf of ``like`` receives its own shard (any mesh and placements); each plain leaf
    receives the full tensor, so a single process without a process group can read a checkpoint
    written by many. Tensors keep their saved dtypes.
    """
    import torch.distributed.checkpoint as dcp

    from . import _io

    path = Path(path)
    if not (path / HEADER).is_file():
        raise ValueError(
            f"{path}: no {HEADER} in this directory: not a sharded funcema checkpoint, or its save did not finish."
        )
    header, tensors = _io._read(path / HEADER)
    like_leaves, like_paths, spec = _io.like_layout(path, header, like)
    try:
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as err:  # DCP raises assorted errors for a missing or corrupt .metadata
        raise ValueError(f"{path}: cannot read the DCP metadata (incomplete or corrupt checkpoint?): {err}") from None
    dest = {}
    for p, leaf in zip(like_paths, like_leaves):
        saved = metadata.get(_DCP_PREFIX + p)
        if saved is None or not hasattr(saved, "size"):
            raise ValueError(f"{path}: leaf {p!r} is missing from the DCP checkpoint (corrupt checkpoint?).")
        if tuple(saved.size) != tuple(leaf.shape):
            raise ValueError(
                f"{path}: leaf {p!r} was saved with shape {tuple(saved.size)}, but `like` has {tuple(leaf.shape)}."
            )
        with torch.no_grad():
            dest[_DCP_PREFIX + p] = torch.empty_like(leaf, dtype=tensors[_DCP_PREFIX + p].dtype)
    compensated = header.get("compensated") is True
    if compensated:  # sharded like the EMA leaf; a copied leaf's empty placeholder is a plain tensor
        averaged = dict(zip(header["paths"], header["averaged"]))
        for p, leaf in zip(like_paths, like_leaves):
            if _COMP_PREFIX + p not in metadata:
                raise ValueError(f"{path}: the compensation of leaf {p!r} is missing from the DCP checkpoint.")
            dtype = tensors[_DCP_PREFIX + p].dtype
            with torch.no_grad():
                dest[_COMP_PREFIX + p] = (
                    torch.empty_like(leaf, dtype=dtype) if averaged[p] else torch.empty(0, dtype=dtype, device=leaf.device)
                )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    with warnings.catch_warnings():
        # Loading on one process without a process group is intended here, not a mistake to warn of.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(dest, storage_reader=dcp.FileSystemReader(path), no_dist=not distributed)
    emas = [dest[_DCP_PREFIX + p] for p in like_paths]
    comps = [dest[_COMP_PREFIX + p] for p in like_paths] if compensated else None
    return _io.build_state(path, header, tensors, emas, like_paths, spec, comps)


# --------------------------------------------------------------------------------------------
# nn.Module helper


@contextlib.contextmanager
def swapped(module: torch.nn.Module, state: EmaState) -> Iterator[torch.nn.Module]:
    """``funcema.swapped`` for modules with DTensor parameters (FSDP2).

    FSDP2 all-gathers from its own padded buffer, of which each sharded parameter's local tensor
    is a view, so assigning ``.data`` would be ignored. DTensor targets therefore get the EMA's
    local shard copied in (cast to the parameter's dtype), after saving a copy of the live local
    shard that is copied back on exit, even on an exception (bit-exact: same dtype). Plain targets
    (buffers, unsharded parameters) are swapped through ``.data`` as in the unsharded helper.
    """
    _reshard(module)  # the sharded DTensor parameters are then the registered ones
    targets = dict(module.state_dict(keep_vars=True))
    paths = state.config.paths
    emas = optree.tree_leaves(state.ema)
    missing = [p for p in paths if p not in targets]
    if missing:
        raise ValueError(
            f"the EMA state has paths that name no parameter or buffer of the module: {missing[:8]}; "
            "create the state from dict(module.named_parameters()) or module.state_dict()."
        )
    for path, ema in zip(paths, emas):
        target = targets[path]
        if target.shape != ema.shape:
            raise ValueError(f"module tensor {path!r} has shape {tuple(target.shape)}, the EMA has {tuple(ema.shape)}.")
        if is_dtensor(target) != is_dtensor(ema):
            raise ValueError(
                f"module tensor {path!r} is {'a DTensor' if is_dtensor(target) else 'a plain tensor'} but the EMA's "
                "leaf is not; swap a sharded EMA into the sharded (fully_shard-ed) module it was created from."
            )
    restore: list[Callable[[], None]] = []
    try:
        with torch.no_grad():  # only the exchange itself; the body runs in the caller's grad mode
            for path, ema in zip(paths, emas):
                target = targets[path]
                if is_dtensor(target):
                    if tuple(target.placements) != tuple(ema.placements):
                        raise ValueError(
                            f"module tensor {path!r} has placements {tuple(target.placements)}, the EMA has "
                            f"{tuple(ema.placements)}; the EMA must be sharded like the module."
                        )
                    local = target.to_local()
                    saved = local.clone()
                    restore.append(lambda local=local, saved=saved: local.copy_(saved))  # type: ignore[misc]
                    local.copy_(ema.to_local())
                else:
                    data = target.data
                    restore.append(lambda target=target, data=data: setattr(target, "data", data))  # type: ignore[misc]
                    target.data = ema.detach().to(device=target.device, dtype=target.dtype)
        yield module
    finally:
        _reshard(module)  # drop unsharded copies of the EMA gathered by forwards in the block
        with torch.no_grad():
            for undo in reversed(restore):
                undo()


def _reshard(module: torch.nn.Module) -> None:
    """Reshard every FSDP2 module in ``module``, freeing unsharded parameters.

    FSDP2 does not reshard the root after forward (``reshard_after_forward`` is off for it), and a
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
