"""The compiled update as ``torch.library`` custom ops: a few graph nodes, whatever the leaf count.

Under ``torch.compile`` the update is traced as

- ``funcema::advance``: the step counter, the interpolation weight, ``log A`` and the skip count
  (the scalar state), and
- one ``funcema::lerp_`` (in place, ``donate=True``) or ``funcema::lerp`` (into new tensors) per
  dtype group, and for the copied leaves,

each an opaque node whose implementation is the eager code. The graph therefore grows with the
number of dtype groups, not with the number of leaves; inductor generates and compiles no kernel
for it (a C++ or Triton compilation costs seconds); and its steady state runs the eager kernels.
The ops take no Python objects: the configuration is passed by its key (``EmaConfig.key``).

No op reads a device tensor on the host. Where the scalar state is on the CPU (its default, so
that reading ``state.step`` never synchronises), ``advance`` computes the weight with Python
floats, exactly as the eager update does, and hands it to the kernels on the parameters' device;
it is tagged ``cudagraph_unsafe``, so with ``mode="reduce-overhead"`` inductor runs it outside the
captured CUDA graph, and the captured part holds no CPU tensor. The lerp ops mirror the eager
update exactly: weight 0 leaves the EMA unchanged, weight 1 copies the parameters, anything else
is ``lerp(ema, params.to(ema.dtype), weight)``; on an accelerator the weight stays on the device
(one multi-tensor ``lerp`` with the tensor-list weight overload, exact at 0 and 1 for finite
values).

Owns: the `funcema::` custom ops (`advance`, `lerp`, `lerp_`), their fake implementations, the
kernel choice (`kernel=`) and the finiteness flag of `on_nonfinite="skip"`.

Must not import: `_core`, `_format`, `_io`, `nn`, `posthoc` or anything above them (`_core` calls
these ops, not the reverse).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

from . import _kernels, _triton
from ._interp import host_weight, traced_weight
from ._state import EmaConfig, config_by_key
from ._tree import check_leaves

__all__ = ["advance", "all_finite", "check_kernel", "kernel_lerp", "lerp", "on_host"]


def check_kernel(kernel: str, tensors: Sequence[torch.Tensor]) -> None:
    """Raise unless `kernel` (`EmaConfig.kernel`) can average these tensors.

    `"auto"` and `"foreach"` always can; `"triton"` needs the `triton` package and CUDA tensors
    (or `TRITON_INTERPRET=1`, Triton's CPU interpreter, for tests).

    Raises:
        ValueError: `kernel="triton"` without `triton`, or with tensors not on a CUDA device.
    """
    if kernel != "triton":
        return
    if importlib.util.find_spec("triton") is None:
        raise ValueError('kernel="triton" needs the triton package (pip install triton); use kernel="foreach" or "auto".')
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    off_cuda = sorted({str(t.device) for t in tensors if t.device.type != "cuda"})
    if off_cuda and not interpreted:
        raise ValueError(
            f'kernel="triton" runs on CUDA tensors, but some are on {", ".join(off_cuda)}; '
            'use kernel="foreach" or "auto" there (or TRITON_INTERPRET=1 to test on the CPU).'
        )


def kernel_lerp(
    kernel: str, emas: list[torch.Tensor], params: list[torch.Tensor], weight: float, *, inplace: bool, same_dtype: bool = False
) -> list[torch.Tensor]:
    """`lerp(ema, params, weight)` over one group with the configured multi-tensor kernel.

    The one place where `EmaConfig.kernel` picks a kernel: `"auto"` is `"foreach"` everywhere
    until a GPU measurement says otherwise. `"triton"` runs the fused kernel of `_triton` (one
    launch for the group) on float32/bfloat16/float16 EMAs of contiguous tensors; other groups
    (float64, complex, strided) take the foreach kernel. `same_dtype`: see `_kernels.lerp`.
    """
    if kernel == "triton" and emas and _triton_can_average(emas, params):
        check_kernel(kernel, emas)
        targets = list(emas) if inplace else [e.clone(memory_format=torch.contiguous_format) for e in emas]
        w = weight if isinstance(weight, torch.Tensor) else torch.full((), weight, device=emas[0].device)
        _triton.lerp_(targets, params, w.to(device=emas[0].device, dtype=torch.float32))
        return targets
    return _kernels.lerp(emas, params, weight, inplace=inplace, same_dtype=same_dtype)


def _triton_can_average(emas: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
    """Whether the fused kernel takes this group: its dtypes, and contiguous tensors only."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return (
        emas[0].dtype in floats
        and params[0].dtype in floats
        and all(t.is_contiguous() for t in emas)
        and all(t.is_contiguous() for t in params)
    )


def on_host(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor is on the CPU, where reading its value is no synchronisation."""
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _advance(scalars: list[torch.Tensor], finite: torch.Tensor | None, config: str, device: torch.device) -> list[torch.Tensor]:
    step, log_decay_product, nonfinite_count = scalars
    cfg = config_by_key(config)
    if on_host(*scalars, finite):  # host reads, no sync
        host = int(step) + 1, float(log_decay_product), int(nonfinite_count), finite is None or bool(finite)
        return _advance_on_host(cfg, *host, device)
    t = step + 1
    weight, _, new_log = traced_weight(cfg, t.to(log_decay_product.device), log_decay_product.double())
    count = nonfinite_count.clone()
    if finite is not None:
        ok = finite.to(log_decay_product.device)
        weight = torch.where(ok, weight, torch.zeros_like(weight))
        new_log = torch.where(ok, new_log, log_decay_product)
        count = count + (~ok).to(count.device, count.dtype)
    return [t, weight.to(device), new_log, count]


def _advance_on_host(cfg: EmaConfig, t: int, log_a: float, count: int, finite: bool, device: torch.device) -> list[torch.Tensor]:
    """`_advance` of host numbers, with the weight of the eager update (`host_weight`)."""
    _, weight, new_log = host_weight(cfg, t, log_a, finite=finite)
    return [
        torch.full((), t, dtype=torch.int64),
        torch.full((), weight, dtype=torch.float64).to(device, non_blocking=True),
        torch.full((), new_log, dtype=torch.float64),
        torch.full((), count + (not finite), dtype=torch.int64),
    ]


_advance_op = torch.library.custom_op("funcema::advance", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))(_advance)


@_advance_op.register_fake
def _(scalars: list[torch.Tensor], finite: torch.Tensor | None, config: str, device: torch.device) -> list[torch.Tensor]:
    step, *rest = scalars
    return [torch.empty_like(step), torch.empty((), dtype=torch.float64, device=device), *map(torch.empty_like, rest)]


def advance(
    scalars: Sequence[torch.Tensor], finite: torch.Tensor | None, config: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(step + 1, weight, log A, skip count)`` after one update, the weight on ``device``.

    ``scalars`` is the scalar state before it: ``(step, log A, skip count)``. A non-finite update
    (``finite`` false) has weight 0, keeps ``log A`` and counts one skip.
    """
    fn = _advance_op if torch.compiler.is_compiling() else _advance
    t, weight, log_a, count = fn(list(scalars), finite, config, device)
    return t, weight, log_a, count


def _all_finite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return _kernels.all_finite(tensors, device)


_all_finite_op = torch.library.custom_op("funcema::all_finite", mutates_args=())(_all_finite)


@_all_finite_op.register_fake
def _(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.empty((), dtype=torch.bool, device=device)


def all_finite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 0-d bool tensor on ``device``: whether every element of every tensor is finite."""
    fn = _all_finite_op if torch.compiler.is_compiling() else _kernels.all_finite
    return fn(tensors, device)


def _host_weight(weight: torch.Tensor, finite: torch.Tensor | None, copy: bool) -> float:
    """The weight as a float (CPU tensors only: a host read, no synchronisation)."""
    w = float(weight)
    if finite is not None and not bool(finite):
        return 0.0
    return 1.0 if copy and w > 0 else w


def _lerp(
    emas: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor, finite: torch.Tensor | None, config: str, group: int
) -> list[torch.Tensor]:
    return lerp(emas, params, weight, finite, config, group, inplace=False)


def _lerp_(
    emas: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor, finite: torch.Tensor | None, config: str, group: int
) -> None:
    lerp(emas, params, weight, finite, config, group, inplace=True)


def _check(
    emas: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor, finite: torch.Tensor | None, config: str, group: int
) -> None:
    """At trace time: the parameters match the EMA leaves of the group, else a path-named error.

    The fake (trace-time) implementation of ``funcema::lerp_``, which returns nothing.
    """
    cfg = config_by_key(config)
    indices = cfg.groups[group] if group >= 0 else cfg.copied
    check_leaves(params, emas, tuple(cfg.paths[i] for i in indices))


_lerp_op = torch.library.custom_op("funcema::lerp", mutates_args=())(_lerp)
_lerp_inplace_op = torch.library.custom_op("funcema::lerp_", mutates_args=("emas",))(_lerp_)
_lerp_inplace_op.register_fake(_check)


@_lerp_op.register_fake
def _(
    emas: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor, finite: torch.Tensor | None, config: str, group: int
) -> list[torch.Tensor]:
    _check(emas, params, weight, finite, config, group)
    return [torch.empty_like(e) for e in emas]


def lerp(
    emas: list[torch.Tensor],
    params: list[torch.Tensor],
    weight: torch.Tensor,
    finite: torch.Tensor | None,
    config: str,
    group: int,
    *,
    inplace: bool,
) -> list[torch.Tensor]:
    """``lerp(ema, params, weight)`` over group ``group`` of ``config``: 0 keeps the EMA, 1 copies.

    ``group`` -1 stands for the copied leaves, which are copied whenever the weight is positive.
    ``finite`` false keeps the EMA (a skipped non-finite update). Returns the new tensors (the
    EMA tensors themselves when ``inplace``).
    """
    if torch.compiler.is_compiling():  # one opaque node, whose implementation is the eager code below
        if inplace:
            _lerp_inplace_op(emas, params, weight, finite, config, group)
            return emas
        out: list[torch.Tensor] = _lerp_op(emas, params, weight, finite, config, group)
        return out
    if not emas:
        return []
    copy = group < 0
    if not on_host(weight, finite):
        if copy:
            weight = (weight > 0).to(weight.dtype)
        return _kernels.lerp_on_device(emas, params, weight, finite=finite, inplace=inplace)
    w = _host_weight(weight, finite, copy)
    if w == 0.0:
        return emas if inplace else [e.clone() for e in emas]  # the pure op's outputs never alias its inputs
    if w == 1.0:
        return _kernels.copy(emas, params, inplace=inplace)
    return kernel_lerp(config_by_key(config).kernel, emas, params, w, inplace=inplace)
