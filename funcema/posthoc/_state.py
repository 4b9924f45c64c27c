"""Tracking power EMAs for post-hoc synthesis: [`init`][funcema.posthoc.init], [`update`][funcema.posthoc.update], [`snapshot`][funcema.posthoc.snapshot].

Owns: [`PosthocState`][funcema.posthoc.PosthocState] (K power EMAs of the same parameters) and
writing its snapshots.

Must not import: `_io`, `nn`, `_cli`, or the synthesis side of `posthoc` (`_solve`, `_synthesize`).
"""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import optree
import torch

from .. import _dtensor
from .._core import init as init_one
from .._core import match_params, update_matched
from .._interp import StagnationWarning, warn_if_stagnates
from .._state import AveragePredicate, EmaState, check_live
from .._validate import floating_dtype
from ..schedules import Power, power
from ._files import snapshot_filename, write_snapshot_set

__all__ = ["PosthocState", "init", "update", "snapshot"]

_DEFAULT_SIGMA_RELS = (0.05, 0.10)  # the pair of Karras et al. (2024)


class PosthocState(NamedTuple):
    """K power-function EMAs of the same parameters (Karras et al. 2024), one per `sigma_rel`.

    Each member is an ordinary [`EmaState`][funcema.EmaState] with a `schedules.power` schedule, so
    `state.emas[k].ema` is the k-th EMA, usable like any other.
    """

    emas: tuple[EmaState, ...]
    """One EMA state per tracked width, in the order of `sigma_rels`."""

    @property
    def step(self) -> torch.Tensor:
        """Number of [`update`][funcema.posthoc.update] calls so far (0-d int64 CPU tensor)."""
        return self.emas[0].step

    @property
    def gammas(self) -> tuple[float, ...]:
        """The exponent γ of each tracked EMA."""
        return tuple(_power(s).gamma for s in self.emas)

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """The relative width σ_rel of each tracked EMA."""
        return tuple(_power(s).sigma_rel for s in self.emas)

    @property
    def every(self) -> int:
        """The update interval shared by all tracked EMAs."""
        return self.emas[0].config.every


def init(
    params: Any,
    *,
    sigma_rels: Sequence[float] | None = None,
    every: int = 1,
    dtype: torch.dtype | None = None,
    gammas: Sequence[float] | None = None,
    average: AveragePredicate | None = None,
    compensated: bool = False,
) -> PosthocState:
    """Start tracking one power EMA per relative width for post-hoc synthesis.

    Each EMA follows `d(u) = (1 - 1/u) ** (gamma + 1)`; averaging every `every` steps uses the
    exact interval decay `(1 - every/u) ** (gamma + 1)`, so its profile is the power profile of
    the parameters held over each interval (not the call count, whatever `every` is).

    Args:
        params: the parameter tree (as for [`init`][funcema.init]).
        sigma_rels: the relative widths to track, each in (0, 1/sqrt(12)); the paper's pair
            (0.05, 0.10) when neither `sigma_rels` nor `gammas` is given.
        every: average once every `every` updates.
        dtype: the EMA dtype (as for [`init`][funcema.init]; float32 for low-precision params).
        gammas: the exponents instead of `sigma_rels` (each > -1/2).
        average: predicate `(path, tensor) -> bool`; rejected leaves are copied.
        compensated: keep a compensation term beside every tracked EMA (as for
            [`init`][funcema.init]). A power EMA's weight `(gamma + 1) / t` falls below float32's
            resolution late in long runs (from about step 1.3e6 at σ_rel = 0.10 for a parameter
            1% from its average) and a plain EMA then stops moving. Snapshots store the pair
            rounded once to the snapshot's dtype. Without it, `init` warns with
            [`StagnationWarning`][funcema.StagnationWarning] when that happens within 10^6 updates.

    Returns:
        The state; `state.emas[k]` is the k-th EMA.

    Examples:
        >>> import torch, funcema as fe
        >>> ph = fe.posthoc.init({"w": torch.zeros(3)}, sigma_rels=(0.05, 0.10))
        >>> [round(g, 4) for g in ph.gammas]
        [16.9722, 6.9372]
    """
    if gammas is not None and sigma_rels is not None:
        raise ValueError("pass either sigma_rels or gammas, not both.")
    if gammas is not None:
        schedules_ = [power(gamma=g) for g in _nonempty("gammas", gammas)]
    else:
        widths = _DEFAULT_SIGMA_RELS if sigma_rels is None else sigma_rels
        schedules_ = [power(sigma_rel=s) for s in _nonempty("sigma_rels", widths)]
    gammas_ = [s.gamma for s in schedules_]
    if len(set(gammas_)) != len(gammas_):
        raise ValueError(f"the tracked widths must be distinct, got gammas {gammas_}.")
    options = dict(every=every, after=0, debias=False, dtype=dtype, average=average, compensated=compensated)
    with warnings.catch_warnings():  # warned below, once per tracked EMA, at the caller's line
        warnings.simplefilter("ignore", StagnationWarning)
        emas = tuple(init_one(params, schedule=s, **options) for s in schedules_)  # type: ignore[arg-type]
    for member in emas:
        averaged = zip(optree.tree_leaves(member.ema), member.config.averaged)
        warn_if_stagnates(member.config, {e.dtype for e, avg in averaged if avg}, stacklevel=3)
    return PosthocState(emas)


def update(state: PosthocState, params: Any, *, donate: bool = False) -> PosthocState:
    """Update every tracked EMA with `params` in one call.

    The parameters are flattened, matched and checked once for all K EMAs; each EMA then gets the
    update of [`update`][funcema.update] (pure unless `donate=True`, which consumes `state`).

    Examples:
        >>> import torch, funcema as fe
        >>> ph = fe.posthoc.init({"w": torch.zeros(2)})
        >>> ph = fe.posthoc.update(ph, {"w": torch.ones(2)})
        >>> ph.emas[0].ema["w"], int(ph.step)
        (tensor([1., 1.]), 1)
    """
    if not isinstance(state, PosthocState):
        raise TypeError(f"state must be a funcema.posthoc.PosthocState, got {type(state).__name__}.")
    for member in state.emas:  # every member before the first write: none is updated if one is consumed
        check_live(member)
    first_emas, leaves = match_params(state.emas[0], params)  # flattened, matched and checked once
    ema_leaves = [first_emas] + [optree.tree_leaves(s.ema) for s in state.emas[1:]]
    return PosthocState(tuple(update_matched(s, e, leaves, donate) for s, e in zip(state.emas, ema_leaves)))


def snapshot(
    state: PosthocState, directory: str | os.PathLike[str], dtype: torch.dtype | None = None
) -> list[pathlib.Path]:
    """Write one snapshot file per tracked EMA into `directory`, atomically as a set.

    The K files share a set id and record their index and K; synthesis uses the files of a set
    only when all K are present, so a crash in the middle of a snapshot leaves that step out
    entirely, never a mix of two versions. The snapshot time is the last averaging step (`step` rounded down to a multiple of
    `every`), the time of the EMA's power profile. Files are safetensors with the step, γ, σ_rel,
    `every`, the dtype and the tree layout in their metadata; a crash never leaves a file that
    synthesis would read.

    Args:
        state: the post-hoc state.
        directory: where to write (created if missing).
        dtype: dtype of the floating tensors in the file: `None` keeps the EMA's own (float32 by
            default), `torch.float16` halves the size.

    With sharded (DTensor) EMAs every rank must call it: the shards are gathered one leaf at a
    time and rank 0 writes the files (other ranks return an empty list).

    Returns:
        The paths written, one per EMA.

    Raises:
        ValueError: no averaging step has happened yet, or `dtype` is not floating.
    """
    if not isinstance(state, PosthocState):
        raise TypeError(f"state must be a funcema.posthoc.PosthocState, got {type(state).__name__}.")
    floating_dtype("dtype", dtype, complex_ok=False)
    for member in state.emas:
        check_live(member)
    t = int(state.step)
    if _dtensor.any_dtensor(*(optree.tree_leaves(m.ema) for m in state.emas)):
        # Sharded (FSDP2) EMAs: every rank joins the gather, rank 0 writes full tensors, so
        # synthesis later runs on one process without a process group.
        state = state._replace(emas=tuple(_gathered(m) for m in state.emas))
        if not _dtensor.is_main_process():
            return []
    step = t - t % state.every
    if step < 1:
        raise ValueError(f"nothing to snapshot: no averaging step yet (step {t}, every {state.every}).")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gammas = state.gammas
    by_name = len({f"{g:.2f}" for g in gammas}) == len(gammas)
    members = []
    for k, member in enumerate(state.emas):
        sched = _power(member)
        tensors = dict(zip(member.config.paths, _snapshot_leaves(member, dtype)))
        members.append((snapshot_filename(step, sched.gamma if by_name else k), tensors, sched.gamma, sched.sigma_rel))
    return write_snapshot_set(directory, members, step=step, every=state.every)


def _gathered(member: EmaState) -> EmaState:
    """`member` with full tensors on the CPU (a collective: every rank calls it)."""
    compensation = None if member.compensation is None else _dtensor.gather(member.compensation, cpu=True)
    return member._replace(ema=_dtensor.gather(member.ema, cpu=True), compensation=compensation)


def _snapshot_leaves(member: EmaState, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The EMA's leaves, floating ones in the snapshot dtype (`None`: the EMA's own).

    A compensated pair `ema + compensation` is summed in float64 (complex128), exactly for
    float32, bfloat16 and float16 pairs, and rounded once to the snapshot's dtype: the most exact
    value a snapshot of that dtype can hold, with no double rounding when it is narrower than the
    EMA's (for a float32 snapshot of a float32 pair it is `ema` itself, ties aside).
    """
    leaves = optree.tree_leaves(member.ema)
    compensation = member.compensation
    comps = [None] * len(leaves) if compensation is None else optree.tree_leaves(compensation)  # type: ignore[arg-type]
    out = []
    with torch.no_grad():
        for leaf, comp, avg in zip(leaves, comps, member.config.averaged):
            target = dtype if dtype is not None and leaf.is_floating_point() else leaf.dtype
            if comp is not None and avg:
                wide = torch.complex128 if leaf.is_complex() else torch.float64
                out.append((leaf.to(wide) + comp.to(wide)).to(target))
            else:
                out.append(leaf.to(target))
    return out


def _power(state: EmaState) -> Power:
    schedule = state.config.schedule
    assert isinstance(schedule, Power)
    return schedule


def _nonempty(name: str, values: Sequence[float]) -> list[float]:
    if isinstance(values, (int, float)):
        values = [values]
    values = list(values)
    if not values:
        raise ValueError(f"{name} must name at least one width, got an empty sequence.")
    return values

