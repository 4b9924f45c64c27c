"""Benchmark the eager update under each ``on_nonfinite`` policy, as a ratio to ``"propagate"``.

``"skip"`` and ``"raise"`` add a finiteness test of the parameters to the update: one more pass
over them. This times, per parameter set and parameter dtype, the pure and the donated update
under the three policies, interleaved (each round runs every method once, in a rotating order),
and reports the median milliseconds per update and the ratio to ``"propagate"`` with the same
``donate``. It uses the public API only, so the same file times any checkout::

    PYTHONPATH=. python benchmarks/bench_nonfinite.py                  # gpt2 and tiny, fp32 and bf16
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_nonfinite.py --shapes gpt2

On the CPU the default is one intra-op thread (stable figures on a shared machine).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_update import SHAPES, time_methods  # the shape lists and timing rounds of the main benchmark

import funcema as fe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # parameter dtype; the EMA is float32
POLICIES = ("propagate", "skip", "raise")


def methods(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One `step()` per policy and donation, each with its own state over the same parameters."""
    gen = torch.Generator().manual_seed(0)
    params = {f"layer{i}.weight": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes)}
    out: dict[str, Callable[[], None]] = {}
    for policy in POLICIES:
        for donate in (False, True):
            box = [fe.init(params, schedule=fe.schedules.warmup(), on_nonfinite=policy)]

            def step(box: list[fe.EmaState] = box, donate: bool = donate) -> None:
                box[0] = fe.update(box[0], params, donate=donate)

            out[f"{policy}{', donated' if donate else ''}"] = step
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gpt2,tiny", help=f"comma-separated, of {','.join(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated parameter dtypes: fp32, bf16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"funcema from {pathlib.Path(fe.__file__).parent}; torch {torch.__version__}, {args.threads} thread(s)")
    print("| shapes | params | policy | ms per update | ratio to propagate |")
    print("|---|---|---|---|---|")
    for shape_name in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            medians = time_methods(methods(SHAPES[shape_name](), DTYPES[dtype_name]), args.repeats, args.warmup)
            for name, seconds in medians.items():
                base = medians["propagate" + name.partition(",")[1] + name.partition(",")[2]]
                print(f"| {shape_name} | {dtype_name} | {name} | {seconds * 1e3:.1f} | {seconds / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
