"""Saving and loading EMA states: safetensors files written atomically, never pickle."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optree
import torch

from . import _distributed, _tree  # _distributed: the sharded-EMA hooks in save/load
from ._core import _groups
from ._format import META_KEY, Fields, check_target, dtype_from_name, dtype_name, is_int, open_file, write_safetensors
from ._state import NONFINITE_POLICIES, EmaConfig, EmaState
from ._tree import Params
from .schedules import from_dict

__all__ = ["save", "load"]

_FORMAT = "funcema.state"
_VERSION = 1


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
        "dtype": None if config.dtype is None else dtype_name(config.dtype),
        "on_nonfinite": config.on_nonfinite,
        "seed": config.seed,
        "paths": list(config.paths),
        "averaged": list(config.averaged),
        "param_dtypes": [dtype_name(d) for d in config.param_dtypes],
    }
    path = check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, list(tensors), list(tensors.values()), {META_KEY: json.dumps(header)})


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
    return build_state(path, header, tensors, emas, like_paths, spec)


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
) -> EmaState:
    """Rebuild a state from a validated header, its scalar tensors and the EMA leaves in ``paths`` order."""
    fields = _parse_header(path, header)
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
        treespec=spec,
        paths=paths,
        averaged=averaged,
        param_dtypes=tuple(param_dtypes),
        groups=_groups(emas, param_dtypes, averaged),
    )
    scalar_device = emas[0].device if config.on_nonfinite == "skip" and emas else torch.device("cpu")
    return EmaState(
        ema=optree.tree_unflatten(spec, emas),
        step=tensors["step"].to(torch.int64).cpu(),
        log_decay_product=tensors["log_decay_product"].to(scalar_device),
        nonfinite_count=tensors["nonfinite_count"].to(scalar_device),
        config=config,
    )


_KEYS = {
    "format",
    "version",
    "schedule",
    "every",
    "after",
    "debias",
    "dtype",
    "on_nonfinite",
    "seed",
    "paths",
    "averaged",
    "param_dtypes",
}
# dtypes the kernels average in; anything else in an averaged leaf is a damaged file
_AVERAGED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128})


def _parse_header(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Validate the configuration fields of a state file; any damage is a ValueError naming the file."""
    fields = Fields(path, header, "funcema state header")
    fields.keys(_KEYS)
    paths = fields.as_list("paths", lambda p: isinstance(p, str), "strings")
    if len(set(paths)) != len(paths):
        raise fields.error("field 'paths' repeats a path")
    n = len(paths)
    schedule = fields.as_object("schedule").data
    try:
        parsed_schedule = from_dict(schedule)
    except (KeyError, TypeError, ValueError) as err:
        raise fields.error(f"field 'schedule' is invalid: {err}") from None
    dtype = fields.get("dtype")
    return {
        "schedule": parsed_schedule,
        "every": fields.as_int("every", minimum=1),
        "after": fields.as_int("after", minimum=0),
        "seed": fields.as_int("seed", minimum=0),
        "debias": fields.as_bool("debias"),
        "dtype": None if dtype is None else _dtype_field(fields, "dtype", dtype, floating=True),
        "on_nonfinite": fields.as_str("on_nonfinite", choices=NONFINITE_POLICIES),
        "averaged": fields.as_list("averaged", lambda a: isinstance(a, bool), "true or false", length=n),
        "param_dtypes": [
            _dtype_field(fields, f"param_dtypes[{i}]", d)
            for i, d in enumerate(fields.as_list("param_dtypes", lambda d: isinstance(d, str), "dtype names", length=n))
        ],
    }


def _dtype_field(fields: Fields, label: str, name: object, floating: bool = False) -> torch.dtype:
    try:
        dtype = dtype_from_name(name)
    except ValueError:
        raise fields.error(f"field {label!r} names no torch dtype: {name!r}") from None
    if floating and dtype not in _AVERAGED_DTYPES:
        raise fields.error(f"field {label!r} must be a floating or complex dtype, got {name!r}")
    return dtype


def _check_tensors(path: Path, fields: dict[str, Any], paths: list[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Check the tensors against the header: the scalars' dtype, shape and range, each leaf's dtype."""
    for name, dtype in (("step", torch.int64), ("log_decay_product", torch.float64), ("nonfinite_count", torch.int64)):
        t = tensors[name]
        if t.dtype != dtype or t.ndim != 0:
            raise ValueError(f"{path}: tensor {name!r} must be a 0-d {dtype}, got {t.dtype} of shape {tuple(t.shape)}.")
    if int(tensors["step"]) < 0 or int(tensors["nonfinite_count"]) < 0:
        raise ValueError(f"{path}: 'step' and 'nonfinite_count' must be >= 0 (corrupt file).")
    # -inf is legitimate: a schedule whose decay was exactly 0 once (power, warmup at the first step)
    log_decay = float(tensors["log_decay_product"])
    if math.isnan(log_decay) or log_decay > 0:
        raise ValueError(f"{path}: 'log_decay_product' must be <= 0 (or -inf), got {log_decay} (corrupt file).")
    for p, averaged, param_dtype in zip(paths, fields["averaged"], fields["param_dtypes"]):
        dtype = tensors[f"ema/{p}"].dtype
        if averaged and (dtype not in _AVERAGED_DTYPES or param_dtype not in _AVERAGED_DTYPES):
            raise ValueError(
                f"{path}: leaf {p!r} is averaged, so its EMA and parameter must be floating or complex, "
                f"got {dtype} and {param_dtype} (corrupt file)."
            )
        if not averaged and dtype != param_dtype:
            raise ValueError(f"{path}: copied leaf {p!r} is {dtype} but its parameter dtype is {param_dtype} (corrupt file).")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and validate a state file: its header, every metadata field, and the tensors against them."""
    with open_file(path) as reader:
        meta = reader.header.funcema()
        if meta is None:
            raise ValueError(f"{path}: not a funcema state file (no {META_KEY!r} metadata).")
        if meta.data.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a funcema state file (format {meta.data.get('format')!r}).")
        version = meta.get("version")
        if not is_int(version) or not 1 <= version <= _VERSION:
            raise ValueError(f"{path}: state format version {version!r} is not one this funcema reads (1 to {_VERSION}).")
        fields = _parse_header(path, meta.data)
        paths = meta.data["paths"]
        expected = {f"ema/{p}" for p in paths} | {"step", "log_decay_product", "nonfinite_count"}
        if set(reader.header.entries) != expected:
            raise ValueError(f"{path}: the file's tensors do not match its header (corrupt file).")
        tensors = {name: reader.tensor(name) for name in reader.header.entries}
    _check_tensors(path, fields, paths, tensors)
    return meta.data, tensors
