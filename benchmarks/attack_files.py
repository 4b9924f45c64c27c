"""Attack funcema's file handling as a careless or hostile user would, and count the outcomes.

Every case is a call of the public API (`fe.save`, `fe.load`, `posthoc.read_snapshot_info`,
`posthoc.scan_snapshots`, `posthoc.synthesize`, `posthoc.snapshot`, the `funcema` command line) on
a damaged file, an odd path or a special file, so the script runs against any funcema version on
the path (to compare one commit with another). Each outcome is one of:

- **clear**: the call raised a `ValueError` or an `OSError` whose message names the file (for a
  command-line case: exit status 2, one line on stderr, no traceback);
- **correct**: a legal input (a symlink, a 255-byte name) did what it should;
- **raw**: any other exception, or a message that does not name the file;
- **hang**: the call was still running after 20 s (stopped by SIGALRM);
- **silent**: the damaged input was accepted (or the special file replaced) without an error.

    PYTHONPATH=. python benchmarks/attack_files.py   # the markdown table of docs/reliability.md

Run as root on Linux to include the device-node and permission cases (a forked child drops to
uid 65534 to meet a real EACCES); it takes about a minute.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import random
import resource
import signal
import socket
import stat
import struct
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open

import funcema as fe
from benchmarks.attack_report import print_table
from funcema.posthoc import read_snapshot_info, synthesize, write_snapshot
from tests.conftest import rewrite_safetensors  # the test suite's file-damaging helper

G = 6.94
TIMEOUT = 20
RESULTS: dict[str, Counter[str]] = {}


class Hang(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang


def judge(
    cls: str, name: str, call: Callable[[], Any], expect_error: bool | None = True, check=None, must_say: str = ""
) -> str:
    """Run one case and record its outcome under ``cls``.

    ``expect_error``: True (the input is invalid), False (it is legal), None (either is right,
    e.g. a flipped bit that may or may not change anything). An error is clear when it is a
    ValueError or OSError whose message names ``name`` and contains ``must_say``.
    """
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT)
    detail = ""
    try:
        result = call()
        outcome = "silent" if expect_error else ("correct" if check is None or check(result) else "silent")
    except Hang:
        outcome = "hang"
    except (ValueError, OSError) as err:
        outcome = "clear" if expect_error is not False and name in str(err) and must_say in str(err) else "raw"
        detail = f"{type(err).__name__}: {err}"
    except Exception as err:
        outcome = "raw"
        detail = f"{type(err).__name__}: {err}"
    finally:
        signal.alarm(0)
    if outcome in ("raw", "hang", "silent") and os.environ.get("ATTACK_VERBOSE"):
        print(f"[{outcome}] {cls}: {name}: {detail[:300]}", file=sys.stderr)
    RESULTS.setdefault(cls, Counter())[outcome] += 1
    return outcome


def cli(argv: list[str]) -> int:
    """Run the command line; return 0 if it exited 2 with one line on stderr, else raise."""
    from funcema._cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:
            raise RuntimeError(f"the CLI raised {type(exc).__name__}") from None
    lines = err.getvalue().strip().splitlines()
    errors = [line for line in lines if not line.startswith("funcema: warning:")]
    if status == 0:
        return 0  # accepted
    if status != 2 or len(errors) != 1 or "Traceback" in err.getvalue():
        raise RuntimeError(f"exit {status}, {len(errors)} error lines")
    raise ValueError(errors[0])


# ---------------------------------------------------------------------------------------------
# Fixtures


def state_file(d: pathlib.Path) -> tuple[pathlib.Path, dict[str, torch.Tensor]]:
    params = {"w": torch.randn(3), "n": torch.tensor(4)}
    state = fe.update(fe.init(params, schedule=fe.schedules.warmup(), debias=True), params)
    return fe.save(state, d / "ema.safetensors"), params


def snapshot_dir(d: pathlib.Path) -> list[pathlib.Path]:
    d.mkdir(parents=True, exist_ok=True)
    for k in range(1, 7):
        write_snapshot(
            d, {"w": torch.full((3,), float(k)), "n": torch.tensor(k)}, step=10 * k, gamma=G,
            sigma_rel=fe.gamma_to_sigma_rel(G), every=1,
        )  # fmt: skip
    return sorted(d.glob("*.safetensors"))


# Options a version-1 state file may lack, being older than the option, and the value it then loads with.
LATER_OPTIONS = {"compensated": False, "kernel": "auto"}

# JSON values of the wrong type or out of range, and the fields each can break.
BAD_VALUES: list[Any] = [True, "1", 1.5, -1, 0, 2**64, 1e400, None, [], {}, [1]]


def bad_values_for(field: str, valid: Any) -> list[Any]:
    values = [v for v in BAD_VALUES if not (type(v) is type(valid) and v == valid)]
    if field in ("after", "seed"):  # 0 is legal there
        values = [v for v in values if not (type(v) is int and v == 0)]
    if field == "dtype":  # null is legal: the default dtype policy
        values = [v for v in values if v is not None] + ["int64", "float99"]
    return values


def structural(prefix: str) -> dict[str, str]:
    return {
        "not an object": "[1, 2]",
        "a string": '"x"',
        "nesting 50": '{"format": "' + prefix + '", "x": ' + "[" * 50 + "]" * 50 + "}",
        "nesting 100000": '{"format": "' + prefix + '", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "NaN literal": '{"format": "' + prefix + '", "version": NaN}',
        "invalid JSON": '{"format": ',
    }


# ---------------------------------------------------------------------------------------------
# Attack classes


def attack_save_targets(d: pathlib.Path) -> None:
    cls = "save: odd targets (special files, links, empty, directories, long names)"
    state = fe.init({"w": torch.ones(3)})
    for kind in ("fifo", "socket", "device"):
        target = d / f"{kind}.safetensors"
        try:
            if kind == "fifo":
                os.mkfifo(target)
            elif kind == "socket":
                s = socket.socket(socket.AF_UNIX)
                s.bind(str(target))
                s.close()
            else:
                os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            continue
        mode = os.lstat(target).st_mode
        outcome = judge(cls, target.name, lambda t=target: fe.save(state, t))
        if outcome != "silent" and os.lstat(target).st_mode != mode:
            RESULTS[cls][outcome] -= 1
            RESULTS[cls]["silent"] += 1  # an error, but the special file was replaced anyway
    real = d / "real.safetensors"
    fe.save(state, real)
    link = d / "link.safetensors"
    link.symlink_to(real)
    judge(cls, link.name, lambda: fe.save(state, link), expect_error=False, check=lambda _: link.is_symlink())
    for name in ("", ".", str(d), str(d) + "/"):
        judge(cls, name or "empty", lambda n=name: fe.save(state, n))
    long = d / ("e" * 243 + ".safetensors")
    judge(cls, long.name, lambda: fe.save(state, long), expect_error=False, check=lambda _: long.is_file())
    longer = d / ("e" * 244 + ".safetensors")
    judge(cls, longer.name[:40], lambda: fe.save(state, longer))


def attack_state_fields(d: pathlib.Path) -> None:
    cls = "load: state header fields (wrong type, range, missing, unknown, structure)"
    path, params = state_file(d)
    pristine = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["funcema"])
    cases: list[tuple[str, dict[str, Any]]] = []
    for field, valid in header.items():
        for bad in bad_values_for(field, valid):
            cases.append((f"{field}={bad!r}", dict(edit_meta=lambda m, f=field, b=bad: m.__setitem__(f, b))))
        if field not in LATER_OPTIONS:
            cases.append((f"missing {field}", dict(edit_meta=lambda m, f=field: m.pop(f))))
    cases.append(("unknown field", dict(edit_meta=lambda m: m.__setitem__("extra", 1))))
    cases += [(k, dict(raw_meta=v)) for k, v in structural("funcema.state").items()]
    for _label, damage in cases:
        path.write_bytes(pristine)
        rewrite_safetensors(path, **damage)
        judge(cls, path.name, lambda: fe.load(path, like=params))
    for field, default in LATER_OPTIONS.items():  # legal: a file written before the option existed
        path.write_bytes(pristine)
        rewrite_safetensors(path, edit_meta=lambda m, f=field: m.pop(f, None))
        check = lambda state, f=field, v=default: getattr(state.config, f) == v  # noqa: E731
        judge(cls, path.name, lambda: fe.load(path, like=params), expect_error=False, check=check)


def attack_state_tensors(d: pathlib.Path) -> None:
    cls = "load: tensors that contradict the header"
    path, params = state_file(d)
    pristine = path.read_bytes()
    f64 = torch.float64
    cases = {
        "log_decay_product": [torch.tensor(float("nan"), dtype=f64), torch.tensor(0.5, dtype=f64), torch.tensor(-1.0)],
        "step": [torch.tensor(-1), torch.tensor([1, 2]), torch.tensor(1.0), torch.tensor(True)],
        "nonfinite_count": [torch.tensor(-3), torch.zeros(1, dtype=torch.int64), torch.tensor(0.0)],
        "ema/w": [
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(3, dtype=torch.bool),
            torch.zeros(3).to(torch.float8_e4m3fn),
        ],
        "ema/n": [torch.tensor(4, dtype=torch.int32), torch.tensor(4.0)],
    }
    for name, values in cases.items():
        for value in values:
            path.write_bytes(pristine)
            rewrite_safetensors(path, edit_tensors=lambda t, n=name, v=value: t.__setitem__(n, v))
            judge(cls, path.name, lambda: fe.load(path, like=params))
    path.write_bytes(pristine)
    rewrite_safetensors(path, edit_meta=lambda m: m.__setitem__("averaged", ["no", "no"]))
    judge(cls, path.name, lambda: fe.load(path, like=params))


def attack_snapshot_fields(d: pathlib.Path) -> None:
    cls = "snapshots: metadata fields, through read_snapshot_info, synthesize and the CLI"
    files = snapshot_dir(d)
    victim = files[2]
    pristine = victim.read_bytes()
    with safe_open(str(victim), framework="pt") as f:
        header = json.loads(f.metadata()["funcema"])
    cases: list[dict[str, Any]] = []
    for field, valid in header.items():
        if field == "tree":
            continue  # its parts are attacked below
        cases += [dict(edit_meta=lambda m, f=field, b=b: m.__setitem__(f, b)) for b in bad_values_for(field, valid)]
        cases.append(dict(edit_meta=lambda m, f=field: m.pop(f)))
    for part in ("paths", "shapes", "dtypes"):
        cases += [dict(edit_meta=lambda m, p=part, b=b: m["tree"].__setitem__(p, b)) for b in BAD_VALUES]
    cases.append(dict(edit_meta=lambda m: m.__setitem__("sigma_rel", 0.2)))  # disagrees with gamma
    cases += [dict(raw_meta=v) for v in structural("funcema.posthoc.snapshot").values()]
    for damage in cases:
        victim.write_bytes(pristine)
        rewrite_safetensors(victim, **damage)
        judge(cls, victim.name, lambda: read_snapshot_info(victim))
        judge(cls, victim.name, lambda: synthesize(d, sigma_rel=0.08))
        judge(cls, victim.name, lambda: cli(["synthesize", str(d), "--sigma-rel", "0.08", "--out", str(d / "out")]))
    victim.write_bytes(pristine)


def attack_special_files(d: pathlib.Path) -> None:
    cls = "readers: special files (FIFO, device, socket, directory) given as a file"
    snaps = d / "snaps"
    snapshot_dir(snaps)
    params = {"w": torch.ones(3)}
    for kind in ("fifo", "device", "socket", "directory"):
        target = snaps / f"x-{kind}.safetensors"
        try:
            if kind == "fifo":
                os.mkfifo(target)
            elif kind == "device":
                os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: reads forever
            elif kind == "socket":
                s = socket.socket(socket.AF_UNIX)
                s.bind(str(target))
                s.close()
            else:
                target.mkdir()
        except PermissionError:
            continue
        readers = [lambda t=target: read_snapshot_info(t), lambda: synthesize(snaps, sigma_rel=0.08)]
        if kind != "directory":  # fe.load reads a directory as a sharded checkpoint
            readers.append(lambda t=target: fe.load(t, like=params))
        for read in readers:
            if kind == "directory" and read is readers[1]:
                continue  # subdirectories of a snapshot directory are skipped by design
            judge(cls, target.name, read)
        target.unlink() if kind != "directory" else target.rmdir()


def attack_truncation_and_flips(d: pathlib.Path) -> None:
    path, params = state_file(d)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    cuts = sorted({0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1})
    for cut in cuts:
        path.write_bytes(data[:cut])
        judge("load: truncated state files", path.name, lambda: fe.load(path, like=params))
    path.write_bytes(data)
    pristine = fe.load(path, like=params)
    rng = random.Random(7)
    cls = "load: one flipped bit in the length prefix or the header"

    def same(state: fe.EmaState) -> bool:  # an accepted flip that changed nothing the state holds
        return (
            state.config == pristine.config
            and all(torch.equal(a, b) for a, b in zip(state[:4], pristine[:4]) if isinstance(a, torch.Tensor))
            and all(torch.equal(state.ema[k], pristine.ema[k]) for k in pristine.ema)
        )

    for _ in range(300):
        buf = bytearray(data)
        buf[rng.randrange(0, 8 + n)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(buf))
        judge(cls, path.name, lambda: fe.load(path, like=params), expect_error=None, check=same)


def attack_os_errors(d: pathlib.Path) -> None:
    cls = "OS errors: file too large (RLIMIT_FSIZE), permission denied (uid 65534), name too long, missing"
    state = fe.init({"w": torch.ones(100_000)})
    path = fe.save(state, d / "os.safetensors")

    def in_child(fn: Callable[[], None]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(r)
                torch.set_num_threads(1)  # the parent's thread pool does not survive fork
                fn()
                os.write(w, b"silent|")
            except (ValueError, OSError) as err:
                os.write(w, f"{type(err).__name__}|{err}".encode())
            except BaseException as err:
                os.write(w, f"raw|{type(err).__name__}: {err}".encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            report = os.read(r, 10_000).decode()
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
        kind, _, message = report.partition("|")
        if kind == "silent":
            raise AssertionError("accepted")
        if kind == "raw":
            raise RuntimeError(message)
        raise OSError(message)

    def too_large() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        fe.save(state, path)

    def denied_read() -> None:
        os.setuid(65534)
        fe.load(path, like={"w": torch.ones(100_000)})

    def denied_write() -> None:
        os.setuid(65534)
        fe.save(state, path)

    os.chmod(path, 0o600)
    os.chmod(d, 0o755)
    for fn, says in (
        (too_large, "File too large"),
        (denied_read, "Permission denied"),
        (denied_write, "Permission denied"),
    ):
        judge(cls, path.name, lambda f=fn: in_child(f), must_say=says)
    judge(cls, "x" * 40, lambda: fe.save(state, d / ("x" * 300 + ".safetensors")), must_say="too long")
    judge(cls, "missing.safetensors", lambda: fe.load(d / "missing.safetensors", like={"w": torch.ones(1)}))
    judge(cls, "nodir", lambda: fe.load(d / "nodir" / "x.safetensors", like={"w": torch.ones(1)}))


def main() -> None:
    warnings.simplefilter("ignore")  # the scanner's warnings about skipped files; outcomes are counted
    attacks = [
        attack_save_targets,
        attack_state_fields,
        attack_state_tensors,
        attack_snapshot_fields,
        attack_special_files,
        attack_truncation_and_flips,
        attack_os_errors,
    ]
    for attack in attacks:
        with tempfile.TemporaryDirectory() as tmp:
            attack(pathlib.Path(tmp))
    print_table(RESULTS)


if __name__ == "__main__":
    main()
