"""Snapshot files of post-hoc EMAs: safetensors with funcema metadata, written atomically.

A snapshot is a plain safetensors file (never pickle). Tensors are keyed by their tree path string
(``"blocks.0.weight"``); the safetensors metadata (a ``str -> str`` map) holds one JSON value under
the key ``"funcema"``::

    {"format": "funcema.posthoc.snapshot", "version": 1,
     "step": 123456, "gamma": 6.9372, "sigma_rel": 0.1, "every": 1, "dtype": "float32",
     "tree": {"paths": [...], "shapes": [[...], ...], "dtypes": ["float32", "int64", ...]},
     "tree_hash": "sha256:..."}

``tree.paths`` keeps the order of the tree (safetensors itself sorts its entries), and
``tree_hash`` digests the paths, shapes and dtype kinds (floating, complex, or the exact integer /
bool dtype), so snapshots of different trees are told apart without comparing the lists, while a
float16 and a float32 snapshot of the same tree still match.

Writes go to a hidden temporary file in the same directory (``.<name>.<random>.tmp``, which the
scanner never reads), are flushed and fsynced, renamed over the final name with ``os.replace``
and the directory is fsynced: after a crash there is either the complete file or none. Tensors are
streamed to the file one at a time (each copied to contiguous CPU memory on its own), so writing
an EMA held on an accelerator never needs a second full copy in host memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import pathlib
import struct
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from safetensors import safe_open

from .._atomic import TMP_SUFFIX as _TMP_SUFFIX
from .._atomic import TO_ST as _TO_ST
from .._atomic import write_safetensors
from .._sigma import gamma_to_sigma_rel
from .._validate import finite_float, integer

__all__ = [
    "FORMAT",
    "RESULT_FORMAT",
    "VERSION",
    "NotASnapshotError",
    "SnapshotInfo",
    "iter_tensors",
    "read_snapshot_info",
    "scan_snapshots",
    "snapshot_filename",
    "write_snapshot",
    "write_synthesized",
]

#: Value of ``"format"`` in a snapshot's metadata.
FORMAT = "funcema.posthoc.snapshot"
#: Value of ``"format"`` in a file written by synthesis (not a snapshot; the scanner skips it).
RESULT_FORMAT = "funcema.posthoc.synthesized"
#: Current format version; readers accept the versions in ``_SUPPORTED_VERSIONS``.
VERSION = 1
_SUPPORTED_VERSIONS = frozenset({1})
_META_KEY = "funcema"
_SUFFIX = ".safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

_FROM_ST = {code: dtype for dtype, code in _TO_ST.items()}


class NotASnapshotError(ValueError):
    """A readable safetensors file that is not a funcema snapshot (the scanner skips it)."""


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot's header says, read without loading its tensors.

    Attributes:
        path: The file.
        step: Time ``t`` of the power EMA at the snapshot.
        gamma: Exponent of the power EMA.
        sigma_rel: Relative width of the power EMA.
        every: The EMA's update interval (informational; it does not change the profile).
        dtype: Dtype of the floating leaves as stored (``"float32"``, ``"mixed"``, ``"none"``).
        version: Format version.
        paths: Leaf paths, in tree order.
        shapes: Leaf shapes.
        dtypes: Leaf dtypes as torch names (``"float32"``, ``"int64"``, ...).
        tree_hash: Digest of the tree layout (paths, shapes, dtype kinds).
    """

    path: pathlib.Path
    step: int
    gamma: float
    sigma_rel: float
    every: int
    dtype: str
    version: int
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    tree_hash: str


def snapshot_filename(step: int, index_or_gamma: int | float) -> str:
    """Return a readable file name for a snapshot, e.g. ``ema-g6.94-0000123456.safetensors``.

    Args:
        step: The snapshot time (zero-padded to 10 digits).
        index_or_gamma: An ``int`` index of the EMA (``ema-k0-...``) or its ``float`` gamma
            (``ema-g6.94-...``, two decimals; pass indices when gammas closer than 0.01 coexist).
            Synthesis reads the metadata, never the name.
    """
    step = _as_int("step", step, minimum=0)
    if isinstance(index_or_gamma, bool) or not isinstance(index_or_gamma, numbers.Real):
        raise TypeError(f"index_or_gamma must be an int or a float, got {type(index_or_gamma).__name__}.")
    if isinstance(index_or_gamma, numbers.Integral):
        tag = f"k{int(index_or_gamma)}"
    else:
        if not math.isfinite(float(index_or_gamma)):
            raise ValueError(f"index_or_gamma must be finite, got {index_or_gamma!r}.")
        tag = f"g{float(index_or_gamma):.2f}"
    return f"ema-{tag}-{step:010d}{_SUFFIX}"


def write_snapshot(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    step: int,
    gamma: float,
    sigma_rel: float,
    every: int,
) -> pathlib.Path:
    """Write one power EMA to a safetensors snapshot file, atomically.

    Tensors are written as given (the caller chooses their dtype); non-contiguous or non-CPU
    tensors are copied one at a time to contiguous CPU memory while streaming.

    Args:
        path: The file to write, or an existing directory in which a file named
            ``snapshot_filename(step, gamma)`` is created. An existing file is replaced.
        tensors: Leaves keyed by their tree path string, in tree order.
        step: The EMA's averaging step ``t >= 1`` (the time of its power profile).
        gamma: The EMA's exponent (``> -1/2``).
        sigma_rel: The EMA's relative width; must agree with ``gamma``.
        every: The EMA's update interval (``>= 1``).

    Returns:
        The path written.

    Raises:
        ValueError: On invalid arguments, naming the argument.
        TypeError: If a value of ``tensors`` is not a tensor or a key not a string.
        OSError: If the file cannot be written (no partial file is left under the final name).
    """
    step = _as_int("step", step, minimum=1)
    every = _as_int("every", every, minimum=1)
    gamma_f = finite_float("gamma", gamma)
    sigma_f = finite_float("sigma_rel", sigma_rel)
    expected = gamma_to_sigma_rel(gamma_f)  # validates gamma > -1/2
    if not math.isclose(sigma_f, expected, rel_tol=1e-6):
        raise ValueError(
            f"sigma_rel={sigma_rel!r} does not match gamma={gamma!r} (which gives sigma_rel={expected!r})."
        )
    names, leaves = _check_tensors(tensors)
    target = pathlib.Path(path)
    if target.is_dir():
        target = target / snapshot_filename(step, gamma_f)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "gamma": gamma_f,
        "sigma_rel": sigma_f,
        "every": every,
        "dtype": _floating_dtype(leaves),
        **_tree_meta(names, leaves),
    }
    _write_atomic(target, names, leaves, meta)
    return target


def write_synthesized(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    sigma_rel: float,
    gamma: float,
    step: int,
    error: float,
    cond: float,
    weights: list[float],
    snapshots: list[SnapshotInfo],
) -> pathlib.Path:
    """Write a synthesized EMA atomically, with the synthesis diagnostics in its metadata.

    The metadata's ``"format"`` is ``"funcema.posthoc.synthesized"`` (so the snapshot scanner
    skips these files) and it records ``sigma_rel``, ``gamma``, ``step``, ``error``, ``cond``,
    ``weights`` and ``snapshots`` (file name, step and gamma of each snapshot used).
    """
    names, leaves = _check_tensors(tensors)
    meta: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "version": VERSION,
        "sigma_rel": float(sigma_rel),
        "gamma": float(gamma),
        "step": int(step),
        "error": float(error),
        "cond": float(cond),
        "weights": [float(w) for w in weights],
        "snapshots": [{"file": s.path.name, "step": s.step, "gamma": s.gamma} for s in snapshots],
        **_tree_meta(names, leaves),
    }
    target = pathlib.Path(path)
    _write_atomic(target, names, leaves, meta)
    return target


def read_snapshot_info(path: str | os.PathLike[str]) -> SnapshotInfo:
    """Read a snapshot's header (metadata and tensor table) without loading its tensors.

    The header is checked against the file: the tensor table must cover the data exactly (a
    truncated file is caught here) and agree with the funcema metadata.

    Raises:
        NotASnapshotError: A valid safetensors file without funcema snapshot metadata.
        ValueError: A truncated or corrupt file, or an unsupported format version; the message
            names the file.
        OSError: If the file cannot be opened.
    """
    p = pathlib.Path(path)
    header, _ = _read_header(p)
    raw_meta = header.get("__metadata__") or {}
    if not isinstance(raw_meta, dict) or _META_KEY not in raw_meta:
        raise NotASnapshotError(f"{p} is a safetensors file without funcema metadata.")
    try:
        meta = json.loads(raw_meta[_META_KEY])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{p}: the funcema metadata is not valid JSON ({err}); the file is corrupt.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise NotASnapshotError(f"{p} is a funcema file of format {fmt!r}, not a snapshot.")
    version = meta.get("version")
    if version not in _SUPPORTED_VERSIONS:
        raise ValueError(
            f"{p} has snapshot format version {version!r}; this funcema reads versions "
            f"{sorted(_SUPPORTED_VERSIONS)} (upgrade funcema to read newer snapshots)."
        )
    try:
        tree = meta["tree"]
        paths = tuple(str(n) for n in tree["paths"])
        shapes = tuple(tuple(int(d) for d in s) for s in tree["shapes"])
        dtypes = tuple(str(d) for d in tree["dtypes"])
        info = SnapshotInfo(
            path=p,
            step=int(meta["step"]),
            gamma=float(meta["gamma"]),
            sigma_rel=float(meta["sigma_rel"]),
            every=int(meta["every"]),
            dtype=str(meta["dtype"]),
            version=int(version),
            paths=paths,
            shapes=shapes,
            dtypes=dtypes,
            tree_hash=str(meta["tree_hash"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{p}: the funcema metadata is incomplete or malformed ({err!r}); the file is corrupt."
        ) from None
    if not (len(paths) == len(shapes) == len(dtypes)):
        raise ValueError(f"{p}: the funcema metadata lists different numbers of paths, shapes and dtypes.")
    if info.step < 1 or not math.isfinite(info.gamma) or not info.gamma > -0.5:
        raise ValueError(f"{p}: the funcema metadata has an invalid step or gamma ({info.step}, {info.gamma}).")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(entries) != set(paths):
        raise ValueError(f"{p}: the tensors in the file do not match the paths in its funcema metadata.")
    for name, shape, dtype in zip(paths, shapes, dtypes):
        entry = entries[name]
        if tuple(entry["shape"]) != shape or _FROM_ST.get(entry["dtype"]) != _dtype_from_name(dtype):
            raise ValueError(f"{p}: tensor {name!r} does not match its shape or dtype in the funcema metadata.")
    if _layout_hash(paths, shapes, dtypes) != info.tree_hash:
        raise ValueError(f"{p}: the tree_hash in the funcema metadata does not match its tree; the file is corrupt.")
    return info


def scan_snapshots(directory: str | os.PathLike[str]) -> list[SnapshotInfo]:
    """Find the funcema snapshots in ``directory``, sorted by ``(step, gamma)``.

    Only the headers are read. Files that are not snapshots (other files, non-funcema
    safetensors, synthesized results, temporary files of writes in progress or interrupted) are
    skipped with a ``warnings.warn`` naming them; subdirectories are skipped silently.

    Raises:
        FileNotFoundError: If ``directory`` does not exist.
        NotADirectoryError: If it is not a directory.
        ValueError: If it holds no snapshot, if a ``.safetensors`` file is truncated or corrupt
            (naming the file), or if snapshots come from different trees or format versions
            (naming two files).
    """
    d = pathlib.Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"snapshot directory {str(d)!r} does not exist.")
    if not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is not a directory.")
    infos: list[SnapshotInfo] = []
    for entry in sorted(d.iterdir()):
        if entry.is_dir():
            continue
        name = entry.name
        if name.startswith(".") and name.endswith(_TMP_SUFFIX):
            warnings.warn(
                f"ignoring {entry}: a temporary file of a snapshot write in progress or interrupted "
                "(safe to delete if no write is running).",
                stacklevel=2,
            )
            continue
        if not name.endswith(_SUFFIX) or not entry.is_file():
            warnings.warn(f"ignoring {entry}: not a funcema snapshot (.safetensors) file.", stacklevel=2)
            continue
        try:
            infos.append(read_snapshot_info(entry))
        except NotASnapshotError as err:
            warnings.warn(f"ignoring {entry}: not a funcema snapshot ({err}).", stacklevel=2)
    if not infos:
        raise ValueError(f"no funcema snapshots (*.safetensors with funcema metadata) found in directory {str(d)!r}.")
    first = infos[0]
    for info in infos[1:]:
        if info.version != first.version:
            raise ValueError(
                f"snapshots of different format versions: {first.path.name} (version {first.version}) and "
                f"{info.path.name} (version {info.version}); keep one version per directory."
            )
        if info.tree_hash != first.tree_hash:
            raise ValueError(
                f"snapshots of different trees: {first.path.name} and {info.path.name} "
                f"({_tree_difference(first, info)}); keep the snapshots of one model per directory."
            )
    infos.sort(key=lambda i: (i.step, i.gamma, i.path.name))
    return infos


def iter_tensors(info: SnapshotInfo) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` of a snapshot in tree order, opening the file once.

    Each tensor is checked against the header read earlier (shape and dtype).

    Raises:
        ValueError: If the file changed or is corrupt; the message names the file.
    """
    try:
        handle = safe_open(str(info.path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"cannot read snapshot {info.path}: {err}") from None
    with handle as f:
        for name, shape, dtype in zip(info.paths, info.shapes, info.dtypes):
            try:
                tensor = f.get_tensor(name)
            except Exception as err:
                raise ValueError(f"cannot read tensor {name!r} of snapshot {info.path}: {err}") from None
            if tuple(tensor.shape) != shape or tensor.dtype != _dtype_from_name(dtype):
                raise ValueError(f"snapshot {info.path} changed since it was scanned (tensor {name!r}).")
            yield name, tensor


# ---------------------------------------------------------------------------------------------
# Internals


def _as_int(name: str, value: object, *, minimum: int) -> int:
    """An int argument; a 0-d integer tensor (e.g. ``state.step``) is accepted too."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = int(value.item())
    return integer(name, value, minimum=minimum)


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping from path strings to tensors, got {type(tensors).__name__}.")
    names: list[str] = []
    leaves: list[torch.Tensor] = []
    for name, leaf in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise TypeError(f"tensors keys must be non-empty path strings other than '__metadata__', got {name!r}.")
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"tensors[{name!r}] is a {type(leaf).__name__}, expected a torch.Tensor.")
        if leaf.dtype not in _TO_ST:
            raise ValueError(
                f"tensors[{name!r}] has dtype {leaf.dtype}, which safetensors cannot store; "
                "cast it (e.g. complex128 -> complex64) before writing."
            )
        names.append(name)
        leaves.append(leaf)
    return names, leaves


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype | None:
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _kind(dtype_name: str) -> str:
    dtype = _dtype_from_name(dtype_name)
    if dtype is None:
        return dtype_name
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return dtype_name


def _layout_hash(paths: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], dtypes: tuple[str, ...]) -> str:
    layout = [[p, list(s), _kind(d)] for p, s, d in zip(paths, shapes, dtypes)]
    digest = hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()
    return f"sha256:{digest}"


def _tree_meta(names: list[str], leaves: list[torch.Tensor]) -> dict[str, Any]:
    shapes = [list(leaf.shape) for leaf in leaves]
    dtypes = [_dtype_name(leaf.dtype) for leaf in leaves]
    return {
        "tree": {"paths": names, "shapes": shapes, "dtypes": dtypes},
        "tree_hash": _layout_hash(tuple(names), tuple(tuple(s) for s in shapes), tuple(dtypes)),
    }


def _floating_dtype(leaves: list[torch.Tensor]) -> str:
    kinds = {_dtype_name(x.dtype) for x in leaves if x.dtype.is_floating_point or x.dtype.is_complex}
    if not kinds:
        return "none"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _tree_difference(a: SnapshotInfo, b: SnapshotInfo) -> str:
    pa, pb = set(a.paths), set(b.paths)
    if pa != pb:
        only_a = sorted(pa - pb)[:3]
        only_b = sorted(pb - pa)[:3]
        return f"paths only in the first: {only_a}, only in the second: {only_b}"
    shape_b = dict(zip(b.paths, zip(b.shapes, b.dtypes)))
    for name, shape, dtype in zip(a.paths, a.shapes, a.dtypes):
        other_shape, other_dtype = shape_b[name]
        if other_shape != shape or _kind(other_dtype) != _kind(dtype):
            return (
                f"leaf {name!r} is {dtype}{list(shape)} in the first and {other_dtype}{list(other_shape)} in the second"
            )
    return "the leaves are in a different order"


def _read_header(path: pathlib.Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header; return it and the data offset."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes).")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path} is corrupt or not a safetensors file: its header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt or not a safetensors file: its header is not a JSON object.")
    data_len = size - 8 - n
    spans = []
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = (int(v) for v in entry["data_offsets"])
            dtype = _FROM_ST[entry["dtype"]]
            numel = math.prod(int(d) for d in entry["shape"])
            if end - begin != numel * dtype.itemsize:
                raise ValueError(name)
            spans.append((begin, end))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{path} is corrupt: its safetensors header has an invalid tensor entry.") from None
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise ValueError(f"{path} is corrupt: its tensors do not tile the data section.")
        pos = end
    if pos != data_len:
        raise ValueError(
            f"{path} is truncated or corrupt: its header describes {pos} bytes of tensor data, "
            f"the file holds {data_len}."
        )
    return header, 8 + n


def _write_atomic(target: pathlib.Path, names: list[str], leaves: list[torch.Tensor], meta: dict[str, Any]) -> None:
    write_safetensors(target, names, leaves, {_META_KEY: json.dumps(meta, separators=(",", ":"))})
