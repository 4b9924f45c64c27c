"""Crash safety of the writers, and rejection of corrupt, truncated and pickle files.

A writer process is killed with SIGKILL at random points while it rewrites a ~16 MB file in a
loop (each write takes ~50 ms here, so kills land inside writes: the temporary files left behind
prove it). After every kill the file under the final name must be complete and equal to one of
the versions written (the last reported one, or the one whose rename had happened when the kill
landed), and neither ``fe.load`` nor the snapshot scanner may ever read a temporary file.

Writers are forked from the test process (torch already imported) instead of started as fresh
interpreters, so 2 x 25 kills fit in a few seconds.

Corrupt files (truncated at every structural boundary, random byte flips) must give a clear
``ValueError`` naming the file, from ``fe.load``, the snapshot reader/scanner and synthesis --
never an exception from a dependency. A pickle file renamed ``.safetensors`` is rejected without
being unpickled.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import random
import signal
import struct
import time
import warnings

import pytest
import torch

import funcema as fe
from funcema.posthoc import _files

KILLS = 25
NUMEL = 2_000_000  # two leaves of 8 MB in float32: 16 MB per file
GAMMA = 6.94
COUNTS: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


def _tensors(version: int) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((NUMEL,), float(version)), "b": torch.full((1000, 1000), float(version))}


def _write(kind: str, path: pathlib.Path, version: int) -> None:
    if kind == "save":
        fe.save(fe.init(_tensors(version), schedule=fe.schedules.constant(0.9)), path)
    else:
        _files.write_snapshot(
            path, _tensors(version), step=version, gamma=GAMMA, sigma_rel=fe.gamma_to_sigma_rel(GAMMA), every=1
        )


def _read_version(kind: str, path: pathlib.Path) -> int:
    """The version held by a complete file; fails on a mixed or partial one."""
    if kind == "save":
        values = list(fe.load(path, like=_tensors(0)).ema.values())
    else:
        info = _files.read_snapshot_info(path)
        values = [t for _, t in _files.iter_tensors(info)]
        assert info.step == int(values[0].flatten()[0])
    first = float(values[0].flatten()[0])
    for v in values:
        assert torch.all(v == first), f"{path} mixes versions"
    return int(first)


def _writer_child(kind: str, path: pathlib.Path, start: int, fd: int) -> None:
    """Runs in the forked child: write versions start, start+1, ... and report each completed one."""
    try:
        torch.set_num_threads(1)
        version = start
        while True:
            _write(kind, path, version)
            os.write(fd, f"{version}\n".encode())
            version += 1
    finally:
        os._exit(0)


@pytest.mark.parametrize("kind", ["save", "snapshot"])
def test_sigkill_mid_write_leaves_a_complete_file(kind, tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "ema.safetensors"
    _write(kind, path, 1)
    completed = 1  # the highest version whose write is known to be complete
    mid_write = 0
    seen_tmp: set[pathlib.Path] = set()
    for _ in range(KILLS):
        read_fd, write_fd = os.pipe()
        start = completed + 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read_fd)
            _writer_child(kind, path, start, write_fd)
        os.close(write_fd)
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(read_fd) as f:
            reported = [int(line) for line in f.read().split()]
        if reported:
            completed = max(reported)
        # A kill between os.replace and the report leaves the next version in place, complete.
        version = _read_version(kind, path)
        assert version in (completed, completed + 1), (version, completed)
        completed = version
        leftovers = {p for p in tmp_path.iterdir() if p.name.endswith(".tmp")} - seen_tmp
        if leftovers:  # this kill interrupted a write
            mid_write += 1
            seen_tmp |= leftovers
        _count(f"{kind}: kills")
        _count(f"{kind}: versions written", len(reported))
    _count(f"{kind}: kills that left a temporary file (mid-write)", mid_write)
    assert mid_write >= KILLS // 5, "the kills did not land inside writes; make the file larger"
    assert completed > KILLS // 2, "the writer made too little progress between kills"
    # Temporary files are never read back: fe.load reads only the name given, the scanner skips them.
    tmp_files = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert tmp_files
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "snapshot":
            infos = _files.scan_snapshots(tmp_path)
            assert [i.path for i in infos] == [path]
    for tmp in tmp_files:
        # a temporary file, even handed to fe.load directly, is never returned as a valid state
        # unless it is complete (a kill during fsync/rename leaves a complete one)
        try:
            _read_version(kind, tmp)
            _count(f"{kind}: complete temporary files")
        except ValueError as err:
            assert str(tmp) in str(err) or tmp.name in str(err)
            _count(f"{kind}: partial temporary files rejected")


# ---------------------------------------------------------------------------------------------
# Corrupt files


def _small_state() -> fe.EmaState:
    params = {
        "w": torch.arange(12.0).reshape(3, 4),
        "n": torch.tensor(7),
        "blocks": [torch.ones(5, dtype=torch.float16)],
    }
    state = fe.init(params, schedule=fe.schedules.warmup(), debias=True)
    return fe.update(state, params)


def _snapshot_dir(directory: pathlib.Path) -> list[pathlib.Path]:
    params = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    state = fe.posthoc.init(params, sigma_rels=(0.05, 0.10))
    files = []
    for step in range(1, 7):
        state = fe.posthoc.update(state, params)
        if step % 2 == 0:
            files += list(fe.posthoc.snapshot(state, directory) or [])
    return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")


def _boundaries(data: bytes) -> list[int]:
    (n,) = struct.unpack("<Q", data[:8])
    cuts = {0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1, (8 + n + len(data)) // 2}
    return sorted(c for c in cuts if 0 <= c < len(data))


def _check_value_error(fn, path: pathlib.Path) -> None:
    try:
        fn()
    except ValueError as err:
        assert str(path) in str(err) or path.name in str(err), f"message does not name the file: {err}"
    except Exception as err:  # pragma: no cover - the failure this test looks for
        pytest.fail(f"{type(err).__module__}.{type(err).__name__} instead of ValueError: {err}")
    else:
        pytest.fail(f"{path} was accepted")


def test_truncated_state_files(tmp_path):
    path = tmp_path / "ema.safetensors"
    state = _small_state()
    fe.save(state, path)
    data = path.read_bytes()
    for cut in _boundaries(data):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        _check_value_error(lambda b=bad: fe.load(b, like=state), bad)
        _count("truncated state files")


def test_truncated_snapshots(tmp_path):
    files = _snapshot_dir(tmp_path)
    assert files
    victim = files[-1]
    data = victim.read_bytes()
    for cut in _boundaries(data):
        victim.write_bytes(data[:cut])
        _check_value_error(lambda: _files.read_snapshot_info(victim), victim)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_value_error(lambda: fe.posthoc.synthesize(tmp_path, sigma_rel=0.08), victim)
        _count("truncated snapshots")
    victim.write_bytes(data)
    fe.posthoc.synthesize(tmp_path, sigma_rel=0.08)  # intact again: works


def _flip_outcomes(
    data: bytes, path: pathlib.Path, read, rng: random.Random, flips: int, known=(), known_unnamed: bool = False
) -> dict[str, int]:
    outcomes = {"accepted": 0, "ValueError": 0, "known bug": 0}
    (n,) = struct.unpack("<Q", data[:8])
    for i in range(flips):
        buf = bytearray(data)
        # half the flips hit the length prefix or the JSON header, half anywhere
        pos = rng.randrange(0, 8 + n) if i % 2 == 0 else rng.randrange(0, len(buf))
        buf[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(buf))
        try:
            read()
            outcomes["accepted"] += 1  # e.g. a flip in the tensor data or in the header padding
        except ValueError as err:
            if known_unnamed and path.name not in str(err):
                outcomes["known bug"] += 1  # see test_load_header_with_a_bad_schedule
                continue
            assert str(path) in str(err) or path.name in str(err), f"message does not name the file: {err}"
            outcomes["ValueError"] += 1
        except known:
            outcomes["known bug"] += 1  # see test_load_header_missing_a_key
        except Exception as err:
            pytest.fail(f"flip at byte {pos}: {type(err).__module__}.{type(err).__name__} instead of ValueError: {err}")
    return outcomes


def test_byte_flipped_state_files(tmp_path):
    path = tmp_path / "ema.safetensors"
    state = _small_state()
    fe.save(state, path)
    # KeyError is the known bug of test_load_header_missing_a_key (a flip in a header key name);
    # drop `known` once it is fixed.
    outcomes = _flip_outcomes(
        path.read_bytes(),
        path,
        lambda: fe.load(path, like=state),
        random.Random(7),
        300,
        known=(KeyError,),
        known_unnamed=True,
    )
    _count("byte-flipped state files", 300)
    _count("byte-flipped state files: ValueError", outcomes["ValueError"])
    _count("byte-flipped state files: KeyError or unnamed ValueError (known bugs)", outcomes["known bug"])
    assert outcomes["ValueError"] > 0


def test_byte_flipped_snapshots(tmp_path):
    files = _snapshot_dir(tmp_path)
    victim = files[-1]

    def read():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fe.posthoc.synthesize(tmp_path, sigma_rel=0.08)

    outcomes = _flip_outcomes(victim.read_bytes(), victim, read, random.Random(8), 200)
    _count("byte-flipped snapshots", 200)
    _count("byte-flipped snapshots: ValueError", outcomes["ValueError"])
    assert outcomes["ValueError"] > 0


@pytest.mark.parametrize(
    ("key", "damaged"),
    [
        ('"every"', '"evmry"'),  # a header field goes missing (e.g. one flipped byte in its name)
        ('"inv_gamma"', '"ilv_gamma"'),  # the schedule's fields are damaged
    ],
    ids=["missing-field", "bad-schedule"],
)
def test_load_damaged_header_names_the_file(tmp_path, key, damaged):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "ema.safetensors"
    state = _small_state()
    fe.save(state, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert key in metadata["funcema"]
    metadata["funcema"] = metadata["funcema"].replace(key, damaged)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="ema.safetensors"):
        fe.load(path, like=state)


# ---------------------------------------------------------------------------------------------
# Pickle is never executed


class _Payload:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_renamed_safetensors_is_rejected_without_unpickling(tmp_path):
    marker = tmp_path / "PWNED"
    state = _small_state()
    payload = {"w": torch.zeros(3), "evil": _Payload(marker)}
    for name, dump in [
        ("torch.safetensors", lambda p: torch.save(payload, p)),
        ("plain.safetensors", lambda p: p.write_bytes(pickle.dumps(payload))),
    ]:
        bad = tmp_path / name
        dump(bad)
        assert not marker.exists()
        _check_value_error(lambda b=bad: fe.load(b, like=state), bad)
        assert not marker.exists(), "fe.load executed a pickle payload"
        snapdir = tmp_path / f"snaps_{name}"
        snapdir.mkdir()
        _snapshot_dir(snapdir)
        (snapdir / name).write_bytes(bad.read_bytes())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_value_error(lambda d=snapdir: fe.posthoc.synthesize(d, sigma_rel=0.08), snapdir / name)
            _check_value_error(lambda d=snapdir: _files.scan_snapshots(d), snapdir / name)
        assert not marker.exists(), "the snapshot scanner executed a pickle payload"
        _count("pickle files rejected")


def test_zzz_report_counts():
    """Print the counts for docs/reliability.md (runs last in this file)."""
    print("\ncrash counts:", COUNTS)
