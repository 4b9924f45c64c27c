"""Shared awkward parameter trees, reused by every test file that exercises the public API."""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

import torch


class Pair(NamedTuple):
    weight: Any
    bias: Any


def _t(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 17 * len(shape))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-5, 5, shape, generator=g).to(dtype)


def trees() -> dict[str, Any]:
    """Return fresh copies of the awkward trees, keyed by a readable id."""
    return {
        "empty-dict": {},
        "empty-tuple": (),
        "empty-list": [],
        "none-tuple": (None,),
        "none-dict": {"a": None},
        "single-tensor": _t(3),
        "scalar-0d": {"s": _t()},
        "zero-size": {"z": _t(0, 4)},
        "nested-with-none": {"enc": {"w": _t(2, 3), "b": None}, "dec": [_t(4), None, (_t(1, 1),)]},
        "namedtuple": Pair(weight=_t(3, 2), bias=_t(2)),
        "ordered-dict": collections.OrderedDict([("z", _t(2)), ("a", _t(3))]),
        "mixed-dtypes": {
            "bf16": _t(5, dtype=torch.bfloat16),
            "fp16": _t(5, dtype=torch.float16),
            "fp64": _t(5, dtype=torch.float64),
            "c64": _t(3, dtype=torch.complex64),
            "count": torch.tensor(7),
            "mask": _t(4, dtype=torch.bool),
        },
        "non-contiguous": {"t": _t(4, 3).t(), "s": _t(10)[::2]},
        "channels-last": {"conv": _t(2, 3, 4, 4).to(memory_format=torch.channels_last)},
        "module-state-dict": _module_state_dict(),
    }


def _module_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def perturb(tree: Any, scale: float = 1.0, seed: int = 1) -> Any:
    """A tree like ``tree`` with new values of the same dtypes (integers incremented)."""
    import optree

    g = torch.Generator().manual_seed(seed)

    def f(x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return (x.float() + scale * torch.randn(x.shape, generator=g)).to(x.dtype)
        if x.is_complex():
            return x + scale * torch.randn(x.shape, generator=g, dtype=x.dtype)
        if x.dtype == torch.bool:
            return ~x
        return x + 1

    return optree.tree_map(f, tree)


def assert_trees_equal(a: Any, b: Any) -> None:
    """Bit-exact equality of two trees (structure, dtypes, values; NaNs compare equal)."""
    import optree

    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb, f"structures differ: {sa} vs {sb}"
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.uint8) if x.numel() and x.is_contiguous() and x.dim() else x, y.view(torch.uint8) if y.numel() and y.is_contiguous() and y.dim() else y) or torch.equal(
            torch.nan_to_num(x) if x.is_floating_point() else x, torch.nan_to_num(y) if y.is_floating_point() else y
        )
