r"""Lightning: [`EMACallback`][funcema.integrations.lightning.EMACallback], an EMA of the weights for `Trainer`.

Install with `pip install 'funcema[lightning]'`. It uses only Lightning's `Callback` hooks.

Owns: the Lightning callback and its two checkpoint layouts.

Must not import: the other integrations or `_cli`; it builds on [`funcema.EMA`][funcema.EMA].
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as _err:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "funcema.integrations.lightning needs the `lightning` package: pip install 'funcema[lightning]'"
    ) from _err

from .._dtensor import is_dtensor
from .._stateful import EMA, checked_options
from .._validate import one_of

__all__ = ["EMACallback", "LAYOUTS"]

LAYOUTS = ("funcema", "weight_averaging")
"""Checkpoint layouts: `"funcema"` (raw weights in `state_dict`) or Lightning's `EMAWeightAveraging` one."""


class EMACallback(Callback):
    r"""Keep an EMA of the `LightningModule`'s weights, and validate and test with it.

    $$ \text{ema} \leftarrow \text{decay} \cdot \text{ema} + (1 - \text{decay}) \cdot \text{params} $$

    A thin callback over [`funcema.EMA`][funcema.EMA], which holds the state and calls
    [`update`][funcema.update] / [`swapped`][funcema.swapped]:

    - **One update per optimizer step**: after a training batch whose optimizer step advanced
      `trainer.global_step`, so `accumulate_grad_batches=N` gives one update per N batches.
    - **Evaluation on the EMA**: from `on_validation_start` to `on_validation_end` (and the same for
      testing) the module holds the EMA weights, then the very same training tensors are put back,
      bit for bit. It never swaps in an EMA that has not been updated (a fresh run's first
      validation, Lightning #21724), nor during the sanity check unless `sanity_check=True`
      (schnetpack #785).
    - **Checkpoints**: `checkpoint["state_dict"]` always holds the raw training weights, even when a
      checkpoint is saved while the EMA is swapped in (nequip #590); the EMA goes in the callback's
      state (`checkpoint["callbacks"]["EMACallback"]`), keyed by parameter names. With
      `layout="weight_averaging"` the checkpoint is laid out as Lightning's `EMAWeightAveraging`
      writes it instead: `state_dict` holds the EMA (so `load_from_checkpoint` gives the averaged
      model), `current_model_state` the raw weights, which this callback restores on resume.
    - **Devices**: the EMA is created from the module when training starts, after the strategy
      has moved (or sharded) it; a restored EMA waits in the callback until then (or until its first
      use in evaluation) instead of being built when the checkpoint is read, before the module
      reaches its device (neural-lam #739).
    - **Sharding**: with FSDP2 (`ModelParallelStrategy`) the EMA is sharded like the parameters and
      updated on the local shards, with no gather; its callback state is gathered only when a
      checkpoint is written, because Lightning writes callback state from rank 0.

    The averaged tree is `pl_module.state_dict()`: parameters and floating buffers averaged,
    integer buffers copied ([`funcema.EMA`][funcema.EMA]); `buffers=False` averages the parameters
    only.

    Args:
        validate: run validation epochs on the EMA.
        test: run test epochs on the EMA.
        sanity_check: run the sanity-check validation on the EMA too (only a restored EMA can be).
        copy_on_train_end: write the EMA into the module for good when training ends (as
            Lightning's `WeightAveraging` does); the final checkpoints are saved before that.
        layout: `"funcema"` or `"weight_averaging"` (see above).
        buffers: average the buffers too (this and the options below go to [`funcema.EMA`][funcema.EMA]).
        posthoc: also track power EMAs for post-hoc synthesis; `callback.ema.snapshot(directory)`
            writes them.
        **init_options: options of [`funcema.init`][funcema.init] (`schedule`, `every`, `after`, ...).

    Raises:
        TypeError / ValueError: an invalid option, named in the message.

    Examples:
        >>> import lightning.pytorch as pl
        >>> import funcema as fe
        >>> from funcema.integrations.lightning import EMACallback
        >>> callback = EMACallback(schedule=fe.schedules.warmup(max_decay=0.999))
        >>> trainer = pl.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False)
        >>> callback.ema is None   # created when trainer.fit(module) starts training
        True
    """

    def __init__(
        self,
        *,
        validate: bool = True,
        test: bool = True,
        sanity_check: bool = False,
        copy_on_train_end: bool = False,
        layout: str = "funcema",
        buffers: bool = True,
        posthoc: Sequence[float] | Mapping[str, Any] | None = None,
        **init_options: Any,
    ) -> None:
        flags = {"validate": validate, "test": test, "sanity_check": sanity_check, "copy_on_train_end": copy_on_train_end}
        self._options = checked_options(buffers, posthoc, init_options, **flags)
        one_of("layout", layout, LAYOUTS)
        self._validate, self._test, self._sanity_check = validate, test, sanity_check
        self._copy_on_train_end, self._layout = copy_on_train_end, layout
        self._ema: EMA | None = None
        self._pending: Mapping[str, Any] | None = None  # a restored state, until the module is in place
        self._last_step = 0  # trainer.global_step at the last update
        self._swap: contextlib.ExitStack | None = None

    @property
    def ema(self) -> EMA | None:
        """The [`funcema.EMA`][funcema.EMA] holder, or `None` before its first use."""
        return self._ema

    # ------------------------------------------------------------------------------------------
    # Training

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Create the EMA from the initial weights, where the strategy has put them (or restore it there)."""
        self._materialize(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Update the EMA if this batch ended with an optimizer step."""
        if trainer.global_step != self._last_step:
            self._swap_out(pl_module)  # never average EMA weights into the EMA
            self._materialize(pl_module).update(pl_module)
            self._last_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With `copy_on_train_end`, write the EMA into the module."""
        if self._copy_on_train_end and self._updates() > 0:
            self._materialize(pl_module).copy_to(pl_module)

    # ------------------------------------------------------------------------------------------
    # Evaluation

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in (unless disabled, not yet updated, or in the sanity check)."""
        if self._validate and (self._sanity_check or not trainer.sanity_checking):
            self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the training weights back."""
        self._swap_out(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA in for testing."""
        if self._test:
            self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the training weights back."""
        self._swap_out(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Put the training weights back if evaluation raised."""
        self._swap_out(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Put the training weights back, whatever happened."""
        self._swap_out(pl_module)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The callback's state: the EMA's [`state_dict`][funcema.EMA.state_dict] and the last update step.

        A sharded (DTensor) EMA is gathered here: Lightning writes callback state from rank 0.
        """
        if self._ema is not None:
            ema_state: Mapping[str, Any] | None = _gathered(self._ema.state_dict())
        else:
            ema_state = self._pending
        return {"ema": ema_state, "last_update_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the restored EMA aside; it is copied onto the module's device at its first use."""
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"ema", "last_update_step"}:
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"not an EMACallback state: expected keys ['ema', 'last_update_step'], got {keys}.")
        ema_state, last = state_dict["ema"], state_dict["last_update_step"]
        if ema_state is not None and not isinstance(ema_state, Mapping):
            raise TypeError(f"EMACallback state 'ema' must be None or a mapping, got {type(ema_state).__name__}.")
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise ValueError(f"EMACallback state 'last_update_step' must be an int >= 0, got {last!r}.")
        self._ema, self._pending, self._last_step = None, ema_state, last

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the raw weights in `checkpoint["state_dict"]`; with `layout="weight_averaging"`, export the EMA."""
        if self._swap is not None:  # saved while the EMA is swapped in: take the raw weights instead
            self._swap_out(pl_module)
            try:
                raw = trainer.strategy.lightning_module_state_dict()
                checkpoint["state_dict"] = {k: v.detach().clone() for k, v in raw.items()}
            finally:
                self._enter(pl_module)
        if self._layout == "weight_averaging" and self._updates() > 0:
            ema = _by_every_name(dict(self._materialize(pl_module).ema), pl_module)
            raw = checkpoint["state_dict"]
            checkpoint["current_model_state"] = raw
            checkpoint["state_dict"] = {k: _like(ema[k], v) if k in ema else v for k, v in raw.items()}
            checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self._updates(), dtype=torch.long)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore the raw weights of a checkpoint in `EMAWeightAveraging`'s layout, and import its EMA."""
        if "current_model_state" not in checkpoint:
            return
        if self.state_key not in checkpoint.get("callbacks", {}) and "averaging_state" in checkpoint:
            self._pending = _imported(self, pl_module, checkpoint)  # written by Lightning's EMAWeightAveraging
        pl_module.load_state_dict(checkpoint["current_model_state"])  # the module got the EMA from "state_dict"

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _updates(self) -> int:
        if self._ema is not None:
            return self._ema.step
        if self._pending is not None:
            return int(self._pending["step"])
        return 0

    def _materialize(self, pl_module: pl.LightningModule) -> EMA:
        """The holder, created from the module where it is now, with any restored state copied in."""
        if self._ema is None:
            ema = EMA(pl_module, **self._options)
            if self._pending is not None:
                ema.load_state_dict(_sharded_like(self._pending, ema))
            self._ema, self._pending = ema, None
        return self._ema

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self._swap is None and self._updates() > 0:  # never an EMA that has averaged nothing
            self._enter(pl_module)

    def _enter(self, pl_module: pl.LightningModule) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(self._materialize(pl_module).swapped(pl_module))
        self._swap = stack

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        stack, self._swap = self._swap, None
        if stack is not None:
            stack.close()


def _gathered(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict with every DTensor replaced by its full tensor (a collective on sharded EMAs)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = _gathered(value)
        elif is_dtensor(value):
            out[key] = value.full_tensor()
        else:
            out[key] = value
    return out


def _sharded_like(state: Mapping[str, Any], ema: EMA) -> Mapping[str, Any]:
    """Shard the full tensors of a restored state like the (FSDP2) holder's leaves, locally."""
    own = ema.state_dict()
    if not any(is_dtensor(v) for v in own["ema"].values()):
        return state
    from torch.distributed.tensor import distribute_tensor

    def shard(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(saved)
        emas = saved.get("ema")
        if isinstance(emas, Mapping):
            out["ema"] = {
                k: distribute_tensor(v.to(mine["ema"][k].device), mine["ema"][k].device_mesh, mine["ema"][k].placements,
                                     src_data_rank=None)  # each rank keeps its own chunk: no communication
                if k in mine["ema"] and is_dtensor(mine["ema"][k]) and isinstance(v, torch.Tensor) and not is_dtensor(v)
                else v
                for k, v in emas.items()
            }  # fmt: skip
        return out

    result = shard(state, own)
    if isinstance(state.get("posthoc"), Mapping) and "posthoc" in own:
        result["posthoc"] = {k: shard(v, own["posthoc"].get(k, {"ema": {}})) for k, v in state["posthoc"].items()}
    return result


def _by_every_name(ema: dict[str, torch.Tensor], pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The EMA under every name of the module's state dict: tied weights share the first name's EMA."""
    first: dict[int, str] = {}
    out = {}
    for name, tensor in pl_module.state_dict(keep_vars=True).items():
        key = first.setdefault(id(tensor), name)
        if key in ema:
            out[name] = ema[key]
    return out


def _like(ema: torch.Tensor, raw: Any) -> Any:
    """The EMA tensor in the form of the raw checkpoint entry: gathered if that one is, same dtype and device."""
    if not isinstance(raw, torch.Tensor):
        return raw
    if is_dtensor(ema) and not is_dtensor(raw):
        ema = ema.full_tensor()  # type: ignore[attr-defined]
    return ema.detach().to(dtype=raw.dtype, device=raw.device).clone()


def _imported(callback: EMACallback, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """An EMA state built from a checkpoint written by Lightning's `EMAWeightAveraging` (on the CPU)."""
    probe = EMA(pl_module, **callback._options)
    state = probe.state_dict()
    averaged = checkpoint["state_dict"]
    missing = [k for k in state["ema"] if k not in averaged]
    if missing:
        raise ValueError(f"the EMAWeightAveraging checkpoint has no averaged value for {missing[:8]}.")
    state["ema"] = {k: averaged[k].detach().to(dtype=v.dtype, device="cpu") for k, v in state["ema"].items()}
    state["step"] = torch.tensor(int(checkpoint["averaging_state"]["n_averaged"]), dtype=torch.int64)
    return state
