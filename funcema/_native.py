r"""Fused CPU loops for the mixed-precision updates, compiled from C at first use (optional).

torch's CPU kernels cannot lerp a bf16/fp16 parameter into an fp32 EMA in one pass (TensorIterator
makes a converted copy first), and a counter-based stochastic rounding written with tensor ops
takes about fifteen passes over memory. These two loops do each update in one pass:

- `lerp_widening`: $e' = \operatorname{lerp}(e, \operatorname{float}(p), w)$, fp32 EMA, bf16/fp16 params;
- `lerp_round_bf16`: the same in fp32 for a bf16 EMA, rounded back to bf16 stochastically with
  the counter-based hash of [`stochastic_round`][funcema._kernels.stochastic_round] (the same
  bits for the same key).

The lerp is torch's CPU formula, `fma(w, p - e, e)` for $|w| < 1/2$ and `fma(w - 1, p - e, p)`
otherwise. The C source is compiled once per process with the system C compiler into a private
temporary directory (about 0.2 s) and loaded with `ctypes`, which releases the GIL, so large
tensors are split over torch's intra-op thread count. Without a compiler, on a platform where the
build fails, or with `FUNCEMA_NATIVE=0` in the environment, [`library`][funcema._native.library]
returns `None` and the callers keep their torch implementation.

Owns: the C source of the fused loops, their build and their `ctypes` bindings.

Must not import: any funcema module (it imports the standard library and torch only).
"""

from __future__ import annotations

import array
import ctypes
import functools
import itertools
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["library", "lerp_widening", "lerp_round_bf16", "hash_keys"]

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float from_f32(const float *p, int64_t i) { return p[i]; }
static inline float from_bf16(const uint16_t *p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* fp16 -> fp32 (exact) from the low 16 bits of h, with integer and float operations the compiler
   vectorises (a `(float)_Float16` conversion stays scalar); torch's scalar formula: with x the
   exponent and mantissa bits, a normal, an infinity or a NaN is x moved up 13 bits with the exponent
   raised by 224, times 2^-112 (exact; an exponent 31 becomes 255 and a NaN keeps its payload);
   a zero or subnormal is 0.5 + m * 2^-24 - 0.5 = m * 2^-24, exact. Then the sign. */
static inline float f16_f32(uint32_t h) {
    const uint32_t x = h & 0x7FFFu;
    const float normal = bits_f32((x << 13) + 0x70000000u) * 0x1p-112f;
    const float tiny = bits_f32(x | 0x3F000000u) - 0.5f;
    return bits_f32(f32_bits(x < 0x400u ? tiny : normal) | (h & 0x8000u) << 16);
}
static inline float from_f16(const uint16_t *p, int64_t i) { return f16_f32(p[i]); }

/* torch's CPU lerp: exact at both ends, one rounding (fused multiply-add). */
static inline float lerp1(float s, float e, float w) {
    return fabsf(w) < 0.5f ? fmaf(w, e - s, s) : fmaf(w - 1.0f, e - s, e);
}

/* The "lowbias32" finaliser, as funcema._kernels._hash32 computes it on int64 with masks. */
static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; return x ^ (x >> 16);
}

/* Multi-tensor loops over a table of int64 rows, one column per tensor k: the addresses
   out[k], ema[k], p[k] (out[k] may be ema[k]) and the element count n[k]. */
#define WIDEN(NAME, PT, LOAD)                                                              \
void NAME(int64_t count, const int64_t *out, const int64_t *ema, const int64_t *p,       \
          const int64_t *n, float w) {                                                    \
    for (int64_t k = 0; k < count; k++) {                                                 \
        float *o = (float *)(intptr_t)out[k];                                             \
        const float *e = (const float *)(intptr_t)ema[k];                                 \
        const PT *restrict q = (const PT *)(intptr_t)p[k];                                \
        for (int64_t i = 0; i < n[k]; i++) o[i] = lerp1(e[i], LOAD(q, i), w);             \
    }                                                                                     \
}
WIDEN(lerp_widening_bf16, uint16_t, from_bf16)
WIDEN(lerp_widening_f16, uint16_t, from_f16)

/* Two more rows: start[k], the index of element 0 of tensor k in its leaf (the rounding
   counter), and hkey[k], the leaf's hashed key (its low 32 bits). Element i of a leaf gets the
   noise hash32(i * 0x9E3779B1 + hkey) & 0xFFFF, and the float v rounds to the high half of
   round_hi(v, noise): bits + noise for every non-NaN v (a finite v with the low half cut off;
   an infinity's low half is zero and noise < 2^16, so no carry reaches its high half) and torch's
   canonical bf16 NaN 0x7FC0 for every NaN. */
static inline uint32_t round_hi(float v, uint32_t noise) {
    uint32_t bits; memcpy(&bits, &v, 4);
    return v != v ? 0x7FC00000u : bits + noise;
}
static inline uint32_t noise16(uint32_t x) { return hash32(x) & 0xFFFFu; }

/* The loop over one tensor, written so that the compiler vectorises it: branch-free rounding,
   the counter hashed as a 32-bit induction variable (x advances by 0x9E3779B1 per element),
   the lerp's |w| < 1/2 test hoisted out (`hi` is a constant: one loop version per branch), and
   elements taken in pairs: a 32-bit word of a bf16 array holds elements 2j (low half, on a
   little-endian machine) and 2j+1 (high half), so both widen with a shift and a mask and the two
   rounded results pack into one word without a shuffle. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PAIRED_WORDS 1
#else
#define PAIRED_WORDS 0
#endif
static inline void pair_bf16(const uint16_t *p, int64_t j, float *a, float *b) {
    if (PAIRED_WORDS) {
        uint32_t u; memcpy(&u, p + 2 * j, 4); *a = bits_f32(u << 16); *b = bits_f32(u & 0xFFFF0000u);
    } else {
        *a = from_bf16(p, 2 * j); *b = from_bf16(p, 2 * j + 1);
    }
}
static inline void put_pair(uint16_t *o, int64_t j, uint32_t r0, uint32_t r1) {
    if (PAIRED_WORDS) {
        uint32_t u = (r0 >> 16) | (r1 & 0xFFFF0000u); memcpy(o + 2 * j, &u, 4);
    } else {
        o[2 * j] = (uint16_t)(r0 >> 16); o[2 * j + 1] = (uint16_t)(r1 >> 16);
    }
}
#define ROUND(NAME, PT, PAIR, LOAD)                                                        \
static inline __attribute__((always_inline)) void NAME##_one(                             \
        uint16_t *o, const uint16_t *e, const PT *restrict q, int64_t n, float w, int hi,     \
        uint32_t x) {                                                                     \
    const float a = hi ? w - 1.0f : w;                                                    \
    const int64_t m = n / 2;                                                              \
    for (int64_t j = 0; j < m; j++) {                                                     \
        float s0, s1, t0, t1;                                                             \
        pair_bf16(e, j, &s0, &s1);                                                        \
        PAIR(q, j, &t0, &t1);                                                             \
        float v0 = fmaf(a, t0 - s0, hi ? t0 : s0), v1 = fmaf(a, t1 - s1, hi ? t1 : s1);   \
        uint32_t r0 = round_hi(v0, noise16(x)), r1 = round_hi(v1, noise16(x + 0x9E3779B1u)); \
        put_pair(o, j, r0, r1);                                                           \
        x += 2u * 0x9E3779B1u;                                                            \
    }                                                                                     \
    if (n & 1) {                                                                          \
        float v = lerp1(from_bf16(e, n - 1), LOAD(q, n - 1), w);                          \
        o[n - 1] = (uint16_t)(round_hi(v, noise16(x)) >> 16);                             \
    }                                                                                     \
}                                                                                         \
void NAME(int64_t count, const int64_t *out, const int64_t *ema, const int64_t *p,       \
          const int64_t *n, float w, const int64_t *start, const int64_t *hkey) {         \
    for (int64_t k = 0; k < count; k++) {                                                 \
        uint16_t *o = (uint16_t *)(intptr_t)out[k];                                       \
        const uint16_t *e = (const uint16_t *)(intptr_t)ema[k];                           \
        const PT *q = (const PT *)(intptr_t)p[k];                                         \
        uint32_t x = (uint32_t)start[k] * 0x9E3779B1u + (uint32_t)hkey[k];                \
        if (fabsf(w) < 0.5f) NAME##_one(o, e, q, n[k], w, 0, x);                          \
        else NAME##_one(o, e, q, n[k], w, 1, x);                                          \
    }                                                                                     \
}
static inline void pair_f32(const float *p, int64_t j, float *a, float *b) { *a = p[2 * j]; *b = p[2 * j + 1]; }
static inline void pair_f16(const uint16_t *p, int64_t j, float *a, float *b) {
    if (PAIRED_WORDS) {
        uint32_t u; memcpy(&u, p + 2 * j, 4); *a = f16_f32(u); *b = f16_f32(u >> 16);
    } else {
        *a = from_f16(p, 2 * j); *b = from_f16(p, 2 * j + 1);
    }
}
ROUND(lerp_round_bf16_f32, float, pair_f32, from_f32)
ROUND(lerp_round_bf16_bf16, uint16_t, pair_bf16, from_bf16)
ROUND(lerp_round_bf16_f16, uint16_t, pair_f16, from_f16)

/* key[k] = hash32 of the low 32 bits of key[k], in place: the leaves' hashed rounding keys. */
void hash_keys(int64_t count, int64_t *key) {
    for (int64_t k = 0; k < count; k++) key[k] = hash32((uint32_t)key[k]);
}
"""

_WIDEN = {torch.bfloat16: "lerp_widening_bf16", torch.float16: "lerp_widening_f16"}
_ROUND = {
    torch.float32: "lerp_round_bf16_f32",
    torch.bfloat16: "lerp_round_bf16_bf16",
    torch.float16: "lerp_round_bf16_f16",
}
# With more than one intra-op thread, tensors are cut into pieces of at most this many elements
# and the pieces are dealt out to the threads in contiguous runs of about equal size.
_PIECE = 1 << 20


def _build(directory: str) -> ctypes.CDLL:
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    compiler = shlex.split(os.environ["CC"]) if os.environ.get("CC") else [found] if found else []
    if not compiler:
        raise OSError("no C compiler found")
    src, lib = os.path.join(directory, "funcema_native.c"), os.path.join(directory, "funcema_native.so")
    with open(src, "w") as f:
        f.write(_SOURCE)
    rest = ["-O3", "-fPIC", "-shared", "-fno-math-errno", src, "-o", lib, "-lm"]
    error = ""
    for flags in (["-march=native"], []):  # tuned to this CPU if the compiler can, generic otherwise
        done = subprocess.run([*compiler, *flags, *rest], capture_output=True, timeout=120)
        if done.returncode == 0:
            return ctypes.CDLL(lib)
        error = done.stderr.decode(errors="replace")[-500:]
    raise OSError(error)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled loops, or `None` where they are unavailable or disabled (`FUNCEMA_NATIVE=0`)."""
    if os.environ.get("FUNCEMA_NATIVE", "1") == "0":
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="funcema-native-") as directory:
            lib = _build(directory)  # the loaded library stays mapped after its file is removed
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    for name in _WIDEN.values():
        getattr(lib, name).argtypes = rows
    for name in _ROUND.values():
        getattr(lib, name).argtypes = [*rows, ctypes.c_void_p, ctypes.c_void_p]
    lib.hash_keys.argtypes = [ctypes.c_int64, ctypes.c_void_p]
    return lib


@functools.lru_cache(maxsize=4)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """A pool per thread count and process (a forked child cannot use its parent's threads)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="funcema-native")


def _pieces(
    tensors: tuple[Sequence[torch.Tensor], ...], sizes: list[int], piece: int
) -> tuple[list[list[int]], list[int], list[int], list[int]]:
    """Pointers, sizes, leaf indices and element offsets of the tensors (`sizes`: their element
    counts) cut into pieces of <= `piece`."""
    ptrs = [list(map(torch.Tensor.data_ptr, ts)) for ts in tensors]
    if max(sizes, default=0) <= piece:
        return ptrs, sizes, list(range(len(sizes))), [0] * len(sizes)
    widths = [ts[0].element_size() if ts else 0 for ts in tensors]
    cut: list[list[int]] = [[] for _ in tensors]
    n_out, leaf_out, start_out = [], [], []
    for k, n in enumerate(sizes):
        for start in range(0, max(n, 1), piece):
            for j, width in enumerate(widths):
                cut[j].append(ptrs[j][k] + start * width)
            n_out.append(min(piece, n - start))
            leaf_out.append(k)
            start_out.append(start)
    return cut, n_out, leaf_out, start_out


def _runs(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut `sizes` into at most `parts` contiguous runs `(lo, hi)` of about equal total size."""
    if parts == 1:
        return [(0, len(sizes))] if sizes else []
    bounds, acc, goal = [0], 0, sum(sizes) / parts
    for i, n in enumerate(sizes):
        acc += n
        if acc >= goal * len(bounds) and len(bounds) < parts:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]


def _run(name: str, tensors: tuple[Sequence[torch.Tensor], ...], weight: float, hkeys: Sequence[int] | None) -> None:
    """Call the loop `name` over the tensors, on torch's intra-op thread count when they are large."""
    lib = library()
    assert lib is not None, "call library() first"
    call = getattr(lib, name)
    threads = torch.get_num_threads()
    sizes = list(map(torch.Tensor.numel, tensors[0]))
    parts = max(1, min(threads, sum(sizes) // _PIECE))
    ptrs, sizes, leaves, starts = _pieces(tensors, sizes, _PIECE if parts > 1 else 1 << 62)
    rows = [*ptrs, sizes]
    if hkeys is not None:
        rows += [starts, list(hkeys) if len(leaves) == len(hkeys) else [hkeys[k] for k in leaves]]
    flat: list[int] = []
    for row in rows:
        flat += row
    table = array.array("q", flat)  # one column per piece; alive until the calls return
    base, stride = table.buffer_info()[0], len(sizes) * 8
    calls = []
    for lo, hi in _runs(sizes, parts):
        row = [base + r * stride + lo * 8 for r in range(len(rows))]
        calls.append([hi - lo, *row[:4], weight, *row[4:]])
    if len(calls) == 1:
        call(*calls[0])
        return
    for future in [_pool(threads, os.getpid()).submit(call, *args) for args in calls]:
        future.result()


def lerp_widening(
    outs: Sequence[torch.Tensor], emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor], weight: float
) -> None:
    """`out = lerp(ema, param.float(), weight)` for fp32 EMAs and bf16/fp16 parameters (one dtype).

    `outs[k]` may be `emas[k]` (in place). Every tensor must be a contiguous CPU tensor, and
    [`library`][funcema._native.library] must not be `None` (the caller checks both).
    """
    if outs:
        _run(_WIDEN[params[0].dtype], (outs, emas, params), weight, None)


def lerp_round_bf16(
    outs: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    weight: float,
    hkeys: Sequence[int],
) -> None:
    """`out = stochastic_round(lerp(ema.float(), param.float(), weight), key)` for bf16 EMAs.

    `hkeys[k]` is leaf `k`'s hashed rounding key (`_hash32(key)` as an int); element `i` of
    the leaf gets the noise `hash32(i * 0x9E3779B1 + hkey) & 0xFFFF`. `outs[k]` may be `emas[k]`.
    """
    if outs:
        _run(_ROUND[params[0].dtype], (outs, emas, params), weight, list(hkeys))


def hash_keys(keys: Sequence[int]) -> list[int]:
    """The hashed rounding keys `hkeys` of `lerp_round_bf16`: `hash32` of each key's low 32 bits.

    The bits of `funcema._kernels._hash32`, which reduces its input modulo 2**32 first, in one C call.
    """
    table = array.array("q", [k & 0xFFFFFFFF for k in keys])
    lib = library()
    assert lib is not None, "call library() first"
    lib.hash_keys(len(table), table.buffer_info()[0])
    return table.tolist()
