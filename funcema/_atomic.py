"""Atomic safetensors writes: a temporary file in the same directory, fsync, rename, fsync the directory.

A crash at any point leaves either the previous file or the new one under the final name, never a
partial file; leftover temporaries are named ``.<name>.<random>.tmp``, which no reader opens.
Tensors are streamed one at a time to the file, so writing needs no copy of the whole tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import struct
import sys
from collections.abc import Sequence
from typing import BinaryIO

import torch

__all__ = ["TMP_SUFFIX", "TO_ST", "write_safetensors", "fsync_directory"]

TMP_SUFFIX = ".tmp"

TO_ST: dict[torch.dtype, str] = {
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
        TO_ST[getattr(torch, _name)] = _code


def write_safetensors(
    target: pathlib.Path, names: Sequence[str], leaves: Sequence[torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write ``leaves`` under ``names`` to the safetensors file ``target``, atomically.

    Raises:
        ValueError: a leaf's dtype has no safetensors code.
        FileNotFoundError: the directory of ``target`` does not exist.
    """
    if sys.byteorder != "little":  # pragma: no cover - torch runs on little-endian hosts
        raise RuntimeError("funcema writes safetensors files on little-endian hosts only.")
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, leaf in zip(names, leaves):
        if leaf.dtype not in TO_ST:
            raise ValueError(f"leaf {name!r} has dtype {leaf.dtype}, which safetensors files cannot hold.")
        nbytes = leaf.numel() * leaf.element_size()
        header[name] = {"dtype": TO_ST[leaf.dtype], "shape": list(leaf.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8-byte alignment
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {str(directory)!r} does not exist.")
    tmp = directory / f".{target.name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    try:
        with open(tmp, "xb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for leaf in leaves:
                _write_tensor(f, leaf)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(directory)


def _write_tensor(f: BinaryIO, leaf: torch.Tensor) -> None:
    if leaf.numel() == 0:
        return
    data = leaf.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    f.write(data.view(torch.uint8).numpy().data)


def fsync_directory(directory: pathlib.Path) -> None:
    """Make the rename durable; a no-op where directories cannot be opened (Windows)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # pragma: no cover - Windows
        return
    fd = os.open(directory, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
