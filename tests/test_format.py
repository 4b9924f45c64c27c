"""The safetensors layer: what saving may replace, temporary files, SIGTERM, OS errors, special files.

Each test is named after the defect it keeps fixed.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import pathlib
import re
import signal
import socket
import stat
import subprocess
import sys

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import example, given

import funcema as fe
from funcema import _format
from funcema.posthoc import read_snapshot_info, scan_snapshots, write_snapshot

G = 6.94


def _state(value: float = 1.0) -> fe.EmaState:
    return fe.init({"w": torch.full((3,), value)})


@contextlib.contextmanager
def _no_hang(seconds: int = 20):
    """Turn a read that blocks (a FIFO opened for reading) into a test failure instead of a hang."""

    def fail(signum, frame):
        raise TimeoutError("the call blocked")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _device_node(path: pathlib.Path) -> None:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # the numbers of /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs root (CAP_MKNOD)")


def _socket(path: pathlib.Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


# ---------------------------------------------------------------------------------------------
# What saving may replace


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_save_never_replaces_a_special_file(tmp_path, kind):
    target = tmp_path / "ema.safetensors"
    {"fifo": os.mkfifo, "device": _device_node, "socket": _socket}[kind](target)
    before = os.lstat(target)
    with pytest.raises(ValueError, match=r"ema\.safetensors: it exists and is a .* left it untouched"):
        fe.save(_state(), target)
    with pytest.raises(ValueError, match="left it untouched"):
        write_snapshot(target, {"w": torch.ones(2)}, step=1, gamma=G, sigma_rel=fe.gamma_to_sigma_rel(G), every=1)
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors"]  # no temporary left either


def test_save_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    target = real_dir / "real.safetensors"
    fe.save(_state(1.0), target)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    assert fe.save(_state(2.0), link) == link
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert torch.equal(fe.load(target, like=_state()).ema["w"], torch.full((3,), 2.0))
    # a dangling link: the file it names is created, in its own directory
    dangling = tmp_path / "next.safetensors"
    dangling.symlink_to(real_dir / "new.safetensors")
    fe.save(_state(3.0), dangling)
    assert dangling.is_symlink() and (real_dir / "new.safetensors").is_file()
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("", ValueError, "path is empty"),
        (".", IsADirectoryError, "names a directory"),
        ("{tmp}/", IsADirectoryError, "names a directory"),
        ("{tmp}", IsADirectoryError, "is a directory"),
        ("{tmp}/..", IsADirectoryError, "names a directory"),
    ],
)
def test_empty_dot_and_directory_targets_give_a_clear_error(tmp_path, path, error, match):
    path = path.format(tmp=tmp_path)
    with pytest.raises(error, match=match):
        fe.save(_state(), path)
    assert list(tmp_path.iterdir()) == []


def test_a_255_byte_file_name_can_be_saved(tmp_path):
    name = "e" * (255 - len(".safetensors")) + ".safetensors"
    assert len(name.encode()) == 255
    fe.save(_state(), tmp_path / name)
    assert torch.equal(fe.load(tmp_path / name, like=_state()).ema["w"], torch.ones(3))
    with pytest.raises(OSError, match="File name too long") as info:
        fe.save(_state(), tmp_path / ("x" + name))
    assert info.value.errno == errno.ENAMETOOLONG and name[:40] in str(info.value)


# ---------------------------------------------------------------------------------------------
# Temporary files


def _temporaries(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if _format.is_temporary(p.name))


def test_temporary_names_carry_the_writer_pid_and_dead_writers_temporaries_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited (reaped by subprocess.run)
    host = _format._host_tag()
    stale = tmp_path / f".funcema-{host}-{dead_pid}-0123abcd.tmp"
    live = tmp_path / f".funcema-{host}-{os.getppid()}-0123abcd.tmp"  # the test runner's parent: alive
    other_host = tmp_path / f".funcema-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead_pid}-0123abcd.tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    fe.save(_state(), tmp_path / "ema.safetensors")
    assert _temporaries(tmp_path) == sorted([live.name, other_host.name])


def test_sigterm_during_a_write_removes_its_temporary_and_reaches_the_previous_handler(tmp_path, monkeypatch):
    path = tmp_path / "ema.safetensors"
    fe.save(_state(1.0), path)
    received = []

    def handler(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    real_write_tensor = _format._write_tensor

    def write_tensor(f, leaf):
        real_write_tensor(f, leaf)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the write

    monkeypatch.setattr(_format, "_write_tensor", write_tensor)
    try:
        with pytest.raises(InterruptedError, match="interrupted by SIGTERM"):
            fe.save(_state(2.0), path)
        assert received == [signal.SIGTERM]  # delivered once, after the cleanup
        assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _temporaries(tmp_path) == []
    assert torch.equal(fe.load(path, like=_state()).ema["w"], torch.ones(3))  # the old file, intact


# ---------------------------------------------------------------------------------------------
# OS errors say what happened and name the file


def test_enospc_names_the_file_and_what_happened(tmp_path, monkeypatch):
    path = fe.save(_state(1.0), tmp_path / "ema.safetensors")

    def full(f, leaf):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_format, "_write_tensor", full)
    with pytest.raises(OSError, match=r"cannot write .*ema\.safetensors: No space left on device") as info:
        fe.save(_state(2.0), path)
    assert info.value.errno == errno.ENOSPC
    assert _temporaries(tmp_path) == []


def test_a_permission_error_is_not_reported_as_a_missing_file(tmp_path, monkeypatch):
    path = fe.save(_state(), tmp_path / "ema.safetensors")
    real_open = os.open

    def denied(p, flags, *args, **kwargs):
        if str(p) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    for read in (lambda: fe.load(path, like=_state()), lambda: _format.read_header(path)):
        with pytest.raises(PermissionError, match=r"cannot read .*ema\.safetensors: Permission denied") as info:
            read()
        assert "No such file" not in str(info.value)


def test_a_missing_file_says_so_and_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot read .*missing\.safetensors: No such file"):
        fe.load(tmp_path / "missing.safetensors", like=_state())


# ---------------------------------------------------------------------------------------------
# Special files are refused by every reader without blocking


def test_readers_refuse_a_fifo_without_blocking(tmp_path):
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    write_snapshot(snaps, {"w": torch.ones(2)}, step=1, gamma=G, sigma_rel=fe.gamma_to_sigma_rel(G), every=1)
    fifo = snaps / "ema-fifo.safetensors"
    os.mkfifo(fifo)
    with _no_hang():
        for read in (
            lambda: fe.load(fifo, like=_state()),
            lambda: read_snapshot_info(fifo),
            lambda: scan_snapshots(snaps),
            lambda: fe.posthoc.synthesize(snaps, sigma_rel=0.1),
        ):
            with pytest.raises(ValueError, match=r"ema-fifo\.safetensors is a FIFO, not a safetensors file"):
                read()


def test_deeply_nested_json_is_a_value_error_not_a_recursion_error():
    for depth in (_format.MAX_DEPTH + 1, 100_000):
        raw = "[" * depth + "]" * depth
        with pytest.raises(ValueError, match=f"nested more than {_format.MAX_DEPTH} levels"):
            _format.parse_json(raw, "x")


@pytest.mark.parametrize("raw", ["NaN", "[Infinity]", '{"a": -Infinity}', '{"a": 1, "a": 2}', "1" * 5000])
def test_json_is_strict(raw):
    with pytest.raises(ValueError, match="not valid JSON"):
        _format.parse_json(raw, "x")


def _depth_by_regex(text: str) -> int:
    """The nesting depth of JSON text, read the plain way: brackets left once its strings are removed."""
    depth = deepest = 0
    for c in re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', "", text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(c, 0)
        deepest = max(deepest, depth)
    return deepest


@given(st.text(alphabet='"\\[]{}:a \n', max_size=24))
@example('"\\\\"[')  # an escaped backslash ends the string: the bracket is outside
@example('"\\"["')  # an escaped quote does not: the bracket is inside
@example('"\\\n"[')  # a backslash before a newline: no string there for the regex
@example('\\"[')  # a backslash outside strings (not JSON)
@example('"[')  # a string left open (not JSON)
def test_the_vectorised_nesting_scan_reads_brackets_as_the_string_regex_does(text):
    fast = _format._fast_nesting(np.frombuffer(text.encode(), dtype=np.uint8))
    assert fast is None or fast == _depth_by_regex(text)  # None: text it leaves to the regex
    assert _format._nesting(text) == _depth_by_regex(text)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='a"\\[]{}:\n\u00e9'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='k"\\[{', max_size=3), inner, max_size=3),
    max_leaves=12,
)


@given(_JSON)
def test_valid_json_always_takes_the_vectorised_scan(value):
    text = json.dumps(value, ensure_ascii=False)
    assert _format._fast_nesting(np.frombuffer(text.encode(), dtype=np.uint8)) == _depth_by_regex(text)


def test_a_refused_header_leaves_the_garbage_collector_as_it_was(tmp_path):
    path = fe.save(_state(), tmp_path / "ema.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:-1])
    assert gc.isenabled()
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            _format.read_header(path)
            with pytest.raises(ValueError, match="truncated"):
                _format.read_header(bad)
            with pytest.raises(ValueError, match="not valid JSON"):
                _format.parse_json('{"a": 1, "a": 2}', "x")
            assert gc.isenabled() is enabled
        finally:
            gc.enable()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"a": 1}, r"^f\.safetensors: the header lacks the fields \['b'\]$"),
        ({"a": 1, "b": 2, "c": 3}, r"^f\.safetensors: the header has unknown fields \['c'\]$"),
        ({"a": 1, "c": 3}, r"^f\.safetensors: the header lacks the fields \['b'\] and has unknown fields \['c'\]$"),
    ],
)
def test_a_field_set_error_names_only_what_is_wrong(data, message):
    fields = _format.Fields("f.safetensors", data, "the header")
    with pytest.raises(ValueError, match=message):
        fields.keys({"a", "b"})
    fields.keys({"a"}, optional={"b", "c"})  # what is allowed passes
