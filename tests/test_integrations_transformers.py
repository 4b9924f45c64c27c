"""Hugging Face ``Trainer`` with ``EMACallback``: a tiny GPT-2 built from a config (no download), on the CPU.

The EMA is compared with a float64 reference computed by hand from the weights recorded after every
optimizer step; evaluation metrics must come from the EMA; a run killed and resumed from its
``checkpoint-N/`` must equal an uninterrupted run bit for bit, EMA included.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import funcema as fe

pytest.importorskip("transformers", reason="the transformers integration needs the transformers extra")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from funcema.integrations.transformers import EMACallback, EMATrainer

DECAY = 0.8
# float32 EMA against a float64 reference: each of the 6 updates rounds once (<= 1 ulp, 1.2e-7 for
# the |w| < 1 weights of this model), so the difference stays far below this bound.
REF_ATOL = 2e-6

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 32, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path, **kwargs: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": str(out), "use_cpu": True, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
        "gradient_accumulation_steps": 2, "max_steps": 6, "learning_rate": 0.05, "lr_scheduler_type": "constant",
        "save_strategy": "steps", "save_steps": 3, "eval_strategy": "no", "report_to": "none", "seed": 0,
        "disable_tqdm": True, "logging_strategy": "no", "dataloader_num_workers": 0,
        **kwargs,
    }  # fmt: skip
    return TrainingArguments(**options)


class Recorder(TrainerCallback):
    """Records the weights when training begins and after every optimizer step (runs before the EMA callback)."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.initial = _weights(model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.after_step.append(_weights(model))


class Killer(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            raise RuntimeError("killed")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in fe.EMA(model).state.ema.items()}  # the names the EMA keeps


def _reference(initial: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ema = {k: v.double() for k, v in initial.items()}
    for params in steps:
        ema = {k: DECAY * ema[k] + (1 - DECAY) * params[k].double() for k in ema}
    return ema


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_ema_matches_reference_and_evaluation_uses_it(tmp_path: Path) -> None:
    recorder = Recorder()
    callback = EMACallback(schedule=fe.schedules.constant(DECAY))
    model = _model()
    eval_data = _Data(8, seed=2)
    trainer = EMATrainer(
        model=model, args=_args(tmp_path), train_dataset=_Data(48, seed=1), eval_dataset=eval_data,
        callbacks=[recorder, callback],
    )  # fmt: skip
    trainer.train()
    assert len(recorder.after_step) == 6 and callback.ema.step == 6  # 12 batches, accumulated by 2
    ema, ref = dict(callback.ema.ema), _reference(recorder.initial, recorder.after_step)
    assert "lm_head.weight" not in ema  # tied to transformer.wte.weight: one EMA for one tensor
    diff = max(float((ema[k].double() - ref[k]).abs().max()) for k in ref)
    assert diff <= REF_ATOL, diff

    raw = _weights(model)
    metrics = trainer.evaluate()
    assert _equal(_weights(model), raw)  # training weights back, bit for bit
    # The same evaluation by a plain Trainer, of a fresh model holding the EMA (copy_to) or the raw weights.
    def plain_eval(weights: fe.EmaState | None) -> float:
        fresh = _model()
        fe.copy_to(fresh, weights if weights is not None else fe.init(raw))
        plain = Trainer(model=fresh, args=_args(tmp_path / "plain"), eval_dataset=eval_data)
        return plain.evaluate()["eval_loss"]

    assert metrics["eval_loss"] == plain_eval(callback.ema.state)  # same model, same data, same arithmetic
    assert metrics["eval_loss"] != plain_eval(None)  # and it is not the raw weights' loss

    # Every checkpoint-N/ holds an ordinary funcema state file with the EMA at step N.
    for step in (3, 6):
        state = fe.load(tmp_path / f"checkpoint-{step}" / "ema.safetensors", like=callback.ema.state)
        assert int(state.step) == step
    assert _equal(dict(fe.load(tmp_path / "checkpoint-6" / "ema.safetensors", like=callback.ema.state).ema), ema)


def _run(out: Path, kill_at: int | None = None, resume: str | bool | None = None) -> tuple[torch.nn.Module, EMACallback]:
    model = _model()
    callback = EMACallback(schedule=fe.schedules.warmup(max_decay=DECAY), debias=True, posthoc=(0.05, 0.10))
    callbacks: list[Any] = [callback] + ([Killer(kill_at)] if kill_at is not None else [])
    trainer = EMATrainer(model=model, args=_args(out), train_dataset=_Data(24, seed=1), callbacks=callbacks)
    if kill_at is not None:
        with pytest.raises(RuntimeError, match="killed"):
            trainer.train()
    else:
        trainer.train(resume_from_checkpoint=resume)
    return model, callback


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output_dir of a run that died during step 5: checkpoint-3 is the last one written."""
    out = tmp_path_factory.mktemp("killed")
    _run(out, kill_at=4)
    assert (out / "checkpoint-3" / "ema.safetensors").is_file() and not (out / "checkpoint-6").exists()
    return out


def _copy(killed: Path, tmp_path: Path) -> Path:
    shutil.copytree(killed, tmp_path / "run")
    return tmp_path / "run"


def test_resume_equals_continuous_training(killed: Path, tmp_path: Path) -> None:
    whole_model, whole = _run(tmp_path / "whole")
    resumed_model, resumed = _run(_copy(killed, tmp_path), resume=True)  # the last checkpoint of output_dir
    assert _equal(_weights(resumed_model), _weights(whole_model))
    assert _equal(dict(resumed.ema.ema), dict(whole.ema.ema)) and resumed.ema.step == whole.ema.step == 6
    for a, b in zip(resumed.ema.posthoc.emas, whole.ema.posthoc.emas):
        assert _equal(dict(a.ema), dict(b.ema))


def test_plain_trainer_resume_finds_the_ema_and_a_missing_file_raises(killed: Path, tmp_path: Path) -> None:
    tmp_path = _copy(killed, tmp_path)
    callback = EMACallback(schedule=fe.schedules.warmup(max_decay=DECAY), debias=True, posthoc=(0.05, 0.10))
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_Data(24, seed=1), callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))  # output_dir/checkpoint-<global_step>
    assert callback.ema.step == 6
    (tmp_path / "checkpoint-3" / "ema.safetensors").unlink()
    other = EMACallback(schedule=fe.schedules.warmup(max_decay=DECAY), debias=True, posthoc=(0.05, 0.10))
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_Data(24, seed=1), callbacks=[other])
    with pytest.raises(ValueError, match=r"no \['ema.safetensors'\]"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_changed_options_are_named_on_resume(killed: Path, tmp_path: Path) -> None:
    tmp_path = _copy(killed, tmp_path)
    callback = EMACallback(schedule=fe.schedules.warmup(max_decay=0.5), debias=True, posthoc=(0.05, 0.10))
    trainer = EMATrainer(model=_model(), args=_args(tmp_path), train_dataset=_Data(24, seed=1), callbacks=[callback])
    with pytest.raises(ValueError, match="schedule: saved"):
        trainer.train(resume_from_checkpoint=True)


def test_export_on_train_end_saves_the_ema_as_the_model(tmp_path: Path) -> None:
    callback = EMACallback(schedule=fe.schedules.constant(DECAY), export_on_train_end=True)
    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="no"), train_dataset=_Data(24, seed=1), callbacks=[callback])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    assert _equal(_weights(exported), dict(callback.ema.ema))


def test_mixin_needs_one_callback(tmp_path: Path) -> None:
    trainer = EMATrainer(model=_model(), args=_args(tmp_path), train_dataset=_Data(8, seed=1))
    with pytest.raises(ValueError, match="exactly one EMACallback"):
        trainer.evaluate(_Data(8, seed=2))
    with pytest.raises(ValueError, match="every"):
        EMACallback(every=0)
    with pytest.raises(TypeError, match="export_on_train_end"):
        EMACallback(export_on_train_end=1)  # type: ignore[arg-type]


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "funcema.integrations.transformers")
    with pytest.raises(ImportError, match=r"funcema\[transformers\]"):
        import funcema.integrations.transformers  # noqa: F401
