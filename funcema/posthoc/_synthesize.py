r"""Synthesize the EMA of any width from stored power-EMA snapshots, streaming.

For each target `(t_r, g_r)` the weights `x` of [`solve_weights`][funcema.posthoc.solve_weights]
give

$$ \text{ema}_r = \sum_i x_i\, \text{ema}_i $$

over the snapshots `i` with `t_i <= t_r`, divided by `sum_i x_i` unless `normalize=False`. Every
snapshot file is read once, for all targets together, and only one snapshot is in memory at a
time, next to one accumulator per target (float32 for float16/bfloat16/float32 leaves, float64
for float64 leaves, complex64 for complex). Integer and bool leaves are never averaged: they are
taken from the first snapshot at `t_r`.

Owns: streaming synthesis, its error report (weight sum, profile error, rounding bound) and the
file of a synthesized EMA.

Must not import: `_core`, `_io`, `nn`, `_cli` or `posthoc._state` (it reads and writes files
through `posthoc._files` only).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, Unpack, overload

import numpy as np
import optree
import torch
from numpy.typing import NDArray

from .._format import dtype_from_name
from .._sigma import SIGMA_REL_MAX, gamma_for_width, gamma_to_sigma_rel
from .._tree import path_string
from .._validate import boolean
from ._files import RESULT_FORMAT, VERSION, SnapshotInfo, iter_tensors, scan_snapshots, write_tensors
from ._solve import Solution, solve

__all__ = ["SynthesisResult", "synthesize", "write_synthesized"]

_WIDER = f"for a wider EMA (up to {SIGMA_REL_MAX!r}) pass gamma= with a value in (-1/2, 0) instead"


@dataclasses.dataclass(frozen=True)
class SynthesisResult:
    r"""One synthesized EMA and its diagnostics.

    For every real parameter `j` (every entry of every floating leaf), with `M_j` the largest
    `|theta_j|` over the averaging steps up to `step`, the synthesized value differs from the
    exact power EMA of width `sigma_rel` at `step` by at most

    $$ |\text{ema}_j - \text{EMA}_j| \le \left(\text{error}\,\frac{\gamma + 1}{\sqrt{2\gamma + 1}}
    + \text{rounding\_error}\right) M_j \;(+\; 2^{-25} \textstyle\sum_i |x_i| \text{ for float16 snapshots}), $$

    where the exact EMA is the one that averages every `every` steps, as the tracked EMAs did
    (see `docs/posthoc.md` for the derivation and the sharper form with `||theta_j||_2`). The
    tracked EMAs themselves are taken as exact: their own rounding during training is not counted.

    Attributes:
        ema: `dict` path -> tensor in snapshot order, or the structure of `like`.
        weights: float64 weights, one per snapshot in `snapshots` (summing to 1 when normalised).
        error: Relative L2 error `||sum_i x_i p_i - p_r|| / ||p_r||` of the profile of `weights`.
        cond: Condition number of the Gram matrix.
        snapshots: The snapshots used (`t <= step`), sorted by `(step, gamma)`.
        sigma_rel: Target relative width.
        gamma: Target exponent.
        step: Target time.
        weight_sum: Sum of the least-squares weights before normalisation: the mass of the
            reconstructed profile, 1 for an exact average. Without normalisation a parameter held
            at `c` comes back as `weight_sum * c`.
        rounding_error: Bound on the error from the snapshots' dtypes and the accumulation,
            relative to `M_j`: `sum_i |x_i| (u_i + g_{n+2})`, with `u_i` the unit roundoff of
            snapshot `i`'s floating dtype (`2**-11` for float16, `2**-8` for bfloat16, `2**-24`
            for float32) and `g_m = m u / (1 - m u)` for the accumulator's roundoff `u`.
        bound: `error * (gamma + 1) / sqrt(2 gamma + 1) + rounding_error`: the relative bound above.
    """

    ema: Any
    weights: NDArray[np.float64]
    error: float
    cond: float
    snapshots: tuple[SnapshotInfo, ...]
    sigma_rel: float
    gamma: float
    step: int
    weight_sum: float = 1.0
    rounding_error: float = 0.0

    @property
    def bound(self) -> float:
        """The relative error bound `error * (gamma + 1) / sqrt(2 gamma + 1) + rounding_error`."""
        return self.error * (self.gamma + 1.0) / math.sqrt(2.0 * self.gamma + 1.0) + self.rounding_error


def _targets(sigma_rel: Any, gamma: Any) -> tuple[list[tuple[float, float]], bool]:
    """Return `[(sigma_rel, gamma), ...]` and whether a single target was given."""
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
            out.append((float(v), gamma_for_width(v, allow_negative=False, wider_hint=_WIDER)))
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


class _Options(TypedDict, total=False):
    """The keyword-only options of every form of `synthesize` (documented there)."""

    like: Any
    progress: bool | None
    normalize: bool


# One target (a number) gives one result, a list of targets a list; the last form is for a union.
@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: float | None = None,
    gamma: float | None = None,
    step: int | None = None,
    **options: Unpack[_Options],
) -> SynthesisResult: ...
@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    step: int | None = None,
    **options: Unpack[_Options],
) -> list[SynthesisResult]: ...
@overload
def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    step: int | None = None,
    **options: Unpack[_Options],
) -> SynthesisResult | list[SynthesisResult]: ...


def synthesize(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] | None = None,
    step: int | None = None,
    *,
    like: Any = None,
    progress: bool | None = None,
    normalize: bool = True,
) -> SynthesisResult | list[SynthesisResult]:
    r"""Synthesize the power EMA of any width from the snapshots in `directory`.

    For each target, weights `x` minimise `||sum_i x_i p_i - p_r||` over the power profiles
    `p(tau) = (g+1)/t (tau/t)**g` of the snapshots with `t_i <= t_r` (see
    [`solve_weights`][funcema.posthoc.solve_weights]), and the result is

    $$ \text{ema}_r = \sum_i x_i\, \text{ema}_i \Big/ \sum_i x_i \quad (\text{no division if not normalize}). $$

    Args:
        directory: Directory of snapshot files (see [`snapshot`][funcema.posthoc.snapshot]).
        sigma_rel: Target width(s) relative to `step`; a number or a list.
        gamma: Target exponent(s) instead of `sigma_rel`; a number or a list.
        step: Target time; must be a snapshot time. Default: the latest snapshot time.
        like: Optional pytree of tensors (`None` holes allowed) whose structure and devices
            `.ema` takes, matching leaves by their dotted path. Default: a `dict` path -> tensor.
        progress: Show a tqdm progress bar; `None` shows it only when stderr is a terminal.
        normalize: Divide the weights by their sum, so that the result is a weighted average of
            the snapshots (a parameter held constant comes back exactly, and adding a constant to
            every parameter adds it to the result). The least-squares weights sum to 1 only up to
            the reconstruction error (0.955 at `sigma_rel=0.28` from the default pair); EDM2's
            `solve_posthoc_coefficients` normalises too. `False` keeps the plain least-squares
            weights of [`solve_weights`][funcema.posthoc.solve_weights].

    Returns:
        A [`SynthesisResult`][funcema.posthoc.SynthesisResult] per target (a list for a list).

    Raises:
        TypeError: If `step` is not an int, a target is not a number, or `normalize` not a bool.
        ValueError: If not exactly one of `sigma_rel` / `gamma` is given, a target is out of
            range, `step` is not a snapshot time, the directory holds no snapshots, a file is
            corrupt, the snapshots differ in tree, or the system is singular / ill-conditioned.
    """
    normalize = boolean("normalize", normalize)
    targets, single = _targets(sigma_rel, gamma)
    used, t_r = _snapshots_up_to(directory, step)
    solutions = [_solve_target(used, t_r, s, g, normalize) for s, g in targets]
    acc_dtype = _accumulator_dtypes(used)
    accs, copied = _accumulate(used, t_r, [sol.weights for sol in solutions], acc_dtype, progress)
    roundoffs = _roundoffs(used)
    acc_roundoff = max((_unit_roundoff(d) for d in acc_dtype.values() if d is not None), default=0.0)
    results = []
    for (s, g), sol, acc in zip(targets, solutions, accs):
        flat = {p: (acc[p] if p in acc else copied[p].clone()) for p in used[0].paths}
        rounding = _rounding_error(sol.weights, roundoffs, acc_roundoff)
        ema = flat if like is None else _rebuild(like, flat)
        result = SynthesisResult(
            ema, sol.weights, sol.error, sol.cond, tuple(used), s, g, t_r, sol.weight_sum, rounding
        )
        results.append(result)
    return results[0] if single else results


def write_synthesized(path: str | os.PathLike[str], result: SynthesisResult) -> pathlib.Path:
    """Write a synthesized EMA atomically, with the synthesis diagnostics in its metadata.

    The metadata's ``"format"`` is ``"funcema.posthoc.synthesized"`` (so the snapshot scanner
    skips these files) and it records ``sigma_rel``, ``gamma``, ``step``, ``error``, ``cond``,
    ``weights`` and ``snapshots`` (file name, step and gamma of each snapshot used).

    Raises:
        TypeError: If `result.ema` is not the path-keyed dict of a synthesis without `like`.
        OSError: If the file cannot be written (no partial file is left under the final name).
    """
    if not (isinstance(result.ema, Mapping) and all(isinstance(v, torch.Tensor) for v in result.ema.values())):
        raise TypeError("result.ema must be the dict path -> tensor of a synthesis without like=; synthesize again without it.")
    fields: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "version": VERSION,
        "sigma_rel": float(result.sigma_rel),
        "gamma": float(result.gamma),
        "step": int(result.step),
        "error": float(result.error),
        "cond": float(result.cond),
        "weights": [float(w) for w in result.weights],
        "snapshots": [{"file": s.path.name, "step": s.step, "gamma": s.gamma} for s in result.snapshots],
    }
    return write_tensors(path, result.ema, fields)


def _solve_target(used: list[SnapshotInfo], t_r: int, sigma_rel: float, gamma: float, normalize: bool) -> Solution:
    steps = [float(i.step) for i in used]
    try:
        return solve(steps, [i.gamma for i in used], float(t_r), gamma, normalize=normalize)
    except ValueError as err:
        raise ValueError(f"cannot synthesize sigma_rel={sigma_rel:g} (gamma={gamma:g}) at step {t_r}: {err}") from None


def _snapshots_up_to(directory: str | os.PathLike[str], step: object) -> tuple[list[SnapshotInfo], int]:
    """Return the snapshots with `t <= t_r` and `t_r` (`step`, or the latest snapshot time)."""
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
    return used, t_r


def _leaf_dtypes(info: SnapshotInfo) -> list[torch.dtype]:
    out = []
    for name in info.dtypes:
        dtype = dtype_from_name(name)
        assert dtype is not None
        out.append(dtype)
    return out


def _accumulator_dtypes(used: list[SnapshotInfo]) -> dict[str, torch.dtype | None]:
    """The accumulator dtype of every leaf path (`None`: copied, not averaged)."""
    leaf_dtypes: dict[str, set[torch.dtype]] = {p: set() for p in used[0].paths}
    for info in used:
        for p, d in zip(info.paths, _leaf_dtypes(info)):
            leaf_dtypes[p].add(d)
    return {p: _accumulator_dtype(ds) for p, ds in leaf_dtypes.items()}


def _accumulate(
    used: list[SnapshotInfo],
    t_r: int,
    weights: list[NDArray[np.float64]],
    acc_dtype: dict[str, torch.dtype | None],
    progress: bool | None,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Read each snapshot once and add it, weighted, into one accumulator per target.

    Returns the accumulators and the non-averaged leaves of the first snapshot at `t_r`.
    """
    from tqdm.auto import tqdm

    shapes = dict(zip(used[0].paths, used[0].shapes))
    accs = [{p: torch.zeros(shapes[p], dtype=d) for p, d in acc_dtype.items() if d is not None} for _ in weights]
    copied: dict[str, torch.Tensor] = {}
    copy_from = next(i for i in used if i.step == t_r)
    bar = tqdm(used, desc="synthesizing", unit="snapshot", disable=_progress_disabled(progress), file=sys.stderr)
    try:
        for index, info in enumerate(bar):
            column = [float(w[index]) for w in weights]
            for name, tensor in iter_tensors(info):
                dtype = acc_dtype[name]
                if dtype is None:
                    if info is copy_from:
                        copied[name] = tensor
                    continue
                value = tensor.to(dtype)
                for acc, w in zip(accs, column):
                    acc[name].add_(value, alpha=w)
                del value, tensor
    finally:
        bar.close()
    return accs, copied


def _unit_roundoff(dtype: torch.dtype) -> float:
    """Half the spacing of the dtype's numbers just above 1 (`2**-24` for float32)."""
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    return float(torch.finfo(real).eps) / 2.0


def _roundoffs(used: list[SnapshotInfo]) -> NDArray[np.float64]:
    """The largest unit roundoff among each snapshot's floating leaves (0 if it has none)."""
    out = []
    for info in used:
        floats = [d for d in _leaf_dtypes(info) if d.is_floating_point or d.is_complex]
        out.append(max((_unit_roundoff(d) for d in floats), default=0.0))
    return np.asarray(out, dtype=np.float64)


def _rounding_error(weights: NDArray[np.float64], roundoffs: NDArray[np.float64], acc_roundoff: float) -> float:
    r"""Return `sum_i |x_i| (u_i + g_{n+2})`, relative to the largest `|theta_j|`.

    Each stored snapshot value is `s (1 + d)` with `|d| <= u_i`, and `|s| <= M` (a power EMA is
    an average). The accumulator adds `n` terms `fl(x_i) s_i`, each weight rounded to the
    accumulator once, so recursive summation errs by at most `g_{n+2} sum_i |x_i| |s_i|`
    (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 4.4), with
    `g_m = m u / (1 - m u)`.
    """
    n = weights.size
    gamma_n = (n + 2) * acc_roundoff / (1.0 - (n + 2) * acc_roundoff)
    return float(np.sum(np.abs(weights) * (roundoffs + gamma_n * (1.0 + roundoffs))))


def _rebuild(like: Any, flat: dict[str, torch.Tensor]) -> Any:
    """Return `like` with each leaf replaced by the tensor at its dotted path, on that leaf's device."""
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
