"""Shared test configuration and helpers: awkward trees, the float64 reference EMA, bit equality.

- `any_schedule` / `EXAMPLES`: a hypothesis strategy over every schedule, one example of each;
- `trees()`: fresh copies of the awkward parameter trees (empty, `None` holes, NamedTuples,
  mixed dtypes, non-contiguous, a module's state dict), reused by every test of the public API;
- `reference_ema` with `decay_rule`: the update rule of DESIGN.md in float64, one step at a time;
- `trees_bit_equal` / `assert_trees_equal`: the one bit-for-bit comparison of trees;
- `timm_model_ema`: timm's EMA module, loaded once (a session fixture) for the peer tests;
- `force_traced_skip`: eager `on_nonfinite="skip"` updates through the traced update on the CPU.

Hypothesis runs under a pinned profile so that the suite is deterministic: `ci` (the default)
derandomises the search and keeps no example database, so every run of a clean clone tries the
same examples. Set `HYPOTHESIS_PROFILE=explore` to search with fresh random examples locally;
keep every falsifying example found that way as an `@example` on its test.
"""

from __future__ import annotations

import collections
import importlib.util
import math
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from funcema import schedules
from funcema.schedules import Warmup

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Pair(NamedTuple):
    weight: Any
    bias: Any


def _t(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 17 * len(shape))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-5, 5, shape, generator=g).to(dtype)


def trees() -> dict[str, Any]:
    """Return fresh copies of the awkward trees, keyed by a readable id."""
    return {
        "empty-dict": {},
        "empty-tuple": (),
        "empty-list": [],
        "none-tuple": (None,),
        "none-dict": {"a": None},
        "single-tensor": _t(3),
        "scalar-0d": {"s": _t()},
        "zero-size": {"z": _t(0, 4)},
        "nested-with-none": {"enc": {"w": _t(2, 3), "b": None}, "dec": [_t(4), None, (_t(1, 1),)]},
        "namedtuple": Pair(weight=_t(3, 2), bias=_t(2)),
        "ordered-dict": collections.OrderedDict([("z", _t(2)), ("a", _t(3))]),
        "mixed-dtypes": {
            "bf16": _t(5, dtype=torch.bfloat16),
            "fp16": _t(5, dtype=torch.float16),
            "fp64": _t(5, dtype=torch.float64),
            "c64": _t(3, dtype=torch.complex64),
            "count": torch.tensor(7),
            "mask": _t(4, dtype=torch.bool),
        },
        "non-contiguous": {"t": _t(4, 3).t(), "s": _t(10)[::2]},
        "channels-last": {"conv": _t(2, 3, 4, 4).to(memory_format=torch.channels_last)},
        "module-state-dict": _module_state_dict(),
    }


def _module_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(tree: Any, scale: float = 1.0, seed: int = 1) -> Any:
    """A tree like ``tree`` with new values of the same dtypes (integers incremented)."""
    import optree

    g = torch.Generator().manual_seed(seed)

    def f(x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return (x.float() + scale * torch.randn(x.shape, generator=g)).to(x.dtype)
        if x.is_complex():
            return x + scale * torch.randn(x.shape, generator=g, dtype=x.dtype)
        if x.dtype == torch.bool:
            return ~x
        return x + 1

    return optree.tree_map(f, tree)


# ---------------------------------------------------------------------------------------------
# Schedules: a hypothesis strategy over every schedule class, and one example of each

unit = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def warmups(draw: st.DrawFn) -> Warmup:
    lo, hi = sorted((draw(unit), draw(unit)))
    return schedules.warmup(
        max_decay=hi,
        inv_gamma=draw(st.floats(min_value=1e-3, max_value=1e3)),
        power=draw(st.floats(min_value=1e-2, max_value=10.0)),
        min_decay=lo,
    )


powers = st.one_of(
    st.floats(min_value=-0.499, max_value=1e3).map(lambda g: schedules.power(gamma=g)),
    st.floats(min_value=1e-3, max_value=0.288).map(lambda s: schedules.power(sigma_rel=s)),
)
halflives = st.builds(
    schedules.halflife,
    st.floats(min_value=1e-2, max_value=1e6),
    st.one_of(st.none(), st.floats(min_value=1e-3, max_value=10.0)),
)
any_schedule = st.one_of(
    st.builds(schedules.constant, unit),
    warmups(),
    st.builds(schedules.litema, unit),
    powers,
    halflives,
)

# A few fixed schedules for the non-hypothesis tests, one per class (and both halflife kinds).
EXAMPLES = [
    schedules.constant(0.999),
    schedules.warmup(),
    schedules.warmup(max_decay=0.999, inv_gamma=10.0, power=0.75, min_decay=0.5),
    schedules.litema(),
    schedules.power(sigma_rel=0.10),
    schedules.power(gamma=-0.3),
    schedules.halflife(500.0),
    schedules.halflife(500.0, rampup=0.05),
]


# ---------------------------------------------------------------------------------------------
# Bit equality


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` in row-major order (so NaN payloads and signed zeros count)."""
    t = t.detach().reshape(-1).contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(torch.uint8) if t.numel() else t.to(torch.uint8)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, device and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(bits(a), bits(b))


def trees_bit_equal(a: Any, b: Any) -> bool:
    """Same structure and every leaf [`bit_equal`][tests.conftest.bit_equal]."""
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    return sa == sb and len(la) == len(lb) and all(bit_equal(x, y) for x, y in zip(la, lb))


def assert_trees_equal(a: Any, b: Any) -> None:
    """Assert bit-exact equality of two trees (structure, dtypes, devices, bytes)."""
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb, f"structures differ: {sa} vs {sb}"
    for i, (x, y) in enumerate(zip(la, lb)):
        assert bit_equal(x, y), f"leaf {i} differs: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"


# ---------------------------------------------------------------------------------------------
# The float64 reference EMA

Rule = Callable[[int], "float | None"]  # t (1-based) -> interpolation weight (1 = copy) or None (skip)


def reference_ema(init: dict[str, torch.Tensor], trajectory: Sequence[dict[str, torch.Tensor]], rule: Rule) -> dict[str, torch.Tensor]:
    """The float64 EMA of the floating entries of `trajectory` (update t = 1, 2, ...) under `rule`.

    `ema <- ema + w * (params - ema)` with `w = rule(t)`; `w = 1` copies exactly, `None` skips.
    """
    ema = {k: v.double() for k, v in init.items() if v.is_floating_point()}
    for t, point in enumerate(trajectory, start=1):
        w = rule(t)
        if w is None:
            continue
        for k in ema:
            ema[k] = point[k].double().clone() if w == 1 else ema[k] + w * (point[k].double() - ema[k])
    return ema


def decay_rule(schedule: Callable[[int], float], *, every: int = 1, after: int = 0, debias: bool = False) -> Rule:
    """The weight of DESIGN.md's update rule, step by step in Python floats (call it for t = 1, 2, ...).

    `beta` is formed by multiplying the per-step decays (not as `exp(sum log)` as funcema does),
    so agreement checks the product rule independently.
    """
    a_product = [1.0]

    def rule(t: int) -> float | None:
        if t <= after:
            return 1.0
        u = t - after
        if u % every:
            return None
        beta = math.prod(schedule(v) for v in range(u - every + 1, u + 1))
        if not debias:
            return 1 - beta
        a_new = a_product[0] * beta
        a_product[0] = a_new
        # The first averaging step copies (the initial value has zero weight), for every beta;
        # later, beta == 1 leaves the EMA unchanged.
        if u == every:
            return 1.0
        return (1 - beta) / (1 - a_new) if beta < 1 else None

    return rule


# ---------------------------------------------------------------------------------------------
# Peers


@pytest.fixture(scope="session")
def timm_model_ema() -> Any:
    """timm's `model_ema` module, loaded once from its file so that `timm/__init__` (which imports
    torchvision, broken or absent here) is not executed. It needs only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = f"{next(iter(spec.submodule_search_locations))}/utils/model_ema.py"
    try:
        mod_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as err:  # pragma: no cover - depends on the installed timm
        pytest.skip(f"cannot load timm/utils/model_ema.py without timm's package import: {err!r}")
    if not hasattr(module, "ModelEmaV3"):
        pytest.skip("this timm has no ModelEmaV3")
    return module


# ---------------------------------------------------------------------------------------------
# Update paths


def force_traced_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make eager updates with `on_nonfinite="skip"` take the traced update on CPU tensors too.

    Eager skips decide on the host where the skip flag lives on the CPU; elsewhere they run the
    traced update (`_core._update_traced`, the one `torch.compile` traces). Forced here on CPU
    tensors, its ops still compute the weight on the host (their CPU branch), so its results can
    be compared with the eager path's bit for bit.
    """
    from funcema import _core

    monkeypatch.setattr(_core, "_readable_on_host", lambda flag, state: False)


# ---------------------------------------------------------------------------------------------
# Consumed (donated) states


def consumed_message() -> str:
    """The one message every function gives for a state consumed by `update(..., donate=True)`."""
    from funcema._state import check_live

    state = consumed_state()
    with pytest.raises(ValueError) as info:
        check_live(state)
    return str(info.value)


def consumed_state(params: Any = None) -> Any:
    """A state of `params` (default `{"w": zeros(3)}`) consumed by a donated update."""
    import funcema as fe

    params = {"w": torch.zeros(3)} if params is None else params
    state = fe.init(params)
    fe.update(state, params, donate=True)
    return state


# ---------------------------------------------------------------------------------------------
# Damaged files


def rewrite_safetensors(
    path: Any,
    edit_meta: Callable[[dict[str, Any]], object] | None = None,
    replace_meta: Callable[[dict[str, Any]], Any] | None = None,
    raw_meta: str | None = None,
    edit_tensors: Callable[[dict[str, torch.Tensor]], object] | None = None,
) -> None:
    """Rewrite a funcema safetensors file as a valid container with damaged contents.

    `edit_meta` edits the parsed funcema metadata in place (what it returns is ignored, so
    `lambda m: m.pop("seed")` removes a field), `replace_meta` returns new metadata for the
    parsed one, `raw_meta` replaces its JSON text, and `edit_tensors` edits the tensors in place.
    """
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if edit_meta is not None or replace_meta is not None:
        meta = json.loads(metadata["funcema"])
        if edit_meta is not None:
            edit_meta(meta)
        metadata["funcema"] = json.dumps(meta if replace_meta is None else replace_meta(meta))
    if raw_meta is not None:
        metadata["funcema"] = raw_meta
    if edit_tensors is not None:
        edit_tensors(tensors)
    if "funcema.sha256" in metadata:  # keep the digest valid: the damage under test is the content
        metadata["funcema.sha256"] = hashlib.sha256(metadata["funcema"].encode()).hexdigest()
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Multi-process runs


def spawn_and_wait(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int, tmp: Any, timeout: float) -> None:
    """Run `worker(rank, *args)` in `nprocs` spawned processes and wait for them.

    Fails the test with the workers' stack dumps (`stacks-*.txt` in `tmp`, which the workers
    write when they pass `timeout`) if they do not finish in `timeout` + 10 s; kills leftovers.
    """
    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    try:
        while not context.join(timeout=1.0):
            if time.perf_counter() - t0 > timeout + 10:
                stacks = "\n".join(p.read_text() for p in sorted(pathlib.Path(tmp).glob("stacks-*.txt")))
                pytest.fail(f"the {nprocs}-process run did not finish in {timeout} s; stacks:\n{stacks}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()

