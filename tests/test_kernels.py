"""The fast paths of the eager update give the values of the plain reference path.

Fast paths under test (see docs/performance.md):
- ``_tree.check_leaves`` with ``dtypes=``: a C++ guard of the layout last accepted, else a C-level
  layout comparison against a cached reference layout; the per-leaf check (with the path-named
  error) runs only when both fail (the guard itself: tests/test_core_shortcuts.py);
- ``_tree.match_leaves``: one C-level ``isinstance`` pass;
- ``_core._update_eager``: no per-leaf gathering when one group holds every leaf;
- ``_kernels.lerp`` of one dtype: on the CPU, one multi-tensor call per block of 256 tensors;
- ``_kernels._lerp_converting_cpu``: bf16/fp16 parameters into an fp32 EMA, converted block by
  block through a per-thread scratch buffer instead of full-size temporaries.

The reference is the update rule computed in float64, ``ema + w * (params - ema)`` with
``w = 1 - decay``, rounded to the EMA's dtype at the end of each step. Tolerance: an fp32 ``lerp``
is within about one ulp (2**-24 relative, plus a tiny absolute term near zero) of the exact result
per step, so after ``STEPS`` steps the difference stays below ``STEPS`` ulps; rtol=1e-6 (about 8 ulps)
and atol=1e-6 (values are O(1)) bound it with margin. No test asserts a timing.
"""

from __future__ import annotations

import threading

import pytest
import torch

import funcema as fe
from funcema import _kernels, _tree
from tests.conftest import reference_ema

DECAY = 0.75
STEPS = 3
RTOL = ATOL = 1e-6

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available in this environment"),
    ),
]


def _params(device: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"big": (3000,), "w": (17, 33), "scalar": (), "empty": (0, 4), "v": (5,)}
    out = {k: torch.randn(s, generator=gen).to(device=device, dtype=dtype) for k, s in shapes.items()}
    out["transposed"] = torch.randn(24, 40, generator=gen).to(device=device, dtype=dtype).t()  # non-contiguous
    return out


@pytest.fixture(
    params=[(64, 0), (64, 100), (_kernels._CPU_BLOCK, _kernels._CPU_SMALL)],
    ids=["all-blocked", "small-and-blocked", "defaults"],
)
def block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Exercise the blocked conversion with blocks smaller than the leaves (every leaf blocked, or
    the small leaves through the foreach call and the others blocked), and the defaults."""
    block_size, small = request.param
    monkeypatch.setattr(_kernels, "_CPU_BLOCK", block_size)
    monkeypatch.setattr(_kernels, "_CPU_SMALL", small)
    return block_size


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("donate", [False, True])
def test_update_matches_float64_reference(device: str, param_dtype: torch.dtype, donate: bool, block: int) -> None:
    state = fe.init(_params(device, param_dtype, 0), schedule=fe.schedules.constant(DECAY))
    init = {k: v.clone() for k, v in state.ema.items()}  # donate=True updates these in place
    trajectory = [_params(device, param_dtype, step) for step in range(1, STEPS + 1)]
    for params in trajectory:
        before = {k: v.clone() for k, v in params.items()}
        state = fe.update(state, params, donate=donate)
        for k, v in params.items():  # parameters are never modified
            assert torch.equal(v, before[k])
    expected = reference_ema(init, trajectory, lambda t: 1.0 - DECAY)
    for k, e in state.ema.items():
        assert e.dtype == torch.float32 and e.shape == expected[k].shape
        # A float32 EMA against the unrounded float64 one: each of the STEPS updates rounds once
        # (half an ulp, 6e-8 relative), far inside 1e-6.
        torch.testing.assert_close(e.double(), expected[k], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_pure_update_leaves_old_state_bit_identical(device: str, block: int) -> None:
    state = fe.init(_params(device, torch.bfloat16, 0), schedule=fe.schedules.constant(DECAY))
    old = {k: v.clone() for k, v in state.ema.items()}
    new = fe.update(state, _params(device, torch.bfloat16, 1))
    for k, v in state.ema.items():
        assert torch.equal(v, old[k])
        assert new.ema[k].data_ptr() != v.data_ptr() or v.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_groups_and_copied_leaves(device: str) -> None:
    """Several dtype groups plus copied integer leaves: the gather path, not the single-group one."""

    def params(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            "a": torch.randn(7, generator=gen).to(device),
            "b": torch.randn(9, generator=gen).to(device, torch.bfloat16),
            "count": torch.tensor(seed, device=device),
            "c": torch.randn(2, 3, generator=gen).to(device),
        }

    state = fe.init(params(0), schedule=fe.schedules.constant(DECAY))
    init = {k: v.clone() for k, v in state.ema.items()}
    trajectory = [params(step) for step in range(1, STEPS + 1)]
    for step, p in enumerate(trajectory, start=1):
        state = fe.update(state, p, donate=step % 2 == 0)
        assert int(state.ema["count"]) == step
    for k, v in reference_ema(init, trajectory, lambda t: 1.0 - DECAY).items():  # floating leaves only
        torch.testing.assert_close(state.ema[k].double(), v, rtol=RTOL, atol=ATOL)


def test_many_small_leaves_match_reference() -> None:
    """The tiny case (thousands of leaves) goes through the single-group fast path."""
    gen = torch.Generator().manual_seed(0)
    params = {f"layer{i}.w": torch.randn(16, generator=gen) for i in range(500)}
    state = fe.init(params, schedule=fe.schedules.constant(DECAY))
    target = {k: torch.randn(16, generator=gen) for k in params}
    expected = reference_ema(dict(state.ema), [target], lambda t: 1.0 - DECAY)
    for donate in (False, True):
        out = fe.update(state, target, donate=donate)
        for k, v in expected.items():
            torch.testing.assert_close(out.ema[k].double(), v, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("count", [1, 255, 256, 257, 2 * 256 + 3])
def test_lerp_in_blocks_is_one_lerp_per_tensor(inplace: bool, count: int) -> None:
    """Calls of 256 tensors give the bits of a per-tensor `torch.lerp`, in order; in place the
    very list is returned and every tensor is written once (blocks neither overlap nor skip)."""
    gen = torch.Generator().manual_seed(count)
    emas = [torch.randn(3 + i % 5, generator=gen) for i in range(count)]
    params = [torch.randn(e.shape, generator=gen) for e in emas]
    expected = [torch.lerp(e, p, 0.3) for e, p in zip(emas, params)]
    before = [e.clone() for e in emas]
    out = _kernels.lerp(emas, params, 0.3, inplace=inplace, same_dtype=True)
    assert len(out) == count
    assert all(torch.equal(o, x) for o, x in zip(out, expected))
    if inplace:
        assert out is emas
    else:
        assert all(torch.equal(e, b) for e, b in zip(emas, before))  # the inputs are untouched
        assert not any(o is e for o, e in zip(out, emas))


def test_threads_do_not_share_the_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernels, "_CPU_BLOCK", 128)
    monkeypatch.setattr(_kernels, "_CPU_SMALL", 0)
    gen = torch.Generator().manual_seed(1)
    params = [{"w": torch.randn(5000, generator=gen).bfloat16()} for _ in range(4)]
    states = [fe.init(p, schedule=fe.schedules.constant(DECAY)) for p in params]
    targets = [{"w": torch.randn(5000, generator=gen).bfloat16()} for _ in range(4)]
    expected = [fe.update(s, t).ema["w"] for s, t in zip(states, targets)]
    results: list[torch.Tensor | None] = [None] * 4

    def work(i: int) -> None:
        s = states[i]
        for _ in range(20):
            out = fe.update(s, targets[i])
        results[i] = out.ema["w"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert got is not None and torch.equal(got, want)


def test_other_dtype_of_same_kind_takes_the_slow_path_and_matches() -> None:
    """fp16 parameters for a state made from bf16 ones: the fast check fails, the full check passes."""
    state = fe.init({"w": torch.randn(40).bfloat16()}, schedule=fe.schedules.constant(DECAY))
    params = {"w": torch.randn(40).half()}
    expected = reference_ema(dict(state.ema), [params], lambda t: 1.0 - DECAY)
    torch.testing.assert_close(fe.update(state, params).ema["w"].double(), expected["w"], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# The fast checks keep the path-named errors.


def _state() -> fe.EmaState:
    return fe.init({"enc": {"w": torch.zeros(3, 2), "b": torch.zeros(2)}}, schedule=fe.schedules.constant(DECAY))


def test_shape_error_names_the_path() -> None:
    with pytest.raises(ValueError, match=r"'enc\.w' has shape \(2, 3\)"):
        fe.update(_state(), {"enc": {"w": torch.zeros(2, 3), "b": torch.zeros(2)}})


def test_broadcastable_shape_is_still_rejected() -> None:
    with pytest.raises(ValueError, match=r"'enc\.b' has shape \(1, 2\)"):
        fe.update(_state(), {"enc": {"w": torch.zeros(3, 2), "b": torch.zeros(1, 2)}})


def test_dtype_kind_error_names_the_path() -> None:
    with pytest.raises(ValueError, match=r"'enc\.b' has dtype torch\.int64"):
        fe.update(_state(), {"enc": {"w": torch.zeros(3, 2), "b": torch.zeros(2, dtype=torch.int64)}})


def test_device_error_names_the_path() -> None:
    with pytest.raises(ValueError, match=r"'enc\.w' is on device meta"):
        fe.update(_state(), {"enc": {"w": torch.zeros(3, 2, device="meta"), "b": torch.zeros(2)}})


def test_non_tensor_leaf_error_names_the_path() -> None:
    with pytest.raises(TypeError, match=r"'enc\.b' is a float"):
        fe.update(_state(), {"enc": {"w": torch.zeros(3, 2), "b": 1.0}})


def test_layout_cache_is_bounded() -> None:
    for _ in range(3 * _tree._LAYOUTS_MAX):
        fe.update(_state(), {"enc": {"w": torch.zeros(3, 2), "b": torch.zeros(2)}})
    assert len(_tree._LAYOUTS) <= _tree._LAYOUTS_MAX


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(torch.float64, 1e300), (torch.complex128, 1e300), (torch.float16, 65504.0), (torch.bfloat16, 3.0e38), (torch.float32, 3.4e38)],
)
def test_all_finite_is_exact_at_each_dtype_max(dtype, value):
    """The largest finite values of every dtype are finite (a float32 cast made 1e300 infinite);
    an infinity or a NaN in any one tensor of a mixed-dtype list makes the whole list non-finite."""
    from funcema import _kernels

    big = torch.full((4,), value, dtype=dtype)
    others = [torch.ones(2), torch.ones(3, dtype=torch.float64)]
    assert bool(_kernels.all_finite([*others, big], torch.device("cpu")))
    for bad in (float("inf"), float("nan")):
        broken = big.clone()
        broken[2] = bad
        assert not bool(_kernels.all_finite([*others, broken], torch.device("cpu")))


@pytest.mark.parametrize("numel", [0, 1, 1000, 70_000])  # small leaves are concatenated; large ones tested alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "conj"])
def test_all_finite_finds_every_bad_value_on_the_cpu(numel, dtype, layout):
    """Every NaN, +inf and -inf (in a real or an imaginary part) is found wherever it sits, in a
    tree mixing dtypes, sizes and layouts with empty and integer leaves; `first_nonfinite` names
    its tensor, and a finite tree is finite."""
    from funcema import _kernels

    cpu = torch.device("cpu")

    def tree():
        base = torch.randn(2 * numel, generator=torch.Generator().manual_seed(numel), dtype=dtype)
        leaf = base[::2] if layout == "strided" else base[:numel]
        if layout == "conj" and dtype.is_complex:
            leaf = leaf.conj()  # a lazy conjugate view
        return [torch.ones(3, dtype=torch.float64), torch.zeros(0), torch.arange(5), leaf, torch.ones(70_000, dtype=torch.bfloat16)]

    assert bool(_kernels.all_finite(tree(), cpu)) and _kernels.first_nonfinite(tree()) is None
    for at in sorted({0, numel // 2, numel - 1}) if numel else []:
        for bad in (float("nan"), float("inf"), float("-inf")):
            for value in [bad, complex(0.0, bad)] if dtype.is_complex else [bad]:
                damaged = tree()
                damaged[3][at] = value  # written through the view: the leaf keeps its layout
                assert not bool(_kernels.all_finite(damaged, cpu)), (at, value)
                assert _kernels.first_nonfinite(damaged) == 3, (at, value)
