"""``fe.EMA`` (the Stateful holder): same numbers as the pure API, and every checkpointer.

The holder computes nothing itself, so its EMA must equal the pure API's bit for bit; every
checkpointer that takes a ``state_dict()`` object (DCP on one and on two processes, Lightning
Fabric, accelerate, plain ``torch.save``) must give back a state whose next updates equal those of
a run that never stopped, bit for bit.
"""

from __future__ import annotations

import faulthandler
import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import funcema as fe
from funcema import schedules
from tests.conftest import spawn_and_wait

STEPS = 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _snapshot(ema: fe.EMA) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ema.state.ema.items()}


# ----------------------------------------------------------------------------------------------
# The holder is the pure API


def test_module_holder_equals_pure_api_with_buffers() -> None:
    """Parameters and float buffers averaged, num_batches_tracked copied: exactly fe.init/update of state_dict()."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"schedule": schedules.warmup(), "every": 2, "debias": True}
    ema = fe.EMA(model, **options)
    state = fe.init(model.state_dict(), **options)
    for step in range(STEPS):
        _train(model, opt, step)
        ema.update(model)
        state = fe.update(state, model.state_dict())
    assert _equal(dict(ema.state.ema), dict(state.ema))
    assert ema.step == STEPS and ema.state.config == state.config
    assert "1.num_batches_tracked" in ema.state.ema and ema.state.ema["1.num_batches_tracked"].dtype == torch.int64
    assert not ema.state.config.averaged[ema.state.config.paths.index("1.num_batches_tracked")]


def test_buffers_false_and_params_tree() -> None:
    model = _net()
    ema = fe.EMA(model, buffers=False, schedule=schedules.constant(0.5))
    assert set(ema.state.ema) == {k for k, _ in model.named_parameters()}
    tree = fe.EMA({"w": torch.zeros(2)}, schedule=schedules.constant(0.5))
    tree.update({"w": torch.ones(2)})
    assert torch.equal(tree.ema["w"], torch.full((2,), 0.5))


def test_update_donates_and_old_state_is_consumed() -> None:
    model = _net()
    ema = fe.EMA(model)
    old = ema.state
    ema.update(model)
    assert int(old.step) == -1 and ema.step == 1


def test_satisfies_dcp_stateful_protocol() -> None:
    from torch.distributed.checkpoint.stateful import Stateful

    assert isinstance(fe.EMA(_net()), Stateful)


def test_swapped_and_copy_to() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = fe.EMA(model, schedule=schedules.constant(0.5))
    _train(model, opt, 0)
    ema.update(model)
    _train(model, opt, 1)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped(model):
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    assert _equal(inside, dict(ema.ema)) and _equal(model.state_dict(), live)
    assert ema.copy_to(model) is model
    assert _equal(model.state_dict(), dict(ema.ema))


def test_evaluation_never_changes_the_ema() -> None:
    """In-place writes to the module inside swapped() (BatchNorm in training mode) do not reach the EMA."""
    model = _net()
    ema = fe.EMA(model, schedule=schedules.constant(0.5))
    before = _snapshot(ema)
    with ema.swapped(model):
        model.train()
        model(torch.randn(16, 4))  # updates running_mean / running_var / num_batches_tracked in place
    assert _equal(_snapshot(ema), before)


def test_repr_names_step_and_schedule() -> None:
    text = repr(fe.EMA(_net(), schedule=schedules.constant(0.9), posthoc=(0.05, 0.10)))
    assert text.startswith("EMA(step=0, leaves=9,") and "posthoc_sigma_rels" in text


# ----------------------------------------------------------------------------------------------
# state_dict / load_state_dict


def test_state_dict_layout() -> None:
    model = _net()
    ema = fe.EMA(model, schedule=schedules.halflife(10), every=3)
    sd = ema.state_dict()
    assert set(sd) == {"config", "ema", "step", "log_decay_product", "nonfinite_count"}
    assert list(sd["ema"]) == list(model.state_dict())  # fully qualified names, module order
    assert all(sd["ema"][k] is ema.state.ema[k] for k in sd["ema"])  # live tensors, as nn.Module.state_dict()
    config = json.loads(sd["config"])
    assert config["format"] == "funcema.EMA" and config["every"] == 3
    assert config["schedule"] == schedules.halflife(10).to_dict()
    assert config["copied"] == ["1.num_batches_tracked"]


def _resumed_equals_uninterrupted(save: Any, load: Any, *, posthoc: Any = None) -> None:
    """Train STEPS steps; stop after 3, rebuild everything from the checkpoint, continue; compare."""
    options: dict[str, Any] = {"schedule": schedules.warmup(), "debias": True, "posthoc": posthoc}

    def run(stop: int | None) -> fe.EMA:
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ema = fe.EMA(model, **options)
        for step in range(STEPS):
            if step == stop:
                save(model, opt, ema)
                model = _net()
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1.0)  # the fresh objects start elsewhere: only the checkpoint can bring them back
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
                ema = fe.EMA(model, **options)
                load(model, opt, ema)
            _train(model, opt, step)
            ema.update(model)
        return ema

    whole, resumed = run(None), run(3)
    assert _equal(dict(resumed.ema), dict(whole.ema)), "resumed EMA differs from the uninterrupted run"
    assert resumed.step == whole.step == STEPS
    assert torch.equal(resumed.state.log_decay_product, whole.state.log_decay_product)
    if posthoc is not None:
        for a, b in zip(resumed.posthoc.emas, whole.posthoc.emas):
            assert _equal(dict(a.ema), dict(b.ema)) and int(a.step) == int(b.step)


def test_resume_through_torch_save_is_bit_exact(tmp_path: Path) -> None:
    file = tmp_path / "ck.pt"

    def save(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, file)

    def load(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        ck = torch.load(file, weights_only=True)  # no pickled objects: tensors, numbers and a JSON string
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        ema.load_state_dict(ck["ema"])

    _resumed_equals_uninterrupted(save, load, posthoc=(0.05, 0.10))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resume_through_dcp_on_one_process_is_bit_exact(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    def save(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "rest.pt")
        dcp.save({"ema": ema}, checkpoint_id=tmp_path / "dcp", no_dist=True)

    def load(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        rest = torch.load(tmp_path / "rest.pt", weights_only=True)
        model.load_state_dict(rest["model"])
        opt.load_state_dict(rest["opt"])
        live = ema.state_dict()["ema"]
        dcp.load({"ema": ema}, checkpoint_id=tmp_path / "dcp", no_dist=True)
        assert all(ema.ema[k] is live[k] for k in live)  # loaded in place, no new storage

    _resumed_equals_uninterrupted(save, load, posthoc={"sigma_rels": (0.05, 0.10), "every": 2})


def test_resume_through_fabric_is_bit_exact(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning", reason="Fabric needs the lightning extra")
    fabric = lightning.Fabric(accelerator="cpu", devices=1)
    file = tmp_path / "fabric.ckpt"

    def save(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        fabric.save(file, {"model": model, "opt": opt, "ema": ema})

    def load(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        remainder = fabric.load(file, {"model": model, "opt": opt, "ema": ema})
        assert remainder == {}

    _resumed_equals_uninterrupted(save, load)


def test_resume_through_accelerate_is_bit_exact(tmp_path: Path) -> None:
    accelerate = pytest.importorskip("accelerate", reason="needs accelerate (the transformers extra)")

    def save(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        acc = accelerate.Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        acc.register_for_checkpointing(ema)
        acc.save_state(tmp_path / "acc")

    def load(model: nn.Module, opt: torch.optim.Optimizer, ema: fe.EMA) -> None:
        acc = accelerate.Accelerator(cpu=True)
        acc.prepare(model, opt)
        acc.register_for_checkpointing(ema)
        acc.load_state(tmp_path / "acc")

    _resumed_equals_uninterrupted(save, load)
    assert (tmp_path / "acc" / "custom_checkpoint_0.pkl").is_file()  # where accelerate put the EMA


def _rejected(ema: fe.EMA, sd: Any, error: type[Exception], match: str) -> None:
    before = _snapshot(ema)
    step = ema.step
    with pytest.raises(error, match=match):
        ema.load_state_dict(sd)
    assert _equal(_snapshot(ema), before) and ema.step == step  # a rejected call changes nothing


def test_load_state_dict_rejects_with_named_cause() -> None:
    model = _net()
    ema = fe.EMA(model, schedule=schedules.constant(0.9))
    donor = fe.EMA(model, schedule=schedules.constant(0.9))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    donor.update(model)
    good = donor.state_dict()

    _rejected(ema, [1, 2], TypeError, "mapping")
    _rejected(ema, {k: v for k, v in good.items() if k != "step"}, ValueError, r"missing keys \['step'\]")
    _rejected(ema, {**good, "extra": 1}, ValueError, r"unexpected keys \['extra'\]")
    other = fe.EMA(model, schedule=schedules.constant(0.99)).state_dict()
    _rejected(ema, {**good, "config": other["config"]}, ValueError, r"schedule: saved .*0\.99")
    _rejected(ema, {**good, "config": "{"}, ValueError, "not valid JSON")
    _rejected(ema, {**good, "config": json.dumps({"format": "other"})}, ValueError, "not the configuration")
    ema_part = dict(good["ema"])
    ema_part.pop("0.bias")
    _rejected(ema, {**good, "ema": ema_part}, ValueError, r"missing keys \['0.bias'\]")
    # The first leaves are valid: a late failure must not have written them.
    bad_shape = {**good["ema"], "3.bias": torch.zeros(5)}
    _rejected(ema, {**good, "ema": bad_shape}, ValueError, r"\['3.bias'\] has shape \(5,\)")
    bad_dtype = {**good["ema"], "3.bias": good["ema"]["3.bias"].double()}
    _rejected(ema, {**good, "ema": bad_dtype}, ValueError, "float64")
    _rejected(ema, {**good, "ema": {**good["ema"], "3.bias": [0.0, 0.0]}}, TypeError, "must be a tensor")
    _rejected(ema, {**good, "step": torch.tensor(-3)}, ValueError, "step'] must be >= 0")
    _rejected(ema, {**good, "step": "3"}, TypeError, "0-d tensor or a number")
    _rejected(ema, {**good, "step": torch.ones(2, dtype=torch.int64)}, ValueError, "single")
    ema.load_state_dict(good)
    assert _equal(_snapshot(ema), dict(donor.ema)) and ema.step == 1


def test_posthoc_state_dict_and_snapshot(tmp_path: Path) -> None:
    model = _net()
    ema = fe.EMA(model, posthoc=(0.05, 0.10))
    with pytest.raises(ValueError, match="posthoc"):
        fe.EMA(model).snapshot(tmp_path)
    ph = fe.posthoc.init(model.state_dict(), sigma_rels=(0.05, 0.10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        _train(model, opt, step)
        ema.update(model)
        ph = fe.posthoc.update(ph, model.state_dict())
    for a, b in zip(ema.posthoc.emas, ph.emas):
        assert _equal(dict(a.ema), dict(b.ema))
    written = ema.snapshot(tmp_path / "snaps")
    assert len(written) == 2
    result = fe.posthoc.synthesize(tmp_path / "snaps", sigma_rel=0.07)
    assert set(result.ema) == set(model.state_dict())
    sd = ema.state_dict()
    assert set(sd["posthoc"]) == {"0", "1"} and json.loads(sd["config"])["posthoc"]["every"] == 1
    _rejected(fe.EMA(model, posthoc=(0.05, 0.10)), {**sd, "posthoc": {"0": sd["posthoc"]["0"]}}, ValueError, "'1'")
    _rejected(fe.EMA(model, posthoc=(0.05, 0.12)), sd, ValueError, "posthoc: saved")


def test_constructor_validation() -> None:
    model = _net()
    with pytest.raises(TypeError, match="buffers must be a bool"):
        fe.EMA(model, buffers="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="posthoc must be"):
        fe.EMA(model, posthoc=0.05)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        fe.EMA(model, every=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fe.EMA(model, decay=0.9)
    ema = fe.EMA(model)
    with pytest.raises(ValueError, match="paths"):
        ema.update(nn.Linear(4, 8))
    assert ema.step == 0


# ----------------------------------------------------------------------------------------------
# FSDP2 on 2 gloo processes: saved at world size 2, loaded at 1

WORLD = 2
WORKER_TIMEOUT = 90  # seconds; each worker dumps its stacks and exits after this


def _gloo_reason() -> str | None:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "torch.distributed with gloo is not available in this build"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:  # pragma: no cover
        return f"FSDP2 unavailable: {err}"
    return None


class _Sharded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.l2 = nn.Linear(8, 3)  # 3 rows over 2 ranks: uneven shards (2 + 1)
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def _sharded_run(rank: int) -> tuple[nn.Module, fe.EMA]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = _Sharded()
    fully_shard(net.l1)
    fully_shard(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ema = fe.EMA(net, schedule=schedules.constant(0.7), posthoc=(0.05, 0.10))
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g)[4 * rank : 4 * rank + 4], torch.randn(8, 3, generator=g)[4 * rank : 4 * rank + 4]
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            net.count.add_(1)
        ema.update(net)
    return net, ema


def _fsdp_worker(rank: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    out = Path(tmp)
    stacks = open(out / f"stacks-{rank}.txt", "w")  # noqa: SIM115 - lives as long as the process
    faulthandler.dump_traceback_later(WORKER_TIMEOUT, exit=True, file=stacks)
    # A file rendezvous: no TCP port to pick, so no race with other processes on the machine.
    torch.distributed.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=WORLD)
    result: dict[str, Any] = {}
    try:
        net, ema = _sharded_run(rank)
        assert isinstance(ema.ema["l1.weight"], DTensor) and not isinstance(ema.ema["count"], DTensor)
        dcp.save({"ema": ema}, checkpoint_id=out / "dcp")
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in ema.ema.items()}
        # Same world size: a fresh sharded holder loads its own shards in place.
        _, fresh = _sharded_run(rank)
        fresh_live = fresh.state_dict()["ema"]
        with torch.no_grad():
            for v in fresh_live.values():
                (v.to_local() if isinstance(v, DTensor) else v).zero_()
        dcp.load({"ema": fresh}, checkpoint_id=out / "dcp")
        same = all(
            torch.equal(fresh.ema[k].to_local(), ema.ema[k].to_local()) if isinstance(v, DTensor) else torch.equal(fresh.ema[k], v)
            for k, v in ema.ema.items()
        )
        result["same_world_load"] = same and all(fresh.ema[k] is fresh_live[k] for k in fresh_live)
        # copy_to writes the local shards; the next forward all-gathers the EMA.
        ema.copy_to(net)
        params = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in net.state_dict().items()}
        result["copy_to"] = all(torch.equal(params[k], full[k]) for k in full)
        if rank == 0:
            torch.save({k: v.clone() for k, v in full.items()}, out / "full.pt")
            torch.save({"step": ema.step}, out / "step.pt")
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        (out / f"result-{rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    if _gloo_reason() is not None:
        pytest.skip(str(_gloo_reason()))
    tmp = tmp_path_factory.mktemp("stateful-fsdp")
    spawn_and_wait(_fsdp_worker, (str(tmp),), WORLD, tmp, WORKER_TIMEOUT)
    return tmp, [json.loads((tmp / f"result-{r}.json").read_text()) for r in range(WORLD)]


def test_fsdp2_dcp_same_world_and_copy_to(fsdp_run: Any) -> None:
    _, results = fsdp_run
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r['error']}"
        assert r["same_world_load"] is True, rank
        assert r["copy_to"] is True, rank


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp2_dcp_saved_on_two_loads_on_one(fsdp_run: Any) -> None:
    """DCP reshards 2 → 1: a plain holder on a process without a process group gets the full EMA."""
    import torch.distributed.checkpoint as dcp

    tmp, results = fsdp_run
    assert all("error" not in r for r in results), results
    assert not torch.distributed.is_initialized()
    ema = fe.EMA(_Sharded(), schedule=schedules.constant(0.7), posthoc=(0.05, 0.10))
    dcp.load({"ema": ema}, checkpoint_id=tmp / "dcp", no_dist=True)
    full = torch.load(tmp / "full.pt", weights_only=True)
    assert _equal(dict(ema.ema), full)
    assert ema.step == torch.load(tmp / "step.pt", weights_only=True)["step"] == STEPS
    assert all(int(m.step) == STEPS for m in ema.posthoc.emas)
