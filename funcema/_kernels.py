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
flags, stochastic rounding). Must not import: any funcema module (it imports `torch` only);
what to write and with which weight is the core's decision.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from operator import attrgetter

import torch

__all__ = [
    "lerp",
    "lerp_tensor_weight",
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
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: float, *, inplace: bool
) -> list[torch.Tensor]:
    """Return `ema + weight * (params - ema)` with a host float weight (no device synchronisation).

    Eager mode only: under `torch.compile` the core uses
    [`lerp_tensor_weight`][funcema._kernels.lerp_tensor_weight], since a Python float weight
    would recompile for every new value.
    """
    if not emas:
        return []
    same = list(map(_DTYPE, emas)) == list(map(_DTYPE, params))  # C-level: no per-leaf Python frame
    if not same and emas[0].device.type == "cpu":
        return _lerp_converting_cpu(emas, params, weight, inplace=inplace)
    out: list[torch.Tensor] = []
    for e_chunk, p_chunk in [(list(emas), list(params))] if same else _converted_chunks(emas, params):
        if inplace:
            torch._foreach_lerp_(e_chunk, p_chunk, weight)
            out.extend(e_chunk)
        else:
            out.extend(torch._foreach_lerp(e_chunk, p_chunk, weight))
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

    Elementwise the same operation as converting first (the conversion is exact for bf16/fp16 to
    fp32), computed on blocks of at most `_CPU_BLOCK` elements through a per-thread scratch.
    The scratch is private to this function and fully consumed before it returns, so reusing it
    across calls never aliases anything the caller can see.
    """
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

    Computed with the max-abs norm (NaN and infinities propagate, finite values never overflow)
    and without any host synchronisation.
    """
    floating = [t for t in tensors if (t.is_floating_point() or t.is_complex()) and t.numel() > 0]
    ok = torch.ones((), dtype=torch.bool, device=device)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in floating:
        by_device.setdefault(t.device, []).append(t)
    for dev_tensors in by_device.values():
        norms = torch._foreach_norm(dev_tensors, ord=float("inf"))
        flag = torch.stack([n.float() for n in norms]).isfinite().all()
        ok = ok & flag.to(device, non_blocking=True)
    return ok


@torch.no_grad()
def first_nonfinite(tensors: Sequence[torch.Tensor]) -> int | None:
    """Index of the first tensor holding a NaN or an infinity, or `None` (synchronises)."""
    for i, t in enumerate(tensors):
        if (t.is_floating_point() or t.is_complex()) and t.numel() > 0 and not bool(torch.isfinite(t).all()):
            return i
    return None


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
