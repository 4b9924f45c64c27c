r"""The one safetensors layer: atomic writer, strict header reader, dtype names, metadata fields.

Owns: the byte format. `_io` (state files) and `posthoc._files` (snapshots) describe only their
own metadata schema on top of it.

Must not import: any funcema module but `_tree` (for `collector_paused`); it imports torch, numpy
and the standard library.

Writing. A file is written to a temporary file in its directory, streamed leaf by leaf, fsynced,
renamed over the final name and the directory fsynced, so after a crash the final name holds the
old file or the new one, never a partial one (the way git and SQLite commit). The rules around it:

- only a regular file is replaced: a directory, FIFO, socket or device under the target name is
  refused with a clear error and nothing is touched;
- a symlink is kept: the file it points to is replaced, atomically, in *that* file's directory;
- temporary files are named `.funcema-<host>-<pid>-<random>.tmp` (short, so any name the file
  system allows can be written; the host is an 8-hex-digit digest of the host name). Each write
  first removes the temporaries that dead writers of this host left in its directory;
- while a write runs in the main thread, SIGTERM removes its temporary file and is then delivered
  to the previous handler (the default one ends the process, as it would have).

Reading. A file is opened without blocking and refused unless it is a regular file; its header is
parsed with a depth limit, the caller's check of the funcema metadata (if any) runs, and the header
is checked entry by entry (known dtype, non-negative int shape, offsets that tile the data section
exactly) before any tensor is read, and the tensors are read from the same open file, so a
concurrent rewrite can never mix two versions. Every failure is a
`ValueError` naming the file, or an `OSError` (same errno) naming the file and what happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import pathlib
import re
import secrets
import signal
import socket
import stat
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch

from ._tree import collector_paused

__all__ = [
    "MAX_DEPTH",
    "DIGEST_KEY",
    "META_KEY",
    "ST_CODES",
    "TMP_SUFFIX",
    "Entry",
    "Fields",
    "Header",
    "MetadataCheck",
    "Reader",
    "check_target",
    "dtype_from_name",
    "dtype_name",
    "fsync_directory",
    "funcema_metadata",
    "is_int",
    "metadata_digest",
    "is_temporary",
    "open_file",
    "os_error",
    "parse_json",
    "read_header",
    "remove_stale_temporaries",
    "write_safetensors",
]

#: Key of the funcema JSON in a safetensors file's ``__metadata__``.
META_KEY = "funcema"
#: Key of the SHA-256 digest of the funcema JSON (checked when present; funcema always writes it).
DIGEST_KEY = "funcema.sha256"
#: Deepest JSON nesting accepted in a header or in funcema's metadata (funcema writes at most 4).
MAX_DEPTH = 8
#: Largest integer accepted in a metadata field (int64).
MAX_INT = 2**63 - 1
#: Largest header accepted (safetensors' own limit).
MAX_HEADER = 100_000_000
TMP_PREFIX = ".funcema-"
TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"\.funcema-([0-9a-f]{8})-([0-9]{1,10})-[0-9a-f]{8}\.tmp\Z")

ST_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):
        ST_CODES[getattr(torch, _name)] = _code
_FROM_CODE = {code: dtype for dtype, code in ST_CODES.items()}
_BY_NAME = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


# ---------------------------------------------------------------------------------------------
# dtype names


def dtype_name(dtype: torch.dtype) -> str:
    """Return the name funcema files use for ``dtype``.

    Examples:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: object) -> torch.dtype:
    """Return the torch dtype named ``name`` (as written by [`dtype_name`][funcema._format.dtype_name]).

    Raises:
        ValueError: ``name`` is not the name of a torch dtype.

    Examples:
        >>> dtype_from_name("float16")
        torch.float16
    """
    dtype = _BY_NAME.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ValueError(f"unknown dtype {_short_repr(name)}")
    return dtype


# ---------------------------------------------------------------------------------------------
# Errors and JSON


def os_error(err: OSError, doing: str, path: object) -> OSError:
    """Return ``err`` as an OSError of the same errno whose message names ``path`` and what failed.

    Examples:
        >>> os_error(PermissionError(13, "Permission denied"), "read", "a.safetensors")
        PermissionError(13, 'cannot read a.safetensors: Permission denied')
    """
    if err.errno is None:
        return OSError(f"cannot {doing} {path}: {err}")
    return OSError(err.errno, f"cannot {doing} {path}: {err.strerror or os.strerror(err.errno)}")


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a JSON object repeats a key")
    return result


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPENS, _CLOSES = np.frombuffer(b"[{", dtype=np.uint8), np.frombuffer(b"]}", dtype=np.uint8)
_QUOTE, _BACKSLASH, _NEWLINE = ord('"'), ord("\\"), ord("\n")


def _nesting(raw: str | bytes) -> int:
    """Nesting depth of JSON text, read from its brackets outside strings, before parsing it.

    Checked before `json.loads`, so a deep document is refused without recursing into it.
    `_fast_nesting` reads it in a few vectorised passes (100,000 header entries in tens of
    milliseconds); text it does not model (only invalid JSON) is read by the string regex.
    """
    text = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    depth = _fast_nesting(np.frombuffer(text, dtype=np.uint8))
    if depth is None:
        codes = np.frombuffer(_JSON_STRING.sub(b"", text), dtype=np.uint8)
        delta = np.isin(codes, _OPENS).astype(np.int64) - np.isin(codes, _CLOSES)
        depth = int(delta.cumsum().max(initial=0))
    return depth


def _fast_nesting(codes: np.ndarray) -> int | None:
    """`_nesting` from the positions of quotes, backslashes and brackets alone, or None.

    A quote closes or opens a string unless an odd run of backslashes precedes it; the depth is
    the running count of brackets outside strings. This is the string regex's reading exactly
    when every backslash is inside a string and escapes no newline, and no string is left
    open; anything else (never valid JSON) gives None.
    """
    quotes = codes == _QUOTE
    slashes = np.flatnonzero(codes == _BACKSLASH)
    if slashes.size:
        starts = np.flatnonzero(np.diff(slashes, prepend=-2) != 1)  # runs of adjacent backslashes
        ends = np.append(starts[1:], slashes.size) - 1
        after = slashes[ends] + 1
        if after[-1] == codes.size or np.any(codes[after] == _NEWLINE):
            return None
        quotes[after[(ends - starts) % 2 == 0]] = False  # a quote after an odd run is escaped
    opens = (codes == _OPENS[0]) | (codes == _OPENS[1])
    closes = (codes == _CLOSES[0]) | (codes == _CLOSES[1])
    where = np.flatnonzero(quotes | opens | closes | (codes == _BACKSLASH))
    inside = np.bitwise_xor.accumulate(quotes[where].view(np.uint8)) == 1
    if inside[-1:].any() or np.any((codes[where] == _BACKSLASH) & ~inside):
        return None
    delta = (opens[where] & ~inside).view(np.int8) - (closes[where] & ~inside).view(np.int8)
    return int(np.cumsum(delta, dtype=np.int64).max(initial=0))


def parse_json(raw: str | bytes, what: str) -> Any:
    """Parse strict JSON (no NaN/Infinity, no repeated keys, at most `MAX_DEPTH` levels).

    Raises:
        ValueError: the text is not such JSON; the message starts with ``what``.

    Examples:
        >>> parse_json('{"a": [1, 2.5]}', "x")
        {'a': [1, 2.5]}
    """
    if _nesting(raw) > MAX_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    try:
        with collector_paused():
            return json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique_object)
    except RecursionError:  # pragma: no cover - refused by the nesting check above
        raise ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as err:  # also: an integer too long to convert
        raise ValueError(f"{what} is not valid JSON ({_short_repr(str(err), 120)})") from None


# ---------------------------------------------------------------------------------------------
# Metadata fields


class Fields:
    """Strict access to one JSON object of a file's metadata; every error is a ValueError naming the file.

    Nothing is coerced: a bool is not an int, a string is not a number, a float with no fraction
    is not an int; numbers must be finite and within the field's range.

    Examples:
        >>> f = Fields("ema.safetensors", {"every": 2, "gamma": 6.94, "debias": True}, "header")
        >>> f.as_int("every", minimum=1), f.as_float("gamma", above=-0.5), f.as_bool("debias")
        (2, 6.94, True)
        >>> f.as_int("gamma")
        Traceback (most recent call last):
        ...
        ValueError: ema.safetensors: header field 'gamma' must be an int >= 0, got 6.94
    """

    def __init__(self, path: object, data: object, what: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}")
        self.path, self.data, self.what = path, data, what

    def error(self, message: str) -> ValueError:
        """A ValueError naming the file and the metadata part."""
        return ValueError(f"{self.path}: {self.what} {message}")

    def keys(self, required: set[str], optional: set[str] | frozenset[str] = frozenset()) -> None:
        """Require exactly the ``required`` keys, plus any of ``optional``."""
        missing = sorted(required - self.data.keys())
        extra = sorted(self.data.keys() - required - optional)
        problems = ([f"lacks the fields {missing}"] if missing else []) + ([f"has unknown fields {extra}"] if extra else [])
        if problems:
            raise self.error(" and ".join(problems))

    def get(self, name: str) -> Any:
        """The raw value of field ``name``."""
        if name not in self.data:
            raise self.error(f"is missing the field {name!r}")
        return self.data[name]

    def check(self, label: str, ok: bool, expected: str, value: object) -> None:
        """Raise unless ``ok``: ``<what> field <label> must be <expected>, got <value>``."""
        if not ok:
            raise self.error(f"field {label} must be {expected}, got {_short_repr(value)}")

    def as_int(self, name: str, minimum: int = 0, maximum: int = MAX_INT) -> int:
        """An int field in ``[minimum, maximum]``."""
        value = self.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum
        self.check(repr(name), ok, f"an int >= {minimum}" + ("" if maximum == MAX_INT else f" and <= {maximum}"), value)
        assert isinstance(value, int)
        return value

    def as_float(self, name: str, *, above: float | None = None, at_most: float | None = None) -> float:
        """A finite number field (int or float, never bool or string), optionally ``> above``, ``<= at_most``."""
        value = self.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            result = float(value) if number else math.nan
        except OverflowError:
            result = math.nan
        ok = math.isfinite(result) and (above is None or result > above) and (at_most is None or result <= at_most)
        bounds = "".join([f" > {above}" if above is not None else "", f" <= {at_most}" if at_most is not None else ""])
        self.check(repr(name), ok, "a finite number" + bounds, value)
        return result

    def as_bool(self, name: str) -> bool:
        """A JSON ``true``/``false`` field."""
        value = self.get(name)
        self.check(repr(name), isinstance(value, bool), "true or false", value)
        return bool(value)

    def as_str(self, name: str, choices: Sequence[str] | None = None) -> str:
        """A string field, optionally one of ``choices``."""
        value = self.get(name)
        ok = isinstance(value, str) and (choices is None or value in choices)
        self.check(repr(name), ok, "a string" + (f" in {list(choices)}" if choices is not None else ""), value)
        return str(value)

    def as_list(self, name: str, item: Callable[[object], bool], expected: str, length: int | None = None) -> list[Any]:
        """A list field whose items all satisfy ``item`` (described by ``expected``), of ``length`` if given."""
        value = self.get(name)
        self.check(repr(name), isinstance(value, list), f"a list of {expected}", value)
        assert isinstance(value, list)
        if length is not None and len(value) != length:
            raise self.error(f"field {name!r} has {len(value)} entries, expected {length} (one per path)")
        if not all(map(item, value)):  # then name the first item that fails
            for i, v in enumerate(value):
                self.check(f"{name!r}[{i}]", item(v), expected, v)
        return value

    def as_object(self, name: str, what: str | None = None) -> Fields:
        """A nested JSON object field."""
        value = self.get(name)
        self.check(repr(name), isinstance(value, dict), "a JSON object", value)
        return Fields(self.path, value, what or f"{self.what} field {name!r}")


def is_int(value: object) -> bool:
    """True for a JSON integer in int64 range that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


# ---------------------------------------------------------------------------------------------
# Reading


class Entry(NamedTuple):
    """One tensor of a safetensors file, as its header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int  # absolute offset one past the last byte


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    Attributes:
        path: The file.
        entries: Tensor name -> entry, in the header's order.
        metadata: The ``__metadata__`` map (``{}`` when absent).
    """

    path: pathlib.Path
    entries: dict[str, Entry]
    metadata: dict[str, str]

    def funcema(self) -> Fields | None:
        """The funcema metadata of the file (see [`funcema_metadata`][funcema._format.funcema_metadata])."""
        return funcema_metadata(self.path, self.metadata)


MetadataCheck = Callable[[Fields | None], None]
"""A check of a file's funcema metadata, run by [`open_file`][funcema._format.open_file] before the tensor entries."""


def funcema_metadata(path: pathlib.Path, metadata: Mapping[str, str]) -> Fields | None:
    """The funcema metadata in a header's ``metadata`` (parsed, must be a JSON object), or None if it has none.

    When the file carries the digest of that metadata (every file funcema writes does), the
    metadata must match it: a flipped bit anywhere in it is caught, not read as another value.
    """
    if META_KEY not in metadata:
        return None
    text = metadata[META_KEY]
    digest = metadata.get(DIGEST_KEY)
    if digest is not None and digest != metadata_digest(text):
        raise ValueError(f"{path}: the funcema metadata does not match its digest; the file is corrupt.")
    data = parse_json(text, f"{path}: the funcema metadata")
    return Fields(path, data, "funcema metadata")


def _kind_of(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular(path: pathlib.Path) -> io.FileIO:
    """Open ``path`` for reading without blocking; refuse anything but a regular file."""
    try:
        mode = os.stat(path).st_mode  # a FIFO or device is refused before it is opened
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            mode = os.fstat(fd).st_mode  # what was opened, should the name have changed meanwhile
            if stat.S_ISREG(mode):
                return io.FileIO(fd, "rb")
            os.close(fd)
    except OSError as err:
        raise os_error(err, "read", path) from err
    raise ValueError(f"{path} is {_kind_of(mode)}, not a safetensors file; nothing was read from it.")


def _read_exact(f: io.FileIO, offset: int, buffer: memoryview, path: pathlib.Path) -> None:
    f.seek(offset)
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise ValueError(f"{path} is truncated: it changed or ended while being read.")
        done += n


def _entry(name: str, raw: object, path: pathlib.Path, base: int) -> Entry:
    """Validate one tensor entry of the header; offsets become absolute.

    A well-formed entry is accepted by a few direct type tests (a header can hold 100,000 of
    them); anything else goes through the field-by-field check, which names what is wrong.
    """
    try:
        code, shape, (begin, end) = raw["dtype"], raw["shape"], raw["data_offsets"]  # type: ignore[index]
        dtype = _FROM_CODE[code]
        well_formed = (
            len(raw) == 3  # type: ignore[arg-type]
            and type(shape) is list
            and all(type(d) is int and 0 <= d <= MAX_INT for d in shape)
            and type(begin) is int
            and type(end) is int
            and 0 <= begin <= end <= MAX_INT
            and end - begin == math.prod(shape) * dtype.itemsize
        )
    except (KeyError, TypeError, ValueError):
        well_formed = False
    if well_formed:
        return Entry(dtype, tuple(shape), base + begin, base + end)
    return _checked_entry(name, raw, path, base)


def _checked_entry(name: str, raw: object, path: pathlib.Path, base: int) -> Entry:
    """`_entry` field by field: the precise error for a damaged entry."""
    fields = Fields(path, raw, f"safetensors header entry {name!r}")
    fields.keys({"dtype", "shape", "data_offsets"})
    code = fields.as_str("dtype", choices=sorted(_FROM_CODE))
    shape = fields.as_list("shape", is_int, "ints >= 0")
    offsets = fields.as_list("data_offsets", is_int, "ints >= 0")
    if len(offsets) != 2 or offsets[0] > offsets[1]:
        raise fields.error(f"field 'data_offsets' must be [begin, end] with begin <= end, got {_short_repr(offsets)}")
    begin, end = offsets
    dtype = _FROM_CODE[code]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise fields.error(f"spans {end - begin} bytes, but {code}{shape} needs {math.prod(shape) * dtype.itemsize}")
    return Entry(dtype, tuple(shape), base + begin, base + end)


def _parse_header(f: io.FileIO, path: pathlib.Path, check_metadata: MetadataCheck | None) -> Header:
    try:
        with collector_paused():
            return _parse_header_unchecked(f, path, check_metadata)
    except OSError as err:
        raise os_error(err, "read", path) from err


def _parse_header_unchecked(f: io.FileIO, path: pathlib.Path, check_metadata: MetadataCheck | None) -> Header:
    size = os.fstat(f.fileno()).st_size
    prefix = bytearray(8)
    if size < 8:
        raise ValueError(f"{path} is truncated or not a safetensors file ({size} bytes).")
    _read_exact(f, 0, memoryview(prefix), path)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER or 8 + n > size:
        raise ValueError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes).")
    raw = bytearray(n)
    _read_exact(f, 8, memoryview(raw), path)
    fields = Fields(path, parse_json(bytes(raw), f"{path}: the safetensors header"), "safetensors header")
    metadata = fields.data.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fields.error("field '__metadata__' must map strings to strings")
    if check_metadata is not None:
        check_metadata(funcema_metadata(path, metadata))
    entries = {k: _entry(k, v, path, 8 + n) for k, v in fields.data.items() if k != "__metadata__"}
    position = 8 + n
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != position:
            raise ValueError(f"{path} is corrupt: its tensors do not tile the data section.")
        position = e.end
    if position != size:
        raise ValueError(
            f"{path} is truncated or corrupt: its header describes {position - 8 - n} bytes of tensor data, "
            f"the file holds {size - 8 - n}."
        )
    return Header(path, entries, metadata)


class Reader:
    """An open safetensors file whose header has been validated; tensors are read from the same file."""

    def __init__(self, f: io.FileIO, header: Header) -> None:
        self._file, self.header = f, header

    def tensor(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` into a new CPU tensor of the header's dtype and shape."""
        entry = self.header.entries[name]
        data = torch.empty(entry.end - entry.start, dtype=torch.uint8)
        try:
            _read_exact(self._file, entry.start, data.numpy().data, self.header.path)
        except OSError as err:
            raise os_error(err, "read", self.header.path) from err
        return data.view(entry.dtype).reshape(entry.shape)


@contextlib.contextmanager
def open_file(path: str | os.PathLike[str], check_metadata: MetadataCheck | None = None) -> Iterator[Reader]:
    """Open a safetensors file, refusing special files without blocking, and validate its header.

    ``check_metadata``, if given, receives the file's funcema metadata (None when it has none)
    as soon as the header is valid JSON, before its tensor entries are checked: a caller that
    can refuse the file from its metadata alone (e.g. it records other paths than wanted)
    refuses it without checking a hundred thousand entries first. It raises to refuse.

    Raises:
        ValueError: not a regular file, truncated, or not a valid safetensors file (names the file).
        OSError: the file cannot be read (same errno; names the file and says why).
    """
    if sys.byteorder != "little":  # pragma: no cover - torch runs on little-endian hosts
        raise RuntimeError("funcema reads safetensors files on little-endian hosts only.")
    p = pathlib.Path(path)
    with _open_regular(p) as f:
        yield Reader(f, _parse_header(f, p, check_metadata))


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of a safetensors file without reading its tensors (see `open_file`)."""
    with open_file(path) as reader:
        return reader.header


# ---------------------------------------------------------------------------------------------
# Writing


def check_target(path: str | os.PathLike[str]) -> pathlib.Path:
    """Validate the name of a file about to be written and return it as a path.

    Raises:
        TypeError: ``path`` is not a str or path-like.
        ValueError: ``path`` is empty, or names an existing FIFO, socket or device.
        IsADirectoryError: ``path`` names a directory (``"."``, ``"a/"``, an existing directory).
        OSError: ``path`` cannot be examined (e.g. a name too long), naming it and the cause.
    """
    try:
        raw = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}.") from None
    raw = os.fsdecode(raw)
    if not raw:
        raise ValueError("path is empty; give a file name such as 'ema.safetensors'.")
    p = pathlib.Path(raw)
    if raw.endswith(("/", os.sep)) or p.name in ("", ".", ".."):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {raw!r}: it names a directory, not a file")
    _refuse_special(p)
    return p


def _refuse_special(path: pathlib.Path) -> None:
    try:
        mode = os.stat(path).st_mode  # follows a symlink to what would be replaced
    except FileNotFoundError:
        return  # a new file (or a symlink whose target does not exist yet)
    except OSError as err:
        raise os_error(err, "write", path) from err
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"cannot write {path}: it exists and is {_kind_of(mode)}; funcema replaces only regular files "
            "and left it untouched."
        )


def is_temporary(name: str) -> bool:
    """True for the name of a temporary file of a write (in progress or interrupted)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


_HOST: list[str] = []


def _host_tag() -> str:
    if not _HOST:
        _HOST.append(hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8])
    return _HOST[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a live process of another user
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[pathlib.Path]:
    """Remove the temporary files that dead writers of this host left in ``directory``.

    A temporary file is stale when the writer pid in its name is not a live process here. Files of
    other hosts (a shared file system) and of this process are kept. Returns the files removed.
    """
    removed: list[pathlib.Path] = []
    if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) is no liveness test elsewhere
        return removed
    me, host = os.getpid(), _host_tag()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            match = _TMP_NAME.match(entry.name)
            if match and match[1] == host and int(match[2]) != me and not _alive(int(match[2])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(pathlib.Path(entry.path))
    return removed


class _Terminated(BaseException):
    """Raised by the SIGTERM handler inside a write, so that the write removes its temporary file."""


@contextlib.contextmanager
def _sigterm_removes_temporary(path: pathlib.Path) -> Iterator[None]:
    """While the body runs, SIGTERM unwinds it (removing the temporary file), then is re-delivered.

    Installed only in the main thread and only over a handler Python can restore; the previous
    handler is always restored and then receives the signal (the default one ends the process).
    """
    previous = signal.getsignal(signal.SIGTERM) if hasattr(signal, "SIGTERM") else None
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield
        return
    state = {"active": True, "received": False, "completed": False}

    def handler(signum: int, frame: object) -> None:
        state["received"] = True
        if state["active"]:
            raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
        state["completed"] = True
    except _Terminated:
        pass
    finally:
        state["active"] = False
        signal.signal(signal.SIGTERM, previous)
    if state["received"]:
        signal.raise_signal(signal.SIGTERM)
        if not state["completed"]:
            raise InterruptedError(errno.EINTR, f"the write of {path} was interrupted by SIGTERM; it left no file")


def metadata_digest(text: str) -> str:
    """The digest stored under `DIGEST_KEY` for the funcema metadata ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _header_blob(names: Sequence[str], leaves: Sequence[torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    if len(set(names)) != len(names) or "__metadata__" in names:
        raise ValueError("tensor names must be distinct and not '__metadata__'.")
    metadata = dict(metadata)
    if META_KEY in metadata:
        metadata[DIGEST_KEY] = metadata_digest(metadata[META_KEY])
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, leaf in zip(names, leaves):
        if leaf.dtype not in ST_CODES:
            raise ValueError(f"leaf {name!r} has dtype {leaf.dtype}, which safetensors files cannot hold.")
        nbytes = leaf.numel() * leaf.element_size()
        header[name] = {
            "dtype": ST_CODES[leaf.dtype],
            "shape": list(leaf.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return blob + b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment


def write_safetensors(
    target: str | os.PathLike[str], names: Sequence[str], leaves: Sequence[torch.Tensor], metadata: Mapping[str, str]
) -> pathlib.Path:
    """Write ``leaves`` under ``names`` to the safetensors file ``target``, atomically.

    See the module docstring for what happens to symlinks, special files and temporary files.

    Returns:
        ``target`` as a path.

    Raises:
        ValueError: a leaf's dtype has no safetensors code, or ``target`` is refused (see
            [`check_target`][funcema._format.check_target]).
        FileNotFoundError: the directory of ``target`` does not exist.
        OSError: the write failed (same errno; the message names ``target`` and the cause). The
            previous file, if any, is unchanged and the temporary file is removed.
    """
    if sys.byteorder != "little":  # pragma: no cover - torch runs on little-endian hosts
        raise RuntimeError("funcema writes safetensors files on little-endian hosts only.")
    path = check_target(target)
    blob = _header_blob(names, leaves, metadata)
    real = pathlib.Path(os.path.realpath(path)) if path.is_symlink() else path
    if not real.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"cannot write {path}: directory {str(real.parent)!r} does not exist")
    remove_stale_temporaries(real.parent)
    with _sigterm_removes_temporary(path):
        _write_and_rename(real, blob, leaves, path)
    return path


def _write_and_rename(real: pathlib.Path, blob: bytes, leaves: Sequence[torch.Tensor], path: pathlib.Path) -> None:
    tmp = real.parent / f"{TMP_PREFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as err:
        raise os_error(err, "write", path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for leaf in leaves:
                _write_tensor(f, leaf)
            f.flush()
            os.fsync(f.fileno())
        _refuse_special(real)  # checked again just before the rename
        os.replace(tmp, real)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise os_error(err, "write", path) from err
        raise
    fsync_directory(real.parent)


def _write_tensor(f: BinaryIO, leaf: torch.Tensor) -> None:
    if leaf.numel() == 0:
        return
    data = leaf.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    f.write(data.view(torch.uint8).numpy().data)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened (Windows)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # pragma: no cover - Windows
        return
    fd = os.open(directory, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
