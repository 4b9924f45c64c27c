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
    _native.lerp_round_bf16(outs, emas, params, weight, [_kernels._hash32_int(k) for k in keys])
    for out, want in zip(outs, expected):
        assert torch.equal(_bits(out), _bits(want))


def test_lerp_round_keeps_infinities_and_nans() -> None:
    ema = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.3e38, 1.0, 0.0]).bfloat16()
    param = torch.tensor([1.0, 1.0, 1.0, 3.39e38, float("nan"), float("inf")])
    for weight in (0.1, 0.9):
        want = _kernels.stochastic_round(torch.lerp(ema.float(), param, weight), torch.bfloat16, 5)
        out = torch.empty_like(ema)
        _native.lerp_round_bf16([out], [ema], [param], weight, [_kernels._hash32_int(5)])
        assert torch.equal(out.isnan(), want.isnan())
        finite_or_inf = ~want.isnan()
        assert torch.equal(_bits(out)[finite_or_inf], _bits(want)[finite_or_inf])


def test_hash32_int_is_the_tensor_hash() -> None:
    keys = [0, 1, 0xFFFFFFFF, 0x7FFFFFFFFFFF, 123456789012345]
    want = _kernels._hash32(torch.tensor(keys, dtype=torch.int64)).tolist()
    assert [_kernels._hash32_int(k) for k in keys] == want


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
