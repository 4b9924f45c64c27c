"""Multi-tensor kernels: the only module that calls ``torch._foreach_*``.

Each function takes matching lists of EMA tensors and parameter tensors from one group of the
state (same device, same EMA dtype, same parameter dtype), so every ``_foreach`` call can take
torch's fused multi-tensor path. All of them run under ``torch.no_grad()`` (an in-place update
with grad mode on would attach autograd history to the EMA) and convert dtypes explicitly, so
eager mode (which rejects mixed dtypes in ``_foreach_lerp_``) and compiled mode (which would
silently promote) compute the same thing.

The interpolation ``ema + w * (params - ema)`` is always a ``lerp``: torch's lerp returns the
end point exactly at ``w = 1`` and the start point exactly at ``w = 0``, and maps a constant
sequence to itself bit for bit, which the debias and warm-start semantics rely on.
"""

from __future__ import annotations

from typing import Sequence

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


def _converted_chunks(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Split the group into chunks whose converted parameters fit in the temporary budget."""
    if all(e.dtype == p.dtype for e, p in zip(emas, params)):
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
    """``ema + weight * (params - ema)`` with a host float weight (no device synchronisation)."""
    if not emas:
        return []
    if torch.compiler.is_compiling():  # compiled code fuses the conversion into the kernel
        params = [p.to(e.dtype) for e, p in zip(emas, params)]
        if inplace:
            torch._foreach_lerp_(list(emas), params, weight)
            return list(emas)
        return list(torch._foreach_lerp(list(emas), params, weight))
    out: list[torch.Tensor] = []
    for e_chunk, p_chunk in _converted_chunks(emas, params):
        if inplace:
            torch._foreach_lerp_(e_chunk, p_chunk, weight)
            out.extend(e_chunk)
        else:
            out.extend(torch._foreach_lerp(e_chunk, p_chunk, weight))
    return out


@torch.no_grad()
def lerp_tensor_weight(
    emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: torch.Tensor
) -> list[torch.Tensor]:
    """Out-of-place ``lerp`` with a 0-d tensor weight that may live on the device.

    The weight is passed as a list (one 0-d tensor per leaf), an overload that never reads it
    on the host, so the update stays free of device synchronisation.
    """
    if not emas:
        return []
    params = [p.to(e.dtype) for e, p in zip(emas, params)]
    if torch.compiler.is_compiling():
        return list(torch._foreach_lerp(list(emas), params, weight.to(emas[0].device)))
    weights = [weight.to(device=e.device)] * len(emas)
    return list(torch._foreach_lerp(list(emas), params, weights))


@torch.no_grad()
def copy(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, inplace: bool) -> list[torch.Tensor]:
    """Copy ``params`` into EMA tensors (converting to the EMA's dtype), in place or into new tensors."""
    if not emas:
        return []
    if inplace:
        torch._foreach_copy_(list(emas), list(params))
        return list(emas)
    return [p.detach().to(dtype=e.dtype, copy=True) for e, p in zip(emas, params)]


@torch.no_grad()
def all_finite(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d bool tensor on ``device``: whether every element of every tensor is finite.

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
    """Index of the first tensor holding a NaN or an infinity, or ``None`` (synchronises)."""
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
    """Round float32 ``values`` to bfloat16 (or return them cast) with stochastic rounding.

    A value between two bfloat16 neighbours rounds up with probability proportional to its
    distance from the lower one, so the expected result equals the input and small EMA updates
    accumulate instead of being rounded away. ``key`` (an int or a 0-d integer tensor) selects
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
