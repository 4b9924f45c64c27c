"""Time to reject mismatched trees of many leaves: the error path must be linear.

A rejected `fe.update`, `fe.swap` or `fe.load` of a tree that differs from the state (one path
renamed, every path renamed, a list one leaf short, a leaf of the wrong shape) must return its
error quickly however many leaves the tree has. Inputs are built before the clock starts; the
cases of one leaf count are timed in turn, once per repeat (interleaved, so a change in the
machine's load affects them alike), with ``--threads`` intra-op threads. Printed: the best and
the median wall time, the median CPU time of the calling thread (which leaves out waiting for a
core on a shared machine) and the best time per leaf, so a quadratic path shows up as a per-leaf
time that grows with the leaf count.

    python benchmarks/bench_errors.py                   # 1,000 / 10,000 / 100,000 leaves
    python benchmarks/bench_errors.py --leaves 8000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import funcema as fe


def _timed(call: Callable[[], Any]) -> tuple[float, float, str]:
    """Wall and thread CPU seconds of one call, and the error it raised."""
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        call()
    except (ValueError, TypeError) as err:
        message = f"{type(err).__name__}: {str(err)[:70]}"
    else:
        message = "NOT REJECTED"
    return time.perf_counter() - start, time.thread_time() - cpu, message


def cases(n: int, directory: str) -> dict[str, Callable[[], Any]]:
    """The rejected calls for a tree of `n` leaves (inputs built here, outside the timing)."""
    params = {f"layers.{i}.weight": torch.zeros(1) for i in range(n)}
    state = fe.init(params)
    renamed_one = dict(params)
    renamed_one["extra"] = renamed_one.pop("layers.0.weight")
    renamed_all = {f"other.{i}": t for i, t in enumerate(params.values())}
    wrong_shape = {**params, f"layers.{n - 1}.weight": torch.zeros(2)}
    as_list = list(params.values())
    list_state = fe.init(as_list)
    short_list = as_list[:-1]
    file = fe.save(state, os.path.join(directory, f"state{n}.safetensors"))
    return {
        "update, one path renamed": lambda: fe.update(state, renamed_one),
        "update, every path renamed": lambda: fe.update(state, renamed_all),
        "update, one leaf of another shape": lambda: fe.update(state, wrong_shape),
        "update, a list one leaf short": lambda: fe.update(list_state, short_list),
        "update, a list for a dict": lambda: fe.update(state, as_list),
        "swap, every path renamed": lambda: fe.swap(state, renamed_all),
        "load, every path renamed": lambda: fe.load(file, like=renamed_all),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaves", default="1000,10000,100000", help="comma-separated leaf counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} intra-op thread(s); {args.repeats} repeats")
    print(f"{'case':36s} {'leaves':>8s} {'best s':>8s} {'median s':>8s} {'cpu s':>8s} {'us/leaf':>8s}  error")
    with tempfile.TemporaryDirectory() as directory:
        for n in (int(x) for x in args.leaves.split(",")):
            calls = cases(n, directory)
            walls: dict[str, list[float]] = {name: [] for name in calls}
            cpus: dict[str, list[float]] = {name: [] for name in calls}
            messages: dict[str, str] = {}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    wall, cpu, messages[name] = _timed(call)
                    walls[name].append(wall)
                    cpus[name].append(cpu)
            for name, ts in walls.items():
                best, median, cpu = min(ts), statistics.median(ts), statistics.median(cpus[name])
                print(f"{name:36s} {n:8d} {best:8.3f} {median:8.3f} {cpu:8.3f} {best / n * 1e6:8.2f}  {messages[name]}")


if __name__ == "__main__":
    main()
