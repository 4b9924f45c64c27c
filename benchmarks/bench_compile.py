"""Compile time and steady state of ``torch.compile(fullgraph=True)(fe.update)``.

For every parameter set and for the pure (``donate=False``) and donated update, a fresh child
process with an empty inductor cache directory (a cold cache) times the first call of the
compiled update, then times the compiled and the eager update of the same mode in interleaved
rounds (median of ``--repeats`` calls each), with ``--threads`` intra-op threads. It also counts
the nodes of the graph dynamo hands to the backend, which should grow with the number of dtype
groups, not with the number of leaves.

Run ``python benchmarks/bench_compile.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

import funcema as fe


def shapes(name: str) -> list[tuple[int, ...]]:
    """``leavesN`` (N tensors of 1024 elements), or a shape list of bench_update.py."""
    if name.startswith("leaves"):
        return [(1024,)] * int(name[len("leaves") :])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_update  # the shape lists of the update benchmark

    return bench_update.SHAPES[name]()


def _params(name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"p{i}": torch.randn(s, generator=gen).to(dtype) for i, s in enumerate(shapes(name))}


def _graph_nodes(params: dict[str, torch.Tensor], donate: bool) -> int:
    """Number of call nodes in the graph dynamo traces for one update (no inductor)."""
    counts = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        counts.append(sum(node.op.startswith("call") for node in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    state = fe.init(params, schedule=fe.schedules.warmup())
    torch.compile(lambda s, p: fe.update(s, p, donate=donate), backend=backend, fullgraph=True)(state, params)
    torch._dynamo.reset()
    return counts[0]


def child(name: str, donate: bool, repeats: int, dtype: torch.dtype) -> dict[str, Any]:
    """Runs in a fresh process whose inductor cache directory is empty."""
    params = _params(name, dtype)
    compiled = torch.compile(lambda s, p: fe.update(s, p, donate=donate), fullgraph=True)
    state_c = fe.init(params, schedule=fe.schedules.warmup())
    state_e = fe.init(params, schedule=fe.schedules.warmup())
    start, start_cpu = time.perf_counter(), time.process_time()
    out = compiled(state_c, params)
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    if donate:
        state_c = out

    def run_compiled() -> None:
        nonlocal state_c
        new = compiled(state_c, params)
        if donate:
            state_c = new

    def run_eager() -> None:
        nonlocal state_e
        new = fe.update(state_e, params, donate=donate)
        if donate:
            state_e = new

    # Wall clock and this thread's CPU time (one intra-op thread: the kernels run on it), which
    # leaves out the time spent waiting for a core on a shared machine.
    times: dict[str, list[float]] = {"compiled": [], "eager": []}
    cpu: dict[str, list[float]] = {"compiled": [], "eager": []}
    methods = [("compiled", run_compiled), ("eager", run_eager)]
    for _ in range(3):
        run_compiled()
        run_eager()
    with torch.compiler.set_stance("fail_on_recompile"):
        for r in range(repeats):
            for key, fn in methods[r % 2 :] + methods[: r % 2]:  # alternate the order
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.thread_time() - c0)
    nodes = _graph_nodes(params, donate)  # after the timed compilation, which must start cold
    compiled_ms = 1e3 * statistics.median(times["compiled"])
    eager_ms = 1e3 * statistics.median(times["eager"])
    return {
        "shapes": name,
        "leaves": len(params),
        "donate": donate,
        "graph_nodes": nodes,
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,
        "compiled_cpu_ms": 1e3 * statistics.median(cpu["compiled"]),
        "eager_cpu_ms": 1e3 * statistics.median(cpu["eager"]),
        "compiled_ms": compiled_ms,
        "eager_ms": eager_ms,
        "ratio": eager_ms / compiled_ms,
        "ratio_cpu": statistics.median(cpu["eager"]) / statistics.median(cpu["compiled"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="leaves10,leaves150,leaves4000,gpt2", help="comma-separated: leavesN, gpt2, resnet50, ...")
    parser.add_argument("--modes", default="pure,donate")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="parameter dtype (the EMA is fp32)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.child:
        name, mode = args.child.split(":")
        print(json.dumps(child(name, mode == "donate", args.repeats, dtype)))
        return
    results = []
    print(f"torch {torch.__version__}, {args.threads} intra-op thread(s), {args.dtype} params, fp32 EMA, cold inductor cache per row")
    print("compile: wall (process CPU); steady state: wall median (thread CPU median) per update")
    print(f"{'shapes':>11} {'leaves':>6} {'mode':>7} {'nodes':>5} {'compile':>15} {'compiled':>18} {'eager':>18} {'eager/compiled':>14}")
    for name in args.shapes.split(","):
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name}:{mode}"]
                cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads), "--dtype", args.dtype]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{name} {mode}: failed\n{out.stderr[-3000:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(
                f"{row['shapes']:>11} {row['leaves']:>6} {mode:>7} {row['graph_nodes']:>5} "
                f"{row['compile_s']:>6.1f}s ({row['compile_cpu_s']:>5.1f}s) "
                f"{row['compiled_ms']:>7.2f}ms ({row['compiled_cpu_ms']:>6.2f}) {row['eager_ms']:>7.2f}ms ({row['eager_cpu_ms']:>6.2f}) "
                f"{row['ratio']:>6.2f} ({row['ratio_cpu']:.2f})",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "dtype": args.dtype, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
