"""Host overhead of one eager update on many small leaves, against a raw `torch._foreach_lerp_`.

On the tiny parameter set (default 4000 tensors of 1024 float32 elements, a flat dict as
`dict(model.named_parameters())` gives) the kernel is short, so funcema's own host work shows.
In interleaved rounds (the order rotates every round), it times:

- a raw `torch._foreach_lerp_` over the same EMA and parameter lists (in place), and funcema's
  donated update (`donate=True`);
- a raw `torch._foreach_lerp` (out of place), and funcema's pure update (`donate=False`);
- the same two raw calls split into calls of 256 tensors, as funcema's kernel splits them on the
  CPU (`funcema._kernels`): funcema / that is the host work funcema adds to its own kernel calls;

and reports medians and the ratios funcema / raw. Then it times the pieces of the host work one
by one (median CPU time), each right after a raw update of other tensors of the same shapes, so
that the caches hold what they hold at the start of a real update (the last step's data, not the
metadata each piece reads).

Run `python benchmarks/bench_overhead.py --help` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import optree
import torch

import funcema as fe
from funcema import _core, _dtensor, _kernels, _tree

# The CPU time of this thread, besides the wall clock: with one intra-op thread every kernel runs
# on the calling thread, so its CPU time is the update's cost without the time the thread spent
# waiting for a core, which on a shared machine inflates the wall clock at random.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def _median_ms(fn: Callable[[], Any], repeats: int, clock: Callable[[], float], before: Callable[[], Any]) -> float:
    """Median milliseconds of `fn()`, each call right after an untimed `before()`."""
    fn()
    times = []
    for _ in range(repeats):
        before()
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def _blocks(op: Callable[..., Any], emas: list[torch.Tensor], params: list[torch.Tensor], weight: float, size: int = 256) -> list[Any]:
    """`op` over blocks of `size` tensors; out of place, every block's results are kept to the end."""
    return [op(emas[start : start + size], params[start : start + size], weight) for start in range(0, len(emas), size)]


def interleaved(methods: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median milliseconds per call of each method on each clock, in rotating order round by round."""
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            methods[name]()
    times: dict[str, dict[str, list[float]]] = {name: {c: [] for c in CLOCKS} for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = {c: clock() for c, clock in CLOCKS.items()}
            methods[name]()
            for c, clock in CLOCKS.items():
                times[name][c].append(clock() - start[c])
    return {name: {c: 1e3 * statistics.median(t) for c, t in by_clock.items()} for name, by_clock in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaves", type=int, default=4000)
    parser.add_argument("--numel", type=int, default=1024)
    parser.add_argument("--shapes", help="instead of leaves x numel, a shape list of bench_update.py (gpt2, resnet50)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    if args.shapes:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_update  # the shape lists of the update benchmark

        shapes = bench_update.SHAPES[args.shapes]()
    else:
        shapes = [(args.numel,)] * args.leaves
    params = {f"blocks.{i}.weight": torch.randn(shape, generator=gen) for i, shape in enumerate(shapes)}
    schedule = fe.schedules.warmup()
    donated = fe.init(params, schedule=schedule)
    pure = fe.init(params, schedule=schedule)
    for _ in range(5):  # past the first steps, whose weight is 1 (a copy, not a lerp)
        pure = fe.update(pure, params, donate=True)
        donated = fe.update(donated, params, donate=True)
    raw_emas = [e.clone() for e in optree.tree_leaves(donated.ema)]
    raw_params = _tree.match_leaves(params, donated.config.treespec, donated.config.paths)
    step = [0]

    def weight() -> float:  # a weight that changes every call, as funcema's schedule does
        step[0] += 1
        return 1.0 / (step[0] + 10)

    def funcema_donated() -> None:
        nonlocal donated
        donated = fe.update(donated, params, donate=True)

    def funcema_pure() -> None:  # threaded as a training loop does: the old state is let go
        nonlocal pure
        pure = fe.update(pure, params)

    methods = {
        "raw _foreach_lerp_ (in place)": lambda: torch._foreach_lerp_(raw_emas, raw_params, weight()),
        "funcema update, donate=True": funcema_donated,
        "raw _foreach_lerp (out of place)": lambda: torch._foreach_lerp(raw_emas, raw_params, weight()),
        "funcema update, donate=False": funcema_pure,
        "raw _foreach_lerp_, 256 per call": lambda: _blocks(torch._foreach_lerp_, raw_emas, raw_params, weight()),
        "raw _foreach_lerp, 256 per call": lambda: _blocks(torch._foreach_lerp, raw_emas, raw_params, weight()),
    }
    medians = interleaved(methods, args.repeats)
    what = args.shapes or f"{args.leaves} x {args.numel}"
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s), {what} float32, median of {args.repeats}")
    print(f"{'':>34}  {'wall':>9}  {'thread CPU':>10}")
    for name, ms in medians.items():
        print(f"{name:>34}: {ms['wall']:6.2f} ms  {ms['cpu']:7.2f} ms")
    ratios = {}
    for c in CLOCKS:
        m = {name: ms[c] for name, ms in medians.items()}
        ratios[c] = {
            "donated / raw in place": m["funcema update, donate=True"] / m["raw _foreach_lerp_ (in place)"],
            "pure / raw out of place": m["funcema update, donate=False"] / m["raw _foreach_lerp (out of place)"],
            "donated / raw in place, 256 per call": m["funcema update, donate=True"] / m["raw _foreach_lerp_, 256 per call"],
            "pure / raw out of place, 256 per call": m["funcema update, donate=False"] / m["raw _foreach_lerp, 256 per call"],
        }
        print(f"{c:>5}: " + "   ".join(f"{k}: {v:.3f}" for k, v in ratios[c].items()))
    breakdown = _pieces(donated, params, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            result = {"threads": args.threads, "shapes": what}
            json.dump(result | {"medians_ms": medians, "ratios": ratios, "pieces_ms": breakdown}, f, indent=1)


def _pieces(state: fe.EmaState, params: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Time the pieces of the host work of one update, each after a raw update of other tensors."""
    config = state.config
    keys, positions = config.dict_insertion_keys, config.dict_positions
    emas = _tree.dict_leaves(state.ema, keys, positions)
    leaves = _tree.dict_leaves(params, keys, positions)
    assert emas is not None and leaves is not None
    other_emas = [e.clone() for e in emas]
    other_params = [p.clone() for p in leaves]
    layout = _tree._reference_layout(emas, config.param_dtypes)
    pieces = {
        "match_params (both dicts read by key + check)": lambda: _core.match_params(state, params),
        "  dict_leaves(state.ema) (keys + gather)": lambda: _tree.dict_leaves(state.ema, keys, positions),
        "  dict_leaves(params) (keys + gather)": lambda: _tree.dict_leaves(params, keys, positions),
        "  check_leaves (guard: nested screen + C++)": lambda: _tree.check_leaves(leaves, emas, config.paths, dtypes=config.param_dtypes),
        "  the comparisons the guard replaces": lambda: _tree._compare_layout(leaves, layout),
        "  optree.tree_flatten(params) (general path)": lambda: optree.tree_flatten(params),
        "any_dtensor(emas, leaves)": lambda: _dtensor.any_dtensor(emas, leaves),
        "_kernels.lerp (256 tensors per call)": lambda: _kernels.lerp(emas, leaves, 0.01, inplace=True, same_dtype=True),
        "raw _foreach_lerp_ (one call)": lambda: torch._foreach_lerp_(emas, leaves, 0.01),
        "state.ema.copy() (donated: new tree)": lambda: state.ema.copy(),
        "optree.tree_unflatten (pure: new tree)": lambda: optree.tree_unflatten(config.treespec, emas),
    }
    print("pieces (each right after a raw update of other tensors):")
    flush = lambda: torch._foreach_lerp_(other_emas, other_params, 0.01)  # noqa: E731
    breakdown = {name: _median_ms(fn, repeats, time.thread_time, flush) for name, fn in pieces.items()}
    for name, ms in breakdown.items():
        print(f"{name:>48}: {ms:7.3f} ms thread CPU")
    return breakdown


if __name__ == "__main__":
    main()
