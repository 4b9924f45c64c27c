"""``funcema.EMA``: the stateful face of the pure API, for checkpointers that expect ``state_dict()``.

DCP (``torch.distributed.checkpoint``), torchtitan's ``CheckpointManager``, Lightning's callbacks
and ``fabric.save``, and accelerate's ``register_for_checkpointing`` all take an object with
``state_dict()`` / ``load_state_dict()``. [`EMA`][funcema.EMA] is that object: it holds an
[`EmaState`][funcema.EmaState] (and optionally a post-hoc state) and calls
[`init`][funcema.init], [`update`][funcema.update], [`swapped`][funcema.swapped] and
[`copy_to`][funcema.copy_to]; it computes nothing itself.

Owns: the [`EMA`][funcema.EMA] holder (its `state_dict` layout and the checks on loading one),
the tensors of a module that it averages, and the option check the callbacks run when created.

Must not import: `_cli` or the integrations (they build on it).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optree
import torch
from torch import nn

from . import posthoc as _posthoc
from ._core import init, update
from ._dtensor import is_dtensor
from ._state import EmaState, tree_fields
from ._validate import boolean
from .nn import copy_to, swapped

__all__ = ["EMA", "checked_options", "module_tensors"]

FORMAT = "funcema.EMA"
"""Value of ``"format"`` in the configuration of an [`EMA`][funcema.EMA] state dict."""
VERSION = 1
_SCALARS = ("step", "log_decay_product", "nonfinite_count")
_KEYS = frozenset({"config", "ema", *_SCALARS})


class EMA:
    r"""An EMA of a module's weights that checkpointers can save and restore (DCP ``Stateful``).

    $$ \text{ema} \leftarrow \text{decay} \cdot \text{ema} + (1 - \text{decay}) \cdot \text{params} $$

    A thin holder over the pure API: `EMA(module, **options)` is
    `fe.init(params, **options)`, `ema.update(module)` is `fe.update(state, params, donate=True)`,
    and the state is `ema.state`. Given an `nn.Module`, the averaged tree is
    `module.state_dict()`: the parameters and the floating buffers are averaged and the integer
    buffers (`num_batches_tracked`) are copied, as timm's `ModelEmaV3` and torch's
    `AveragedModel(use_buffers=True)` do; tied weights (one tensor under two names) get one EMA,
    under the first name; `buffers=False` averages the parameters only. Any
    parameter tree ([`init`][funcema.init]'s `params`) is accepted instead of a module.

    `state_dict()` is keyed by the parameters' fully qualified names
    (`{"ema": {"layer.weight": ...}, "step": ..., "config": "<json>"}`), so
    `torch.distributed.checkpoint` can reshard it (an FSDP2 EMA saved on 2 processes loads on 1);
    its tensors are the live ones, like `nn.Module.state_dict()`.

    Args:
        module_or_params: the module, or a parameter tree.
        buffers: with a module, average its buffers too (default) or only its parameters.
        posthoc: also track power EMAs for post-hoc synthesis: a sequence of `sigma_rels`, or a
            mapping of [`posthoc.init`][funcema.posthoc.init]'s keyword options.
        **init_options: the options of [`init`][funcema.init] (`schedule`, `every`, ...).

    Raises:
        TypeError / ValueError: an invalid option, named in the message (as [`init`][funcema.init]).

    Examples:
        >>> import torch, funcema as fe
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = fe.EMA(model, schedule=fe.schedules.constant(0.9))
        >>> ema.update(model)
        >>> ema.step
        1
        >>> with ema.swapped(model):
        ...     y = model(torch.ones(1, 2))
        >>> sorted(ema.state_dict()["ema"])
        ['bias', 'weight']
    """

    def __init__(
        self,
        module_or_params: nn.Module | Any,
        *,
        buffers: bool = True,
        posthoc: Sequence[float] | Mapping[str, Any] | None = None,
        **init_options: Any,
    ) -> None:
        self._buffers = boolean("buffers", buffers)
        params = self._params(module_or_params)
        state = init(params, **init_options)
        posthoc_options = _posthoc_options(posthoc, init_options)
        self._posthoc = None if posthoc_options is None else _posthoc.init(params, **posthoc_options)
        self._state = state

    # ------------------------------------------------------------------------------------------
    # The pure API, held

    @property
    def state(self) -> EmaState:
        """The current [`EmaState`][funcema.EmaState]; the next `update` consumes it (donation)."""
        return self._state

    @property
    def posthoc(self) -> _posthoc.PosthocState | None:
        """The post-hoc state (power EMAs), or `None` without the `posthoc=` option."""
        return self._posthoc

    @property
    def step(self) -> int:
        """Number of `update` calls so far."""
        return int(self._state.step)

    @property
    def ema(self) -> Any:
        """The averaged weights (`state.ema`): a tree with the structure of the parameters."""
        return self._state.ema

    def update(self, module_or_params: nn.Module | Any) -> None:
        """Average the module's current weights into the EMA (and the post-hoc EMAs), in place.

        Calls [`update`][funcema.update] with `donate=True`: the EMA's tensors are updated in place
        and the previous `state` is consumed. A rejected call (parameters of another structure,
        shape or kind) raises before anything changes.
        """
        params = self._params(module_or_params)
        new = update(self._state, params, donate=True)
        self._state = new
        if self._posthoc is not None:
            self._posthoc = _posthoc.update(self._posthoc, params, donate=True)

    def swapped(self, module: nn.Module, *, eval_mode: bool = True) -> contextlib.AbstractContextManager[nn.Module]:
        """[`swapped`][funcema.swapped]: evaluate `module` with the EMA weights inside a `with` block.

        The block runs in eval mode unless `eval_mode=False`; the buffers are swapped in as
        copies, so a forward in the block (a BatchNorm in training mode, DDP's buffer broadcast)
        never changes the EMA.
        """
        return swapped(module, self._state, eval_mode=eval_mode)

    def copy_to(self, module: nn.Module) -> nn.Module:
        """[`copy_to`][funcema.copy_to]: write the EMA weights into `module` for good."""
        return copy_to(module, self._state)

    def snapshot(self, directory: str | os.PathLike[str], dtype: torch.dtype | None = None) -> list[Path]:
        """Write the post-hoc EMAs to `directory` ([`posthoc.snapshot`][funcema.posthoc.snapshot]).

        Raises:
            ValueError: the EMA was created without `posthoc=`.
        """
        if self._posthoc is None:
            raise ValueError("this EMA tracks no post-hoc EMAs; create it with EMA(..., posthoc=(0.05, 0.10)).")
        return _posthoc.snapshot(self._posthoc, directory, dtype=dtype)

    def __repr__(self) -> str:
        config = self._state.config
        extra = "" if self._posthoc is None else f", posthoc_sigma_rels={tuple(round(s, 6) for s in self._posthoc.sigma_rels)}"
        return f"EMA(step={self.step}, leaves={len(config.paths)}, schedule={config.schedule!r}{extra})"

    # ------------------------------------------------------------------------------------------
    # Stateful

    def state_dict(self) -> dict[str, Any]:
        """The state keyed by fully qualified names, with the step and the configuration.

        Returns:
            `{"ema": {name: tensor}, "step", "log_decay_product", "nonfinite_count": 0-d tensors,
            "config": JSON string}`, plus `"posthoc": {"0": {...}, ...}` (one such dict per
            tracked power EMA) with `posthoc=`. The EMA tensors are the live ones (a checkpointer
            such as DCP loads into them in place); the scalars are copies.
        """
        out = _member_dict(self._state)
        out["config"] = json.dumps(self._config(), sort_keys=True)
        if self._posthoc is not None:
            out["posthoc"] = {str(k): _member_dict(m) for k, m in enumerate(self._posthoc.emas)}
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state written by `state_dict`, in place.

        The configuration saved must equal this EMA's (same options, same names); tensors are
        copied into the EMA's own (so they land on its device), unless a checkpointer already
        loaded into them. A sharded (DTensor) EMA takes DTensors sharded like it: load it with
        `torch.distributed.checkpoint`, which reshards. Everything is checked first: a rejected
        call changes nothing.

        Raises:
            ValueError: a key, name, shape, dtype or configuration field differs (named).
            TypeError: `state_dict` or one of its values has the wrong type.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping from EMA.state_dict(), got {type(state_dict).__name__}.")
        expected = set(_KEYS) | {f.name for f in tree_fields(self._state.config)}
        expected |= {"posthoc"} if self._posthoc is not None else set()
        _check_keys("state_dict", state_dict, expected)
        _check_config(state_dict["config"], self._config())
        trees = [f.name for f in tree_fields(self._state.config)]
        commits = [_member_plan("state_dict", self._state, {k: state_dict[k] for k in (*trees, *_SCALARS)})]
        if self._posthoc is not None:
            members = state_dict["posthoc"]
            if not isinstance(members, Mapping):
                raise TypeError(f"state_dict['posthoc'] must be a mapping, got {type(members).__name__}.")
            _check_keys("state_dict['posthoc']", members, {str(k) for k in range(len(self._posthoc.emas))})
            commits += [
                _member_plan(f"state_dict['posthoc']['{k}']", m, members[str(k)]) for k, m in enumerate(self._posthoc.emas)
            ]
        states = [commit() for commit in commits]  # nothing is written before every check passed
        self._state = states[0]
        if self._posthoc is not None:
            self._posthoc = self._posthoc._replace(emas=tuple(states[1:]))

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _params(self, module_or_params: nn.Module | Any) -> Any:
        if isinstance(module_or_params, nn.Module):
            if self._buffers:
                return module_tensors(module_or_params)
            return dict(module_or_params.named_parameters())
        return module_or_params

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"format": FORMAT, "version": VERSION, **_member_config(self._state)}
        if self._posthoc is not None:
            config["posthoc"] = {
                "gammas": list(self._posthoc.gammas),
                "every": self._posthoc.every,
                **{k: v for k, v in _member_config(self._posthoc.emas[0]).items() if k in ("dtype", "compensated", "copied")},
            }
        return config


def checked_options(
    buffers: bool, posthoc: Sequence[float] | Mapping[str, Any] | None, init_options: Mapping[str, Any], **flags: bool
) -> dict[str, Any]:
    """The keyword options of an [`EMA`][funcema.EMA] built later (by a callback), checked now.

    Each of `flags` (a callback's own switches) must be a bool; the options are checked by
    building an `EMA` of an empty tree, so a wrong one fails when the callback is created, not at
    its first step.

    Raises:
        TypeError / ValueError: an invalid flag or option, named in the message.
    """
    for name, value in flags.items():
        boolean(name, value)
    options = {"buffers": buffers, "posthoc": posthoc, **init_options}
    EMA({}, **options)
    return options


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of `module.state_dict()` (parameters and persistent buffers), each tensor once.

    Tied weights (one parameter under two names, such as a language model's embedding and output
    layer) keep the first name only, so they get one EMA, not two.
    """
    out: dict[str, torch.Tensor] = collections.OrderedDict()  # module order (a dict would flatten sorted)
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


# ----------------------------------------------------------------------------------------------
# Serialisation of one EmaState


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _member_config(state: EmaState) -> dict[str, Any]:
    c = state.config
    return {
        "schedule": c.schedule.to_dict(),
        "every": c.every,
        "after": c.after,
        "debias": c.debias,
        "dtype": _dtype_name(c.dtype),
        "on_nonfinite": c.on_nonfinite,
        "seed": c.seed,
        "compensated": c.compensated,
        "copied": [p for p, averaged in zip(c.paths, c.averaged) if not averaged],
    }


def _member_dict(state: EmaState) -> dict[str, Any]:
    if int(state.step) < 0:  # pragma: no cover - the holder never keeps a consumed state
        raise ValueError("the held state was consumed by a donated update; this is a bug in funcema.EMA.")
    out: dict[str, Any] = {}
    for field in tree_fields(state.config):  # "ema", and "compensation" when compensated
        out[field.name] = dict(zip(state.config.paths, optree.tree_leaves(getattr(state, field.name))))
    for name in _SCALARS:
        out[name] = getattr(state, name).clone()
    return out


def _check_keys(where: str, mapping: Mapping[str, Any], expected: set[str]) -> None:
    keys = set(mapping)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected, key=str)
        raise ValueError(f"{where} does not match this EMA: missing keys {missing[:8]}, unexpected keys {extra[:8]}.")


def _check_config(saved: Any, own: dict[str, Any]) -> None:
    if not isinstance(saved, str):
        raise TypeError(f"state_dict['config'] must be the JSON string EMA.state_dict() writes, got {type(saved).__name__}.")
    try:
        config = json.loads(saved)
    except json.JSONDecodeError as err:
        raise ValueError(f"state_dict['config'] is not valid JSON: {err}.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"state_dict['config'] is not the configuration of a funcema.EMA (format {FORMAT!r}).")
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise ValueError(f"state_dict was written by a newer funcema (EMA format {config.get('version')!r} > {VERSION}).")
    fields = sorted(set(config) | set(own))
    differ = [f for f in fields if f != "version" and config.get(f) != own.get(f)]
    if differ:
        details = "; ".join(f"{f}: saved {_short(config.get(f))}, this EMA {_short(own.get(f))}" for f in differ)
        raise ValueError(
            f"the saved EMA was configured differently ({details}); construct the EMA with the options it was saved with."
        )


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _member_plan(where: str, state: EmaState, saved: Any) -> Any:
    """Check one saved member against ``state``; return a function that commits it."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where} must be a mapping, got {type(saved).__name__}.")
    trees = [f.name for f in tree_fields(state.config)]  # "ema", and "compensation" when compensated
    _check_keys(where, saved, {*trees, *_SCALARS})
    paths = state.config.paths
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    for tree in trees:
        values = saved[tree]
        if not isinstance(values, Mapping):
            raise TypeError(f"{where}[{tree!r}] must be a mapping of names to tensors, got {type(values).__name__}.")
        _check_keys(f"{where}[{tree!r}]", values, set(paths))
        for path, target in zip(paths, optree.tree_leaves(getattr(state, tree))):
            _check_leaf(f"{where}[{tree!r}][{path!r}]", target, values[path])
            copies.append((target, values[path]))
    scalars = {name: _scalar(f"{where}[{name!r}]", saved[name], getattr(state, name)) for name in _SCALARS}
    if int(scalars["step"]) < 0:
        raise ValueError(f"{where}['step'] must be >= 0, got {int(scalars['step'])}.")

    def commit() -> EmaState:
        with torch.no_grad():
            for target, value in copies:
                _copy_into(target, value)
        return state._replace(
            step=scalars["step"], log_decay_product=scalars["log_decay_product"], nonfinite_count=scalars["nonfinite_count"]
        )

    return commit


def _check_leaf(where: str, target: torch.Tensor, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}.")
    if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
        raise ValueError(
            f"{where} has shape {tuple(value.shape)} and dtype {value.dtype}, this EMA's leaf "
            f"{tuple(target.shape)} and {target.dtype}."
        )
    if is_dtensor(target) != is_dtensor(value):
        raise ValueError(
            f"{where} is {'a DTensor' if is_dtensor(value) else 'a plain tensor'} but this EMA's leaf is not; "
            "load a sharded EMA with torch.distributed.checkpoint (dcp.load), which reshards."
        )
    if is_dtensor(target) and tuple(value.placements) != tuple(target.placements):  # type: ignore[attr-defined]
        raise ValueError(
            f"{where} has placements {tuple(value.placements)}, this EMA's leaf {tuple(target.placements)}; "  # type: ignore[attr-defined]
            "load it with torch.distributed.checkpoint (dcp.load), which reshards."
        )


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    if value is target:  # a checkpointer (DCP) loaded into the live tensor in place
        return
    if is_dtensor(target):
        target.to_local().copy_(value.to_local())  # type: ignore[attr-defined]
    else:
        target.copy_(value)


def _scalar(where: str, value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
        raise TypeError(f"{where} must be a 0-d tensor or a number, got {type(value).__name__}.")
    tensor = torch.as_tensor(value)
    if tensor.numel() != 1 or (tensor.is_floating_point() != like.is_floating_point()):
        raise ValueError(f"{where} must be a single {like.dtype} value, got shape {tuple(tensor.shape)} {tensor.dtype}.")
    return tensor.detach().reshape(()).to(dtype=like.dtype, device=like.device).clone()


def _posthoc_options(posthoc: Any, init_options: Mapping[str, Any]) -> dict[str, Any] | None:
    if posthoc is None:
        return None
    options: dict[str, Any] = {"average": init_options.get("average"), "compensated": init_options.get("compensated", False)}
    if isinstance(posthoc, Mapping):
        options.update(posthoc)
    elif isinstance(posthoc, Sequence) and not isinstance(posthoc, str):
        options["sigma_rels"] = tuple(posthoc)
    else:
        raise TypeError(
            "posthoc must be None, a sequence of sigma_rels such as (0.05, 0.10), or a mapping of "
            f"funcema.posthoc.init options, got {type(posthoc).__name__}."
        )
    return options
