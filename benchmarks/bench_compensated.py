"""The cost of ``compensated=True``: memory of the state and time of one update against the plain EMA.

Memory is counted, not estimated: the bytes of ``state.ema`` and ``state.compensation``.

Time: one ``fe.update`` of a compensated state against one of a plain state with the same
parameters, schedule (a power EMA at step 10^6: the weight changes every step) and options, for
``donate=True`` (in place) and ``donate=False`` (pure). Each method is warmed up, then ``--repeats``
rounds run every method once in a rotating order; the figure is the median per method
(``perf_counter``), and the ratio compensated / plain of the medians. One intra-op thread by
default (``--threads``), so the ratio measures work, not how well each op is parallelised.
With ``--compile``, the same for ``torch.compile(fullgraph=True)`` of the pure update (inductor
fuses the compensated update into one pass; compile time is not included).

    python benchmarks/bench_compensated.py                 # resnet50, gpt2 and tiny shapes, fp32 and bf16
    python benchmarks/bench_compensated.py --shapes resnet50 --compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import funcema as fe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import SHAPES, time_methods

DTYPES = {  # name: (parameter dtype, EMA dtype)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "bf16ema": (torch.bfloat16, torch.bfloat16),
}


def _leaves(tree: object) -> list[torch.Tensor]:
    import optree

    return optree.tree_leaves(tree)


def methods(
    params: dict[str, torch.Tensor], ema_dtype: torch.dtype | None, compile_: bool
) -> dict[str, Callable[[], None]]:
    """One closure per timed method; each keeps its own state and threads it through its calls."""
    schedule = fe.schedules.power(sigma_rel=0.10)
    out: dict[str, Callable[[], None]] = {}
    for comp in (False, True):
        name = "compensated" if comp else "plain"
        for donate in (True, False):
            holder = [
                fe.init(params, schedule=schedule, dtype=ema_dtype, compensated=comp)._replace(step=torch.tensor(10**6))
            ]

            def run(holder=holder, donate=donate) -> None:
                holder[0] = fe.update(holder[0], params, donate=donate)

            out[f"{name}, {'donated' if donate else 'pure'}"] = run
        if compile_:
            torch._dynamo.reset()
            step = torch.compile(lambda s, p: fe.update(s, p), fullgraph=True)
            holder = [
                fe.init(params, schedule=schedule, dtype=ema_dtype, compensated=comp)._replace(step=torch.tensor(10**6))
            ]
            holder[0] = step(holder[0], params)  # compile here, outside the timing

            def run_compiled(holder=holder, step=step) -> None:
                holder[0] = step(holder[0], params)

            out[f"{name}, compiled pure"] = run_compiled
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="resnet50,gpt2,tiny")
    parser.add_argument("--dtypes", default="fp32,bf16,bf16ema")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the pure update (fp32)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.repeats < 15:
        parser.error("--repeats must be >= 15 (the figures are medians)")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", fe.StagnationWarning)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    results = []
    for shape_name in args.shapes.split(","):
        shapes = SHAPES[shape_name]()
        for dtype_name in args.dtypes.split(","):
            param_dtype, ema_dtype = DTYPES[dtype_name]
            g = torch.Generator().manual_seed(0)
            params = {f"p{i}": torch.randn(s, generator=g).to(param_dtype) for i, s in enumerate(shapes)}
            plain = fe.init(params, dtype=ema_dtype)
            comp = fe.init(params, dtype=ema_dtype, compensated=True)
            memory = {
                "ema": sum(t.numel() * t.element_size() for t in _leaves(plain.ema)),
                "compensated ema + compensation": sum(
                    t.numel() * t.element_size() for t in _leaves(comp.ema) + _leaves(comp.compensation)
                ),
            }
            fns = methods(params, ema_dtype, args.compile and dtype_name == "fp32")
            med = time_methods(fns, args.repeats, args.warmup)
            ratios = {
                mode: med[f"compensated, {mode}"] / med[f"plain, {mode}"]
                for mode in ("donated", "pure", "compiled pure")
                if f"plain, {mode}" in med
            }
            row = {
                "shapes": shape_name,
                "dtypes": dtype_name,
                "memory_bytes": memory,
                "median_ms": {k: v * 1e3 for k, v in med.items()},
                "ratio": ratios,
            }
            results.append(row)
            mem_ratio = memory["compensated ema + compensation"] / memory["ema"]
            print(
                f"{shape_name:9s} {dtype_name:8s} memory x{mem_ratio:.2f} | "
                + " | ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items())
            )
            print(" " * 19 + "time ratio compensated / plain: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if args.json:
        args.json.write_text(
            json.dumps({"torch": torch.__version__, "threads": args.threads, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
