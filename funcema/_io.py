"""Saving and loading EMA states: safetensors files written atomically, DCP directories, never pickle.

Owns: [`save`][funcema.save] and [`load`][funcema.load] of plain states (one safetensors file)
and sharded states (a `torch.distributed.checkpoint` directory plus a header file). Which
tensors a state has comes from `_state.FIELDS`, so no field is named here.

Must not import: `_core`, `nn`, `posthoc`, `_cli` (it rebuilds states with `_state.build_config`
and `_state.make_state`, never through the core).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, overload

import optree
import torch
from safetensors import SafetensorError, safe_open

from . import _dtensor, _tree
from ._atomic import write_safetensors
from ._state import (
    KERNELS,
    NONFINITE_POLICIES,
    SCALAR_FIELDS,
    EmaConfig,
    EmaState,
    build_config,
    check_live,
    make_state,
    state_keys,
    tree_fields,
)
from ._tree import Params, ParamsT
from .schedules import from_dict

__all__ = ["save", "load", "HEADER"]

_FORMAT = "funcema.state"
_VERSION = 1
_META_KEY = "funcema"

HEADER = "funcema.safetensors"
"""Name of the file, inside a sharded checkpoint directory, with the configuration and scalars."""

_OPTIONS = ("schedule", "every", "after", "debias", "dtype", "on_nonfinite", "seed", "compensated", "kernel")


def save(state: EmaState, path: str | os.PathLike[str]) -> Path:
    """Write `state` to a safetensors file, atomically.

    The file holds each tree field's tensors under `"<field>/<path>"` (the EMA under
    `"ema/<path>"`), the scalar fields (step, debias accumulator, skip counter), and the
    configuration as JSON metadata. It is written to a temporary file in the same directory,
    flushed to disk and renamed, so a crash leaves either the old file or the new one, never a
    partial file. A state with DTensor leaves is saved as a DCP directory instead (every rank
    must call `save` then).

    Args:
        state: the EMA state.
        path: the file to write (conventionally `*.safetensors`).

    Returns:
        The path written.

    Raises:
        TypeError: `state` is not an [`EmaState`][funcema.EmaState].
        ValueError: the state was consumed by `update(..., donate=True)`.

    Examples:
        >>> import tempfile, os, torch, funcema as fe
        >>> state = fe.init({"w": torch.ones(2)})
        >>> file = fe.save(state, os.path.join(tempfile.mkdtemp(), "ema.safetensors"))
        >>> fe.load(file, like=state).ema["w"]
        tensor([1., 1.])
    """
    if not isinstance(state, EmaState):
        raise TypeError(f"state must be a funcema.EmaState, got {type(state).__name__}.")
    if _dtensor.any_dtensor(optree.tree_leaves(state.ema)):
        return _save_dcp(state, Path(path))
    check_live(state)
    tensors = _state_tensors(state, dict(_tree_tensors(state)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, list(tensors), list(tensors.values()), {_META_KEY: json.dumps(_header(state.config))})
    return path


_FLAT: Any = object()  # `like` not given (`None` is a valid, empty, tree)


@overload
def load(path: str | os.PathLike[str]) -> EmaState[dict[str, torch.Tensor]]: ...
@overload
def load(path: str | os.PathLike[str], like: EmaState[ParamsT]) -> EmaState[ParamsT]: ...
@overload
def load(path: str | os.PathLike[str], like: ParamsT) -> EmaState[ParamsT]: ...
def load(path: str | os.PathLike[str], like: Any = _FLAT) -> EmaState:
    """Read a state written by [`save`][funcema.save].

    Args:
        path: the file (or the DCP directory of a sharded state).
        like: an EMA state or a parameter tree that gives the tree structure and the device of
            each leaf; its paths must be those saved. Tensors keep the saved dtypes. For a DCP
            directory, each DTensor leaf of `like` receives its own shard (any mesh and
            placements) and each plain leaf the full tensor. Without `like` (plain files only)
            the state's tree is a flat dict from each saved path to its tensor, on the CPU, in
            the saved order: `fe.load(path).ema` is then ready for `model.load_state_dict`.

    Returns:
        The state, bit-identical to the one saved: resuming gives the same results as never
        having stopped.

    Raises:
        ValueError: the file is missing, truncated, corrupt, not a funcema state, or its paths
            differ from `like`'s (the missing and extra paths are listed); `like` is missing for
            a sharded checkpoint directory; `like` is a state consumed by `update(..., donate=True)`.
        TypeError: `like` is not a tree of tensors (an `nn.Module` or a generator: pass
            `dict(model.named_parameters())` or `model.state_dict()`).

    Examples:
        >>> import tempfile, os, torch, funcema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> file = fe.save(fe.init(model.state_dict()), os.path.join(tempfile.mkdtemp(), "ema.safetensors"))
        >>> state = fe.load(file)
        >>> sorted(state.ema)
        ['bias', 'weight']
        >>> model.load_state_dict(state.ema)
        <All keys matched successfully>
    """
    path = Path(path)
    if path.is_dir():
        if like is _FLAT:
            raise ValueError(
                f"{path} is a sharded (DCP) checkpoint directory: pass like= (the sharded state or parameters) "
                "so that each rank receives its own shards."
            )
        return _load_dcp(path, like)
    header, tensors = _read(path)
    if like is _FLAT:  # a flat path-keyed dict, in the saved order
        like = {p: tensors[f"ema/{p}"] for p in header["paths"]}
    like_leaves, like_paths, spec = _like_layout(path, header, like)
    trees = {}
    for field in tree_fields(header):
        trees[field.name] = [tensors[f"{field.name}/{p}"].to(leaf.device) for p, leaf in zip(like_paths, like_leaves)]
        for p, e, leaf in zip(like_paths, trees[field.name], like_leaves):
            if e.shape != leaf.shape:
                raise ValueError(
                    f"{path}: {field.name} leaf {p!r} was saved with shape {tuple(e.shape)}, but `like` has {tuple(leaf.shape)}."
                )
    return _rebuild(path, header, tensors, trees, like_paths, spec)


def _tree_tensors(state: EmaState) -> list[tuple[str, torch.Tensor]]:
    """Every tree field's leaves, named `"<field>/<path>"`."""
    paths, fields = state.config.paths, tree_fields(state.config)
    return [(f"{f.name}/{p}", leaf) for f in fields for p, leaf in zip(paths, optree.tree_leaves(getattr(state, f.name)))]


def _state_tensors(state: EmaState, trees: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`trees` followed by the scalar fields: the tensors of a state file."""
    return {**trees, **{f.name: getattr(state, f.name) for f in SCALAR_FIELDS}}


def _header(config: EmaConfig) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "schedule": config.schedule.to_dict(),
        "every": config.every,
        "after": config.after,
        "debias": config.debias,
        "dtype": _dtype_name(config.dtype),
        "on_nonfinite": config.on_nonfinite,
        "seed": config.seed,
        "compensated": config.compensated,
        "kernel": config.kernel,
        "paths": list(config.paths),
        "averaged": list(config.averaged),
        "param_dtypes": [_dtype_name(d) for d in config.param_dtypes],
    }


def _like_layout(
    path: Path, header: dict[str, Any], like: EmaState | Params
) -> tuple[list[torch.Tensor], tuple[str, ...], optree.PyTreeSpec]:
    """Flatten `like` (a state or a parameter tree) and check that its paths are the saved ones."""
    if isinstance(like, EmaState):
        check_live(like)  # a consumed state's tensors are no longer a valid layout to load into
    like_tree = like.ema if isinstance(like, EmaState) else like
    like_leaves, like_paths, spec = _tree.flatten(like_tree, "like")
    saved_paths = tuple(header["paths"])
    if set(like_paths) != set(saved_paths) or len(like_paths) != len(saved_paths):
        missing, extra = _tree.path_difference(saved_paths, like_paths)
        raise ValueError(
            f"{path}: the saved state's paths differ from those of `like`: paths only in the file "
            f"{_tree.format_paths(missing)}, paths only in `like` {_tree.format_paths(extra)}. "
            + _tree.mismatch_hint(like_paths, saved_paths, "like")
        )
    return like_leaves, like_paths, spec


def _rebuild(
    path: Path,
    header: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    trees: Mapping[str, list[torch.Tensor]],
    paths: tuple[str, ...],
    spec: optree.PyTreeSpec,
) -> EmaState:
    """Rebuild a state from a header, its scalar tensors and its tree fields' leaves in `paths` order."""
    fields = _parse_header(path, header)
    for name, leaves in trees.items():  # every tree field holds values of the EMA's own dtypes
        for p, e, leaf in zip(paths, trees["ema"], leaves):
            if leaf.dtype != e.dtype:
                raise ValueError(f"{path}: {name} leaf {p!r} has dtype {leaf.dtype}, the EMA's leaf {e.dtype} (corrupt file).")
    averaged_by_path = dict(zip(header["paths"], fields["averaged"]))
    param_dtype_by_path = dict(zip(header["paths"], fields["param_dtypes"]))
    averaged = [averaged_by_path[p] for p in paths]
    param_dtypes = [param_dtype_by_path[p] for p in paths]
    options = {name: fields[name] for name in _OPTIONS}
    config = build_config(options, spec, paths, averaged, param_dtypes, trees["ema"])
    return make_state(config, trees, {f.name: tensors[f.name] for f in SCALAR_FIELDS})


# --------------------------------------------------------------------------------------------
# Sharded states: torch.distributed.checkpoint directories


def _save_dcp(state: EmaState, path: Path) -> Path:
    """Save a state with DTensor leaves as a DCP checkpoint directory; every rank must call it.

    Rank 0 first removes the header file, then all ranks write their shards with
    `torch.distributed.checkpoint.save` (plain leaves are treated as replicated and written
    once), then rank 0 writes the header atomically and all ranks wait at a barrier: the
    header's presence marks a complete checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    check_live(state)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: a sharded EMA state is saved as a directory, but this path is a file.")
    main = _dtensor.is_main_process()
    if main:
        path.mkdir(parents=True, exist_ok=True)
        (path / HEADER).unlink(missing_ok=True)  # a half-overwritten checkpoint is never read as complete
    dcp.save(dict(_tree_tensors(state)), storage_writer=dcp.FileSystemWriter(path, overwrite=True))
    if main:
        # The header is an ordinary state file whose tree leaves are empty placeholders that keep
        # each leaf's dtype; the tensors themselves are in the DCP files beside it.
        placeholders = {k: torch.empty(0, dtype=v.dtype) for k, v in _tree_tensors(state)}
        tensors = _state_tensors(state, placeholders)
        header = {_META_KEY: json.dumps(_header(state.config))}
        write_safetensors(path / HEADER, list(tensors), list(tensors.values()), header)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


def _load_dcp(path: Path, like: EmaState | Any) -> EmaState:
    """Load a DCP checkpoint directory written by `_save_dcp`, resharded like `like`."""
    import torch.distributed.checkpoint as dcp

    if not (path / HEADER).is_file():
        raise ValueError(
            f"{path}: no {HEADER} in this directory: not a sharded funcema checkpoint, or its save did not finish."
        )
    header, tensors = _read(path / HEADER)
    like_leaves, like_paths, spec = _like_layout(path, header, like)
    try:
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as err:  # DCP raises assorted errors for a missing or corrupt .metadata
        raise ValueError(f"{path}: cannot read the DCP metadata (incomplete or corrupt checkpoint?): {err}") from None
    dest = {}
    fields = tree_fields(header)
    for key, leaf in ((f"{f.name}/{p}", leaf) for f in fields for p, leaf in zip(like_paths, like_leaves)):
        saved = metadata.get(key)
        if saved is None or not hasattr(saved, "size"):
            raise ValueError(f"{path}: leaf {key!r} is missing from the DCP checkpoint (corrupt checkpoint?).")
        if tuple(saved.size) != tuple(leaf.shape):
            raise ValueError(
                f"{path}: leaf {key!r} was saved with shape {tuple(saved.size)}, but `like` has {tuple(leaf.shape)}."
            )
        with torch.no_grad():
            dest[key] = torch.empty_like(leaf, dtype=tensors[key].dtype)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    with warnings.catch_warnings():
        # Loading on one process without a process group is intended here, not a mistake to warn of.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(dest, storage_reader=dcp.FileSystemReader(path), no_dist=not distributed)
    trees = {f.name: [dest[f"{f.name}/{p}"] for p in like_paths] for f in fields}
    return _rebuild(path, header, tensors, trees, like_paths, spec)


# --------------------------------------------------------------------------------------------
# The state file's header


def _parse_header(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Validate the configuration fields of a state file; any damage is a ValueError naming it."""

    def integer(name: str, minimum: int) -> int:
        value = header[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"field {name!r} must be an int >= {minimum}, got {value!r}")
        return value

    try:
        n = len(header["paths"])
        fields: dict[str, Any] = {
            "schedule": from_dict(header["schedule"]),
            "every": integer("every", 1),
            "after": integer("after", 0),
            "seed": integer("seed", 0),
            "debias": header["debias"],
            "compensated": header.get("compensated", False),  # absent from files of earlier versions
            "dtype": None if header["dtype"] is None else _dtype(header["dtype"]),
            "on_nonfinite": header["on_nonfinite"],
            "kernel": header.get("kernel", "auto"),  # files written before the option: the default
            "averaged": [bool(a) for a in header["averaged"]],
            "param_dtypes": [_dtype(d) for d in header["param_dtypes"]],
        }
        for name in ("debias", "compensated"):
            if not isinstance(fields[name], bool):
                raise ValueError(f"field {name!r} must be a bool, got {fields[name]!r}")
        if fields["on_nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"unknown on_nonfinite policy {fields['on_nonfinite']!r}")
        if fields["kernel"] not in KERNELS:
            raise ValueError(f"unknown kernel {fields['kernel']!r}")
        if len(fields["averaged"]) != n or len(fields["param_dtypes"]) != n:
            raise ValueError("per-leaf fields do not match the number of paths")
    except (KeyError, TypeError, ValueError) as err:
        detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{path}: corrupt funcema state header: {detail}.") from None
    return fields


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if _META_KEY not in metadata:
                raise ValueError(f"{path}: not a funcema state file (no {_META_KEY!r} metadata).")
            header = json.loads(metadata[_META_KEY])
            if header.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a funcema state file (format {header.get('format')!r}).")
            if not isinstance(header.get("version"), int) or header["version"] > _VERSION:
                raise ValueError(f"{path}: state format version {header.get('version')!r} is newer than this funcema reads ({_VERSION}).")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: cannot read the funcema state file (truncated or corrupt?): {err}") from None
    paths = header.get("paths")
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{path}: corrupt funcema state header: 'paths' must be a list of strings.")
    if set(tensors) != state_keys(paths, header):
        raise ValueError(f"{path}: the file's tensors do not match its header (corrupt file).")
    return header, tensors


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a funcema file.")
    return dtype
