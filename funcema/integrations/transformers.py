r"""Hugging Face `Trainer`: [`EMACallback`][funcema.integrations.transformers.EMACallback] and evaluation on the EMA.

Install with `pip install 'funcema[transformers]'`. `Trainer` has no hook before evaluation, so
evaluating on the EMA takes a one-line subclass,
[`EMATrainerMixin`][funcema.integrations.transformers.EMATrainerMixin] (or the ready-made
[`EMATrainer`][funcema.integrations.transformers.EMATrainer]); the callback alone keeps, saves and
restores the EMA.

Owns: the Hugging Face callback, the evaluation mixin and the EMA file inside each checkpoint.

Must not import: the other integrations or `_cli`; it builds on [`funcema.EMA`][funcema.EMA] and
writes its files with [`funcema.save`][funcema.save].
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optree
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as _err:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "funcema.integrations.transformers needs the `transformers` package: pip install 'funcema[transformers]'"
    ) from _err

from .._dtensor import is_dtensor
from .._io import load, save
from .._state import EmaConfig, EmaState
from .._stateful import EMA, checked_options

__all__ = ["EMACallback", "EMATrainerMixin", "EMATrainer", "FILENAME"]

FILENAME = "ema.safetensors"
"""The EMA's file inside each `checkpoint-N/` directory (a [`funcema.save`][funcema.save] state file)."""


class EMACallback(TrainerCallback):
    r"""Keep an EMA of the model's weights in a Hugging Face `Trainer`, saved with every checkpoint.

    $$ \text{ema} \leftarrow \text{decay} \cdot \text{ema} + (1 - \text{decay}) \cdot \text{params} $$

    A thin callback over [`funcema.EMA`][funcema.EMA]:

    - `on_train_begin` creates the EMA from the model where the `Trainer` has put it, or, when
      training resumes from `checkpoint-N/`, restores it from `checkpoint-N/ema.safetensors`.
    - `on_step_end` (once per optimizer step, so once per `gradient_accumulation_steps` batches)
      updates it.
    - `on_save` writes `ema.safetensors` into the `checkpoint-N/` directory the `Trainer` just
      wrote: an ordinary [`funcema.save`][funcema.save] file (atomic, no pickle), readable with
      `fe.load(path, like=model.state_dict())`. Post-hoc EMAs (`posthoc=`) go beside it as
      `ema-posthoc-K.safetensors`.
    - With `export_on_train_end=True`, `on_train_end` writes the EMA into the model
      ([`copy_to`][funcema.copy_to]), so `trainer.save_model()` saves the EMA as the final model.

    The averaged tree is `model.state_dict()` (parameters and floating buffers averaged, integer
    buffers copied; `buffers=False` for parameters only). To evaluate on the EMA, mix
    [`EMATrainerMixin`][funcema.integrations.transformers.EMATrainerMixin] into the `Trainer`.

    A run resumed with `trainer.train(resume_from_checkpoint=...)` finds its EMA file through the
    mixin, which tells the callback the checkpoint path; with a plain `Trainer` the callback looks
    in `output_dir/checkpoint-<global_step>/`, or in `resume_from=` if given. Resuming without an
    EMA file raises rather than silently starting a fresh EMA.

    Args:
        export_on_train_end: write the EMA into the model when training ends.
        resume_from: a checkpoint directory to take the EMA from (instead of finding it).
        buffers: average the buffers too (this and the options below go to [`funcema.EMA`][funcema.EMA]).
        posthoc: also track power EMAs for post-hoc synthesis.
        **init_options: options of [`funcema.init`][funcema.init] (`schedule`, `every`, ...).

    Examples:
        >>> import tempfile, torch
        >>> import funcema as fe
        >>> from transformers import TrainingArguments
        >>> from funcema.integrations.transformers import EMACallback, EMATrainer
        >>> callback = EMACallback(schedule=fe.schedules.warmup(max_decay=0.999))
        >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[])
        >>> trainer = EMATrainer(model=torch.nn.Linear(4, 1), args=args, callbacks=[callback])
        >>> trainer.ema_callback() is callback   # its EMA is created when trainer.train() begins
        True
    """

    def __init__(
        self,
        *,
        export_on_train_end: bool = False,
        resume_from: str | os.PathLike[str] | None = None,
        buffers: bool = True,
        posthoc: Sequence[float] | Mapping[str, Any] | None = None,
        **init_options: Any,
    ) -> None:
        self._options = checked_options(buffers, posthoc, init_options, export_on_train_end=export_on_train_end)
        self._export = export_on_train_end
        self._resume_from = None if resume_from is None else Path(resume_from)
        self._ema: EMA | None = None

    @property
    def ema(self) -> EMA | None:
        """The [`funcema.EMA`][funcema.EMA] holder, or `None` before training begins."""
        return self._ema

    def resume_from(self, checkpoint: str | os.PathLike[str] | None) -> None:
        """Take the EMA from `checkpoint` when training begins (the mixin calls this from `train`)."""
        self._resume_from = None if checkpoint is None else Path(checkpoint)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate `model` on the EMA inside a `with` block; the training weights come back after.

        Nothing is swapped before the first update: an EMA that has averaged nothing is no model.
        """
        if self._ema is None or self._ema.step == 0:
            yield model
            return
        with self._ema.swapped(model):
            yield model

    # ------------------------------------------------------------------------------------------
    # Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Create the EMA from the model on its device, or restore it from the checkpoint resumed from."""
        if model is None:  # pragma: no cover - Trainer always passes the model
            raise ValueError("EMACallback needs the model: Trainer passes it to on_train_begin as `model`.")
        ema = EMA(model, **self._options)
        if state.global_step > 0:
            directory = self._resume_from or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            _restore(ema, directory)
        self._ema, self._resume_from = ema, None

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Average the weights after each optimizer step."""
        if self._ema is not None and model is not None:
            self._ema.update(model)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the EMA into the checkpoint directory the Trainer has just written."""
        if self._ema is None:
            return
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        sharded = any(is_dtensor(t) for t in optree.tree_leaves(self._ema.state.ema))
        if sharded or state.is_world_process_zero:  # a sharded EMA is saved by every rank (DCP)
            for name, member in _members(self._ema):
                save(member, directory / name)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """With `export_on_train_end`, write the EMA into the model for good."""
        if self._export and self._ema is not None and self._ema.step > 0 and model is not None:
            self._ema.copy_to(model)


class EMATrainerMixin:
    """Mix into a `Trainer` (subclass) to evaluate on the EMA and resume it with the run.

    `evaluate` runs inside [`EMACallback.swapped`][funcema.integrations.transformers.EMACallback.swapped]
    (also the evaluations during training, which go through `evaluate`), and `train` tells the
    callback which checkpoint it resumes from. The trainer must hold exactly one `EMACallback`.

    Examples:
        >>> from transformers import Seq2SeqTrainer
        >>> from funcema.integrations.transformers import EMATrainerMixin
        >>> class MyTrainer(EMATrainerMixin, Seq2SeqTrainer):
        ...     pass
    """

    def ema_callback(self) -> EMACallback:
        """The trainer's `EMACallback`."""
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, EMACallback)]  # type: ignore[attr-defined]
        if len(found) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one EMACallback in its callbacks, found {len(found)}.")
        return found[0]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate`, on the EMA weights (the training weights are restored after)."""
        with self.ema_callback().swapped(self.model):  # type: ignore[attr-defined]
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; a resumed run also resumes its EMA from the same checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")  # type: ignore[attr-defined]
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        self.ema_callback().resume_from(resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]


class EMATrainer(EMATrainerMixin, Trainer):
    """`Trainer` with [`EMATrainerMixin`][funcema.integrations.transformers.EMATrainerMixin]."""


def _members(ema: EMA) -> list[tuple[str, EmaState]]:
    """The files of an EMA: `ema.safetensors` and one per post-hoc member."""
    members = [(FILENAME, ema.state)]
    if ema.posthoc is not None:
        members += [(f"ema-posthoc-{k}.safetensors", m) for k, m in enumerate(ema.posthoc.emas)]
    return members


def _restore(ema: EMA, directory: Path) -> None:
    """Load the EMA files of a checkpoint into `ema`, checking that they were made with its options."""
    missing = [name for name, _ in _members(ema) if not (directory / name).exists()]
    if missing:
        raise ValueError(
            f"resuming from {directory}, which has no {missing}: it was not saved with this EMACallback. "
            "Pass EMACallback(resume_from=...) with the checkpoint that holds the EMA, or train without resuming."
        )
    sd = ema.state_dict()
    loaded = {name: load(directory / name, like=member) for name, member in _members(ema)}
    for (name, member), new in zip(_members(ema), loaded.values()):
        _check_config(directory / name, new.config, member.config)
    sd.update(_flat(loaded[FILENAME]))
    if ema.posthoc is not None:
        sd["posthoc"] = {str(k): _flat(loaded[f"ema-posthoc-{k}.safetensors"]) for k in range(len(ema.posthoc.emas))}
    ema.load_state_dict(sd)


def _flat(state: EmaState) -> dict[str, Any]:
    return {
        "ema": dict(zip(state.config.paths, optree.tree_leaves(state.ema))),
        "step": state.step,
        "log_decay_product": state.log_decay_product,
        "nonfinite_count": state.nonfinite_count,
    }


def _check_config(path: Path, saved: EmaConfig, own: EmaConfig) -> None:
    fields = ("schedule", "every", "after", "debias", "dtype", "on_nonfinite", "seed", "averaged")
    differ = [f"{f}: saved {getattr(saved, f)!r}, this callback {getattr(own, f)!r}" for f in fields
              if getattr(saved, f) != getattr(own, f)]  # fmt: skip
    if differ:
        raise ValueError(f"{path}: the EMA was saved with other options ({'; '.join(differ)}).")
