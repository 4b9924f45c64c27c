"""Saving and loading EMA states: safetensors files written atomically, never pickle."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optree
import torch
from safetensors import SafetensorError, safe_open

from . import _distributed, _tree  # _distributed: the sharded-EMA hooks in save/load
from ._atomic import write_safetensors
from ._core import _groups
from ._state import NONFINITE_POLICIES, EmaConfig, EmaState
from ._tree import Params
from .schedules import from_dict

__all__ = ["save", "load"]

_FORMAT = "funcema.state"
_VERSION = 1
_META_KEY = "funcema"


def save(state: EmaState, path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to a safetensors file, atomically.

    The file holds the EMA tensors under ``"ema/<path>"``, the step, the debias accumulator, the
    skip counter, and the configuration as JSON metadata. It is written to a temporary file in the
    same directory, flushed to disk and renamed, so a crash leaves either the old file or the new
    one, never a partial file.

    Args:
        state: the EMA state.
        path: the file to write (conventionally ``*.safetensors``).

    Returns:
        The path written.

    Examples:
        >>> import tempfile, os, torch, funcema as fe
        >>> state = fe.init({"w": torch.ones(2)})
        >>> file = fe.save(state, os.path.join(tempfile.mkdtemp(), "ema.safetensors"))
        >>> fe.load(file, like=state).ema["w"]
        tensor([1., 1.])
    """
    if not isinstance(state, EmaState):
        raise TypeError(f"state must be a funcema.EmaState, got {type(state).__name__}.")
    config = state.config
    emas = optree.tree_leaves(state.ema)
    if _distributed.any_dtensor(emas):  # sharded-EMA hook: a DCP checkpoint directory
        return _distributed.save(state, path)
    if int(state.step) < 0:
        raise ValueError("state was donated to update(..., donate=True) and is consumed; save the state it returned.")
    tensors = {f"ema/{p}": e for p, e in zip(config.paths, emas)}
    if config.compensated:
        tensors.update({f"compensation/{p}": c for p, c in zip(config.paths, optree.tree_leaves(state.compensation))})
    tensors["step"] = state.step
    tensors["log_decay_product"] = state.log_decay_product
    tensors["nonfinite_count"] = state.nonfinite_count
    header = {
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
        "paths": list(config.paths),
        "averaged": list(config.averaged),
        "param_dtypes": [_dtype_name(d) for d in config.param_dtypes],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, list(tensors), list(tensors.values()), {_META_KEY: json.dumps(header)})
    return path


def load(path: str | os.PathLike[str], like: EmaState | Params) -> EmaState:
    """Read a state written by :func:`save`.

    Args:
        path: the file.
        like: an EMA state or a parameter tree that gives the tree structure and the device of
            each leaf; its paths must be those saved. Tensors keep the saved dtypes.

    Returns:
        The state, bit-identical to the one saved: resuming gives the same results as never
        having stopped.

    Raises:
        ValueError: the file is missing, truncated, corrupt, not a funcema state, or its paths
            differ from ``like``'s (the missing and extra paths are listed).
    """
    path = Path(path)
    if path.is_dir():  # sharded-EMA hook: a DCP checkpoint directory written by save()
        return _distributed.load(path, like)
    header, tensors = _read(path)
    like_leaves, like_paths, spec = like_layout(path, header, like)
    emas = [tensors[f"ema/{p}"].to(leaf.device) for p, leaf in zip(like_paths, like_leaves)]
    for p, e, leaf in zip(like_paths, emas, like_leaves):
        if e.shape != leaf.shape:
            raise ValueError(f"{path}: leaf {p!r} was saved with shape {tuple(e.shape)}, but `like` has {tuple(leaf.shape)}.")
    comps = None
    if header.get("compensated") is True:
        comps = [tensors[f"compensation/{p}"].to(leaf.device) for p, leaf in zip(like_paths, like_leaves)]
    return build_state(path, header, tensors, emas, like_paths, spec, comps)


def like_layout(
    path: Path, header: dict[str, Any], like: EmaState | Params
) -> tuple[list[torch.Tensor], tuple[str, ...], optree.PyTreeSpec]:
    """Flatten ``like`` (a state or a parameter tree) and check that its paths are the saved ones."""
    like_tree = like.ema if isinstance(like, EmaState) else like
    like_leaves, like_paths, spec = _tree.flatten(like_tree, "like")
    saved_paths = tuple(header["paths"])
    if set(like_paths) != set(saved_paths) or len(like_paths) != len(saved_paths):
        missing = [p for p in saved_paths if p not in set(like_paths)]
        extra = [p for p in like_paths if p not in set(saved_paths)]
        raise ValueError(
            f"{path}: the saved state's paths differ from those of `like`: paths only in the file "
            f"{_tree._short(missing)}, paths only in `like` {_tree._short(extra)}."
        )
    return like_leaves, like_paths, spec


def build_state(
    path: Path,
    header: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    emas: list[torch.Tensor],
    paths: tuple[str, ...],
    spec: optree.PyTreeSpec,
    comps: list[torch.Tensor] | None = None,
) -> EmaState:
    """Rebuild a state from a validated header, its scalar tensors and the EMA leaves in ``paths`` order."""
    fields = _parse_header(path, header)
    if comps is not None:
        _check_compensation(path, header, emas, comps, paths)
    averaged_by_path = dict(zip(header["paths"], fields["averaged"]))
    param_dtype_by_path = dict(zip(header["paths"], fields["param_dtypes"]))
    averaged = tuple(averaged_by_path[p] for p in paths)
    param_dtypes = [param_dtype_by_path[p] for p in paths]
    config = EmaConfig(
        schedule=fields["schedule"],
        every=fields["every"],
        after=fields["after"],
        debias=fields["debias"],
        dtype=fields["dtype"],
        on_nonfinite=fields["on_nonfinite"],
        seed=fields["seed"],
        compensated=fields["compensated"],
        treespec=spec,
        paths=paths,
        averaged=averaged,
        param_dtypes=tuple(param_dtypes),
        groups=_groups(emas, param_dtypes, averaged),
    )
    scalar_device = emas[0].device if config.on_nonfinite == "skip" and emas else torch.device("cpu")
    return EmaState(
        ema=optree.tree_unflatten(spec, emas),
        compensation=optree.tree_unflatten(spec, comps) if comps is not None else None,
        step=tensors["step"].to(torch.int64).cpu(),
        log_decay_product=tensors["log_decay_product"].to(scalar_device),
        nonfinite_count=tensors["nonfinite_count"].to(scalar_device),
        config=config,
    )


def _check_compensation(
    path: Path, header: dict[str, Any], emas: list[torch.Tensor], comps: list[torch.Tensor], paths: tuple[str, ...]
) -> None:
    """Each compensation leaf has its EMA leaf's dtype, and its shape (averaged) or shape ``(0,)`` (copied)."""
    averaged = dict(zip(header["paths"], header["averaged"]))
    for p, e, c in zip(paths, emas, comps):
        shape = tuple(e.shape) if averaged[p] else (0,)
        if tuple(c.shape) != shape or c.dtype != e.dtype:
            raise ValueError(
                f"{path}: compensation of leaf {p!r} has shape {tuple(c.shape)} and dtype {c.dtype}; expected shape "
                f"{shape} and the EMA's dtype {e.dtype} (corrupt file)."
            )


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
            "compensated": header.get("compensated", False),
            "dtype": None if header["dtype"] is None else _dtype(header["dtype"]),
            "on_nonfinite": header["on_nonfinite"],
            "averaged": [bool(a) for a in header["averaged"]],
            "param_dtypes": [_dtype(d) for d in header["param_dtypes"]],
        }
        if not isinstance(fields["debias"], bool):
            raise ValueError(f"field 'debias' must be a bool, got {fields['debias']!r}")
        if not isinstance(fields["compensated"], bool):
            raise ValueError(f"field 'compensated' must be a bool, got {fields['compensated']!r}")
        if fields["on_nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"unknown on_nonfinite policy {fields['on_nonfinite']!r}")
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
    expected = {f"ema/{p}" for p in paths} | {"step", "log_decay_product", "nonfinite_count"}
    if header.get("compensated") is True:
        expected |= {f"compensation/{p}" for p in paths}
    if set(tensors) != expected:
        raise ValueError(f"{path}: the file's tensors do not match its header (corrupt file).")
    return header, tensors


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a funcema file.")
    return dtype
