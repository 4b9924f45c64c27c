"""What the compiled update's graph holds: a few custom-op nodes, no host read, no CPU tensor beside CUDA ones.

The compiled update is ``funcema::advance`` (scalar state and weight) plus one ``funcema::lerp_``
or ``funcema::lerp`` per dtype group; these tests check that structure, that neither the
generated code nor the ops' device implementations read a tensor value on the host, and that
with (fake) CUDA parameters no op but ``advance`` (which inductor keeps out of CUDA graphs)
touches a CPU tensor.
"""

from __future__ import annotations

import re
import unittest.mock

import optree
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import funcema as fe
from funcema import _ops, schedules
from tests.conftest import assert_trees_equal

# Host reads of tensor values: each is a device synchronisation when the tensor is on a GPU.
_HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default)


class _NoHostReads(TorchDispatchMode):
    """Fails on any operation that copies a tensor value to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            raise AssertionError(f"{func} reads a tensor value on the host")
        return func(*args, **(kwargs or {}))


def _tree(n: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(n)
    return {f"layer{i}.w": torch.randn(3, 2, generator=gen).to(dtype) for i in range(n)}


def _graph_ops(n_leaves: int, donate: bool, int_leaf: bool = False, **init_kwargs) -> list[str]:
    """The call targets of the graph dynamo traces for one update (``getitem``s left out)."""
    params = _tree(n_leaves)
    if int_leaf:
        params["count"] = torch.zeros((), dtype=torch.int64)
    targets: list[str] = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target).removesuffix(".default") for node in gm.graph.nodes if node.op.startswith("call") and "getitem" not in str(node.target))
        return gm.forward

    torch._dynamo.reset()
    state = fe.init(params, schedule=schedules.warmup(), **init_kwargs)
    torch.compile(lambda s, p: fe.update(s, p, donate=donate), backend=backend, fullgraph=True)(state, params)
    torch._dynamo.reset()
    return targets


@pytest.mark.parametrize("donate", [False, True])
def test_graph_grows_with_groups_not_leaves(donate):
    op = "funcema.lerp_" if donate else "funcema.lerp"
    few, many = _graph_ops(3, donate), _graph_ops(60, donate)
    assert few == many == ["funcema.advance", op], (few, many)
    # An integer leaf is copied by one more op node; "skip" adds the device-side finiteness check.
    assert _graph_ops(5, donate, int_leaf=True, on_nonfinite="skip") == ["funcema.all_finite", "funcema.advance", op, op]


@pytest.mark.parametrize("donate", [False, True])
def test_generated_code_reads_no_tensor_value_on_the_host(donate):
    params = _tree(4)
    state = fe.init(params, schedule=schedules.power(sigma_rel=0.1), debias=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, p: fe.update(s, p, donate=donate), fullgraph=True, backend="inductor")
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(compiled, state, params)
    code = "\n".join(codes)
    assert "torch.ops.funcema.advance" in code
    for pattern in (r"\.item\(\)", r"_local_scalar_dense", r"\.tolist\(\)", r"is_nonzero", r"aten\.equal"):
        assert not re.search(pattern, code), pattern
    # No generated kernel at all: inductor compiles nothing, whatever the number of leaves.
    assert "cpp_fused" not in code and "async_compile.cpp" not in code


def _force_device_path(monkeypatch):
    """Make the ops take their accelerator branch (the weight kept in a tensor) on CPU tensors,
    and fail if that branch reads any tensor value on the host."""
    monkeypatch.setattr(_ops, "on_host", lambda *tensors: False)
    for name in ("_advance", "lerp", "all_finite"):
        impl = getattr(_ops, name)

        def checked(*args, impl=impl, **kwargs):
            with _NoHostReads():
                return impl(*args, **kwargs)

        monkeypatch.setattr(_ops, name, checked)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("weight", "copy"), [(0.0, False), (0.3, False), (1.0, False), (0.3, True), (0.0, True)])
def test_device_lerp_matches_the_host_lerp(monkeypatch, weight, copy, inplace):
    emas = [torch.randn(3, 2), torch.randn(()), torch.randn(0)]
    params = [torch.randn(3, 2), torch.randn(()), torch.randn(0)]
    w = torch.tensor(weight, dtype=torch.float64)
    key = fe.init({"a": torch.zeros(3, 2)}).config.key  # any configuration: only its kernel is read
    host = _ops.lerp([e.clone() for e in emas], params, w, None, key, -1 if copy else 0, inplace=inplace)
    with monkeypatch.context() as m:
        _force_device_path(m)
        device = _ops.lerp([e.clone() for e in emas], params, w, None, key, -1 if copy else 0, inplace=inplace)
    for d, h in zip(device, host):
        # Same float32 lerp with the same float32-rounded weight; exact at 0 and 1: bit for bit.
        assert torch.equal(d, h)


@pytest.mark.parametrize("donate", [False, True])
def test_device_path_reads_nothing_on_the_host_and_matches_the_host_path(monkeypatch, donate):
    params = _tree(5) | {"count": torch.zeros((), dtype=torch.int64)}
    bad = {k: v.clone() for k, v in params.items()}
    bad["layer0.w"][0, 0] = float("nan")
    # on_nonfinite="skip" decides on the host on CPU tensors; forced onto the device path, it runs
    # the traced update (all_finite, advance, lerp ops) with every value kept in tensors.
    kwargs = dict(schedule=schedules.warmup(), every=2, after=1, debias=True, on_nonfinite="skip")
    host, device = fe.init(params, **kwargs), fe.init(params, **kwargs)
    for step in range(9):
        p = bad if step == 4 else {k: v + step for k, v in params.items()}
        host = fe.update(host, p, donate=donate)
        with monkeypatch.context() as m:
            _force_device_path(m)
            device = fe.update(device, p, donate=donate)
        assert int(device.step) == int(host.step) and int(device.nonfinite_count) == int(host.nonfinite_count)
        # Both paths round the float64 weight to the EMA's float32 and run the same lerp; the
        # traced weight may differ from the host float in the last float64 bit, which float32
        # rounding almost always absorbs: one float32 ulp of the values (|x| < 16) at most.
        for k in params:
            torch.testing.assert_close(device.ema[k], host.ema[k], rtol=0, atol=2e-6)
        torch.testing.assert_close(device.log_decay_product, host.log_decay_product, rtol=1e-12, atol=0)
    assert int(host.nonfinite_count) == 1


def test_cuda_params_keep_every_cpu_tensor_in_the_partitioned_op():
    """Traced with fake CUDA tensors: only ``advance`` (tagged cudagraph-unsafe) touches the CPU."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = {f"layer{i}.w": torch.empty(3, 2, device="cuda") for i in range(3)}
        params["count"] = torch.zeros((), dtype=torch.int64, device="cuda")
        state = fe.init(params, schedule=schedules.warmup(), debias=True, on_nonfinite="skip")

    def step(state, params):
        return optree.tree_leaves(fe.update(state, params, donate=True), namespace="funcema")

    with unittest.mock.patch("torch.compiler.is_compiling", return_value=True):
        graph = make_fx(step, tracing_mode="fake")(state, params).graph

    def devices(value):
        values = value if isinstance(value, (list, tuple)) else [value]
        return {v.device.type for v in values if isinstance(v, torch.Tensor)}

    assert torch.Tag.cudagraph_unsafe in torch.ops.funcema.advance.default.tags
    kernels = [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("funcema.")]
    assert {str(n.target) for n in kernels} == {"funcema.all_finite.default", "funcema.advance.default", "funcema.lerp_.default"}
    for node in kernels:
        if node.target is torch.ops.funcema.advance.default:
            continue
        used = set().union(*(devices(a.meta["val"]) for a in node.all_input_nodes))
        assert used == {"cuda"}, (node.target, used)
    advance = next(n for n in kernels if n.target is torch.ops.funcema.advance.default)
    assert devices(advance.meta["val"][1]) == {"cuda"}  # the weight it hands to the kernels


def test_kernel_option_is_checked_saved_and_loaded(tmp_path, monkeypatch):
    params = _tree(2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        fe.init(params, kernel="cuda")
    state = fe.update(fe.init(params, kernel="foreach"), params)
    fe.save(state, tmp_path / "s.safetensors")
    assert fe.load(tmp_path / "s.safetensors", like=params).config.kernel == "foreach"
    assert fe.init(params).config.kernel == "auto"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):  # or, without the triton package, "needs the triton package"
        fe.init(params, kernel="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("donate", [False, True])
def test_triton_kernel_updates_like_foreach_under_the_interpreter(monkeypatch, dtype, donate):
    # Same arithmetic (lerp in float32 of the float32 EMA and the converted parameter, float32
    # weight), so the fused kernel must agree with foreach bit for bit; float64 groups are not
    # the kernel's and take foreach, so they agree trivially.
    pytest.importorskip("triton", reason="the triton package is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = _tree(3, dtype)
    states = {k: fe.init(params, kernel=k, schedule=fe.schedules.power(sigma_rel=0.1)) for k in ("triton", "foreach")}
    assert states["triton"].config.kernel == "triton"
    for step in range(4):
        params = {k: v + 0.25 * (step + 1) for k, v in params.items()}
        states = {k: fe.update(s, params, donate=donate) for k, s in states.items()}
    assert_trees_equal(states["triton"].ema, states["foreach"].ema)
