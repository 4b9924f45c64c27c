r"""A fused multi-tensor EMA kernel in Triton: one launch per dtype group, any mix of leaf sizes.

[`lerp_`][funcema._triton.lerp_] updates a list of EMA tensors in place from a list of parameter
tensors in one kernel launch. A *pointer table* (each leaf's EMA and parameter addresses and
size) and a *block map* (for each program: its leaf and the element where its block starts) are
built once, on the device, and cached while the tensors stay the same (keyed by their addresses
and sizes, which is exactly what the tables hold). Each program converts its block of parameters
to float32, lerps, optionally rounds to bfloat16 stochastically, and stores the EMA:

$$ e \leftarrow \operatorname{round}\big(\operatorname{lerp}(e, \operatorname{float}(p), w)\big) $$

with torch's lerp formula (one fused multiply-add, exact at both ends). The weight $w$ is a 0-d
tensor on the device, read by the kernel: nothing is read back on the host, so the call never
synchronises and can be captured in a CUDA graph.

Triton is optional: this module imports it only when a kernel is first needed, so
`import funcema` works without it; [`available`][funcema._triton.available] says whether it is
installed. On a machine without a GPU, `TRITON_INTERPRET=1` (set before the first call) runs the
same kernel on CPU tensors with Triton's interpreter; that is how the tests run it.

Owns: the Triton kernel, its pointer tables and their cache.

Must not import: any funcema module (it imports torch and, lazily, triton only).
"""

from __future__ import annotations

import functools
import importlib.util
import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["available", "lerp_", "BLOCK"]

BLOCK = 2048  # elements per program; a leaf's last block is masked
_TABLES: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, ...]] = OrderedDict()
_TABLES_MAX = 16  # cached tables (one per dtype group and set of tensors); least recently used dropped
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE, _DEVICE = operator.attrgetter("dtype"), operator.attrgetter("device")


def available() -> bool:
    """Whether the `triton` package is installed (it is not imported here).

    >>> isinstance(available(), bool)
    True
    """
    return importlib.util.find_spec("triton") is not None


# The kernel's source: plain functions, jitted by `_kernel` on first use. Triton resolves `tl` and
# `_hash32_tl` in this module's globals when it compiles (or interprets) them; `_kernel` sets both.
tl: Any = None
_hash32_tl: Any = None


def _hash32_body(x):  # the "lowbias32" finaliser on uint32, as _kernels._hash32
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


def _ema_body(
    ema_ptrs, param_ptrs, sizes, block_leaf, block_start, weight_ptr, keys_ptr, flag_ptr,
    EMA_TYPE: tl.constexpr, PARAM_TYPE: tl.constexpr, ROUND: tl.constexpr, BF16: tl.constexpr,
    SKIP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    leaf = tl.load(block_leaf + pid)
    start = tl.load(block_start + pid)
    n = tl.load(sizes + leaf)
    ema = tl.load(ema_ptrs + leaf).to(tl.pointer_type(EMA_TYPE))
    param = tl.load(param_ptrs + leaf).to(tl.pointer_type(PARAM_TYPE))
    if SKIP:  # the non-finite skip: no element is in range when the flag (a device bool) is false
        n = tl.where(tl.load(flag_ptr) != 0, n, 0)
    index = start + tl.arange(0, BLOCK)
    mask = index < n
    e = tl.load(ema + index, mask=mask).to(tl.float32)
    p = tl.load(param + index, mask=mask).to(tl.float32)
    w = tl.load(weight_ptr).to(tl.float32)
    d = p - e
    v = tl.where(tl.abs(w) < 0.5, tl.fma(w, d, e), tl.fma(w - 1.0, d, p))  # torch's lerp
    if BF16:  # rounded on the bits: stochastically, or to nearest even (as torch's conversion)
        bits = v.to(tl.uint32, bitcast=True)
        if ROUND:  # the noise of funcema._kernels.stochastic_round for this leaf's key
            key = _hash32_tl(tl.load(keys_ptr + leaf).to(tl.uint32))
            noise = _hash32_tl(index.to(tl.uint32) * tl.full([], 0x9E3779B1, tl.uint32) + key) & 0xFFFF
        else:
            noise = ((bits >> 16) & 1) + 0x7FFF
        rounded = ((bits + noise) >> 16).to(tl.uint16)
        special = (bits & 0x7F800000) == 0x7F800000
        nan = special & ((bits & 0x007FFFFF) != 0)
        out = tl.where(nan, tl.full([], 0x7FC0, tl.uint16), tl.where(special, (bits >> 16).to(tl.uint16), rounded))
        tl.store(ema + index, out.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ema + index, v.to(EMA_TYPE), mask=mask)


@functools.cache
def _kernel() -> tuple[Any, dict[torch.dtype, Any]]:
    """The jitted kernel and triton's dtypes. The first call imports triton, which reads
    `TRITON_INTERPRET` when it decorates the functions."""
    global tl, _hash32_tl
    import triton
    import triton.language

    tl = triton.language
    _hash32_tl = triton.jit(_hash32_body)
    return triton.jit(_ema_body), {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _check(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
    """Raise on tensors outside one dtype group; C-level comparisons first, the per-leaf loop on failure."""
    if len(emas) != len(params):
        raise ValueError(f"emas and params must have the same length, got {len(emas)} and {len(params)}.")
    device, e_dtype, p_dtype = emas[0].device, emas[0].dtype, params[0].dtype
    if e_dtype not in _FLOATS or p_dtype not in _FLOATS:
        raise TypeError(f"emas and params must be float32, bfloat16 or float16, got {e_dtype} and {p_dtype}.")
    n = len(emas)
    fine = (
        list(map(_DTYPE, emas)) == [e_dtype] * n
        and list(map(_DTYPE, params)) == [p_dtype] * n
        and list(map(torch.Tensor.size, emas)) == list(map(torch.Tensor.size, params))
        and list(map(_DEVICE, emas)) == [device] * n
        and list(map(_DEVICE, params)) == [device] * n
        and all(map(torch.Tensor.is_contiguous, emas))
        and all(map(torch.Tensor.is_contiguous, params))
    )
    for k, (e, p) in enumerate(zip(emas, params)) if not fine else ():
        if e.dtype != e_dtype or p.dtype != p_dtype:
            raise TypeError(f"leaf {k}: one dtype group only, expected {e_dtype}/{p_dtype}, got {e.dtype}/{p.dtype}.")
        if e.device != device or p.device != device:
            raise ValueError(f"leaf {k}: every tensor must be on {device}, got {e.device} and {p.device}.")
        if e.shape != p.shape or not (e.is_contiguous() and p.is_contiguous()):
            raise ValueError(
                f"leaf {k}: emas and params must be contiguous and of one shape, got {e.shape} and {p.shape}."
            )
    if weight.dim() != 0 or weight.device != device or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a 0-d floating-point tensor on {device}, got {tuple(weight.shape)} on {weight.device}."
        )


def _check_options(emas: Sequence[torch.Tensor], round_keys: torch.Tensor | None, finite: torch.Tensor | None) -> None:
    device = emas[0].device
    if round_keys is not None and (emas[0].dtype != torch.bfloat16 or round_keys.shape != (len(emas),)
                                   or round_keys.dtype != torch.int64 or round_keys.device != device):  # fmt: skip
        raise ValueError(f"round_keys must be an int64 tensor of shape ({len(emas)},) on {device}, for bfloat16 EMAs.")
    if finite is not None and (finite.dim() != 0 or finite.dtype != torch.bool or finite.device != device):
        raise ValueError(f"finite must be a 0-d bool tensor on {device}.")


def _tables(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], block: int) -> tuple[torch.Tensor, ...]:
    """Pointer table, sizes and block map of the group, built once and reused while the tensors stay."""
    e_ptrs, p_ptrs = list(map(torch.Tensor.data_ptr, emas)), list(map(torch.Tensor.data_ptr, params))
    sizes = list(map(torch.Tensor.numel, emas))
    key = (emas[0].device, block, *e_ptrs, *p_ptrs, *sizes)
    cached = _TABLES.get(key)
    if cached is not None:
        _TABLES.move_to_end(key)
        return cached
    blocks = [-(-n // block) for n in sizes]
    leaf = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64))
    first = torch.tensor([0, *blocks], dtype=torch.int64).cumsum(0)[:-1]  # each leaf's first block
    start = (torch.arange(len(leaf), dtype=torch.int64) - first[leaf.long()]) * block
    host = (torch.tensor(e_ptrs, dtype=torch.int64), torch.tensor(p_ptrs, dtype=torch.int64),
            torch.tensor(sizes, dtype=torch.int64), leaf, start)  # fmt: skip
    tables = tuple(t.to(emas[0].device) for t in host)  # one upload, when the tensors change
    _TABLES[key] = tables
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return tables


def lerp_(
    emas: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    weight: torch.Tensor,
    *,
    round_keys: torch.Tensor | None = None,
    finite: torch.Tensor | None = None,
) -> None:
    r"""Update one dtype group of EMA tensors in place, in one kernel launch.

    For every leaf $k$ and element $i$:
    $$ e_{k,i} \leftarrow \operatorname{lerp}\big(\operatorname{float}(e_{k,i}), \operatorname{float}(p_{k,i}), w\big) $$

    computed in float32 and stored in the EMA's dtype (round to nearest), or, with
    `round_keys`, rounded to bfloat16 stochastically with the noise
    `hash32(i * 0x9E3779B1 + hash32(round_keys[k])) & 0xFFFF`: bit for bit the rounding of
    `funcema._kernels.stochastic_round(value, torch.bfloat16, round_keys[k])`.

    Args:
        emas: EMA tensors of one dtype (float32, bfloat16 or float16), contiguous, on one device.
        params: Parameter tensors of one float dtype, of the EMAs' shapes, on the same device.
        weight: 0-d floating-point tensor on that device: the interpolation weight $w$. It is read
            by the kernel (no host synchronisation).
        round_keys: 1-d int64 tensor on the device, one rounding key per leaf (bfloat16 EMAs only).
        finite: 0-d bool tensor on the device. Where it is false nothing is written (the
            non-finite skip decided on the device, e.g. by `funcema._kernels.all_finite`).

    Raises:
        ValueError: mismatched lengths, shapes or devices, a non-contiguous tensor, a bad weight,
            `round_keys` or `finite`; nothing is written then.
        TypeError: the tensors are not one (EMA dtype, parameter dtype) group of float dtypes.

    Example (without a GPU, in Triton's interpreter):

    >>> import os, pytest, torch
    >>> _ = pytest.importorskip("triton")
    >>> device = "cuda" if torch.cuda.is_available() else "cpu"
    >>> _ = os.environ.setdefault("TRITON_INTERPRET", "1" if device == "cpu" else "0")
    >>> ema = [torch.zeros(3, device=device), torch.zeros((), device=device)]
    >>> params = [torch.ones(3, device=device, dtype=torch.bfloat16), torch.ones((), device=device, dtype=torch.bfloat16)]
    >>> lerp_(ema, params, torch.tensor(0.25, device=device))
    >>> [e.tolist() for e in ema]
    [[0.25, 0.25, 0.25], 0.25]
    """
    if not emas:
        return
    _check(emas, params, weight)
    _check_options(emas, round_keys, finite)
    kernel, types = _kernel()
    e_ptrs, p_ptrs, sizes, leaf, start = _tables(emas, params, BLOCK)
    if leaf.numel() > 0:  # not only empty leaves
        kernel[(leaf.numel(),)](
            e_ptrs, p_ptrs, sizes, leaf, start, weight,
            round_keys if round_keys is not None else sizes, finite.view(torch.uint8) if finite is not None else weight,
            EMA_TYPE=types[emas[0].dtype], PARAM_TYPE=types[params[0].dtype],
            ROUND=round_keys is not None, BF16=emas[0].dtype == torch.bfloat16, SKIP=finite is not None, BLOCK=BLOCK,
        )  # fmt: skip
