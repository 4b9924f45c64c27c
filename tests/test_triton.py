"""The fused Triton kernel (``funcema._triton.lerp_``) against the foreach reference path.

Without a GPU the kernel runs on CPU tensors in Triton's interpreter: ``TRITON_INTERPRET=1`` is
set here, before the first call imports the kernel module (Triton reads it when a kernel is
decorated). The interpreter is slow (every program runs in Python), so the trees are small and the
block size is 64 elements, which still gives leaves of several blocks, a masked tail, 0-d and empty
leaves in one launch.

Every comparison is bit for bit: the arithmetic is the same. The reference lerp is torch's
(``_kernels.lerp_tensor_weight``: ``torch._foreach_lerp`` with a 0-d tensor weight), which on the
CPU computes ``fma(w, p - e, e)`` for ``|w| < 1/2`` and ``fma(w - 1, p - e, p)`` otherwise; the
kernel computes the same with ``tl.fma`` (a true single-rounding fma in the interpreter too), and
bf16/fp16 -> fp32 is exact. The stochastic rounding is the same integer hash on the same counter.
NaN bit patterns are not compared (torch's own fp32 -> bf16 conversion writes 0xFFFF or 0x7FC0
depending on the vector lane); NaN positions are.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from funcema import _kernels, _triton

requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install 'funcema[triton]')"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is first imported

SHAPES = [(150,), (3, 5), (), (0,), (64,), (2, 65)]  # 3 blocks with a tail, 1 block, 0-d, empty, exact, 2+tail


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton, "BLOCK", 64)


def _tensors(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype) for s in SHAPES]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bits_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert torch.equal(g.isnan(), w.isnan()), k
        assert torch.equal(_bits(g)[~w.isnan()], _bits(w)[~w.isnan()]), k


def _reference(emas: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """The traced path's foreach lerp in float32, stored in the EMA dtype (round to nearest).

    The weight is passed as float32: with a float64 0-d weight, torch promotes a 0-d leaf (all
    operands 0-d) to float64 arithmetic, while the kernel computes every leaf in float32 (see
    ``test_zero_dim_leaf_with_a_float64_weight``).
    """
    wide = _kernels.lerp_tensor_weight([e.float() for e in emas], params, weight.float())
    return [w.to(e.dtype) for e, w in zip(emas, wide)]


@requires_triton
@pytest.mark.parametrize(
    ("ema_dtype", "param_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("w", [0.0, 1e-3, 0.3, 0.5, 0.9, 1.0])  # both branches of the formula, both ends
def test_lerp_matches_the_foreach_reference(ema_dtype: torch.dtype, param_dtype: torch.dtype, w: float) -> None:
    emas, params = _tensors(ema_dtype, 0), _tensors(param_dtype, 1)
    weight = torch.tensor(w, dtype=torch.float64, device=DEVICE)  # the traced weight is float64
    want = _reference(emas, params, weight)
    _triton.lerp_(emas, params, weight)
    _assert_bits_equal(emas, want)


@requires_triton
def test_zero_dim_leaf_with_a_float64_weight() -> None:
    # The reference promotes a 0-d leaf to float64 (every operand 0-d); the kernel's float32 lerp
    # differs from the exactly rounded result by the rounding of d = p - e (half an ulp of
    # max(|e|, |p|)) plus that of the fma (half an ulp of the result): one ulp of max(|e|, |p|, |result|).
    gen = torch.Generator().manual_seed(12)
    emas = [torch.randn((), generator=gen).to(DEVICE) for _ in range(64)]
    params = [torch.randn((), generator=gen).to(DEVICE) for _ in range(64)]
    weight = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    want = [w.float() for w in _kernels.lerp_tensor_weight(emas, params, weight)]
    scale = [torch.stack([e.abs(), p.abs(), w.abs()]).max() for e, p, w in zip(emas, params, want)]
    _triton.lerp_(emas, params, weight)
    for e, w, m in zip(emas, want, scale):
        assert (e - w).abs() <= torch.finfo(torch.float32).eps * m


@requires_triton
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stochastic_rounding_matches_stochastic_round(param_dtype: torch.dtype) -> None:
    emas, params = _tensors(torch.bfloat16, 2), _tensors(param_dtype, 3)
    params[0][:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.0e38])  # specials stay special
    weight = torch.tensor(0.25, device=DEVICE)
    keys = [(t * 0x632BE5AB + 7 * 0x2545F491 + k * 0x9E3779B9) & 0x7FFFFFFFFFFF for k, t in enumerate(range(6))]
    wide = _kernels.lerp_tensor_weight([e.float() for e in emas], params, weight)
    want = [_kernels.stochastic_round(v, torch.bfloat16, key) for v, key in zip(wide, keys)]
    _triton.lerp_(emas, params, weight, round_keys=torch.tensor(keys, dtype=torch.int64, device=DEVICE))
    _assert_bits_equal(emas, want)


@requires_triton
@pytest.mark.parametrize("finite", [True, False])
def test_finite_flag_skips_on_the_device(finite: bool) -> None:
    emas, params = _tensors(torch.float32, 4), _tensors(torch.bfloat16, 5)
    weight = torch.tensor(0.5, device=DEVICE)
    want = _reference(emas, params, weight) if finite else [e.clone() for e in emas]
    _triton.lerp_(emas, params, weight, finite=torch.tensor(finite, device=DEVICE))
    _assert_bits_equal(emas, want)


@requires_triton
def test_tables_are_reused_while_the_tensors_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton, "_TABLES", type(_triton._TABLES)())
    emas, params = _tensors(torch.float32, 6), _tensors(torch.float32, 7)
    weight = torch.tensor(0.1, device=DEVICE)
    _triton.lerp_(emas, params, weight)
    first = list(_triton._TABLES.values())
    _triton.lerp_(emas, params, weight)
    assert len(_triton._TABLES) == 1 and all(a is b for a, b in zip(first[0], next(iter(_triton._TABLES.values()))))
    other = [p.clone() for p in params]  # new parameter tensors: a new table, the old one kept
    want = _reference(emas, other, weight)
    _triton.lerp_(emas, other, weight)
    assert len(_triton._TABLES) == 2
    _assert_bits_equal(emas, want)


@requires_triton
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda e, p, w: (e, p[:-1], w), ValueError, "same length"),
        (lambda e, p, w: (e, [p[0].t(), *p[1:]] if p[0].dim() == 2 else [p[0][::2], *p[1:]], w), ValueError, "leaf 0"),
        (lambda e, p, w: (e, [*p[:2], p[2].double(), *p[3:]], w), TypeError, "leaf 2"),
        (lambda e, p, w: (e, p, w.reshape(1)), ValueError, "weight"),
    ],
    ids=["length", "non-contiguous", "dtype", "weight-shape"],
)
def test_bad_input_is_rejected_before_anything_is_written(change, error, match) -> None:
    emas, params = _tensors(torch.float32, 8), _tensors(torch.float32, 9)
    before = [e.clone() for e in emas]
    e, p, w = change(emas, params, torch.tensor(0.5, device=DEVICE))
    with pytest.raises(error, match=match):
        _triton.lerp_(e, p, w)
    _assert_bits_equal(emas, before)


@requires_triton
def test_round_keys_need_a_bfloat16_ema() -> None:
    emas, params = _tensors(torch.float32, 10), _tensors(torch.float32, 11)
    with pytest.raises(ValueError, match="round_keys"):
        _triton.lerp_(emas, params, torch.tensor(0.5, device=DEVICE), round_keys=torch.zeros(6, dtype=torch.int64))


def test_importing_funcema_does_not_import_triton() -> None:
    code = "import sys, funcema, funcema._triton; assert 'triton' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
