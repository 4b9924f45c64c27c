"""The fused C loops of ``funcema._native`` give the bits of the torch composition they replace.

- ``lerp_widening`` against ``torch.lerp(ema, param.float(), w)``: bit for bit. Both compute torch's
  CPU formula with one fused multiply-add, and bf16/fp16 -> fp32 is exact.
- ``lerp_round_bf16`` against ``stochastic_round(torch.lerp(ema.float(), param.float(), w), key)``:
  bit for bit on every finite result, so the rounding of a bf16 EMA (its values for a given seed,
  and its unbiasedness, tested in test_core.py) is the one of the torch path. A NaN stays a NaN
  (torch itself writes 0xFFFF or 0x7FC0 depending on the vector lane, so NaN bits are not compared).
- the whole ``fe.update`` with the loops and without them (``library`` patched to ``None``): the
  same bits, pure and donated, one thread and two (tensors cut into pieces over threads).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import funcema as fe
from funcema import _kernels, _native

pytestmark = pytest.mark.skipif(_native.library() is None, reason="no C compiler to build funcema._native with")

SIZES = [0, 1, 7, 33, 1000, 4099]  # empty, a scalar tail only, vector bodies with and without tails
WEIGHTS = [0.0, 1e-4, 0.3, 0.5, 0.7, 1.0]  # both branches of the lerp formula and both end points


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """One thread, or two with pieces of 1000 elements, so leaves are cut and dealt out."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    monkeypatch.setattr(_native, "_PIECE", 1000)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_lerp_widening_matches_torch_lerp(param_dtype: torch.dtype, weight: float, threads: int) -> None:
    gen = torch.Generator().manual_seed(0)
    emas = [torch.randn(n, generator=gen) for n in SIZES]
    params = [torch.randn(n, generator=gen).to(param_dtype) for n in SIZES]
    expected = [torch.lerp(e, p.float(), weight) for e, p in zip(emas, params)]
    outs = [torch.empty_like(e) for e in emas]
    _native.lerp_widening(outs, emas, params, weight)
    _native.lerp_widening(emas, emas, params, weight)  # in place
    for out, e, want in zip(outs, emas, expected):
        assert torch.equal(_bits(out), _bits(want)) and torch.equal(_bits(e), _bits(want))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_lerp_round_matches_stochastic_round(param_dtype: torch.dtype, weight: float, threads: int) -> None:
    gen = torch.Generator().manual_seed(1)
    emas = [torch.randn(n, generator=gen).bfloat16() for n in SIZES]
    params = [torch.randn(n, generator=gen).to(param_dtype) for n in SIZES]
    keys = [(0x632BE5AB * 7 + 0x9E3779B9 * k) & 0x7FFFFFFFFFFF for k in range(len(SIZES))]  # 47-bit keys
    expected = [
        _kernels.stochastic_round(torch.lerp(e.float(), p.float(), weight), torch.bfloat16, key)
        for e, p, key in zip(emas, params, keys)
    ]
    outs = [torch.empty_like(e) for e in emas]
    _native.lerp_round_bf16(outs, emas, params, weight, _native.hash_keys(keys))
    for out, want in zip(outs, expected):
        assert torch.equal(_bits(out), _bits(want))


def test_lerp_round_keeps_infinities_and_nans() -> None:
    ema = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3e38, 1.0, 0.0]).bfloat16()
    param = torch.tensor([1.0, 1.0, 1.0, 3.39e38, float("nan"), float("inf")])
    for weight in (0.1, 0.9):
        want = _kernels.stochastic_round(torch.lerp(ema.float(), param, weight), torch.bfloat16, 5)
        out = torch.empty_like(ema)
        _native.lerp_round_bf16([out], [ema], [param], weight, _native.hash_keys([5]))
        assert torch.equal(out.isnan(), want.isnan())
        finite_or_inf = ~want.isnan()
        assert torch.equal(_bits(out)[finite_or_inf], _bits(want)[finite_or_inf])


EDGE_SIZES = [0, 1, 7, 8, 9, 1023, 1025]  # around the loop's element pairs, vector bodies and odd tails
SPECIAL = [float("nan"), float("inf"), -float("inf"), 3.38e38, -3.38e38, 1e-39, -1e-39, 1e-45, 0.0, -0.0, 6e-8, 65504.0]


def _edge_values(n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 values over many binades, with NaN, infinities, subnormals and huge values cycled in."""
    values = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-40, 40, (n,), generator=gen).float())
    special = torch.tensor(SPECIAL)
    where = torch.randperm(n, generator=gen)[: n // 3]
    values[where] = special[torch.arange(len(where)) % len(special)]
    return values


def _at_odd_address(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` that starts one element into its storage (not 4-byte aligned for bf16)."""
    buffer = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = buffer[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", [1e-4, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("odd", ["none", "ema", "param", "out"])
def test_lerp_round_edge_values_bit_for_bit(param_dtype: torch.dtype, weight: float, odd: str, threads: int) -> None:
    # Every size around the pair loop, NaN, infinities, subnormals and values that round up to an
    # infinity, both branches of the lerp, and tensors that start at an odd bf16 element address.
    # Non-NaN results equal the torch composition bit for bit; every NaN is written as 0x7FC0.
    gen = torch.Generator().manual_seed(3)
    emas = [_edge_values(n, gen).bfloat16() for n in EDGE_SIZES]
    params = [_edge_values(n, gen).to(param_dtype) for n in EDGE_SIZES]
    keys = [(0x2545F491 * k + 0x632BE5AB) & 0x7FFFFFFFFFFF for k in range(len(EDGE_SIZES))]
    expected = [
        _kernels.stochastic_round(torch.lerp(e.float(), p.float(), weight), torch.bfloat16, key)
        for e, p, key in zip(emas, params, keys)
    ]
    if odd == "ema":
        emas = list(map(_at_odd_address, emas))
    if odd == "param":
        params = list(map(_at_odd_address, params))
    outs = [_at_odd_address(torch.empty_like(e)) if odd == "out" else torch.empty_like(e) for e in emas]
    _native.lerp_round_bf16(outs, emas, params, weight, _native.hash_keys(keys))
    for n, out, want in zip(EDGE_SIZES, outs, expected):
        nan = want.isnan()
        assert torch.equal(out.isnan(), nan), n
        assert torch.equal(_bits(out)[~nan], _bits(want)[~nan]), n
        assert bool((_bits(out)[nan] == 0x7FC0).all()), n


def _every_fp16() -> torch.Tensor:
    """The 65,536 fp16 bit patterns: zeros, subnormals, normals, infinities and NaNs of both signs."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)


@pytest.mark.parametrize("weight", [1.0, 0.3, 0.7])
def test_lerp_widening_converts_every_fp16_bit_pattern(weight: float) -> None:
    # The loop's fp16 -> fp32 conversion (integer shifts and selects) is torch's: through the lerp,
    # bit for bit (a signalling NaN comes out quiet in both), and a weight-1 lerp from a zero EMA is
    # a copy of every finite value (0 * (p - 0) + p).
    params = _every_fp16()
    ema = torch.zeros(params.numel()) if weight == 1.0 else torch.linspace(-3.0, 3.0, params.numel())
    want = torch.lerp(ema, params.float(), weight)
    out = torch.empty_like(ema)
    _native.lerp_widening([out], [ema], [params], weight)
    assert torch.equal(_bits(out), _bits(want))
    if weight == 1.0:
        finite = params.isfinite()
        assert torch.equal(_bits(out)[finite], _bits(params.float())[finite])


@pytest.mark.parametrize("weight", [0.3, 0.7])
def test_lerp_round_converts_every_fp16_bit_pattern(weight: float) -> None:
    params = _every_fp16()
    ema = torch.linspace(-3.0, 3.0, params.numel()).bfloat16()
    want = _kernels.stochastic_round(torch.lerp(ema.float(), params.float(), weight), torch.bfloat16, 9)
    out = torch.empty_like(ema)
    _native.lerp_round_bf16([out], [ema], [params], weight, _native.hash_keys([9]))
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(_bits(out)[~nan], _bits(want)[~nan])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="-mno-avx is an x86 flag")
def test_fp16_conversion_without_avx() -> None:
    # The same two tests in a fresh process whose loops are built with -mno-avx (no AVX, F16C or
    # FMA: SSE2 vectors, the fused multiply-add from libm). Both must run, not skip.
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    compiler = os.environ.get("CC") or shlex.quote(found or "")
    assert compiler
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "converts_every_fp16"],
        env={**os.environ, "CC": f"{compiler} -mno-avx"},
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "5 passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def _hash(values: list[int]) -> list[int]:
    """The reference hash of `funcema._kernels` (int64 tensor arithmetic) of each value.

    It reads the low 32 bits of its input, so they are taken first (values here exceed int64).
    """
    return _kernels._hash32(torch.tensor([v & 0xFFFFFFFF for v in values], dtype=torch.int64)).tolist()


def test_lerp_round_counter_wraps_at_32_bits() -> None:
    # A piece that starts past element 2**32 of its leaf: the counter is taken modulo 2**32, as
    # the int64 reference's hash masks it. The noise is computed here element by element.
    lib = _native.library()
    assert lib is not None
    ema, param = torch.randn(11).bfloat16(), torch.randn(11).bfloat16()
    hkey, weight = _hash([12345])[0], 0.3
    wide = torch.lerp(ema.float(), param.float(), weight).view(torch.int32).tolist()
    for start in (2**32 - 5, 2**33 + 3):
        noise = [h & 0xFFFF for h in _hash([(start + i) * 0x9E3779B1 + hkey for i in range(11)])]
        want = [((b & 0xFFFFFFFF) + r) >> 16 & 0xFFFF for b, r in zip(wide, noise)]
        out = torch.empty_like(ema)
        rows = torch.tensor([out.data_ptr(), ema.data_ptr(), param.data_ptr(), 11, start, hkey], dtype=torch.int64)
        at = [rows.data_ptr() + 8 * r for r in range(6)]
        lib.lerp_round_bf16_bf16(1, *at[:4], weight, *at[4:])
        assert (out.view(torch.int16).int() & 0xFFFF).tolist() == want


def test_hash_keys_is_the_tensor_hash() -> None:
    keys = [0, 1, 0xFFFFFFFF, 2**32, 0x7FFFFFFFFFFF, 123456789012345, -1, -(2**40) - 7, *range(100)]
    want = _kernels._hash32(torch.tensor(keys, dtype=torch.int64)).tolist()
    assert _native.hash_keys(keys) == want
    assert _native.hash_keys([]) == []


@pytest.mark.parametrize(
    ("param_dtype", "ema_dtype"),
    [(torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("donate", [False, True])
def test_update_is_the_same_with_and_without_the_loops(
    param_dtype: torch.dtype, ema_dtype: torch.dtype | None, donate: bool, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(2)
    shapes = {"big": (3000,), "w": (17, 33), "scalar": (), "empty": (0, 4), "t": (24, 40)}

    def params() -> dict[str, torch.Tensor]:
        out = {k: torch.randn(s, generator=gen).to(param_dtype) for k, s in shapes.items()}
        out["t"] = out["t"].t()  # non-contiguous: takes the torch path in both runs
        return out

    steps = [params() for _ in range(4)]
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(_native, "library", lambda: None)
        state = fe.init(steps[0], dtype=ema_dtype, seed=11, schedule=fe.schedules.warmup())
        for p in steps[1:]:
            state = fe.update(state, p, donate=donate)
        results.append(state.ema)
    for k in shapes:
        assert torch.equal(_bits(results[0][k]), _bits(results[1][k])), k


@pytest.mark.parametrize("env", [{"FUNCEMA_NATIVE": "0"}, {"CC": "/nonexistent/cc"}], ids=["disabled", "no-compiler"])
def test_without_the_loops_the_library_is_none(env: dict[str, str]) -> None:
    # A fresh process: `library` is cached per process. Updates then take the torch path (the
    # equality of both paths is tested above).
    code = "from funcema import _native; assert _native.library() is None"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, **env}, cwd=Path(__file__).parent.parent
    )
