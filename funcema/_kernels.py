"""Multi-tensor kernels: the only module that calls `torch._foreach_*`.

Each function takes matching lists of EMA tensors and parameter tensors from one group of the
state (same device, same EMA dtype, same parameter dtype), so every `_foreach` call can take
torch's fused multi-tensor path. All of them run under `torch.no_grad()` (an in-place update
with grad mode on would attach autograd history to the EMA) and convert dtypes explicitly, so
eager mode (which rejects mixed dtypes in `_foreach_lerp_`) and compiled mode (which would
silently promote) compute the same thing.

The interpolation `ema + w * (params - ema)` is always a `lerp`: torch's lerp returns the
end point exactly at `w = 1` and the start point exactly at `w = 0`, and maps a constant
sequence to itself bit for bit, which the debias and warm-start semantics rely on.

Owns: every write of an EMA tensor (lerp with a host or a tensor weight, copy, finiteness
flags, stochastic rounding); what to write and with which weight is the core's decision.

Must not import: any funcema module but `_native` (the fused C loops it dispatches to).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import compress
from operator import and_, attrgetter, or_

import torch

from . import _native

__all__ = [
    "lerp",
    "lerp_round",
    "lerp_tensor_weight",
    "lerp_on_device",
    "copy",
    "all_finite",
    "first_nonfinite",
    "stochastic_round",
]

# Parameters of another dtype than the EMA are converted in chunks of at most this many bytes of
# temporaries, so a bf16 model with an fp32 EMA never needs a full-size fp32 copy of its weights.
_CONVERT_CHUNK_BYTES = 64 * 2**20
_DTYPE = attrgetter("dtype")


def _converted_chunks(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Split the group into chunks whose converted parameters fit in the temporary budget."""
    if list(map(_DTYPE, emas)) == list(map(_DTYPE, params)):  # C-level: no per-leaf Python frame
        return [(list(emas), list(params))]
    chunks: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    start, size = 0, 0
    for i, e in enumerate(emas):
        size += e.numel() * e.element_size()
        if size >= _CONVERT_CHUNK_BYTES or i == len(emas) - 1:
            chunk = range(start, i + 1)
            chunks.append(([emas[j] for j in chunk], [params[j].to(emas[j].dtype) for j in chunk]))
            start, size = i + 1, 0
    return chunks


@torch.no_grad()
def lerp(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: float, *, inplace: bool, same_dtype: bool = False
) -> list[torch.Tensor]:
    """Return `ema + weight * (params - ema)` with a host float weight (no device synchronisation).

    Eager mode only: under `torch.compile` the core uses
    [`lerp_tensor_weight`][funcema._kernels.lerp_tensor_weight], since a Python float weight
    would recompile for every new value. `same_dtype=True` is the caller's word that every
    parameter has its EMA's dtype (checked just before), which spares the test here. In place,
    a list `emas` of one dtype is returned itself (no copy); the lists are never modified.
    """
    if not emas:
        return []
    same = same_dtype or list(map(_DTYPE, emas)) == list(map(_DTYPE, params))  # C-level: no per-leaf frame
    if same:
        return _lerp_same_dtype(emas, params, weight, inplace)
    if emas[0].device.type == "cpu":
        return _lerp_converting_cpu(emas, params, weight, inplace=inplace)
    out: list[torch.Tensor] = []
    for e_chunk, p_chunk in _converted_chunks(emas, params):
        if inplace:
            torch._foreach_lerp_(e_chunk, p_chunk, weight)
            out.extend(e_chunk)
        else:
            out.extend(torch._foreach_lerp(e_chunk, p_chunk, weight))
    return out


# A multi-tensor op walks its tensor list several times before and while computing (unpacking,
# autograd and version-counter bookkeeping, then each tensor's kernel), touching a few cache lines
# of metadata per tensor each time. On the CPU, thousands of tensors per call evict that metadata
# between the walks; calls of a few hundred tensors keep it in the core's cache (256 tensors:
# about 100 KiB of metadata, well inside a 256 KiB L2). Figures in docs/performance.md. On an
# accelerator each call also launches kernels, and nothing was measured there: one call per group.
_CPU_TENSORS_PER_CALL = 256


def _lerp_same_dtype(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: float, inplace: bool
) -> list[torch.Tensor]:
    """`lerp` of EMAs and parameters of one dtype: a multi-tensor call per block of tensors.

    In place, a list `emas` is returned itself (no copy); the lists are never modified.
    """
    if not isinstance(emas, (list, tuple)) or not isinstance(params, (list, tuple)):
        emas, params = list(emas), list(params)  # what the multi-tensor ops take
    n = len(emas)
    size = _CPU_TENSORS_PER_CALL if emas[0].device.type == "cpu" else n
    if inplace:
        if n <= size:
            torch._foreach_lerp_(emas, params, weight)
        else:
            for start in range(0, n, size):
                torch._foreach_lerp_(emas[start : start + size], params[start : start + size], weight)
        return emas if type(emas) is list else list(emas)
    if n <= size:
        return list(torch._foreach_lerp(emas, params, weight))  # a tuple at run time
    out: list[torch.Tensor] = []
    for start in range(0, n, size):
        out += torch._foreach_lerp(emas[start : start + size], params[start : start + size], weight)
    return out


# On the CPU, parameters of another dtype are converted block by block into a small scratch
# buffer that stays in cache, instead of into fresh full-size temporaries (which cost page faults
# and an extra trip through memory: 5-8x slower on gpt2/resnet50 shapes, bf16 -> fp32).
_CPU_BLOCK = 1 << 20  # elements: a 4 MiB float32 scratch, cache-resident on current CPUs
_CPU_SMALL = 1 << 16  # leaves below this many elements take one foreach call with temporaries
_SCRATCH = threading.local()  # one scratch per thread and dtype: concurrent updates never share one


def _cpu_scratch(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A private CPU buffer of at least `numel` elements (reused; never handed to the caller)."""
    buffers: dict[torch.dtype, torch.Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def _lerp_converting_cpu(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: float, *, inplace: bool
) -> list[torch.Tensor]:
    """`lerp(ema, params.to(ema.dtype), weight)` on the CPU without full-size temporaries.

    Contiguous leaves take the fused C loop of `funcema._native` when it is available (one pass:
    the conversion happens in registers). The others are computed on blocks of at most
    `_CPU_BLOCK` elements through a per-thread scratch: elementwise the same operation as
    converting first (bf16/fp16 to fp32 is exact). The scratch is private to this function and
    fully consumed before it returns, so reusing it across calls never aliases anything the caller
    can see. Both give the bits of `torch.lerp` (tests/test_native.py).
    """
    fused, rest = _native_partition(emas, params, widening=True)
    if fused:
        done = _lerp_widening_native(_gather(emas, fused), _gather(params, fused), weight, inplace)
        others = (
            _lerp_converting_cpu(_gather(emas, rest), _gather(params, rest), weight, inplace=inplace) if rest else []
        )
        return _merge(len(emas), (fused, done), (rest, others))
    # Small leaves (norms, biases, adapters): per-leaf Python work would dominate, so they are
    # converted into small temporaries (cheap heap allocations) and updated by one foreach call.
    small = [i for i, e in enumerate(emas) if e.numel() < _CPU_SMALL]
    if small:
        e_small = [emas[i] for i in small]
        p_small = [params[i].to(emas[i].dtype) for i in small]
        if inplace:
            torch._foreach_lerp_(e_small, p_small, weight)
            small_out = e_small
        else:
            small_out = list(torch._foreach_lerp(e_small, p_small, weight))
        if len(small) == len(emas):
            return small_out
    by_index = dict(zip(small, small_out)) if small else {}
    out: list[torch.Tensor] = []
    for i, (e, p) in enumerate(zip(emas, params)):
        if i in by_index:
            out.append(by_index[i])
            continue
        target = e if inplace else torch.empty_like(e)
        if e.dtype == p.dtype:
            if inplace:
                e.lerp_(p, weight)
            else:
                torch.lerp(e, p, weight, out=target)
        elif not (e.is_contiguous() and p.is_contiguous() and target.is_contiguous()):
            if inplace:
                e.lerp_(p.to(e.dtype), weight)
            else:
                target = torch.lerp(e, p.to(e.dtype), weight)
        else:
            n = e.numel()
            scratch = _cpu_scratch(e.dtype, min(n, _CPU_BLOCK))
            e_flat, p_flat, t_flat = e.view(-1), p.view(-1), target.view(-1)
            for start in range(0, n, _CPU_BLOCK):
                stop = min(n, start + _CPU_BLOCK)
                converted = scratch[: stop - start]
                converted.copy_(p_flat[start:stop])
                torch.lerp(e_flat[start:stop], converted, weight, out=t_flat[start:stop])
        out.append(target)
    return out


def _native_partition(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, widening: bool
) -> tuple[list[int], list[int]]:
    """The leaves the fused C loops take (plain contiguous CPU tensors), and the others.

    `widening`: fp32 EMAs of bf16/fp16 parameters (`lerp_widening`); otherwise bf16 EMAs of
    fp32/bf16/fp16 parameters (`lerp_round_bf16`). A group has one EMA and one parameter dtype.
    """
    every = list(range(len(emas)))
    if not emas or _native.library() is None:
        return [], every
    e_dtype, p_dtype = emas[0].dtype, params[0].dtype
    if widening:
        fits = e_dtype == torch.float32 and p_dtype in (torch.bfloat16, torch.float16)
    else:
        fits = e_dtype == torch.bfloat16 and p_dtype in (torch.float32, torch.bfloat16, torch.float16)
    same = list(map(_DTYPE, emas)) == [e_dtype] * len(emas) and list(map(_DTYPE, params)) == [p_dtype] * len(params)
    if not (fits and same):
        return [], every
    if (
        emas[0].device.type != "cpu"
        or params[0].device.type != "cpu"
        or {*map(type, emas), *map(type, params)} != {torch.Tensor}
    ):
        return [], every  # a group shares one device (checked by the core); subclasses keep torch's dispatch
    if all(map(torch.Tensor.is_contiguous, emas)) and all(map(torch.Tensor.is_contiguous, params)):
        return every, []
    plain = list(map(and_, map(torch.Tensor.is_contiguous, emas), map(torch.Tensor.is_contiguous, params)))
    return [i for i in every if plain[i]], [i for i in every if not plain[i]]


def _gather(items: Sequence[torch.Tensor], indices: Sequence[int]) -> list[torch.Tensor]:
    return list(items) if len(indices) == len(items) else [items[i] for i in indices]


def _merge(n: int, *parts: tuple[Sequence[int], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The leaves of `parts` (index lists with their tensors) back in leaf order."""
    if len(parts[0][0]) == n:
        return list(parts[0][1])
    out: list[torch.Tensor] = [None] * n  # type: ignore[list-item]  # every slot is filled below
    for indices, tensors in parts:
        for i, t in zip(indices, tensors):
            out[i] = t
    return out


def _lerp_widening_native(
    emas: list[torch.Tensor], params: list[torch.Tensor], weight: float, inplace: bool
) -> list[torch.Tensor]:
    outs = emas if inplace else list(map(torch.empty_like, emas))
    _native.lerp_widening(outs, emas, params, weight)
    return outs


@torch.no_grad()
def lerp_round(
    emas: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    weight: float,
    keys: Sequence[int],
    *,
    inplace: bool,
) -> list[torch.Tensor]:
    """Average low-precision EMAs in float32 and round back: `stochastic_round(lerp(...), key)`.

    `keys[k]` is leaf `k`'s rounding key. A bf16 EMA on the CPU takes one fused pass (the
    C loop of `funcema._native`: the same bits as the composition below, tested bit for bit);
    any other case converts each EMA to a float32 temporary, lerps it and rounds it back.
    """
    if not emas:
        return []
    fused, rest = _native_partition(emas, params, widening=False)
    if fused:
        e_fused, p_fused = _gather(emas, fused), _gather(params, fused)
        outs = e_fused if inplace else list(map(torch.empty_like, e_fused))
        _native.lerp_round_bf16(outs, e_fused, p_fused, weight, _native.hash_keys([keys[i] for i in fused]))
        rest_keys = [keys[i] for i in rest]
        rest_out = (
            lerp_round(_gather(emas, rest), _gather(params, rest), weight, rest_keys, inplace=inplace) if rest else []
        )
        return _merge(len(emas), (fused, outs), (rest, rest_out))
    wide = lerp([e.float() for e in emas], params, weight, inplace=True)
    out = []
    for e, w, key in zip(emas, wide, keys):
        rounded = stochastic_round(w, e.dtype, key)
        if inplace:
            e.copy_(rounded)
            out.append(e)
        else:
            out.append(rounded)
    return out


@torch.no_grad()
def lerp_tensor_weight(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: torch.Tensor
) -> list[torch.Tensor]:
    """Out-of-place `lerp` with a 0-d tensor weight that may live on the device.

    The weight is passed as a list (one 0-d tensor per leaf), an overload that never reads it
    on the host, so the update stays free of device synchronisation.
    """
    if not emas:
        return []
    params = [p.to(e.dtype) for e, p in zip(emas, params)]
    if torch.compiler.is_compiling():
        return list(torch._foreach_lerp(list(emas), params, weight.to(emas[0].device)))  # type: ignore[call-overload]
    weights = [weight.to(device=emas[0].device)] * len(emas)
    return list(torch._foreach_lerp(list(emas), params, weights))


@torch.no_grad()
def lerp_on_device(
    emas: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    weight: torch.Tensor,
    *,
    finite: torch.Tensor | None = None,
    inplace: bool = False,
) -> list[torch.Tensor]:
    """`lerp(ema, params, weight)` with the 0-d weight kept on the device: no host read of any value.

    One multi-tensor `lerp` pass with the weight rounded to each EMA's dtype (as a host float
    weight is), exact at weight 0 and 1 for finite values (torch's lerp returns the start point at
    0 and the end point at 1). `finite` false (a skipped non-finite update) selects the old values;
    leaves that are not floating point (no lerp takes them) are copied where the weight is 1.
    """
    device = emas[0].device
    weight = weight.to(device)
    floating = [i for i, e in enumerate(emas) if e.is_floating_point() or e.is_complex()]
    e_f, p_f = [emas[i] for i in floating], [params[i] for i in floating]
    by_dtype = {e.dtype: weight.to(e.dtype) for e in e_f}  # the same rounding as a host float weight
    weights = [by_dtype[e.dtype] for e in e_f]
    p_f = [p.to(e.dtype) for e, p in zip(e_f, p_f)]
    if inplace and finite is None:
        torch._foreach_lerp_(e_f, p_f, weights)
        values = e_f
    else:
        values = list(torch._foreach_lerp(e_f, p_f, weights)) if e_f else []
    out = list(emas)  # every slot is replaced below unless updated in place
    for i, v in zip(floating, values):
        out[i] = v if finite is None else torch.where(finite.to(device), v, emas[i])
    for i in sorted(set(range(len(emas))) - set(floating)):
        out[i] = torch.where(weight == 1, params[i].to(emas[i].dtype), emas[i])
    if inplace:
        changed = [(e, o) for e, o in zip(emas, out) if o is not e]
        if changed:
            torch._foreach_copy_([e for e, _ in changed], [o for _, o in changed])
    return out


@torch.no_grad()
def copy(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, inplace: bool) -> list[torch.Tensor]:
    """Copy `params` into EMA tensors (converting to the EMA's dtype), in place or into new tensors."""
    if not emas:
        return []
    if inplace:
        torch._foreach_copy_(list(emas), list(params))
        return list(emas)
    return [p.detach().to(dtype=e.dtype, copy=True) for e, p in zip(emas, params)]


@torch.no_grad()
def all_finite(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d bool tensor on `device`: whether every element of every tensor is finite.

    Each tensor's extremes are tested in its own dtype (NaN and infinities propagate to them, a
    finite value is never rounded to an infinity), so the test is exact for every dtype: a float64
    extreme cast to float32 would call values above 3.4e38 infinite. On an accelerator the
    extremes are the max-abs norms of one multi-tensor `_foreach_norm` and nothing is read on the
    host; on the CPU, where that norm is several times slower than a pass over the data, they are
    the `aminmax` of each large tensor and of one concatenation of the small ones.
    """
    kinds = map(or_, map(torch.is_floating_point, tensors), map(torch.is_complex, tensors))  # C-level: no per-leaf frame
    floating = list(compress(tensors, kinds))
    ok = torch.ones((), dtype=torch.bool, device=device)
    devices = set(map(attrgetter("device"), floating))
    for dev in devices:
        dev_tensors = floating if len(devices) == 1 else [t for t in floating if t.device == dev]
        extremes: Sequence[torch.Tensor]
        if dev.type == "cpu":
            extremes = _cpu_extremes(dev_tensors)
        else:
            extremes = torch._foreach_norm([t for t in dev_tensors if t.numel()], ord=float("inf"))
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for n in extremes:
            by_dtype.setdefault(n.dtype, []).append(n)
        for values in by_dtype.values():  # one stack per dtype: no per-leaf conversion launches
            flag = torch.stack(values).isfinite().all()
            # Into host memory the copy must be complete before the host reads it: blocking.
            ok = ok & flag.to(device, non_blocking=device.type != "cpu")
    return ok


def _cpu_extremes(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The smallest and the largest value of each CPU tensor (complex ones as real pairs), in its dtype.

    Small tensors are flattened and concatenated per dtype first: one `aminmax` instead of one
    call per leaf (the per-leaf work stays in C-level `map`s, as trees of thousands of small
    leaves are common).
    """
    if any(map(torch.Tensor.is_complex, tensors)):
        tensors = [torch.view_as_real(t.resolve_conj()) if t.is_complex() else t for t in tensors]
    sizes = list(map(torch.Tensor.numel, tensors))
    out: list[torch.Tensor] = []
    for t in compress(tensors, [n >= _CPU_SMALL for n in sizes]):
        out.extend(torch.aminmax(t))
    small = list(compress(tensors, [0 < n < _CPU_SMALL for n in sizes]))  # empty ones hold nothing to test
    dtypes = set(map(_DTYPE, small))
    for dtype in dtypes:
        parts = small if len(dtypes) == 1 else [t for t in small if t.dtype == dtype]
        out.extend(torch.aminmax(torch.cat(list(map(torch.flatten, parts)))))
    return out


@torch.no_grad()
def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or an infinity, or `None` (synchronises).

    One test of every tensor together, then, only if it fails, one per tensor.
    """
    host = torch.device("cpu")
    if bool(all_finite(tensors, host)):
        return None
    return next((i for i, t in enumerate(tensors) if not bool(all_finite([t], host))), None)


# Constants of a 32-bit integer hash (the "lowbias32" finaliser), applied to the element index,
# the step and the seed: a counter-based generator, so rounding is reproducible, pure and
# traceable (no generator state to thread through the update).
_HASH_MUL_1 = 0x7FEB352D
_HASH_MUL_2 = 0x846CA68B
_MASK_32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK_32
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL_1) & _MASK_32
    x = x ^ (x >> 15)
    x = (x * _HASH_MUL_2) & _MASK_32
    return x ^ (x >> 16)


@torch.no_grad()
def stochastic_round(values: torch.Tensor, dtype: torch.dtype, key: torch.Tensor | int) -> torch.Tensor:
    """Round float32 `values` to bfloat16 (or return them cast) with stochastic rounding.

    A value between two bfloat16 neighbours rounds up with probability proportional to its
    distance from the lower one, so the expected result equals the input and small EMA updates
    accumulate instead of being rounded away. `key` (an int or a 0-d integer tensor) selects
    the random stream; the same key gives the same rounding.
    """
    if dtype != torch.bfloat16:
        return values.to(dtype)
    values = values.to(torch.float32).contiguous()
    index = torch.arange(values.numel(), device=values.device, dtype=torch.int64).view(values.shape)
    key = torch.as_tensor(key, dtype=torch.int64, device=values.device)
    noise = _hash32(index * 0x9E3779B1 + _hash32(key)) & 0xFFFF
    bits = values.view(torch.int32).to(torch.int64)
    rounded = ((bits + noise) & ~0xFFFF).to(torch.int32)
    finite = torch.isfinite(values)
    out = torch.where(finite, rounded.view(torch.float32), values)
    return out.to(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Compensated (two-sum) updates
#
# A compensated EMA stores each averaged leaf as an unevaluated sum `ema + comp`: `ema` is the
# value (rounded to the EMA's dtype) and `comp` the part of the exact value that `ema` cannot
# hold, `|comp| <= ulp(ema) / 2`. One update of the pair `x = ema + comp` with weight `w`:
#
#     y    = comp + w * ((params - ema) - comp)     # = (1 - w) comp + w (params - ema): a lerp
#     s    = ema + y                                # rounded
#     comp = y - (s - ema)                          # what the rounding of s lost (Fast2Sum)
#     ema  = s
#
# `s - ema` is exact when `|y| <= |ema|` (Dekker's Fast2Sum), the case that matters: the
# increment is far below the EMA's resolution. `params - ema` is exact when the two are within a
# factor 2 (Sterbenz) and otherwise rounded to the relative precision of the increment itself. So
# the pair moves by the increment to the dtype's precision *of the increment*, not of `ema`.


def _promoted(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`params` ready for `params - ema` in the EMA's dtype (a narrower dtype is promoted by the op)."""
    if not emas or torch.promote_types(params[0].dtype, emas[0].dtype) == emas[0].dtype:
        return list(params)
    return [p.to(e.dtype) for e, p in zip(emas, params)]


@torch.no_grad()
def compensated_lerp(
    emas: Sequence[torch.Tensor],
    comps: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    weight: float,
    *,
    inplace: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The compensated update of `ema + comp` with a host float weight; returns `(emas, comps)`.

    In place (`inplace=True`): five multi-tensor passes and one temporary per leaf. Out of place:
    five passes into new tensors; nothing of the inputs changes.
    """
    if not emas:
        return [], []
    emas, comps = list(emas), list(comps)
    diffs = torch._foreach_sub(_promoted(emas, params), emas)  # params - ema
    if inplace:
        torch._foreach_lerp_(comps, diffs, weight)  # comps = y
        torch._foreach_copy_(diffs, emas)  # diffs = old ema
        torch._foreach_add_(emas, comps)  # emas = s
        torch._foreach_sub_(diffs, emas)  # diffs = old - s = -(s - old), exact
        torch._foreach_add_(comps, diffs)  # comps = y - (s - old)
        return emas, comps
    ys = list(torch._foreach_lerp(comps, diffs, weight))
    sums = list(torch._foreach_add(emas, ys))
    torch._foreach_copy_(diffs, emas)  # reuse the temporary: diffs = ema
    torch._foreach_sub_(diffs, sums)  # -(s - ema), exact
    torch._foreach_add_(ys, diffs)
    return sums, ys


@torch.no_grad()
def compensated_lerp_tensor_weight(
    emas: Sequence[torch.Tensor],
    comps: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    weight: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Out-of-place compensated update with a 0-d tensor weight (traced; no host synchronisation).

    At `weight == 1` the pair becomes `params` up to the rounding of `params - ema`; callers
    that need the exact copy select `split` there.
    """
    if not emas:
        return [], []
    emas, comps = list(emas), list(comps)
    diffs = torch._foreach_sub(_promoted(emas, params), emas)
    if torch.compiler.is_compiling():
        ys = torch._foreach_lerp(comps, diffs, weight.to(emas[0].device))  # type: ignore[call-overload]
    else:
        ys = torch._foreach_lerp(comps, diffs, [weight.to(emas[0].device)] * len(emas))
    sums = torch._foreach_add(emas, ys)
    lost = torch._foreach_sub(emas, sums)  # -(s - ema), exact
    return list(sums), list(torch._foreach_add(ys, lost))


@torch.no_grad()
def split(params: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`params` as new compensated pairs `(hi, lo)` of `dtypes`: `hi` rounded to nearest, `lo` the rest.

    `lo` is zero where a parameter's dtype fits in the EMA's; for a wider parameter (a float32
    parameter of a bfloat16 EMA) it holds the digits `hi` cannot, so a copy loses nothing more
    than the pair's own precision.
    """
    his, los = [], []
    for p, dtype in zip(params, dtypes):
        hi = p.detach().to(dtype=dtype, copy=True)
        fits = torch.promote_types(p.dtype, dtype) == dtype
        his.append(hi)
        los.append(torch.zeros_like(hi) if fits else (p.detach() - hi.to(p.dtype)).to(dtype))
    return his, los


@torch.no_grad()
def compensated_copy(
    emas: Sequence[torch.Tensor], comps: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, inplace: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Set the pairs `(emas, comps)` to `params` (see `split`), in place or into new tensors."""
    if not emas:
        return [], []
    if not inplace:
        return split(params, [e.dtype for e in emas])
    emas, comps = list(emas), list(comps)
    torch._foreach_copy_(emas, list(params))
    if torch.promote_types(params[0].dtype, emas[0].dtype) == emas[0].dtype:
        torch._foreach_zero_(comps)
    else:
        for e, c, p in zip(emas, comps, params):
            c.copy_(p - e.to(p.dtype))
    return emas, comps


@torch.no_grad()
def compensated_lerp_wide(
    ema: torch.Tensor, comp: torch.Tensor, param: torch.Tensor, weight: float | torch.Tensor, key: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compensated update of one float16/bfloat16 pair, computed in float32.

    The increment `y` is formed as in `compensated_lerp`
    but in float32; `hi` is `ema + y` rounded to nearest, and the remainder
    `(ema - hi) + y` (exact up to float32 rounding of a value below `ulp(hi)`) is rounded
    *stochastically* into `lo`. Rounding `lo` to nearest would stall again one level down: the
    increments at large `t` are also below `lo`'s resolution. Stochastic rounding of the low
    word keeps the pair unbiased with noise 2^-8 of that of a stochastically rounded bfloat16 EMA.
    """
    wide = ema.float()
    diff = param.float() - wide
    if isinstance(weight, torch.Tensor):
        y = torch._foreach_lerp([comp.float()], [diff], [weight.to(wide.device)])[0]
    else:
        y = torch.lerp(comp.float(), diff, weight)
    hi = (wide + y).to(ema.dtype)
    rest = (wide - hi.float()) + y
    return hi, stochastic_round(rest, ema.dtype, key)
