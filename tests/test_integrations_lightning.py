"""Lightning's ``EMACallback`` with the real ``lightning`` package, ``Trainer(accelerator="cpu")``.

The EMA is compared against a float64 reference computed by hand from the weights recorded after
every optimizer step; evaluation must see the EMA and give back the training weights bit for bit;
a run killed and resumed from its checkpoint must equal an uninterrupted run bit for bit; DDP and
FSDP2 (``ModelParallelStrategy``) run on 2 CPU processes (gloo), launched as Lightning launches
them (this file re-run as a script, see ``_launch``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import funcema as fe

pytest.importorskip("lightning", reason="the Lightning integration needs the lightning extra")
import lightning as L

from funcema.integrations.lightning import EMACallback

DECAY = 0.9
# float32 EMA against a float64 reference: each update rounds once (<= 1 ulp of values below 2,
# i.e. 2.4e-7), and 12 updates at most accumulate well below this bound.
REF_ATOL = 5e-6
WORKER_TIMEOUT = 240  # seconds for a 2-process Lightning run (2 shared cores, imports included)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


class Tiny(L.LightningModule):
    """Linear - BatchNorm - ReLU - Linear, trained with SGD + momentum on fixed data (no shuffling)."""

    def __init__(self, shard: bool = False, save_in_validation: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.shard = shard
        self.save_in_validation = save_in_validation
        self.seen_in_validation: list[dict[str, Any]] = []

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", ((self(x) - y) ** 2).mean(), sync_dist=True)
        if batch_idx == 0:
            self.seen_in_validation.append(
                {"step": self.trainer.global_step, "sanity": self.trainer.sanity_checking, "weights": _full(self)}
            )
            if self.save_in_validation and not self.trainer.sanity_checking and len(self.seen_in_validation) == 2:
                self.trainer.save_checkpoint(self.save_in_validation)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_validation.append({"step": -1, "sanity": False, "weights": _full(self)})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _full(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state dict, with sharded tensors gathered."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone()
    return out


def _loader(n: int = 24) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(7)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


class Recorder(L.Callback):
    """Records the weights after every optimizer step, and around each evaluation."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.batches = 0
        self._last = 0
        self.eval_start: list[dict[str, Any]] = []
        self.eval_end: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = _full(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches += 1
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.after_step.append(_full(pl_module))

    def _record(self, where: list, pl_module: L.LightningModule) -> None:
        tensors = {k: v for k, v in pl_module.state_dict().items()}
        where.append({"weights": _full(pl_module), "ptrs": {k: _ptr(v) for k, v in tensors.items()}})

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(self.eval_start, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(self.eval_end, pl_module)

    on_test_start = on_validation_start
    on_test_end = on_validation_end


def _ptr(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.data_ptr()


def _reference(initial: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The EMA by hand, in float64: floating entries averaged, integer ones copied."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in initial.items()}
    for params in steps:
        for k, p in params.items():
            ema[k] = DECAY * ema[k] + (1 - DECAY) * p.double() if p.is_floating_point() else p.clone()
    return ema


def _close(ema: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ema.keys() == ref.keys()
    for k in ref:
        if ref[k].is_floating_point():
            diff = float((ema[k].double() - ref[k]).abs().max())
            assert diff <= REF_ATOL, (k, diff)
        else:
            assert torch.equal(ema[k], ref[k]), k


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _trainer(callbacks: list, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return L.Trainer(callbacks=callbacks, **options)


def _ema_weights(callback: EMACallback) -> dict[str, torch.Tensor]:
    assert callback.ema is not None
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in callback.ema.ema.items()}


# ----------------------------------------------------------------------------------------------
# One process


def test_accumulation_validation_and_reference(tmp_path: Path) -> None:
    """max_steps + val_check_interval + accumulate_grad_batches=2 + num_sanity_val_steps=2."""
    recorder = Recorder()
    callback = EMACallback(schedule=fe.schedules.constant(DECAY))
    after = Recorder()  # runs after the EMA callback: sees what evaluation sees, and what it leaves
    model = Tiny(save_in_validation=str(tmp_path / "in-validation.ckpt"))
    trainer = _trainer(
        [recorder, callback, after], max_steps=6, val_check_interval=4, accumulate_grad_batches=2, num_sanity_val_steps=2
    )
    trainer.fit(model, _loader(), _loader(8))

    assert recorder.batches == 12 and len(recorder.after_step) == 6
    assert callback.ema.step == 6  # one update per optimizer step, not per batch
    _close(_ema_weights(callback), _reference(recorder.initial, recorder.after_step))

    sanity, *validations = model.seen_in_validation
    assert sanity["sanity"] and _equal(sanity["weights"], recorder.initial)  # no EMA swapped into the sanity check
    assert [v["step"] for v in validations] == [2, 4, 6]
    for v in validations:  # validation ran on the EMA of the weights so far, cast to the module's dtypes
        ema = _reference(recorder.initial, recorder.after_step[: v["step"]])
        _close(v["weights"], {k: r.to(v["weights"][k].dtype).double() if r.is_floating_point() else r for k, r in ema.items()})
    for start, end in zip(recorder.eval_start, after.eval_end):  # training weights back, bit for bit, same storage
        assert _equal(start["weights"], end["weights"]) and start["ptrs"] == end["ptrs"]
    assert _equal(_full(model), recorder.after_step[-1])

    # A checkpoint written from inside validation (EMA swapped in, at step 2) holds the raw weights.
    ck = torch.load(tmp_path / "in-validation.ckpt", weights_only=True)
    assert _equal(dict(ck["state_dict"]), recorder.after_step[1])
    state = ck["callbacks"]["EMACallback"]
    _close(dict(state["ema"]["ema"]), _reference(recorder.initial, recorder.after_step[:2]))
    assert state["last_update_step"] == 2 and int(state["ema"]["step"]) == 2


def test_test_runs_on_the_ema_and_restores() -> None:
    callback = EMACallback(schedule=fe.schedules.constant(DECAY))
    recorder = Recorder()
    model = Tiny()
    trainer = _trainer([callback, recorder], max_steps=3, limit_val_batches=0)
    trainer.fit(model, _loader())
    before = _full(model)
    trainer.test(model, _loader(4), verbose=False)
    assert _equal(model.seen_in_validation[-1]["weights"], {k: v.to(before[k].dtype) for k, v in _ema_weights(callback).items()})
    assert _equal(_full(model), before)


class Killer(L.Callback):
    """Raises at the start of the first batch after optimizer step ``at``: the process dies mid-run."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("killed")


def _run(ckpt_dir: Path, ckpt_path: Path | None = None, kill_at: int | None = None, **options: Any) -> tuple[Tiny, EMACallback]:
    """9 optimizer steps, 3 per epoch (6 batches, accumulated by 2), a checkpoint every 3 steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = Tiny()
    callback = EMACallback(schedule=fe.schedules.warmup(max_decay=DECAY), debias=True, **options)
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    extra = [Killer(kill_at)] if kill_at is not None else []
    trainer = _trainer(
        [callback, *extra, checkpoints], max_steps=9, val_check_interval=6, accumulate_grad_batches=2,
        num_sanity_val_steps=1, enable_checkpointing=True,
    )  # fmt: skip
    if kill_at is None:
        trainer.fit(model, _loader(12), _loader(4), ckpt_path=ckpt_path)
    else:
        with pytest.raises(RuntimeError, match="killed"):
            trainer.fit(model, _loader(12), _loader(4))
    return model, callback


@pytest.mark.parametrize("layout", ["funcema", "weight_averaging"])
def test_kill_and_resume_equals_uninterrupted(tmp_path: Path, layout: str) -> None:
    whole_model, whole = _run(tmp_path / "whole", layout=layout)
    _run(tmp_path / "killed", kill_at=5, layout=layout)  # dies after step 5; its last checkpoint is at step 3
    ckpt = tmp_path / "killed" / "step=3.ckpt"
    assert not (tmp_path / "killed" / "step=6.ckpt").exists()
    resumed_model, resumed = _run(tmp_path / "resumed", ckpt_path=ckpt, layout=layout)
    assert _equal(_full(resumed_model), _full(whole_model))
    assert _equal(_ema_weights(resumed), _ema_weights(whole)) and resumed.ema.step == whole.ema.step == 9
    assert all(e.device == p.device for e, p in zip(resumed.ema.ema.values(), resumed_model.state_dict().values()))

    ck = torch.load(ckpt, weights_only=True)
    raw = dict(ck["state_dict"] if layout == "funcema" else ck["current_model_state"])
    # Lightning skips the sanity check when it restores a run mid-epoch (test_sanity_check_option covers it);
    # the first validation of the resumed run, at step 6, saw the EMA.
    first = resumed_model.seen_in_validation[0]
    assert not first["sanity"] and first["step"] == 6
    if layout == "funcema":
        assert "current_model_state" not in ck
    else:  # EMAWeightAveraging's layout: the EMA in state_dict, the raw weights beside it
        assert set(ck["averaging_state"]) == {"n_averaged"} and int(ck["averaging_state"]["n_averaged"]) == 3
        saved_ema = ck["callbacks"]["EMACallback"]["ema"]["ema"]
        assert _equal(dict(ck["state_dict"]), {k: v.to(raw[k].dtype) for k, v in saved_ema.items()})
        assert not _equal(dict(ck["state_dict"]), raw)
        loaded = Tiny.load_from_checkpoint(ckpt)  # inference from the checkpoint gets the EMA
        assert _equal(_full(loaded), dict(ck["state_dict"]))


def test_imports_an_ema_weight_averaging_checkpoint(tmp_path: Path) -> None:
    """Migration: resume a run written by Lightning's EMAWeightAveraging with this callback."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, filename="{step}")
    _trainer([EMAWeightAveraging(decay=DECAY), checkpoints], max_steps=3, enable_checkpointing=True).fit(Tiny(), _loader())
    ck = torch.load(tmp_path / "step=3.ckpt", weights_only=True)

    callback, recorder = EMACallback(schedule=fe.schedules.constant(DECAY)), Recorder()
    resumed = Tiny()
    _trainer([callback, recorder], max_steps=4).fit(resumed, _loader(), ckpt_path=tmp_path / "step=3.ckpt")
    assert recorder.after_step and _equal(recorder.initial, dict(ck["current_model_state"]))  # raw weights, not the EMA
    assert callback.ema.step == int(ck["averaging_state"]["n_averaged"]) + 1 == 4
    imported = {k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    _close(_ema_weights(callback), _reference(imported, recorder.after_step))


def test_no_swap_before_the_first_update_and_sanity_option() -> None:
    """Lightning #21724: a validation before any update runs on the training weights."""
    model = Tiny()
    callback = EMACallback(sanity_check=True)
    trainer = _trainer([callback], max_steps=1, num_sanity_val_steps=1)
    trainer.fit(model, _loader(), _loader(4))
    initial = Tiny()
    assert _equal(model.seen_in_validation[0]["weights"], _full(initial))  # the EMA had averaged nothing yet
    assert trainer.validate(model, _loader(4), verbose=False)  # after training it validates on the EMA
    assert _equal(model.seen_in_validation[-1]["weights"], {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in _ema_weights(callback).items()})


@pytest.mark.parametrize("sanity_check", [False, True])
def test_sanity_check_option(sanity_check: bool) -> None:
    """schnetpack #785: a sanity check with an updated EMA runs on the raw weights unless asked."""
    callback = EMACallback(schedule=fe.schedules.constant(DECAY), sanity_check=sanity_check)
    model = Tiny()
    _trainer([callback], max_steps=2, limit_val_batches=0).fit(model, _loader())
    raw, ema = _full(model), _ema_weights(callback)
    _trainer([callback], max_steps=1, num_sanity_val_steps=1, limit_val_batches=1).fit(model, _loader(2), _loader(2))
    sanity = model.seen_in_validation[0]
    assert sanity["sanity"] and _equal(sanity["weights"], ema if sanity_check else raw)


def test_options_are_validated_at_construction() -> None:
    with pytest.raises(ValueError, match="every"):
        EMACallback(every=0)
    with pytest.raises(ValueError, match="layout"):
        EMACallback(layout="lightning")
    with pytest.raises(TypeError, match="validate must be a bool"):
        EMACallback(validate="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected keys"):
        EMACallback().load_state_dict({"latest_update_step": 1})


def test_restored_state_waits_for_the_module() -> None:
    """neural-lam #739: loading the callback state creates nothing; the EMA is built where the module is."""
    donor = EMACallback(schedule=fe.schedules.constant(DECAY))
    _trainer([donor], max_steps=2).fit(Tiny(), _loader())
    state = donor.state_dict()
    callback = EMACallback(schedule=fe.schedules.constant(DECAY))
    callback.load_state_dict(state)
    assert callback.ema is None and callback.state_dict()["ema"] is state["ema"]
    other = EMACallback(schedule=fe.schedules.constant(0.5))
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="schedule: saved"):  # a changed option is named when the EMA is built
        _trainer([other], max_steps=3).fit(Tiny(), _loader())
    assert other.ema is None


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "funcema.integrations.lightning")
    with pytest.raises(ImportError, match=r"funcema\[lightning\]"):
        import funcema.integrations.lightning  # noqa: F401


def test_import_funcema_imports_no_integration() -> None:
    code = (
        "import sys, funcema, funcema.integrations; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate')"
        " or m.startswith('funcema.integrations.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ----------------------------------------------------------------------------------------------
# Two processes: DDP and FSDP2, launched as Lightning's script launcher does


def _worker(mode: str, out: Path) -> None:
    """Runs in each of the 2 processes (LOCAL_RANK set): train, evaluate, checkpoint, record."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    rank = int(os.environ["LOCAL_RANK"])
    strategy: Any = "ddp" if mode == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    recorder, callback, after = Recorder(), EMACallback(schedule=fe.schedules.constant(DECAY)), Recorder()
    model = Tiny(shard=mode == "fsdp2", save_in_validation=str(out / "in-validation.ckpt"))
    trainer = _trainer(
        [recorder, callback, after], strategy=strategy, devices=2, max_steps=4, val_check_interval=4,
        accumulate_grad_batches=2,
    )  # fmt: skip
    trainer.fit(model, _loader(32), _loader(8))
    result: dict[str, Any] = {}
    sharded = {k: type(v).__name__ for k, v in callback.ema.ema.items()}
    result["ema_types"] = sharded
    ema = _ema_weights(callback)
    ref = _reference(recorder.initial, recorder.after_step)
    result["ref_diffs"] = {k: float((ema[k].double() - ref[k].double()).abs().max()) for k in ref}
    result["ref_diff"] = max(result["ref_diffs"].values())
    result["updates"] = callback.ema.step
    result["validations"] = [v["step"] for v in model.seen_in_validation]
    # Under DDP every forward broadcasts rank 0's buffers into the module, so on rank 1 validation
    # sees rank 0's EMA of the BatchNorm statistics: compare the parameters there.
    keys = [k for k, _ in model.named_parameters()] if mode == "ddp" and rank else list(ref)
    result["validation_diff"] = max(
        max(float((v["weights"][k].double() - r[k].double()).abs().max()) for k in keys)
        for v in model.seen_in_validation
        for r in [_reference(recorder.initial, recorder.after_step[: v["step"]])]
    )
    result["restored"] = all(_equal(s["weights"], e["weights"]) for s, e in zip(recorder.eval_start, after.eval_end))
    result["raw_at_end"] = _equal(_full(model), recorder.after_step[-1])
    if rank == 0:
        torch.save({"ema": ema, "raw": recorder.after_step}, out / "final.pt")
    (out / f"result-{rank}.json").write_text(json.dumps(result))


def _launch(tmp: Path) -> None:
    """Start the 2 workers with the environment Lightning's launcher gives them, and wait."""
    for attempt in range(2):
        logs = _launch_once(tmp)
        if all(code == 0 for code, _ in logs):
            return
        # Lightning rendezvous over TCP: another process on the machine may take the free port we
        # picked before the store binds it. Only that failure is retried, once.
        if attempt == 0 and any("address already in use" in log.lower() for _, log in logs):
            continue
        break
    for code, log in logs:
        assert code == 0, log[-6000:]


def _launch_once(tmp: Path) -> list[tuple[int, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).parents[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.test_integrations_lightning", str(tmp)],
            cwd=root, env={**base, "LOCAL_RANK": str(r), "RANK": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=WORKER_TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, log) for p, log in zip(procs, logs)]


def _check_two_process(tmp: Path, sharded: bool) -> None:
    results = [json.loads((tmp / f"result-{r}.json").read_text()) for r in range(2)]
    for rank, r in enumerate(results):
        assert r["updates"] == 4, rank  # 32 samples / 2 ranks / batch 2 = 8 batches, accumulated by 2
        assert r["ref_diff"] <= REF_ATOL, (rank, r["ref_diff"])
        assert r["validations"] == [2, 4] and r["validation_diff"] <= REF_ATOL, (rank, r)
        assert r["restored"] and r["raw_at_end"], (rank, r)
        kinds = set(r["ema_types"].values())
        assert ("DTensor" in kinds) == sharded, r["ema_types"]
    final = torch.load(tmp / "final.pt", weights_only=True)
    ck_path = tmp / "in-validation.ckpt"
    if ck_path.is_dir():  # ModelParallelStrategy: DCP shards + "meta.pt" with the rest of the checkpoint
        meta = torch.load(ck_path / "meta.pt", weights_only=True)
    else:
        meta = torch.load(ck_path, weights_only=True)
        assert _equal(dict(meta["state_dict"]), final["raw"][3])  # saved inside validation at step 4: raw weights
    saved = meta["callbacks"]["EMACallback"]["ema"]["ema"]
    assert not any(type(v).__name__ == "DTensor" for v in saved.values())  # gathered for rank 0's file
    assert set(saved) == set(final["ema"])


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of 2 processes runs DDP, then FSDP2, so the (slow) process start is paid once."""
    if not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    tmp = tmp_path_factory.mktemp("lightning-2proc")
    _launch(tmp)
    return tmp


def test_ddp_two_cpu_processes(two_process_runs: Path) -> None:
    _check_two_process(two_process_runs / "ddp", sharded=False)


def test_fsdp2_model_parallel_two_cpu_processes(two_process_runs: Path) -> None:
    """FSDP2 through ModelParallelStrategy: the EMA is sharded like the parameters and updated locally."""
    _check_two_process(two_process_runs / "fsdp2", sharded=True)


if __name__ == "__main__":  # a worker of _launch (Lightning re-launches nothing: LOCAL_RANK is set)
    warnings.filterwarnings("ignore")
    for mode in ("ddp", "fsdp2"):
        (Path(sys.argv[1]) / mode).mkdir(exist_ok=True)
        _worker(mode, Path(sys.argv[1]) / mode)
