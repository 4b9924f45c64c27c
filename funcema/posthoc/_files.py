"""Snapshot files of post-hoc EMAs: the snapshot metadata schema on top of the safetensors layer.

A snapshot is a plain safetensors file (never pickle), written and read through `funcema._format`
(atomic writes, strict header checks). Tensors are keyed by their tree path string
(``"blocks.0.weight"``); the safetensors metadata holds one JSON object under ``"funcema"``::

    {"format": "funcema.posthoc.snapshot", "version": 1,
     "step": 123456, "gamma": 6.9372, "sigma_rel": 0.1, "every": 1, "dtype": "float32",
     "tree": {"paths": [...], "shapes": [[...], ...], "dtypes": ["float32", "int64", ...]},
     "tree_hash": "sha256:...",
     "set": {"id": "9f2c...", "index": 0, "size": 2}}

``tree.paths`` keeps the order of the tree (safetensors itself sorts its entries), and
``tree_hash`` digests the paths, shapes and dtype kinds (floating, complex, or the exact integer /
bool dtype), so snapshots of different trees are told apart without comparing the lists, while a
float16 and a float32 snapshot of the same tree still match. Every field is validated strictly (no
coercion; ``sigma_rel`` must agree with ``gamma``; ``dtype`` with the tree).

The K snapshots that [`funcema.posthoc.snapshot`][funcema.posthoc.snapshot] writes at one step form
a set: each carries the optional ``"set"`` field (a random id shared by the K files, its index, and
K). The scanner uses a set member only when all K members of its set are present, so a crash in the
middle of a snapshot (K files written one after the other) leaves that step out entirely, never a
part of it, and a rewrite of a step interrupted half-way never mixes the old and new versions.

Owns: the snapshot metadata schema, snapshot and set writing, and the scan of a directory.

Must not import: `_core`, `_io`, `nn` or the other `posthoc` modules; its bytes go through
`_format`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import pathlib
import secrets
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .._format import (
    META_KEY,
    ST_CODES,
    Fields,
    Header,
    dtype_from_name,
    dtype_name,
    is_int,
    is_temporary,
    open_file,
    read_header,
    write_safetensors,
)
from .._sigma import gamma_to_sigma_rel
from .._validate import finite_float, integer

__all__ = [
    "FORMAT",
    "RESULT_FORMAT",
    "VERSION",
    "NotASnapshotError",
    "SnapshotInfo",
    "Snapshots",
    "iter_tensors",
    "read_snapshot_info",
    "scan_snapshots",
    "snapshot_filename",
    "write_snapshot",
    "write_snapshot_set",
    "write_tensors",
]

#: Value of ``"format"`` in a snapshot's metadata.
FORMAT = "funcema.posthoc.snapshot"
#: Value of ``"format"`` in a file written by synthesis (not a snapshot; the scanner skips it).
RESULT_FORMAT = "funcema.posthoc.synthesized"
#: Current format version; readers accept the versions in ``_SUPPORTED_VERSIONS``.
VERSION = 1
_SUPPORTED_VERSIONS = frozenset({1})
# funcema files that may sit beside snapshots and are skipped, not errors
_OTHER_FORMATS = frozenset({RESULT_FORMAT, "funcema.state"})
_SUFFIX = ".safetensors"
_KEYS = {"format", "version", "step", "gamma", "sigma_rel", "every", "dtype", "tree", "tree_hash"}
_SIGMA_RTOL = 1e-6  # sigma_rel is written from the same gamma; this only absorbs the JSON round trip


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
        set_id: Id of the set of snapshots written together at this step, or None for a file
            written on its own by [`write_snapshot`][funcema.posthoc.write_snapshot].
        set_index: Index of this file in its set (0 when not in a set).
        set_size: Number of files in its set (1 when not in a set).
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
    set_id: str | None = None
    set_index: int = 0
    set_size: int = 1


class Snapshots(list[SnapshotInfo]):
    """The snapshots [`scan_snapshots`][funcema.posthoc.scan_snapshots] found, sorted by ``(step, gamma)``.

    A list of [`SnapshotInfo`][funcema.posthoc.SnapshotInfo] with one more attribute, ``skipped``:
    every file of the directory that was left out, with the reason, as ``(path, reason)`` pairs.
    """

    skipped: tuple[tuple[pathlib.Path, str], ...] = ()


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
            ``snapshot_filename(step, gamma)`` is created. An existing regular file is replaced
            (through a symlink, the file it points to).
        tensors: Leaves keyed by their tree path string, in tree order.
        step: The EMA's averaging step ``t >= 1`` (the time of its power profile).
        gamma: The EMA's exponent (``> -1/2``).
        sigma_rel: The EMA's relative width; must agree with ``gamma``.
        every: The EMA's update interval (``>= 1``).

    Returns:
        The path written.

    Raises:
        ValueError: On invalid arguments, naming the argument, or a target that is not a regular file.
        TypeError: If a value of ``tensors`` is not a tensor or a key not a string.
        OSError: If the file cannot be written (no partial file is left under the final name).
    """
    step, every, gamma_f, sigma_f = _check_power(step, every, gamma, sigma_rel)
    names, leaves = _check_tensors(tensors)
    target = pathlib.Path(path)
    if os.fspath(path) and target.is_dir():  # "" is refused by the writer, never read as "."
        target = target / snapshot_filename(step, gamma_f)
    meta = _snapshot_meta(names, leaves, step=step, gamma=gamma_f, sigma_rel=sigma_f, every=every)
    return _write(target, names, leaves, meta)


def write_snapshot_set(
    directory: str | os.PathLike[str],
    members: Sequence[tuple[str, Mapping[str, torch.Tensor], float, float]],
    *,
    step: int,
    every: int,
) -> list[pathlib.Path]:
    """Write the snapshots of one step as a set of K files, each atomically, that is used all or not at all.

    Args:
        directory: An existing directory.
        members: ``(file name, tensors, gamma, sigma_rel)`` of each EMA.
        step: The averaging step of all of them.
        every: Their update interval.

    Returns:
        The snapshot files, in the order of ``members``.
    """
    set_id = secrets.token_hex(8)
    files = []
    for index, (name, tensors, gamma, sigma_rel) in enumerate(members):  # every check before the first write
        step, every, gamma_f, sigma_f = _check_power(step, every, gamma, sigma_rel)
        names, leaves = _check_tensors(tensors)
        meta = _snapshot_meta(names, leaves, step=step, gamma=gamma_f, sigma_rel=sigma_f, every=every)
        meta["set"] = {"id": set_id, "index": index, "size": len(members)}
        files.append((pathlib.Path(directory) / name, names, leaves, meta))
    return [_write(*file) for file in files]


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], fields: Mapping[str, Any]) -> pathlib.Path:
    """Write `tensors` atomically, with `fields` and the tree's paths, shapes, dtypes and hash as metadata.

    For files other than snapshots (`fields["format"]` says which, e.g. `RESULT_FORMAT`): the
    snapshot scanner skips them.

    Raises:
        TypeError: If `tensors` is not a mapping from path strings to tensors.
        ValueError: If a tensor's dtype cannot be stored, or `path` is not a regular file.
        OSError: If the file cannot be written (no partial file is left under the final name).
    """
    names, leaves = _check_tensors(tensors)
    return _write(pathlib.Path(path), names, leaves, {**fields, **_tree_meta(names, leaves)})


def read_snapshot_info(path: str | os.PathLike[str]) -> SnapshotInfo:
    """Read a snapshot's header (metadata and tensor table) without loading its tensors.

    The header is checked against the file (the tensor table must cover the data exactly, so a
    truncated file is caught here) and every metadata field against the snapshot schema, with no
    coercion: a bool is not an int, a string is not a number; ``sigma_rel`` must agree with
    ``gamma`` and ``dtype`` with the tree. A FIFO or device is refused without blocking.

    Raises:
        NotASnapshotError: A valid safetensors file without funcema snapshot metadata.
        ValueError: A truncated or corrupt file, a special file, a field that breaks the schema,
            or an unsupported format version; the message names the file.
        OSError: If the file cannot be read (same errno; the message names the file).
    """
    header = read_header(path)
    return _snapshot_info(header, _funcema_fields(header, FORMAT))


def scan_snapshots(directory: str | os.PathLike[str], *, skip_invalid: bool = False) -> Snapshots:
    """Find the funcema snapshots in ``directory``, sorted by ``(step, gamma)``.

    Only the headers are read. Files that are not snapshots (other files, safetensors files
    without funcema metadata, synthesized results, state files, temporary files of writes in
    progress or interrupted) are skipped with a ``warnings.warn`` naming them; so are the members
    of an incomplete snapshot set (a snapshot interrupted by a crash, or a set some of whose files
    were removed: the whole set is left out, never a part of it). Subdirectories are skipped silently.

    Args:
        directory: The directory.
        skip_invalid: Skip files that claim to be funcema files but are corrupt or break the
            schema, instead of raising; each is listed, with the reason, in the result's ``skipped``.

    Returns:
        The snapshots, a list with a ``skipped`` attribute listing every file left out and why.

    Raises:
        FileNotFoundError: If ``directory`` does not exist.
        NotADirectoryError: If it is not a directory.
        ValueError: If it holds no snapshot, if a ``.safetensors`` file is truncated, corrupt or
            breaks the schema (naming the file; unless ``skip_invalid``), or if snapshots come from
            different trees or format versions (naming two files).
    """
    d = pathlib.Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"snapshot directory {str(d)!r} does not exist.")
    if not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is not a directory.")
    infos: list[SnapshotInfo] = []
    skipped: list[tuple[pathlib.Path, str]] = []
    for entry in sorted(d.iterdir()):
        found = _classify(entry, skip_invalid)
        if isinstance(found, SnapshotInfo):
            infos.append(found)
        elif found is not None:
            skipped.append((entry, found))
    infos = _complete_sets(infos, skipped)
    for path, reason in skipped:
        warnings.warn(f"ignoring {path}: {reason}.", stacklevel=2)
    if not infos:
        raise ValueError(f"no funcema snapshots (*.safetensors with funcema metadata) found in directory {str(d)!r}.")
    _check_same_tree(infos)
    result = Snapshots(sorted(infos, key=lambda i: (i.step, i.gamma, i.path.name)))
    result.skipped = tuple(skipped)
    return result


def iter_tensors(info: SnapshotInfo) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` of a snapshot in tree order, opening the file once.

    The file's header and metadata are checked against ``info`` first, so a file rewritten since
    it was scanned (another step, width, set or layout) is an error, never a mix of versions.

    Raises:
        ValueError: If the file changed or is corrupt; the message names the file.
    """
    with open_file(info.path) as reader:
        try:
            now = _snapshot_info(reader.header, _funcema_fields(reader.header, FORMAT))
        except NotASnapshotError:
            now = None
        if now != info:
            raise ValueError(f"snapshot {info.path} changed since it was scanned; scan the directory again.")
        for name in info.paths:
            yield name, reader.tensor(name)


# ---------------------------------------------------------------------------------------------
# Scanning


def _classify(entry: pathlib.Path, skip_invalid: bool) -> SnapshotInfo | str | None:
    """A snapshot, the reason to skip the file, or None (a directory)."""
    if entry.is_dir():
        return None
    if is_temporary(entry.name):
        return "a temporary file of a write in progress or interrupted (safe to delete if no write is running)"
    if not entry.name.endswith(_SUFFIX):
        return "not a funcema snapshot (.safetensors) file"
    try:
        header = read_header(entry)
        meta = header.funcema()
        if meta is None:
            return "not a snapshot: a safetensors file without funcema metadata"
        fmt = meta.get("format")
        if isinstance(fmt, str) and fmt in _OTHER_FORMATS:
            return f"not a snapshot: a funcema file of format {fmt!r}"
        return _snapshot_info(header, _funcema_fields(header, FORMAT))
    except (ValueError, OSError) as err:
        if not skip_invalid:
            raise
        return f"invalid: {err}"


def _complete_sets(infos: list[SnapshotInfo], skipped: list[tuple[pathlib.Path, str]]) -> list[SnapshotInfo]:
    """Keep the snapshots written on their own and the members of complete sets; skip the rest."""
    members: dict[str, list[SnapshotInfo]] = {}
    for info in infos:
        if info.set_id is not None:
            members.setdefault(info.set_id, []).append(info)
    complete = {set_id for set_id, found in members.items() if _is_complete(found)}
    kept = []
    for info in infos:
        if info.set_id is None or info.set_id in complete:
            kept.append(info)
        else:
            reason = f"part of an incomplete snapshot set of step {info.step} (a snapshot interrupted by a crash?)"
            skipped.append((info.path, reason))
    return kept


def _is_complete(members: list[SnapshotInfo]) -> bool:
    """All K members of one set: one step, one size K, the indices 0..K-1 once each."""
    sizes = {m.set_size for m in members}
    steps = {m.step for m in members}
    return len(sizes) == 1 and len(steps) == 1 and sorted(m.set_index for m in members) == list(range(sizes.pop()))


def _check_same_tree(infos: list[SnapshotInfo]) -> None:
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


# ---------------------------------------------------------------------------------------------
# The snapshot schema


def _check_version(path: object, version: object) -> int:
    if not is_int(version) or version not in _SUPPORTED_VERSIONS:
        raise ValueError(
            f"{path} has snapshot format version {version!r}; this funcema reads versions "
            f"{sorted(_SUPPORTED_VERSIONS)} (upgrade funcema to read newer snapshots)."
        )
    assert isinstance(version, int)
    return version


def _funcema_fields(header: Header, fmt: str) -> Fields:
    meta = header.funcema()
    if meta is None:
        raise NotASnapshotError(f"{header.path} is a safetensors file without funcema metadata.")
    found = meta.get("format")
    if found != fmt:
        if isinstance(found, str) and found in _OTHER_FORMATS:
            raise NotASnapshotError(f"{header.path} is a funcema file of format {found!r}, not a snapshot.")
        raise meta.error(f"field 'format' is {found!r}, which is no funcema format (corrupt file?)")
    return meta


def _snapshot_info(header: Header, meta: Fields) -> SnapshotInfo:
    """Validate a snapshot's metadata field by field and against its tensor table."""
    version = _check_version(header.path, meta.get("version"))
    meta.keys(_KEYS, {"set"})
    gamma = meta.as_float("gamma", above=-0.5)
    sigma_rel = meta.as_float("sigma_rel", above=0.0)
    if not math.isclose(sigma_rel, gamma_to_sigma_rel(gamma), rel_tol=_SIGMA_RTOL):
        raise meta.error(f"field 'sigma_rel' is {sigma_rel!r}, but gamma {gamma!r} gives {gamma_to_sigma_rel(gamma)!r}")
    paths, shapes, dtypes = _tree_fields(meta, header)
    dtype = meta.as_str("dtype")
    if dtype != _floating_dtype_of(dtypes):
        raise meta.error(
            f"field 'dtype' is {dtype!r}, but the tree's floating leaves are {_floating_dtype_of(dtypes)!r}"
        )
    if meta.as_str("tree_hash") != _layout_hash(paths, shapes, dtypes):
        raise meta.error("field 'tree_hash' does not match its tree; the file is corrupt")
    return SnapshotInfo(
        path=header.path,
        step=meta.as_int("step", minimum=1),
        gamma=gamma,
        sigma_rel=sigma_rel,
        every=meta.as_int("every", minimum=1),
        dtype=dtype,
        version=version,
        paths=paths,
        shapes=shapes,
        dtypes=dtypes,
        tree_hash=meta.data["tree_hash"],
        **_set_fields(meta),
    )


def _set_fields(meta: Fields) -> dict[str, Any]:
    if "set" not in meta.data:
        return {}
    member = meta.as_object("set")
    member.keys({"id", "index", "size"})
    size = member.as_int("size", minimum=1)
    index = member.as_int("index", minimum=0, maximum=size - 1)
    return {"set_id": member.as_str("id"), "set_index": index, "set_size": size}


def _tree_fields(meta: Fields, header: Header) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """The tree's paths, shapes and dtype names, checked against each other and the tensor table."""
    tree = meta.as_object("tree")
    tree.keys({"paths", "shapes", "dtypes"})
    paths = tuple(tree.as_list("paths", lambda p: isinstance(p, str) and p != "", "non-empty strings"))
    n = len(paths)
    shapes = tuple(
        tuple(s) for s in tree.as_list("shapes", lambda s: isinstance(s, list) and all(map(is_int, s)), "int lists", n)
    )
    dtypes = tuple(tree.as_list("dtypes", lambda d: isinstance(d, str) and d in _DTYPE_NAMES, "dtype names", n))
    if len(set(paths)) != n:
        raise tree.error("field 'paths' repeats a path")
    if set(header.entries) != set(paths):
        raise ValueError(f"{header.path}: the tensors in the file do not match the paths in its funcema metadata.")
    for name, shape, dtype in zip(paths, shapes, dtypes):
        entry = header.entries[name]
        if entry.shape != shape or entry.dtype != dtype_from_name(dtype):
            raise ValueError(
                f"{header.path}: tensor {name!r} does not match its shape or dtype in the funcema metadata."
            )
    return paths, shapes, dtypes


_DTYPE_NAMES = frozenset(dtype_name(d) for d in ST_CODES)


# ---------------------------------------------------------------------------------------------
# Writing helpers


def _as_int(name: str, value: object, *, minimum: int) -> int:
    """An int argument; a 0-d integer tensor (e.g. ``state.step``) is accepted too."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        value = int(value.item())
    return integer(name, value, minimum=minimum)


def _check_power(step: int, every: int, gamma: float, sigma_rel: float) -> tuple[int, int, float, float]:
    step = _as_int("step", step, minimum=1)
    every = _as_int("every", every, minimum=1)
    gamma_f = finite_float("gamma", gamma)
    sigma_f = finite_float("sigma_rel", sigma_rel)
    expected = gamma_to_sigma_rel(gamma_f)  # validates gamma > -1/2
    if not math.isclose(sigma_f, expected, rel_tol=_SIGMA_RTOL):
        raise ValueError(
            f"sigma_rel={sigma_rel!r} does not match gamma={gamma!r} (which gives sigma_rel={expected!r})."
        )
    return step, every, gamma_f, sigma_f


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
        if leaf.dtype not in ST_CODES:
            raise ValueError(
                f"tensors[{name!r}] has dtype {leaf.dtype}, which safetensors cannot store; "
                "cast it (e.g. complex128 -> complex64) before writing."
            )
        names.append(name)
        leaves.append(leaf)
    return names, leaves


def _snapshot_meta(names: list[str], leaves: list[torch.Tensor], **fields: Any) -> dict[str, Any]:
    tree = _tree_meta(names, leaves)
    dtype = _floating_dtype_of(tree["tree"]["dtypes"])
    return {"format": FORMAT, "version": VERSION, **fields, "dtype": dtype, **tree}


def _kind(name: str) -> str:
    dtype = dtype_from_name(name)
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return name


def _layout_hash(paths: Sequence[str], shapes: Sequence[Sequence[int]], dtypes: Sequence[str]) -> str:
    layout = [[p, list(s), _kind(d)] for p, s, d in zip(paths, shapes, dtypes)]
    digest = hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()
    return f"sha256:{digest}"


def _tree_meta(names: list[str], leaves: list[torch.Tensor]) -> dict[str, Any]:
    shapes = [list(leaf.shape) for leaf in leaves]
    dtypes = [dtype_name(leaf.dtype) for leaf in leaves]
    return {
        "tree": {"paths": names, "shapes": shapes, "dtypes": dtypes},
        "tree_hash": _layout_hash(names, shapes, dtypes),
    }


def _floating_dtype_of(dtypes: Sequence[str]) -> str:
    kinds = {d for d in dtypes if _kind(d) in ("floating", "complex")}
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


def _write(target: pathlib.Path, names: list[str], leaves: list[torch.Tensor], meta: dict[str, Any]) -> pathlib.Path:
    return write_safetensors(target, names, leaves, {META_KEY: json.dumps(meta, separators=(",", ":"))})
