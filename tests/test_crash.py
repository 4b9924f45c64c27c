"""Crash safety of the writers, and rejection of corrupt, truncated and pickle files.

A writer process is killed with SIGKILL at points the test chooses, not after wall-clock delays:
the forked writer reports on a pipe when it reaches a stage of the write (the header written,
each tensor written, before the data fsync, before the rename, after the rename but before the
directory fsync) and then blocks; the parent reads that report and kills it. Which version the
final name must hold after each kill is therefore known exactly: the previous one for every stage
before the rename, the new one after it. Neither ``fe.load`` nor the snapshot scanner may ever
read a temporary file.

Writers are forked from the test process (torch already imported) instead of started as fresh
interpreters, so the kills take well under a second each.

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
import select
import signal
import struct
import time
import warnings
from stat import S_ISDIR

import pytest
import torch

import funcema as fe
from funcema import _format as writer
from funcema.posthoc import _files

NUMEL = 1000
GAMMA = 6.94
COUNTS: dict[str, int] = {}
REPORT_TIMEOUT = 120.0  # seconds to wait for the child to reach its stage (a hang fails the test)


def _count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


def _tensors(version: int) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((NUMEL,), float(version)), "b": torch.full((10, 10), float(version))}


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


Stage = tuple[str, int]  # (what the writer just reached, which occurrence of it in this call)


def _file_stages(n_tensors: int, k: int = 1) -> list[Stage]:
    """The stages of the k-th file written by one call, in the order they happen."""
    tensors = [(f"tensor {i}", k) for i in range(n_tensors)]
    return [*([("header", k)] if n_tensors else []), *tensors, ("fsync", k), ("rename", k), ("renamed", k)]


def _stages(kind: str) -> list[Stage]:
    # fe.save writes the EMA leaves and step, log_decay_product, nonfinite_count
    return _file_stages(len(_tensors(0)) + (3 if kind == "save" else 0))


def _stop_at(stage: Stage, fd: int) -> None:
    """In the child: make the writer report ``stage`` on ``fd`` when it gets there, then block."""
    real_write_tensor, real_fsync, real_replace = writer._write_tensor, os.fsync, os.replace
    seen: dict[str, int] = {}
    tensor_index = [0]

    def reached(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        if (name, seen[name]) == stage:
            os.write(fd, f"{name} {seen[name]}\n".encode())
            while True:  # until the parent's signal; short sleeps because a signal that lands just
                time.sleep(0.05)  # before a sleep starts runs its Python handler only when the sleep ends

    def write_tensor(f, leaf):
        if tensor_index[0] == 0:
            f.flush()
            reached("header")
        real_write_tensor(f, leaf)
        f.flush()  # the bytes of every tensor written so far are in the file when the kill lands
        reached(f"tensor {tensor_index[0]}")
        tensor_index[0] += 1

    def fsync(fd_: int) -> None:
        if not S_ISDIR(os.fstat(fd_).st_mode):  # the data fsync, not the directory's
            tensor_index[0] = 0  # the next file starts with its header
            reached("fsync")
        real_fsync(fd_)

    def replace(src, dst) -> None:
        reached("rename")
        real_replace(src, dst)
        reached("renamed")

    writer._write_tensor = write_tensor
    os.fsync = fsync
    os.replace = replace


def _interrupt_at(write, stage: Stage, sig: int = signal.SIGKILL) -> None:
    """Fork a child running ``write()``, wait until it reports ``stage``, send it ``sig``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_fd)
            torch.set_num_threads(1)
            _stop_at(stage, write_fd)
            write()
        finally:
            os._exit(1)  # the writer finished without reaching its stage: the parent sees EOF
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], REPORT_TIMEOUT)
        report = os.read(read_fd, 100).decode().strip() if ready else "(timeout)"
    finally:
        os.kill(pid, sig)
        status = _reap(pid)
        os.close(read_fd)
    assert report == f"{stage[0]} {stage[1]}", f"the writer did not stop at {stage}: {report!r}"
    # SIGTERM ends the writer as it would have without funcema, after the cleanup
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig, status


def _reap(pid: int) -> int:
    """Wait for the child; one that outlives REPORT_TIMEOUT is killed and the test fails, never hangs."""
    deadline = time.monotonic() + REPORT_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the writer survived its signal")


def _temporaries(directory: pathlib.Path) -> set[pathlib.Path]:
    return {p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")}


def _check_temporary(kind: str, tmp: pathlib.Path) -> None:
    """A temporary file handed to a reader directly is a state only when complete, else a ValueError naming it."""
    try:
        _read_version(kind, tmp)
        _count(f"{kind}: complete temporary files (killed at fsync or rename)")
    except ValueError as err:
        assert str(tmp) in str(err) or tmp.name in str(err)
        _count(f"{kind}: partial temporary files, rejected naming the file")


@pytest.mark.parametrize("kind", ["save", "snapshot"])
def test_sigkill_mid_write_leaves_a_complete_file(kind, tmp_path):
    path = tmp_path / "ema.safetensors"
    _write(kind, path, 1)
    current = 1  # the version under the final name
    for _round in range(2):
        for stage in _stages(kind):
            before = _temporaries(tmp_path)
            new = current + 1
            _interrupt_at(lambda v=new: _write(kind, path, v), stage)
            renamed = stage[0] == "renamed"
            version = _read_version(kind, path)
            assert version == (new if renamed else current), (stage, version, current)
            current = version
            left = _temporaries(tmp_path) - before
            # before the rename the killed write leaves its temporary file; after it, none
            assert len(left) == (0 if renamed else 1), (stage, left)
            for tmp in left:
                _check_temporary(kind, tmp)
            _count(f"{kind}: kills")
        # the file is rewritten by an uninterrupted writer between the rounds
        current += 1
        _write(kind, path, current)
        assert _read_version(kind, path) == current
    if kind == "snapshot":  # the scanner never reads a temporary file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert [i.path for i in _files.scan_snapshots(tmp_path)] == [path]


def test_interrupted_writes_leave_at_most_one_temporary_file(tmp_path):
    """40 SIGKILLs and 10 SIGTERMs during fe.save and during posthoc.snapshot: <= 1 stale temporary each."""
    params = _tensors(0)
    writes = {
        "save": lambda v: fe.save(
            fe.init(_tensors(v), schedule=fe.schedules.constant(0.9)), tmp_path / "save" / "ema.safetensors"
        ),
        "posthoc.snapshot": lambda v: fe.posthoc.snapshot(
            fe.posthoc.update(fe.posthoc.init(params), _tensors(v)), tmp_path / "snap"
        ),
    }
    stages = {"save": _stages("save"), "posthoc.snapshot": [s for k in (1, 2) for s in _file_stages(2, k)]}
    for name, write in writes.items():
        directory = tmp_path / ("save" if name == "save" else "snap")
        write(0)
        peak = 0  # the most temporary files present after any interruption
        for i in range(50):
            stage = stages[name][i % len(stages[name])]
            term = i % 5 == 4  # every fifth interruption is a SIGTERM
            before = _temporaries(directory)
            _interrupt_at(lambda v=i + 1, w=write: w(v), stage, signal.SIGTERM if term else signal.SIGKILL)
            if term:  # SIGTERM removes the writer's own temporary file
                assert _temporaries(directory) <= before
            peak = max(peak, len(_temporaries(directory)))
        left = _temporaries(directory)
        _count(f"{name}: SIGKILL/SIGTERM interruptions", 50)
        _count(f"{name}: most temporary files present after an interruption", peak)
        _count(f"{name}: temporary files left after 50 interruptions", len(left))
        # each write removes the temporaries of dead writers first: only the last kill's can remain
        assert peak <= 1 and len(left) <= 1, (peak, left)


def _set_state(version: int) -> fe.posthoc.PosthocState:
    ph = fe.posthoc.init(_tensors(0), sigma_rels=(0.05, 0.10))
    return fe.posthoc.update(ph, _tensors(version))


def _scanned_sets(directory: pathlib.Path) -> dict[int, int]:
    """step -> version of every complete set; fails if a step mixes versions or misses a member."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            infos = _files.scan_snapshots(directory)
        except ValueError as err:
            assert "no funcema snapshots" in str(err)
            return {}
    by_step: dict[int, set[int]] = {}
    for info in infos:
        values = {float(t.flatten()[0]) for _, t in _files.iter_tensors(info)}
        assert len(values) == 1, f"{info.path} mixes versions"
        by_step.setdefault(info.step, set()).add(int(values.pop()))
    counts = {step: sum(i.step == step for i in infos) for step in by_step}
    assert all(len(v) == 1 for v in by_step.values()), f"a set mixes versions: {by_step}"
    assert all(c == 2 for c in counts.values()), f"an incomplete set was returned: {counts}"
    return {step: v.pop() for step, v in by_step.items()}


def test_a_snapshot_set_is_all_or_nothing(tmp_path):
    """SIGKILL at every stage of a K=2 snapshot: each step is all K files of one version, or absent."""
    stages = [s for k in (1, 2) for s in _file_stages(2, k)]  # the two members, one after the other
    expected: dict[int, int] = {}
    for step, stage in enumerate(stages, start=1):
        version = 100 + step
        state = _set_state(version)
        state = state._replace(emas=tuple(m._replace(step=torch.tensor(step)) for m in state.emas))
        _interrupt_at(lambda s=state: fe.posthoc.snapshot(s, tmp_path), stage)
        if stage == ("renamed", 2):  # the last member is in place: the set is complete
            expected[step] = version
        assert _scanned_sets(tmp_path) == expected, stage
        _count("posthoc.snapshot sets: kills", 1)
    # Rewriting a step that already has a complete set: killed after the first member was
    # replaced, the step is left out entirely (never old and new files together).
    done = max(expected)
    state = _set_state(999)
    state = state._replace(emas=tuple(m._replace(step=torch.tensor(done)) for m in state.emas))
    _interrupt_at(lambda: fe.posthoc.snapshot(state, tmp_path), ("renamed", 1))
    del expected[done]
    assert _scanned_sets(tmp_path) == expected
    fe.posthoc.snapshot(state, tmp_path)  # an uninterrupted rewrite makes the step whole again
    assert _scanned_sets(tmp_path) == {**expected, done: 999}


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


def _flip_outcomes(data: bytes, path: pathlib.Path, read, rng: random.Random, flips: int) -> dict[str, int]:
    outcomes = {"accepted": 0, "ValueError": 0}
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
            assert str(path) in str(err) or path.name in str(err), f"message does not name the file: {err}"
            outcomes["ValueError"] += 1
        except Exception as err:
            pytest.fail(f"flip at byte {pos}: {type(err).__module__}.{type(err).__name__} instead of ValueError: {err}")
    return outcomes


def test_byte_flipped_state_files(tmp_path):
    path = tmp_path / "ema.safetensors"
    state = _small_state()
    fe.save(state, path)
    outcomes = _flip_outcomes(path.read_bytes(), path, lambda: fe.load(path, like=state), random.Random(7), 300)
    _count("byte-flipped state files", 300)
    _count("byte-flipped state files: ValueError", outcomes["ValueError"])
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
