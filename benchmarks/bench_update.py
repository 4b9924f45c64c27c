"""Benchmark one EMA update against the flat limit and the peers.

One EMA update is memory-bound: it reads the EMA and the parameters once and writes the EMA once.
The *flat limit* is one ``lerp_`` over one flat float32 buffer of the same parameter count, timed in
the same run (interleaved with every other method, so a noisy machine slows all of them alike).
For other dtypes the limit is that flat float32 time scaled by bytes moved per parameter:
fp32 params + fp32 EMA: 12 B; bf16 or fp16 params + fp32 EMA: 10 B; bf16 params + bf16 EMA: 6 B. (A fused
mixed-dtype kernel is the practical limit; torch has none to time, so we scale by bytes at the
bandwidth the flat fp32 lerp reached.)

Every method sees a decay that changes every step (a warm-up schedule) where its API allows it.
Timing: warm-up calls first, then ``--repeats`` rounds; in each round every method runs once, in a
rotating order; the figure is the median per method (``perf_counter`` on the CPU, CUDA events on a
GPU), with the quartiles as the spread. ``torch.compile`` time (the first call) is reported
separately.

Paths: fp32 params and EMA, bf16 (or, with ``--dtypes fp16``, fp16) params into an fp32 EMA, and a bf16 EMA with stochastic rounding;
funcema eager (pure and donated; on the CPU also with its fused C loops turned off), compiled
(``fullgraph=True``; on a GPU also ``mode="reduce-overhead"``, CUDA graphs), the fused Triton kernel
(GPU only), raw ``torch._foreach_lerp_``/``_foreach_lerp`` and the peers. On a GPU, one
steady-state call of every funcema path, the flat limit and the raw foreach calls runs under
``torch.cuda.set_sync_debug_mode("error")``: the run reports (and exits with status 1 on) any path
that synchronises the device. ``--json`` and ``--markdown`` write the results and the table for
docs/performance.md. On the CPU the default is one intra-op thread (stable figures on a shared
machine).

Run ``python benchmarks/bench_update.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import funcema as fe

# --------------------------------------------------------------------------------------------
# Parameter sets: synthetic shape lists with the tensor counts and sizes of real models.


def gpt2_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small: 148 tensors, 124,439,808 parameters (tied embedding)."""
    d, v, n = 768, 50257, 12
    shapes: list[tuple[int, ...]] = [(v, d), (1024, d)]
    for _ in range(n):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """ResNet-50: 161 tensors, 25,557,032 parameters (convs, batch norms, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inp = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(width, inp, 1, 1), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inp, 1, 1), (4 * width,), (4 * width,)]
            inp = 4 * width
    return [*shapes, (1000, 2048), (1000,)]


def llama1b_shapes() -> list[tuple[int, ...]]:
    """Llama-3.2-1B: 146 tensors, 1,235,814,400 parameters (tied embedding)."""
    d, ff, kv, v = 2048, 8192, 512, 128256
    shapes: list[tuple[int, ...]] = [(v, d)]
    for _ in range(16):
        shapes += [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [*shapes, (d,)]


def tiny_shapes() -> list[tuple[int, ...]]:
    """4000 tensors of 1024 elements (LoRA adapters, norms: host overhead dominates)."""
    return [(1024,)] * 4000


SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2": gpt2_shapes,
    "resnet50": resnet50_shapes,
    "llama1b": llama1b_shapes,
    "tiny": tiny_shapes,
}

# (parameter dtype, EMA dtype, bytes moved per parameter by one update)
DTYPES: dict[str, tuple[torch.dtype, torch.dtype, int]] = {
    "fp32": (torch.float32, torch.float32, 12),
    "bf16": (torch.bfloat16, torch.float32, 10),
    "fp16": (torch.float16, torch.float32, 10),
    "bf16ema": (torch.bfloat16, torch.bfloat16, 6),
}

WARMUP = fe.schedules.warmup()  # the decay changes every step


def warmup_decay(step: int) -> float:
    return float(WARMUP(step))


class Holder(nn.Module):
    """An ``nn.Module`` holding the parameters, for the peers that need a model."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])


# --------------------------------------------------------------------------------------------
# Methods: each is ``make(ctx) -> step()``; ``step`` performs one update and returns nothing.


class Ctx:
    def __init__(self, shapes: list[tuple[int, ...]], param_dtype: torch.dtype, ema_dtype: torch.dtype, device: str):
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.tensors = [torch.randn(s, generator=gen).to(device=device, dtype=param_dtype) for s in shapes]
        self.params = {f"layer{i}.weight": t for i, t in enumerate(self.tensors)}
        self.param_dtype, self.ema_dtype, self.device = param_dtype, ema_dtype, device
        self.numel = sum(t.numel() for t in self.tensors)
        self.model = Holder(self.tensors)


def make_flat(ctx: Ctx) -> Callable[[], None]:
    ema = torch.randn(ctx.numel, device=ctx.device)
    par = torch.randn(ctx.numel, device=ctx.device)
    counter = [0]

    def step() -> None:
        counter[0] += 1
        ema.lerp_(par, 1.0 - warmup_decay(counter[0]))

    return step


def _ema_dtype_arg(ctx: Ctx) -> torch.dtype | None:
    return ctx.ema_dtype if ctx.ema_dtype != torch.float32 or ctx.param_dtype != torch.float32 else None


def make_funcema(donate: bool, native: bool = True) -> Callable[[Ctx], Callable[[], None]]:
    """``fe.update``; ``native=False`` turns off the fused C loops (the torch path, for comparison)."""

    def make(ctx: Ctx) -> Callable[[], None]:
        if not native and (ctx.device != "cpu" or fe._native.library() is None):
            raise NotImplementedError("n/a")
        box = [fe.init(ctx.params, schedule=WARMUP, dtype=_ema_dtype_arg(ctx))]

        def step() -> None:
            if native:
                box[0] = fe.update(box[0], ctx.params, donate=donate)
                return
            library = fe._native.library
            fe._native.library = lambda: None  # the torch path, as without a C compiler
            try:
                box[0] = fe.update(box[0], ctx.params, donate=donate)
            finally:
                fe._native.library = library

        return step

    return make


def make_compiled(donate: bool, mode: str | None = None) -> Callable[[Ctx], Callable[[], None]]:
    """``torch.compile(fullgraph=True)`` of ``fe.update``; the first call's time is the compile time."""

    def make(ctx: Ctx) -> Callable[[], None]:
        if mode == "reduce-overhead" and not ctx.device.startswith("cuda"):
            raise NotImplementedError("n/a")  # CUDA graphs: GPU only
        box = [fe.init(ctx.params, schedule=WARMUP, dtype=_ema_dtype_arg(ctx))]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fn = torch.compile(lambda s, p: fe.update(s, p, donate=donate), fullgraph=True, mode=mode)
        sync(ctx.device)
        start = time.perf_counter()
        box[0] = fn(box[0], ctx.params)
        sync(ctx.device)
        COMPILE_TIMES[f"{CURRENT[0]}/{'donated' if donate else 'pure'}/{mode or 'default'}"] = (
            time.perf_counter() - start
        )
        skips = dict(torch._dynamo.utils.counters.get("inductor", {})).get("cudagraph_skips", 0)
        if mode == "reduce-overhead" and skips:
            NOTES[CURRENT[1]] = "CUDA graph not captured (inductor skipped it)"

        def step() -> None:
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the last outputs are this call's inputs
            box[0] = fn(box[0], ctx.params)

        return step

    return make


def make_triton(ctx: Ctx) -> Callable[[], None]:
    """The fused Triton kernel on the state's EMA tensors (one launch per dtype group), in place.

    The weight and the rounding keys are computed on the device each step (no host read), as
    ``fe.update`` will do when it uses the kernel.
    """
    from funcema import _triton

    if not ctx.device.startswith("cuda") or not _triton.available():
        raise NotImplementedError("n/a")
    state = fe.init(ctx.params, schedule=WARMUP, dtype=_ema_dtype_arg(ctx))
    emas = list(state.ema.values())
    rounding = ctx.ema_dtype == torch.bfloat16
    leaf_keys = torch.arange(len(emas), device=ctx.device, dtype=torch.int64) * 0x9E3779B9
    step_t = torch.zeros((), dtype=torch.int64, device=ctx.device)

    def step() -> None:
        step_t.add_(1)
        weight = 1.0 - WARMUP(step_t)  # a 0-d device tensor: the schedule's traced form
        keys = (leaf_keys + step_t * 0x632BE5AB) & 0x7FFFFFFFFFFF if rounding else None
        _triton.lerp_(emas, ctx.tensors, weight, round_keys=keys)

    return step


def make_foreach(inplace: bool) -> Callable[[Ctx], Callable[[], None]]:
    """A raw ``torch._foreach_lerp_`` (in place) or ``torch._foreach_lerp`` (pure) over the same lists."""

    def make(ctx: Ctx) -> Callable[[], None]:
        if ctx.param_dtype != ctx.ema_dtype:
            raise NotImplementedError("n/a")  # foreach lerp needs one dtype
        emas = [t.clone() for t in ctx.tensors]
        counter = [0]

        @torch.no_grad()
        def step() -> None:
            counter[0] += 1
            w = 1.0 - warmup_decay(counter[0])
            if inplace:
                torch._foreach_lerp_(emas, ctx.tensors, w)
            else:
                emas[:] = torch._foreach_lerp(emas, ctx.tensors, w)

        return step

    return make


def make_posthoc_k2(ctx: Ctx) -> Callable[[], None]:
    box = [fe.posthoc.init(ctx.params, sigma_rels=(0.05, 0.10))]

    def step() -> None:
        box[0] = fe.posthoc.update(box[0], ctx.params, donate=True)

    return step


def make_two_singles(ctx: Ctx) -> Callable[[], None]:
    boxes = [fe.init(ctx.params, schedule=fe.schedules.power(sigma_rel=s)) for s in (0.05, 0.10)]

    def step() -> None:
        for k in range(2):
            boxes[k] = fe.update(boxes[k], ctx.params, donate=True)

    return step


def make_loop(ctx: Ctx) -> Callable[[], None]:
    emas = [t.to(ctx.ema_dtype, copy=True) for t in ctx.tensors]
    counter = [0]

    @torch.no_grad()
    def step() -> None:
        counter[0] += 1
        w = 1.0 - warmup_decay(counter[0])
        for e, p in zip(emas, ctx.tensors):
            e.lerp_(p if p.dtype == e.dtype else p.to(e.dtype), w)

    return step


def _load_timm_ema() -> Any:
    """timm's ``ModelEmaV3``; timm's package import needs torchvision, so fall back to the file."""
    try:
        from timm.utils.model_ema import ModelEmaV3

        return ModelEmaV3
    except Exception:  # torchvision missing or broken: load the module file alone
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = f"{next(iter(spec.submodule_search_locations))}/utils/model_ema.py"
        mod_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module.ModelEmaV3


def make_timm(ctx: Ctx) -> Callable[[], None]:
    ModelEmaV3 = _load_timm_ema()
    ema = ModelEmaV3(ctx.model, decay=0.9999, use_warmup=True, dtype=ctx.ema_dtype, stochastic_rounding=True)
    counter = [0]

    def step() -> None:
        counter[0] += 1
        ema.update(ctx.model, step=counter[0])

    return step


def make_ema_pytorch(ctx: Ctx) -> Callable[[], None]:
    from ema_pytorch import EMA

    if ctx.ema_dtype != ctx.param_dtype and ctx.ema_dtype != torch.float32:
        raise NotImplementedError("n/a")
    kwargs: dict[str, Any] = {}
    if ctx.ema_dtype != ctx.param_dtype:
        kwargs = {"ema_model": copy.deepcopy(ctx.model).to(ctx.ema_dtype), "coerce_dtype": True}
    ema = EMA(ctx.model, beta=0.9999, update_after_step=0, update_every=1, use_foreach=True, **kwargs)

    def step() -> None:
        ema.update()

    return step


def make_averaged_model(ctx: Ctx) -> Callable[[], None]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    avg = AveragedModel(ctx.model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=False)
    avg.module.to(ctx.ema_dtype)  # the EMA dtype asked for (float32 for bf16 params): fails on mixed dtypes

    def step() -> None:
        avg.update_parameters(ctx.model)  # fixed decay: its multi_avg_fn closes over one value

    step()  # the second call is the first that averages; let it raise here
    step()
    return step


def make_torch_ema(ctx: Ctx) -> Callable[[], None]:
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(ctx.model.parameters(), decay=0.9999, use_num_updates=True)
    ema.shadow_params = [p.to(ctx.ema_dtype) for p in ema.shadow_params]

    def step() -> None:
        ema.update()

    return step


# Methods whose every call is checked for device synchronisation on CUDA (funcema's own paths).
SYNC_CHECKED = ("funcema", "flat", "raw torch")


def methods_for(
    dtype_name: str, device: str, compile_modes: list[str], peers: bool
) -> dict[str, Callable[[Ctx], Callable[[], None]]]:
    """The methods timed for one dtype case; ``compile_modes``: "default", "reduce-overhead" or none."""
    methods: dict[str, Callable[[Ctx], Callable[[], None]]] = {
        "flat limit (one lerp_, scaled by bytes)": make_flat,
    }
    if dtype_name == "fp32":
        methods["raw torch._foreach_lerp_ (in place)"] = make_foreach(True)
        methods["raw torch._foreach_lerp (pure)"] = make_foreach(False)
    methods["funcema pure (donate=False)"] = make_funcema(False)
    methods["funcema donated (donate=True)"] = make_funcema(True)
    if dtype_name != "fp32" and device == "cpu":
        methods["funcema donated, torch path (C loops off)"] = make_funcema(True, native=False)
    for mode in compile_modes:
        label = "" if mode == "default" else f", {mode}"
        methods[f"funcema torch.compile(fullgraph{label}), pure"] = make_compiled(
            False, None if mode == "default" else mode
        )
        methods[f"funcema torch.compile(fullgraph{label}), donated"] = make_compiled(
            True, None if mode == "default" else mode
        )
    if device.startswith("cuda"):
        methods["funcema Triton kernel (_triton.lerp_, in place)"] = make_triton
    methods["per-tensor lerp_ loop (seeds)"] = make_loop
    if peers:
        methods["timm ModelEmaV3"] = make_timm
        if dtype_name != "bf16ema":
            methods["ema-pytorch EMA(use_foreach=True)"] = make_ema_pytorch
            methods["torch AveragedModel + get_ema_multi_avg_fn"] = make_averaged_model
            methods["torch-ema 0.3"] = make_torch_ema
    if dtype_name == "fp32" and hasattr(fe, "posthoc") and hasattr(fe.posthoc, "update"):
        methods["funcema posthoc.update K=2 (donated)"] = make_posthoc_k2
        methods["funcema 2 single updates (donated)"] = make_two_singles
    return methods


# --------------------------------------------------------------------------------------------
# Timing

COMPILE_TIMES: dict[str, float] = {}
CURRENT = ["", ""]  # the case ("gpt2/fp32") and the method being prepared
NOTES: dict[str, str] = {}  # per method of the current case
SYNCS: dict[str, str] = {}  # "case / method" -> "0" or the error a synchronising call raised


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], None], device: str) -> float:
    """Milliseconds for one call."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def check_syncs(step: Callable[[], None], name: str) -> None:
    """One steady-state call under ``torch.cuda.set_sync_debug_mode("error")``: any sync raises."""
    key = f"{CURRENT[0]} / {name}"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        SYNCS[key] = "0"
    except RuntimeError as exc:
        SYNCS[key] = f"synchronises: {str(exc).splitlines()[0][:160]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def prepare(ctx: Ctx, methods: dict[str, Callable[[Ctx], Callable[[], None]]], args: argparse.Namespace) -> tuple[
    dict[str, Callable[[], None]], dict[str, str]
]:  # fmt: skip
    """Build and warm up every method; those that cannot run this case are reported, not timed."""
    steps: dict[str, Callable[[], None]] = {}
    failures: dict[str, str] = {}
    for name, make in methods.items():
        CURRENT[1] = name
        try:
            step = make(ctx)
            for _ in range(args.warmup):
                step()
            sync(args.device)
            if args.device.startswith("cuda") and name.startswith(SYNC_CHECKED):
                check_syncs(step, name)
            steps[name] = step
        except Exception as exc:  # a peer that cannot do this case is reported
            failures[name] = "n/a" if isinstance(exc, (NotImplementedError, ImportError)) else "fails"
            if isinstance(exc, torch.OutOfMemoryError):  # every method's EMA is held at once
                failures[name] = "out of memory (try --no-peers or fewer --compile-modes)"
            if args.verbose:
                traceback.print_exc()
            print(f"  {name}: {failures[name]} ({type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
    return steps, failures


def time_all(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, list[float]]:
    """``args.repeats`` rounds; every round calls every method once, in a rotating order."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.repeats):
        for k in range(len(names)):
            name = names[(k + r) % len(names)]
            times[name].append(time_once(steps[name], args.device))
    return times


def time_methods(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each CPU method: `warmup` calls each, then `time_all`'s rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = time_all(fns, argparse.Namespace(repeats=repeats, device="cpu"))
    return {name: statistics.median(ms) / 1e3 for name, ms in times.items()}


def make_row(name: str, samples: list[float], limit_ms: float, gbytes: float, emas: int) -> dict[str, Any]:
    """Median, quartiles and the ratio to ``emas`` times the limit."""
    ms = statistics.median(samples)
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (ms, ms, ms)
    note = NOTES.get(name, "2 EMAs: ratio vs 2x the limit" if emas == 2 else "")
    return {"method": name, "ms": ms, "q1": q1, "q3": q3, "gbps": emas * gbytes / ms * 1e3,
            "ratio": emas * limit_ms / ms, "note": note}  # fmt: skip


def run_case(shape_name: str, dtype_name: str, args: argparse.Namespace) -> dict[str, Any]:
    param_dtype, ema_dtype, bytes_per_param = DTYPES[dtype_name]
    ctx = Ctx(SHAPES[shape_name](), param_dtype, ema_dtype, args.device)
    compile_ok = dtype_name in args.compile.split(",") and not (shape_name == "tiny" and args.device == "cpu")
    modes = [m for m in args.compile_modes.split(",") if m] if compile_ok else []
    methods = methods_for(dtype_name, args.device, modes, not args.no_peers)
    CURRENT[0] = f"{shape_name}/{dtype_name}"
    NOTES.clear()
    steps, failures = prepare(ctx, methods, args)
    times = time_all(steps, args)
    flat_name = next(iter(methods))
    flat_ms = statistics.median(times[flat_name])
    limit_ms = flat_ms * bytes_per_param / 12
    gbytes = ctx.numel * bytes_per_param / 1e9
    NOTES[flat_name] = f"flat fp32 lerp_ {flat_ms:.3f} ms x {bytes_per_param}/12"
    rows = []
    for name in methods:
        if name in failures:
            rows.append({"method": name, "ms": None, "gbps": None, "ratio": None, "note": failures[name]})
        elif name == flat_name:
            scaled = [t * bytes_per_param / 12 for t in times[name]]
            rows.append(make_row(name, scaled, limit_ms, gbytes, 1))
        else:
            emas = 2 if name.startswith(("funcema 2 single", "funcema posthoc")) else 1
            rows.append(make_row(name, times[name], limit_ms, gbytes, emas))
    del steps, ctx
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "shape": shape_name,
        "dtype": dtype_name,
        "tensors": len(SHAPES[shape_name]()),
        "numel": sum(torch.Size(s).numel() for s in SHAPES[shape_name]()),
        "bytes_per_param": bytes_per_param,
        "rows": rows,
    }


def print_table(case: dict[str, Any]) -> None:
    print(f"\n## {case['shape']} ({case['tensors']} tensors, {case['numel'] / 1e6:.1f}M params), {case['dtype']}")
    print("| method | ms (median) | quartiles | GB/s | ratio to limit | note |\n|---|---:|---:|---:|---:|---|")
    for r in case["rows"]:
        if r["ms"] is None:
            print(f"| {r['method']} | {r['note']} | | | | |")
        else:
            spread = f"{r['q1']:.3f}–{r['q3']:.3f}"
            print(f"| {r['method']} | {r['ms']:.3f} | {spread} | {r['gbps']:.1f} | {r['ratio']:.3f} | {r['note']} |")


def plot(results: list[dict[str, Any]], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: list[str] = []
    for case in results:
        for row in case["rows"]:
            if row["method"] not in methods and not row["method"].startswith("flat"):
                methods.append(row["method"])
    cases = [f"{c['shape']}\n{c['dtype']}" for c in results]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases) + 4), 5))
    width = 0.8 / max(1, len(methods))
    for m, method in enumerate(methods):
        xs, ys = [], []
        for c, case in enumerate(results):
            row = next((r for r in case["rows"] if r["method"] == method), None)
            if row is not None and row["ratio"] is not None:
                xs.append(c + (m - len(methods) / 2) * width + width / 2)
                ys.append(row["ratio"])
        ax.bar(xs, ys, width=width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("ratio to the flat limit (1 = as fast as one fused lerp)")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    return platform.processor() or "cpu"


def markdown(results: list[dict[str, Any]], header: str) -> str:
    """One table, methods by cases; each cell "ms · ratio to the flat limit" (funcema's in bold)."""
    cases = [f"{c['shape']} {c['dtype']}" for c in results]
    methods: list[str] = []
    for case in results:  # a method first seen in a later case goes right after its predecessor there
        for k, r in enumerate(case["rows"]):
            if r["method"] not in methods:
                before = case["rows"][k - 1]["method"] if k else None
                methods.insert(methods.index(before) + 1 if before in methods else len(methods), r["method"])
    lines = [header, "", f"| method | {' | '.join(cases)} |", f"|---|{'---:|' * len(cases)}"]
    for method in methods:
        cells = []
        for case in results:
            r = next((r for r in case["rows"] if r["method"] == method), None)
            if r is None:
                cells.append("")
            elif r["ms"] is None:
                cells.append(r["note"])
            else:
                ratio = f"{r['ratio']:.2f}" if r["ratio"] >= 0.1 else f"{r['ratio']:.3f}"
                ratio = f"**{ratio}**" if method.startswith("funcema") else ratio
                cells.append(f"{r['ms']:.1f} ms · {ratio}" if r["ms"] >= 1 else f"{r['ms']:.3f} ms · {ratio}")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated: gpt2,resnet50,llama1b,tiny (default: gpt2,resnet50,tiny on the CPU; all four on a GPU)",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated: fp32,bf16,fp16,bf16ema (default: fp32,bf16,bf16ema)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (median of these; at least 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per method first")
    parser.add_argument(
        "--compile",
        default=None,
        help="dtypes to also time torch.compile for, comma-separated, or 'none' "
        "(default: all on a GPU; fp32 on the CPU, where each compile takes 10-70 s)",
    )
    parser.add_argument(
        "--compile-modes",
        default=None,
        help="torch.compile modes, comma-separated: default,reduce-overhead (default: both on a GPU; default on the CPU)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default on the CPU: 1)")
    parser.add_argument("--no-peers", action="store_true", help="skip timm, ema-pytorch, AveragedModel, torch-ema")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument("--markdown", default=None, help="write the table for docs/performance.md to this file")
    parser.add_argument("--plot", default=None, help="write a ratio-to-limit bar chart to this PNG file")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    args = parser.parse_args(argv)
    if args.repeats < 15:
        parser.error("--repeats must be at least 15 (medians of fewer calls are too noisy to compare)")
    gpu = args.device.startswith("cuda")
    args.compile = args.compile or ("fp32,bf16,bf16ema" if gpu else "fp32")
    args.compile_modes = args.compile_modes or ("default,reduce-overhead" if gpu else "default")
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)  # 1 on the CPU: stable figures on a shared machine
    args.shapes = args.shapes or ("gpt2,resnet50,llama1b,tiny" if gpu else "gpt2,resnet50,tiny")
    args.dtypes = args.dtypes or "fp32,bf16,bf16ema"
    return args


def write_outputs(args: argparse.Namespace, dev: str, results: list[dict[str, Any]]) -> None:
    header = (
        f"{dev}; torch {torch.__version__}; median of {args.repeats} interleaved calls after {args.warmup} "
        f"warm-up calls; each cell: ms per update · ratio to the flat limit"
    )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": dev,
                    "torch": torch.__version__,
                    "repeats": args.repeats,
                    "threads": torch.get_num_threads(),
                    "compile_s": COMPILE_TIMES,
                    "syncs": SYNCS,
                    "cases": results,
                },
                f,
                indent=1,
            )
    if args.plot:
        plot(results, args.plot, f"EMA update, ratio to the flat limit ({dev}, torch {torch.__version__})")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    dev = device_name(args.device)
    print(f"device: {dev}; torch {torch.__version__}; funcema {fe.__version__}; repeats {args.repeats}")
    results = []
    for shape_name in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            case = run_case(shape_name, dtype_name, args)
            print_table(case)
            results.append(case)
    if COMPILE_TIMES:
        print("\ncompile time of torch.compile(fullgraph=True)(fe.update), first call:")
        for key, seconds in COMPILE_TIMES.items():
            print(f"  {key}: {seconds:.1f} s")
    if SYNCS:
        bad = {k: v for k, v in SYNCS.items() if v != "0"}
        print(
            f"\ndevice synchronisations (set_sync_debug_mode('error')): {len(SYNCS) - len(bad)} of {len(SYNCS)} paths sync-free"
        )
        for key, message in bad.items():
            print(f"  {key}: {message}")
    write_outputs(args, dev, results)
    return 1 if any(v != "0" for v in SYNCS.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
