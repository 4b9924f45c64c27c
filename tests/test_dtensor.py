"""Sharded EMA: FSDP2 (DTensor parameters) on 2 CPU processes with gloo, against one process.

One module-scoped run spawns 2 processes that train a small ``fully_shard``-ed model and exercise
init/update (pure, donated, post-hoc), the collective counters, ``on_nonfinite="skip"``, DCP
save/load and ``swapped``; each check's outcome is written to a JSON file, and every test below
asserts one of them, so a failure names what broke. Loading onto one process (2 → 1 resharding)
and post-hoc synthesis run in the pytest process itself, without a process group.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import funcema as fe
from funcema import _dtensor, schedules
from tests.conftest import assert_trees_equal, spawn_and_wait

WORLD = 2
STEPS = 6
# FSDP's reduce-scatter averages the two ranks' gradients in another order than the one-process
# mean over the whole batch: fp32 rounding of ~1e-7 relative per step, over 6 SGD steps of lr 0.1
# on O(1) weights, stays far below this bound (the measured difference is recorded in the JSON).
TRAINING_TOL = 1e-5
WORKER_TIMEOUT = 90  # seconds; each worker dumps its stacks and exits after this


def _gloo_ok() -> str | None:
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this build"
    if not torch.distributed.is_gloo_available():
        return "the gloo backend is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError as err:  # pragma: no cover
        return f"FSDP2 / DTensor unavailable: {err}"
    return None


pytestmark = pytest.mark.skipif(_gloo_ok() is not None, reason=str(_gloo_ok()))


class Net(nn.Module):
    """Uneven shards: l2.weight has 5 rows (3 + 2), l3 has 1 row (rank 1 holds an empty shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 5)
        self.l3 = nn.Linear(5, 1)
        self.register_buffer("shift", torch.zeros(16))  # plain (replicated) float buffer
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))  # integer leaf: copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x) + self.shift))))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int | None) -> None:
    x, y = _batch(step)
    if rank is not None:  # each rank gets its half of the batch; FSDP averages the gradients
        x, y = x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        net.shift.add_(0.01)
        net.count.add_(1)


_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "broadcast", "barrier", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter",
    "send", "recv", "isend", "irecv", "all_gather_object", "broadcast_object_list", "monitored_barrier",
)  # fmt: skip


@contextlib.contextmanager
def _count_collectives(counts: dict[str, int]):
    """Count collectives two ways: patched ``torch.distributed`` functions and ``CommDebugMode``
    (which sees the functional collectives that DTensor redistribution and FSDP use)."""
    from torch.distributed.tensor.debug import CommDebugMode

    dist = torch.distributed
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts["python"] = counts.get("python", 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        with CommDebugMode() as mode:
            yield
        counts["comm_debug_mode"] = counts.get("comm_debug_mode", 0) + mode.get_total_counts()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def _worker(rank: int, port: int, tmp: str) -> None:
    """The 2-process run. Records {check: true | "failure message"} in tmp/results-<rank>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    stacks = open(Path(tmp) / f"stacks-{rank}.txt", "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.dump_traceback_later(WORKER_TIMEOUT, exit=True, file=stacks)  # a hang never outlives the test
    dist = torch.distributed
    results: dict[str, Any] = {}
    out = Path(tmp)

    def check(name: str, fn: Callable[[], Any]) -> None:
        try:
            value = fn()
            results[name] = True if value is None else value
        except Exception:
            results[name] = traceback.format_exc()

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _run_checks(rank, out, check, results)
    finally:
        (out / f"results-{rank}.json").write_text(json.dumps(results))
        dist.barrier()
        dist.destroy_process_group()


def _run_checks(rank: int, out: Path, check: Callable[[str, Callable[[], Any]], None], results: dict) -> None:
    run = _setup(rank, out, results)
    _train(run, results)
    for name, fn in CHECKS.items():
        check(name, lambda fn=fn: fn(run))
    full = _dtensor.gather(run.a.ema)  # a collective: every rank gathers, rank 0 writes
    if _dtensor.is_main_process():  # the file the one-process tests compare against
        fe.save(run.a._replace(ema=full), out / "a-full.safetensors")


def _full_params(tree: Any) -> dict[str, torch.Tensor]:
    return _dtensor.gather(dict(tree))


def _setup(rank: int, out: Path, results: dict) -> SimpleNamespace:
    """The sharded model and its EMAs, their references fed the gathered parameters, and the
    one-process run of the same trajectory (whole batch, no FSDP) with its EMA."""
    from torch.distributed.fsdp import fully_shard

    net, ref = _net(), _net()
    for m in (net.l1, net.l2, net):
        fully_shard(m)
    sd = net.state_dict()
    kinds = {k: type(v).__name__ for k, v in sd.items()}
    assert kinds["l1.weight"] == "DTensor" and kinds["shift"] == "Tensor", kinds
    counts: dict[str, int] = {}
    with _count_collectives(counts):
        a = fe.init(sd, schedule=schedules.constant(0.8), debias=True)  # mixed tree, pure updates
        b = fe.init(dict(net.named_parameters()), schedule=schedules.warmup(), every=2)  # donated
        c = fe.posthoc.init(dict(net.named_parameters()), sigma_rels=(0.05, 0.10))
    results["init_collectives"] = counts
    return SimpleNamespace(
        **_compensated_setup(sd, dict(net.named_parameters())),
        rank=rank, out=out, net=net, ref=ref, a=a, b=b, c=c, b_before_donation=b, sd=sd,
        opt=torch.optim.SGD(net.parameters(), lr=0.1), ref_opt=torch.optim.SGD(ref.parameters(), lr=0.1),
        a_ref=fe.init(_full_params(sd), schedule=schedules.constant(0.8), debias=True),
        b_ref=fe.init(_full_params(net.named_parameters()), schedule=schedules.warmup(), every=2),
        c_ref=fe.posthoc.init(_full_params(net.named_parameters()), sigma_rels=(0.05, 0.10)),
        a_single=fe.init(ref.state_dict(), schedule=schedules.constant(0.8), debias=True),
    )  # fmt: skip


def _compensated_setup(sd: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A compensated power EMA late in a run (step 10^7; pairs on the local shards, donated), a
    compensated post-hoc state, and their references fed the gathered parameters."""
    late = schedules.power(sigma_rel=0.10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fe.StagnationWarning)
        d, d_ref = (fe.init(tree, schedule=late, compensated=True) for tree in (sd, _full_params(sd)))
        e, e_ref = (fe.posthoc.init(tree, compensated=True) for tree in (params, _full_params(params)))
    late_step = torch.tensor(10**7)
    return {"d": d._replace(step=late_step), "d_ref": d_ref._replace(step=late_step.clone()), "e": e, "e_ref": e_ref}


def _train(run: SimpleNamespace, results: dict) -> None:
    """STEPS training steps, updating every EMA; post-hoc snapshots at two of them."""
    counts: dict[str, int] = {}
    for step in range(STEPS):
        _train_step(run.net, run.opt, step, run.rank)
        _train_step(run.ref, run.ref_opt, step, None)
        run.sd, params = run.net.state_dict(), dict(run.net.named_parameters())
        with _count_collectives(counts):
            run.a = fe.update(run.a, run.sd)
            run.b = fe.update(run.b, params, donate=True)
            run.c = fe.posthoc.update(run.c, params)
        run.a_ref = fe.update(run.a_ref, _full_params(run.sd))
        run.b_ref = fe.update(run.b_ref, _full_params(params), donate=True)
        run.c_ref = fe.posthoc.update(run.c_ref, _full_params(params))
        run.a_single = fe.update(run.a_single, run.ref.state_dict())
        run.d = fe.update(run.d, run.sd, donate=True)
        run.d_ref = fe.update(run.d_ref, _full_params(run.sd), donate=True)
        run.e = fe.posthoc.update(run.e, params)
        run.e_ref = fe.posthoc.update(run.e_ref, _full_params(params))
        if step in (2, STEPS - 1):  # post-hoc snapshots of the sharded run: every rank calls, rank 0 writes
            written = fe.posthoc.snapshot(run.c, run.out / "snaps-sharded")
            assert (len(written) == 2) == _dtensor.is_main_process()
            if _dtensor.is_main_process():
                fe.posthoc.snapshot(run.c_ref, run.out / "snaps-ref")
    results["update_collectives"] = run.update_counts = counts


# ---------------------------------------------------------------------------------------------
# The checks, run in order on both ranks after training; each returns None or a figure to record.


def layout(run: SimpleNamespace) -> None:
    from torch.distributed.tensor import DTensor

    for path, e in run.a.ema.items():
        p = run.sd[path]
        if isinstance(p, DTensor):
            assert isinstance(e, DTensor), path
            assert e.device_mesh == p.device_mesh and e.placements == p.placements, path
            assert e.to_local().shape == p.to_local().shape, path
        else:
            assert not isinstance(e, DTensor), path
    assert run.b.ema["l3.weight"].to_local().numel() == (5 if run.rank == 0 else 0)


def no_collectives_in_update(run: SimpleNamespace) -> None:
    counts = run.update_counts
    assert counts.get("python", 0) == 0 and counts.get("comm_debug_mode", 0) == 0, counts


def counters_detect_collectives(run: SimpleNamespace) -> None:
    """The negative result of no_collectives_in_update means something."""
    c1: dict[str, int] = {}
    with _count_collectives(c1):
        torch.distributed.all_reduce(torch.ones(1))
    c2: dict[str, int] = {}
    with _count_collectives(c2):
        run.a.ema["l1.weight"].full_tensor()
    assert c1.get("python", 0) >= 1, c1
    assert c2.get("comm_debug_mode", 0) >= 1, c2


def donated_old_state_consumed(run: SimpleNamespace) -> None:
    assert int(run.b_before_donation.step) == -1
    with pytest.raises(ValueError, match="donated"):
        fe.update(run.b_before_donation, dict(run.net.named_parameters()))


def swap_exchanges_dtensors(run: SimpleNamespace) -> None:
    live = run.net.state_dict()
    swapped_state, evaluated = fe.swap(run.a, live)
    assert all(evaluated[k] is run.a.ema[k] for k in live)  # the EMA's DTensors, nothing copied
    assert all(swapped_state.ema[k] is live[k] for k in live)
    back_state, back = fe.swap(swapped_state, evaluated)
    assert all(back[k] is live[k] and back_state.ema[k] is run.a.ema[k] for k in live)


def matches_gathered_reference(run: SimpleNamespace) -> None:
    """Bit for bit: the update is elementwise, so each rank computes exactly the elements of its shard."""
    for state, state_ref in ((run.a, run.a_ref), (run.b, run.b_ref), *zip(run.c.emas, run.c_ref.emas)):
        assert_trees_equal(dict(_dtensor.gather(state.ema)), dict(state_ref.ema))
        assert int(state.step) == int(state_ref.step) == STEPS
        assert float(state.log_decay_product) == float(state_ref.log_decay_product)


def matches_single_process_run(run: SimpleNamespace) -> float:
    diff = _max_diff(_dtensor.gather(run.a.ema), dict(run.a_single.ema))
    assert diff <= TRAINING_TOL, diff
    return diff


def skip_decides_per_rank(run: SimpleNamespace) -> None:
    from torch.distributed.tensor import DTensor

    s = fe.init(dict(run.net.named_parameters()), schedule=schedules.constant(0.5), on_nonfinite="skip")
    bad = {}
    with torch.no_grad():
        for k, p in run.net.named_parameters():
            local = p.to_local().clone() + 1.0
            if run.rank == 0 and k == "l1.weight":
                local[0, 0] = float("nan")
            bad[k] = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    counts: dict[str, int] = {}
    with _count_collectives(counts):
        s2 = fe.update(s, bad)
    assert counts.get("python", 0) == 0 and counts.get("comm_debug_mode", 0) == 0, counts
    changed = any(not torch.equal(s2.ema[k].to_local(), s.ema[k].to_local()) for k in s.ema)
    if run.rank == 0:  # its shard held the NaN: the EMA is untouched and the skip counted
        assert not changed and int(s2.nonfinite_count) == 1
    else:  # its shards were finite: it averaged
        assert changed and int(s2.nonfinite_count) == 0


def save_load_same_world(run: SimpleNamespace) -> None:
    from torch.distributed.tensor import DTensor

    a, ck = run.a, run.out / "ck-a"
    fe.save(a, ck)
    loaded = fe.load(ck, like=a)
    assert loaded.config == a.config
    for k in a.ema:
        e, got = a.ema[k], loaded.ema[k]
        assert type(e) is type(got), k
        if isinstance(e, DTensor):
            assert got.placements == e.placements and torch.equal(got.to_local(), e.to_local()), k
        else:
            assert torch.equal(got, e) and got.dtype == e.dtype, k
    assert int(loaded.step) == int(a.step) and torch.equal(loaded.log_decay_product, a.log_decay_product)
    assert torch.equal(loaded.nonfinite_count, a.nonfinite_count)
    p = run.net.state_dict()  # resuming equals never having stopped
    assert_trees_equal(_dtensor.gather(fe.update(loaded, p).ema), _dtensor.gather(fe.update(a, p).ema))
    # `like` may also be the parameter tree.
    assert_trees_equal(_dtensor.gather(fe.load(ck, like=run.net.state_dict()).ema), _dtensor.gather(a.ema))


def save_overwrites(run: SimpleNamespace) -> None:
    ck = run.out / "ck-a"
    a2 = fe.update(run.a, run.net.state_dict())
    fe.save(a2, ck)
    assert_trees_equal(_dtensor.gather(fe.load(ck, like=run.a).ema), _dtensor.gather(a2.ema))
    fe.save(run.a, ck)  # back to the state the one-process load compares against


def swapped_on_fsdp_module(run: SimpleNamespace) -> float:
    net, x = run.net, _batch(99)[0]
    live_locals = {k: p.to_local().clone() for k, p in net.named_parameters()}
    live_out = net(x).detach()
    plain = _net()
    plain.load_state_dict(_dtensor.gather(run.a.ema))
    with fe.swapped(net, run.a) as m:
        ema_out = m(x).detach()
    diff = float((ema_out - plain(x).detach()).abs().max())
    assert diff <= 1e-6, diff  # the same weights; only matmul blocking may differ
    assert not torch.allclose(ema_out, live_out)
    for k, p in net.named_parameters():
        assert torch.equal(p.to_local(), live_locals[k]), k  # restored bit for bit
    with pytest.raises(RuntimeError, match="boom"), fe.swapped(net, run.a):
        raise RuntimeError("boom")
    for k, p in net.named_parameters():
        assert torch.equal(p.to_local(), live_locals[k]), k
    assert torch.equal(net(x).detach(), live_out)
    return diff


def compensated_matches_gathered_reference(run: SimpleNamespace) -> None:
    """Bit for bit, the compensation too: the compensated update is as elementwise as the plain one."""
    from torch.distributed.tensor import DTensor

    for path, e in run.d.ema.items():
        comp = run.d.compensation[path]
        assert isinstance(comp, DTensor) == isinstance(e, DTensor), path
        if isinstance(e, DTensor):
            assert comp.placements == e.placements and comp.to_local().shape == e.to_local().shape, path
    for state, ref in ((run.d, run.d_ref), *zip(run.e.emas, run.e_ref.emas)):
        for tree in ("ema", "compensation"):
            assert_trees_equal(dict(_dtensor.gather(getattr(state, tree))), dict(getattr(ref, tree)))
    assert any(bool(c.any()) for c in run.d_ref.compensation.values())  # the low words are in use


def compensated_save_load_and_snapshot(run: SimpleNamespace) -> None:
    """DCP save/load keeps the compensation sharded like the EMA; snapshots of a sharded
    compensated run equal those of the reference, file for file."""
    from safetensors.torch import load_file

    ck = run.out / "ck-d"
    fe.save(run.d, ck)
    loaded = fe.load(ck, like=run.d)
    assert loaded.config == run.d.config
    for tree in ("ema", "compensation"):
        for k, e in getattr(run.d, tree).items():
            assert type(getattr(loaded, tree)[k]) is type(e), (tree, k)
        assert_trees_equal(_dtensor.gather(getattr(loaded, tree)), _dtensor.gather(getattr(run.d, tree)))
    p = run.net.state_dict()  # resuming equals never having stopped
    assert_trees_equal(_dtensor.gather(fe.update(loaded, p).compensation), _dtensor.gather(fe.update(run.d, p).compensation))
    written = fe.posthoc.snapshot(run.e, run.out / "snaps-comp", dtype=torch.float32)
    if _dtensor.is_main_process():
        expected = fe.posthoc.snapshot(run.e_ref, run.out / "snaps-comp-ref", dtype=torch.float32)
        for a, b in zip(written, expected):
            assert_trees_equal(load_file(str(a)), load_file(str(b)))


def sharded_bytes(run: SimpleNamespace) -> dict[str, int]:
    """The EMA costs exactly one fp32 copy of the local shard of every parameter."""
    run.net.reshard()  # the root stays unsharded after a forward; its registered parameters are then DTensors
    ema_bytes = sum(e.to_local().numel() * e.to_local().element_size() for e in run.b.ema.values())
    param_bytes = sum(p.to_local().numel() * p.to_local().element_size() for p in run.net.parameters())
    assert ema_bytes == param_bytes
    return {"ema": ema_bytes, "params": param_bytes}


CHECKS: dict[str, Callable[[SimpleNamespace], Any]] = {
    f.__name__: f
    for f in (
        layout,
        no_collectives_in_update,
        counters_detect_collectives,
        donated_old_state_consumed,
        swap_exchanges_dtensors,
        matches_gathered_reference,
        matches_single_process_run,
        skip_decides_per_rank,
        save_load_same_world,
        save_overwrites,
        swapped_on_fsdp_module,
        compensated_matches_gathered_reference,
        compensated_save_load_and_snapshot,
        sharded_bytes,
    )
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any], float]:
    tmp = tmp_path_factory.mktemp("distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    spawn_and_wait(_worker, (port, str(tmp)), WORLD, tmp, WORKER_TIMEOUT)
    seconds = time.perf_counter() - t0
    r0 = json.loads((tmp / "results-0.json").read_text())
    r1 = json.loads((tmp / "results-1.json").read_text())
    return tmp, r0, r1, seconds


def _ok(results: tuple[dict[str, Any], dict[str, Any]], name: str) -> None:
    for rank, r in enumerate(results):
        value = r.get(name, "check did not run")
        assert not isinstance(value, str), f"rank {rank}: {value}"


@pytest.mark.parametrize("name", list(CHECKS))
def test_two_process_check(run: Any, name: str) -> None:
    _, r0, r1, _ = run
    _ok((r0, r1), name)


def test_init_runs_no_collective(run: Any) -> None:
    _, r0, r1, _ = run
    for r in (r0, r1):
        assert r["init_collectives"].get("python", 0) == 0 and r["init_collectives"].get("comm_debug_mode", 0) == 0


def test_load_two_ranks_onto_one_process(run: Any) -> None:
    """2 → 1: a single process without a process group reads the DCP checkpoint into plain tensors."""
    tmp, *_ = run
    assert not torch.distributed.is_initialized()
    like = _net().state_dict()
    loaded = fe.load(tmp / "ck-a", like=like)
    expected = fe.load(tmp / "a-full.safetensors", like=like)
    assert loaded.config == expected.config
    assert_trees_equal(dict(loaded.ema), dict(expected.ema))
    assert not any(_dtensor.is_dtensor(e) for e in loaded.ema.values())
    assert int(loaded.step) == STEPS and torch.equal(loaded.log_decay_product, expected.log_decay_product)
    # The loaded state is an ordinary state: it keeps updating and round-trips as a file.
    fe.update(loaded, like)


def test_posthoc_synthesis_of_a_sharded_run_on_one_process(run: Any) -> None:
    tmp, *_ = run
    sharded = fe.posthoc.synthesize(tmp / "snaps-sharded", sigma_rel=0.08)
    reference = fe.posthoc.synthesize(tmp / "snaps-ref", sigma_rel=0.08)
    assert_trees_equal(dict(sharded.ema), dict(reference.ema))
    assert len(sharded.snapshots) == 4  # 2 widths x 2 times


def test_load_errors(run: Any, tmp_path: Path) -> None:
    tmp, *_ = run
    with pytest.raises(ValueError, match="funcema.safetensors"):
        fe.load(tmp_path, like=_net().state_dict())  # an empty directory is no checkpoint
    like = _net().state_dict()
    like.pop("shift")
    with pytest.raises(ValueError, match="shift"):
        fe.load(tmp / "ck-a", like=like)


def test_mismatched_leaf_kinds_are_rejected() -> None:
    """A plain EMA updated with DTensor parameters (or the reverse) names the leaf."""
    from torch.distributed.tensor import DeviceMesh, DTensor, Replicate

    if not torch.distributed.is_initialized():
        store = torch.distributed.HashStore()
        torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        mesh = DeviceMesh("cpu", [0])
        w = DTensor.from_local(torch.ones(3), mesh, [Replicate()])
        state = fe.init({"w": torch.zeros(3)})
        with pytest.raises(ValueError, match="'w'"):
            fe.update(state, {"w": w})
        sharded = fe.init({"w": w}, schedule=schedules.constant(0.5))
        assert isinstance(sharded.ema["w"], DTensor)
        new = fe.update(sharded, {"w": DTensor.from_local(torch.full((3,), 3.0), mesh, [Replicate()])})
        assert torch.equal(new.ema["w"].to_local(), torch.full((3,), 2.0))
        with pytest.raises(ValueError, match="'w'"):
            fe.update(sharded, {"w": torch.ones(3)})
    finally:
        torch.distributed.destroy_process_group()
