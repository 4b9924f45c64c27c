"""Saving and loading EMA states: safetensors files written atomically, DCP directories, never pickle.

Owns: [`save`][funcema.save] and [`load`][funcema.load] of plain states (one safetensors file)
and sharded states (a `torch.distributed.checkpoint` directory plus a header file). Which
tensors a state has comes from `_state.FIELDS`, so no field is named here.

Must not import: `_core`, `nn`, `posthoc`, `_cli` (it rebuilds states with `_state.build_config`
and `_state.make_state`, never through the core).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, overload

import optree
import torch

from . import _dtensor, _tree
from ._format import META_KEY, Fields, check_target, dtype_from_name, dtype_name, is_int, open_file, write_safetensors
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

    Only a regular file is replaced: an existing directory, FIFO, socket or device at `path` is
    refused and left untouched. If `path` is a symlink, the file it points to is replaced
    (atomically, in that file's directory) and the link is kept.

    Raises:
        TypeError: `state` is not an [`EmaState`][funcema.EmaState].
        ValueError: the state was consumed by `update(..., donate=True)`, `path` is empty, or it
            names a FIFO, socket or device.
        IsADirectoryError: `path` names a directory.
        OSError: the write failed (same errno, e.g. no space left; the message names the file).
            The previous file is unchanged.

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
    path = check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, list(tensors), list(tensors.values()), {META_KEY: json.dumps(_header(state.config))})


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
        ValueError: the file is truncated, corrupt, not a funcema state, breaks the schema (every
            header field and every tensor is checked against it), is not a regular file, or its
            paths differ from `like`'s (the missing and extra paths are listed); `like` is
            missing for a sharded checkpoint directory; `like` is a state consumed by
            `update(..., donate=True)`.
        TypeError: `like` is not a tree of tensors (an `nn.Module` or a generator: pass
            `dict(model.named_parameters())` or `model.state_dict()`).
        OSError: the file cannot be read (same errno, e.g. missing or no permission; the message
            names the file).

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
    layout: list[Any] = []  # like's layout, checked against the header before any tensor is read

    def check_like(header: dict[str, Any]) -> None:
        if like is not _FLAT:
            layout.extend(_like_layout(path, header, like))

    header, tensors = _read(path, check_like)
    if like is _FLAT:  # a flat path-keyed dict, in the saved order
        layout.extend(_like_layout(path, header, {p: tensors[f"ema/{p}"] for p in header["paths"]}))
    like_leaves, like_paths, spec = layout
    return _rebuild(path, header, tensors, _placed_trees(path, header, tensors, like_leaves, like_paths), like_paths, spec)


def _placed_trees(
    path: Path, header: dict[str, Any], tensors: Mapping[str, torch.Tensor], like_leaves: list[torch.Tensor], paths: tuple[str, ...]
) -> dict[str, list[torch.Tensor]]:
    """Each tree field's leaves in `paths` order, on the devices of `like`'s leaves, shapes checked."""
    trees = {}
    for field in tree_fields(header):
        trees[field.name] = [tensors[f"{field.name}/{p}"].to(leaf.device) for p, leaf in zip(paths, like_leaves)]
        for p, e, leaf in zip(paths, trees[field.name], like_leaves):
            if e.shape != leaf.shape:
                raise ValueError(
                    f"{path}: {field.name} leaf {p!r} was saved with shape {tuple(e.shape)}, but `like` has {tuple(leaf.shape)}."
                )
    return trees


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
        "dtype": None if config.dtype is None else dtype_name(config.dtype),
        "on_nonfinite": config.on_nonfinite,
        "seed": config.seed,
        "compensated": config.compensated,
        "kernel": config.kernel,
        "paths": list(config.paths),
        "averaged": list(config.averaged),
        "param_dtypes": [dtype_name(d) for d in config.param_dtypes],
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
        header = {META_KEY: json.dumps(_header(state.config))}
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


# options added after version 1 of the format: absent from older files, which load with the default
_LATER_OPTIONS = {"compensated": False, "kernel": "auto"}
_KEYS = {"format", "version", "paths", "averaged", "param_dtypes", *_OPTIONS} - _LATER_OPTIONS.keys()
# dtypes the kernels average in; anything else in an averaged leaf is a damaged file
_AVERAGED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128})
# the range of each scalar field's value (-inf is a legitimate log_decay_product: a decay of exactly 0 once)
_SCALAR_RANGES = {
    "step": (lambda v: v >= 0, ">= 0"),
    "log_decay_product": (lambda v: not math.isnan(v) and v <= 0, "<= 0 and not NaN"),
    "nonfinite_count": (lambda v: v >= 0, ">= 0"),
}


def _parse_header(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Validate every field of a state file's header, with no coercion; any damage is a ValueError naming the file."""
    fields = Fields(path, header, "funcema state header")
    fields.keys(_KEYS, optional=frozenset(_LATER_OPTIONS))
    paths = fields.as_list("paths", lambda p: isinstance(p, str), "strings")
    if len(set(paths)) != len(paths):
        raise fields.error("field 'paths' repeats a path")
    try:
        schedule = from_dict(fields.as_object("schedule").data)
    except (KeyError, TypeError, ValueError) as err:
        raise fields.error(f"field 'schedule' is invalid: {err}") from None
    dtype = fields.get("dtype")
    names = fields.as_list("param_dtypes", lambda d: isinstance(d, str), "dtype names", length=len(paths))
    return {
        "schedule": schedule,
        "every": fields.as_int("every", minimum=1),
        "after": fields.as_int("after", minimum=0),
        "seed": fields.as_int("seed", minimum=0),
        "debias": fields.as_bool("debias"),
        "dtype": None if dtype is None else _dtype_field(fields, "dtype", dtype, averaged=True),
        "on_nonfinite": fields.as_str("on_nonfinite", choices=NONFINITE_POLICIES),
        "compensated": fields.as_bool("compensated") if "compensated" in header else _LATER_OPTIONS["compensated"],
        "kernel": fields.as_str("kernel", choices=KERNELS) if "kernel" in header else _LATER_OPTIONS["kernel"],
        "averaged": fields.as_list("averaged", lambda a: isinstance(a, bool), "true or false", length=len(paths)),
        "param_dtypes": _dtype_fields(fields, "param_dtypes", names),
    }


def _dtype_fields(fields: Fields, name: str, names: list[str]) -> list[torch.dtype]:
    """`_dtype_field` of each name in a list, each distinct name checked once (at its first index)."""
    dtypes: dict[str, torch.dtype] = {}
    for i, d in enumerate(names):
        if d not in dtypes:
            dtypes[d] = _dtype_field(fields, f"{name}[{i}]", d)
    return [dtypes[d] for d in names]


def _dtype_field(fields: Fields, label: str, name: object, averaged: bool = False) -> torch.dtype:
    try:
        dtype = dtype_from_name(name)
    except ValueError:
        raise fields.error(f"field {label!r} names no torch dtype: {name!r}") from None
    if averaged and dtype not in _AVERAGED_DTYPES:
        raise fields.error(f"field {label!r} must be a floating or complex dtype, got {name!r}")
    return dtype


def _check_tensors(path: Path, fields: dict[str, Any], paths: list[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Check the tensors against the header: each scalar's dtype, shape and range; each leaf's dtype."""
    for field in SCALAR_FIELDS:
        t = tensors[field.name]
        if t.dtype != field.dtype or t.ndim != 0:
            raise ValueError(
                f"{path}: tensor {field.name!r} must be a 0-d {field.dtype}, got {t.dtype} of shape {tuple(t.shape)}."
            )
        ok, expected = _SCALAR_RANGES.get(field.name, (lambda v: True, ""))
        if not ok(t.item()):
            raise ValueError(f"{path}: tensor {field.name!r} must be {expected}, got {t.item()} (corrupt file).")
    for field in tree_fields(fields):
        for p, averaged, param_dtype in zip(paths, fields["averaged"], fields["param_dtypes"]):
            dtype = tensors[f"{field.name}/{p}"].dtype
            if averaged and (dtype not in _AVERAGED_DTYPES or param_dtype not in _AVERAGED_DTYPES):
                raise ValueError(
                    f"{path}: leaf {p!r} is averaged, so its {field.name} and parameter must be floating or "
                    f"complex, got {dtype} and {param_dtype} (corrupt file)."
                )
            if not averaged and dtype != param_dtype:
                raise ValueError(
                    f"{path}: copied leaf {p!r} is {dtype} in {field.name!r} but its parameter dtype is "
                    f"{param_dtype} (corrupt file)."
                )


def _read(
    path: Path, check_header: Callable[[dict[str, Any]], None] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate a state file: its header, every metadata field, and the tensors against them.

    A sound funcema metadata is shown to `check_header` before the tensor entries are checked
    and before any tensor is read: a file that cannot fit (e.g. other paths than `like`'s) is
    refused without checking 100,000 entries first. A damaged metadata is reported after the
    entries are checked, so a damaged file gives the error it always gave.
    """
    checked: list[Any] = []  # the metadata and its parsed fields, once checked
    damaged: list[ValueError] = []

    def check_metadata(meta: Fields | None) -> None:
        try:
            checked.extend(_state_metadata(path, meta))
        except ValueError as err:
            damaged.append(err)
            return
        if check_header is not None:
            check_header(checked[0])

    with open_file(path, check_metadata) as reader:
        if damaged:
            raise damaged[0]
        header, fields = checked
        paths = header["paths"]
        if set(reader.header.entries) != state_keys(paths, fields):
            raise ValueError(f"{path}: the file's tensors do not match its header (corrupt file).")
        tensors = {name: reader.tensor(name) for name in reader.header.entries}
    _check_tensors(path, fields, paths, tensors)
    return header, tensors


def _state_metadata(path: Path, meta: Fields | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The funcema metadata of a state file and its fields, every one checked."""
    if meta is None:
        raise ValueError(f"{path}: not a funcema state file (no {META_KEY!r} metadata).")
    if meta.data.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a funcema state file (format {meta.data.get('format')!r}).")
    version = meta.get("version")
    if not is_int(version) or not 1 <= version <= _VERSION:
        raise ValueError(f"{path}: state format version {version!r} is not one this funcema reads (1 to {_VERSION}).")
    return meta.data, _parse_header(path, meta.data)
