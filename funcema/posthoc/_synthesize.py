"""Synthesize the EMA of any width from stored power-EMA snapshots, streaming.

For each target ``(t_r, g_r)`` the weights ``x`` of :func:`funcema.posthoc.solve_weights` give

    ema_r = sum_i x_i * ema_i

over the snapshots ``i`` with ``t_i <= t_r``. Every snapshot file is read once, for all targets
together, and only one snapshot is in memory at a time, next to one accumulator per target
(float32 for float16/bfloat16/float32 leaves, float64 for float64 leaves, complex64 for complex).
Integer and bool leaves are never averaged: they are taken from the first snapshot at ``t_r``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import sys
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import optree
import torch
from numpy.typing import NDArray

from .._format import dtype_from_name
from .._sigma import gamma_to_sigma_rel, sigma_rel_to_gamma
from .._tree import path_string
from ._files import SnapshotInfo, iter_tensors, scan_snapshots
from ._solve import Solution, solve

__all__ = ["SynthesisResult", "synthesize"]


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
    """One synthesized EMA and its diagnostics.

    Attributes:
        ema: ``dict`` path -> tensor in snapshot order, or the structure of ``like``.
        weights: float64 weights, one per snapshot in ``snapshots``.
        error: Relative L2 error ``||sum_i x_i p_i - p_r|| / ||p_r||`` of the profile.
        cond: Condition number of the Gram matrix.
        snapshots: The snapshots used (``t <= step``), sorted by ``(step, gamma)``.
        sigma_rel: Target relative width.
        gamma: Target exponent.
        step: Target time.
    """

    ema: Any
    weights: NDArray[np.float64]
    error: float
    cond: float
    snapshots: tuple[SnapshotInfo, ...]
    sigma_rel: float
    gamma: float
    step: int


def _targets(sigma_rel: Any, gamma: Any) -> tuple[list[tuple[float, float]], bool]:
    """Return ``[(sigma_rel, gamma), ...]`` and whether a single target was given."""
    if (sigma_rel is None) == (gamma is None):
        raise ValueError("pass exactly one of sigma_rel and gamma (a number or a list of numbers).")
    name, value = ("sigma_rel", sigma_rel) if sigma_rel is not None else ("gamma", gamma)
    single = isinstance(value, numbers.Real) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0)
    if single:
        values = [value]
    elif isinstance(value, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(value, (str, bytes)):
        values = list(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
        if not values:
            raise ValueError(f"{name} is an empty list; give at least one target.")
    else:
        raise TypeError(f"{name} must be a number or a list of numbers, got {type(value).__name__}.")
    out = []
    for v in values:
        if isinstance(v, (np.generic, torch.Tensor)):
            v = v.item()
        if name == "sigma_rel":
            out.append((float(v), sigma_rel_to_gamma(v)))
        else:
            out.append((gamma_to_sigma_rel(v), float(v)))
    return out, single


def _accumulator_dtype(dtypes: set[torch.dtype]) -> torch.dtype | None:
    """float32 at least; float64 / complex when any snapshot stores the leaf so. None: copy."""
    if any(d.is_complex for d in dtypes):
        return torch.complex128 if torch.complex128 in dtypes else torch.complex64
    if any(d.is_floating_point for d in dtypes):
        return torch.float64 if torch.float64 in dtypes else torch.float32
    return None


def _progress_disabled(progress: bool | None) -> bool:
    if progress is None:
        try:
            return not sys.stderr.isatty()
        except (AttributeError, ValueError):
            return True
    return not progress


@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: float,
    gamma: None = None,
    step: int | None = None,
    *,
    like: Any = None,
    progress: bool | None = None,
) -> SynthesisResult: ...


@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: None = None,
    *,
    gamma: float,
    step: int | None = None,
    like: Any = None,
    progress: bool | None = None,
) -> SynthesisResult: ...


@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: Sequence[float],
    gamma: None = None,
    step: int | None = None,
    *,
    like: Any = None,
    progress: bool | None = None,
) -> list[SynthesisResult]: ...


@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: None = None,
    *,
    gamma: Sequence[float],
    step: int | None = None,
    like: Any = None,
    progress: bool | None = None,
) -> list[SynthesisResult]: ...


@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    step: int | None = None,
    *,
    like: Any = None,
    progress: bool | None = None,
) -> SynthesisResult | list[SynthesisResult]: ...


def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    step: int | None = None,
    *,
    like: Any = None,
    progress: bool | None = None,
) -> SynthesisResult | list[SynthesisResult]:
    """Synthesize the power EMA of any width from the snapshots in ``directory``.

    For each target, weights ``x`` minimise ``||sum_i x_i p_i - p_r||`` over the power profiles
    ``p(tau) = (g+1)/t (tau/t)**g`` of the snapshots with ``t_i <= t_r`` (see
    :func:`solve_weights`), and the result is ``ema_r = sum_i x_i ema_i``.

    Args:
        directory: Directory of snapshot files (see :func:`write_snapshot`).
        sigma_rel: Target width(s) relative to ``step``; a number or a list.
        gamma: Target exponent(s) instead of ``sigma_rel``; a number or a list.
        step: Target time; must be a snapshot time. Default: the latest snapshot time.
        like: Optional pytree of tensors (``None`` holes allowed) whose structure and devices ``.ema`` takes,
            matching leaves by their dotted path. Default: a ``dict`` path -> tensor.
        progress: Show a tqdm progress bar over the snapshots; ``None`` shows it only when
            stderr is a terminal.

    Returns:
        A :class:`SynthesisResult` for a single target, a list of them for a list of targets.

    Raises:
        ValueError: If not exactly one of ``sigma_rel`` / ``gamma`` is given, a target is out of
            range, ``step`` is not a snapshot time, the directory holds no snapshots, a file is
            corrupt, the snapshots differ in tree, or the system is singular / ill-conditioned.
    """
    targets, single = _targets(sigma_rel, gamma)
    infos = scan_snapshots(directory)
    times = sorted({i.step for i in infos})
    if step is None:
        t_r = times[-1]
    else:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}.")
        t_r = int(step)
        if t_r not in times:
            shown = ", ".join(str(t) for t in times[-8:])
            raise ValueError(
                f"step={t_r} is not a snapshot time in {str(directory)!r}; the target must be one "
                f"(latest snapshot times: {shown})."
            )
    used = [i for i in infos if i.step <= t_r]
    seen: dict[tuple[int, float], SnapshotInfo] = {}
    for info in used:
        key = (info.step, info.gamma)
        if key in seen:
            raise ValueError(
                f"{seen[key].path.name} and {info.path.name} both hold step {info.step} with "
                f"gamma {info.gamma:g}: the system is singular; remove one of them."
            )
        seen[key] = info
    steps = [float(i.step) for i in used]
    gammas = [i.gamma for i in used]
    solutions: list[Solution] = []
    for s, g in targets:
        try:
            solutions.append(solve(steps, gammas, float(t_r), g))
        except ValueError as err:
            raise ValueError(f"cannot synthesize sigma_rel={s:g} (gamma={g:g}) at step {t_r}: {err}") from None

    first = used[0]
    leaf_dtypes: dict[str, set[torch.dtype]] = {p: set() for p in first.paths}
    for info in used:
        for p, d in zip(info.paths, info.dtypes):
            dt = dtype_from_name(d)
            assert dt is not None
            leaf_dtypes[p].add(dt)
    acc_dtype = {p: _accumulator_dtype(ds) for p, ds in leaf_dtypes.items()}
    shapes = dict(zip(first.paths, first.shapes))
    accs: list[dict[str, torch.Tensor]] = [
        {p: torch.zeros(shapes[p], dtype=d) for p, d in acc_dtype.items() if d is not None} for _ in targets
    ]
    copied: dict[str, torch.Tensor] = {}
    copy_from = next(i for i in used if i.step == t_r)

    from tqdm.auto import tqdm

    bar = tqdm(used, desc="synthesizing", unit="snapshot", disable=_progress_disabled(progress), file=sys.stderr)
    try:
        for index, info in enumerate(bar):
            weights = [float(sol.weights[index]) for sol in solutions]
            for name, tensor in iter_tensors(info):
                dtype = acc_dtype[name]
                if dtype is None:
                    if info is copy_from:
                        copied[name] = tensor
                    continue
                value = tensor.to(dtype)
                for acc, w in zip(accs, weights):
                    acc[name].add_(value, alpha=w)
                del value, tensor
    finally:
        bar.close()

    results: list[SynthesisResult] = []
    for (s, g), sol, acc in zip(targets, solutions, accs):
        flat = {p: (acc[p] if p in acc else copied[p].clone()) for p in first.paths}
        results.append(
            SynthesisResult(
                ema=flat if like is None else _rebuild(like, flat),
                weights=sol.weights,
                error=sol.error,
                cond=sol.cond,
                snapshots=tuple(used),
                sigma_rel=s,
                gamma=g,
                step=t_r,
            )
        )
    return results[0] if single else results


def _rebuild(like: Any, flat: dict[str, torch.Tensor]) -> Any:
    """Return ``like`` with each leaf replaced by the tensor at its dotted path, on that leaf's device."""
    paths, like_leaves, spec = optree.tree_flatten_with_path(like)
    names = [path_string(p) for p in paths]
    if set(names) != set(flat) or len(names) != len(flat):
        missing = sorted(set(names) - set(flat))[:8]
        extra = sorted(set(flat) - set(names))[:8]
        raise ValueError(
            f"like does not have the structure of the snapshots: paths missing from the snapshots "
            f"{missing}, paths of the snapshots missing from like {extra}."
        )
    return optree.tree_unflatten(
        spec,
        [flat[n].to(leaf.device) if isinstance(leaf, torch.Tensor) else flat[n] for n, leaf in zip(names, like_leaves)],
    )
