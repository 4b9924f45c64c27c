"""Tree helpers: flatten parameter trees against a state's layout, with path-aware errors.

Owns: flattening, matching leaves by path, checking leaves against a reference, and the one
formatter of path lists used in every "missing / extra paths" message.

Must not import: any funcema module except `_validate` (it sits just above it).

Every tree is flattened once per call. Leaves are matched to the state by their path (dict key,
sequence index or field name), never by position, so `dict(model.named_parameters())` and
`model.state_dict()` (an `OrderedDict` in insertion order) are interchangeable for the same
keys. Errors name paths and never embed tensor values.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import Any, TypeVar

import optree
import torch

__all__ = ["Params", "ParamsT", "flatten", "path_string", "match_leaves", "check_leaves", "dtype_kind", "format_paths", "path_difference"]

# A pytree whose leaves are tensors, with `None` holes (optree's default: `None` is an empty
# node, so holes are kept in the structure and have no leaf).
Params = Any
ParamsT = TypeVar("ParamsT")
"""The type of a parameter tree, carried from `init`'s argument to `state.ema`."""


def path_string(path: Sequence[Any]) -> str:
    """Join an optree accessor path into a dotted name, e.g. `("blocks", 0, "w")` → `"blocks.0.w"`.

    The root of a single-tensor tree has the empty path and is named `"<root>"`.
    """
    return ".".join(str(entry) for entry in path) if path else "<root>"


def flatten(tree: Params, argname: str) -> tuple[list[torch.Tensor], tuple[str, ...], optree.PyTreeSpec]:
    """Flatten `tree` into tensor leaves, their dotted paths and its structure.

    Raises:
        TypeError: a leaf is not a tensor (the message names its path).
        ValueError: two leaves share a dotted path (e.g. a key `"a.b"` beside `{"a": {"b": ...}}`).
    """
    paths, leaves, spec = optree.tree_flatten_with_path(tree)
    names = tuple(path_string(p) for p in paths)
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{argname} leaf {name!r} is a {type(leaf).__name__}, expected a torch.Tensor or None; "
                "wrap numbers with torch.tensor(...) or remove them from the tree."
            )
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise ValueError(f"{argname} has two leaves named {dup!r}; rename one so every path is unique.")
    return leaves, names, spec


def match_leaves(
    params: Params, spec: optree.PyTreeSpec, paths: tuple[str, ...], argname: str = "params"
) -> list[torch.Tensor]:
    """Return the leaves of `params` in the order of a state's `paths`.

    The fast path is one structure comparison; otherwise leaves are matched by key, so dicts and
    `OrderedDict` with the same keys in any order match.

    Raises:
        ValueError: the trees differ; the message lists the missing and the extra paths.
        TypeError: a leaf is not a tensor.
    """
    if torch.compiler.is_compiling():
        # Dynamo cannot trace PyTreeSpec comparisons; path strings are constants it folds away.
        leaves, names, _ = flatten(params, argname)
        return _by_path(leaves, names, paths, argname)
    leaves, other_spec = optree.tree_flatten(params)
    if other_spec == spec:
        if not all(map(isinstance, leaves, repeat(torch.Tensor))):  # one C-level pass; name the culprit below
            for leaf, name in zip(leaves, paths):
                if not isinstance(leaf, torch.Tensor):
                    raise TypeError(f"{argname} leaf {name!r} is a {type(leaf).__name__}, expected a torch.Tensor.")
        return leaves
    leaves, names, _ = flatten(params, argname)
    return _by_path(leaves, names, paths, argname)


def _by_path(leaves: list[torch.Tensor], names: tuple[str, ...], paths: tuple[str, ...], argname: str) -> list[torch.Tensor]:
    if names == paths:
        return leaves
    by_name = dict(zip(names, leaves))
    if by_name.keys() == set(paths):
        return [by_name[p] for p in paths]
    missing, extra = path_difference(paths, names)
    raise ValueError(
        f"{argname} does not have the structure of the EMA state: "
        f"missing paths {format_paths(missing)}, extra paths {format_paths(extra)}. "
        "Pass the same kind of tree the state was created from "
        "(e.g. dict(model.named_parameters()) or model.state_dict())."
    )


def check_leaves(
    leaves: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    paths: tuple[str, ...],
    argname: str = "params",
    dtypes: Sequence[torch.dtype] | None = None,
) -> None:
    """Check each leaf's shape, dtype kind and device against the state's leaf at the same path.

    `dtypes` (the parameters' dtypes at [`init`][funcema.init]) enables the fast path: when every
    leaf has the reference's shape and device and exactly its recorded dtype (hence the right
    kind), the check is a few C-level list comparisons with no per-leaf Python code; anything
    else falls through to the per-leaf check below, which names the offending path.

    Raises:
        ValueError: the first leaf that differs, named by path, with what was expected.
    """
    if dtypes is not None and len(leaves) == len(reference) == len(dtypes):
        sizes, indices, cuda, meta = _reference_layout(reference, dtypes)
        if (
            tuple(map(_DTYPE, leaves)) == tuple(dtypes)
            and list(map(_SIZE, leaves)) == sizes
            and list(map(_DEVICE_INDEX, leaves)) == indices
            and list(map(_IS_CUDA, leaves)) == cuda
            and list(map(_IS_META, leaves)) == meta
        ):
            return
    for leaf, ref, name in zip(leaves, reference, paths):
        if leaf.shape != ref.shape:
            raise ValueError(f"{argname} leaf {name!r} has shape {tuple(leaf.shape)}, expected {tuple(ref.shape)}.")
        kind, want = dtype_kind(leaf.dtype), dtype_kind(ref.dtype)
        if kind != want:
            raise ValueError(f"{argname} leaf {name!r} has dtype {leaf.dtype} ({kind}), expected a {want} dtype.")
        if leaf.device != ref.device:
            raise ValueError(
                f"{argname} leaf {name!r} is on device {leaf.device}, expected {ref.device} "
                "(the device of the EMA state's leaf); move one of them."
            )


# `Tensor.size`/`get_device` are far cheaper than the `.shape`/`.device` properties; the
# device index (-1 on the CPU and on meta) with the is_cuda/is_meta flags identifies the device.
_DTYPE = attrgetter("dtype")
_SIZE = torch.Tensor.size
_DEVICE_INDEX = torch.Tensor.get_device
_IS_CUDA = attrgetter("is_cuda")
_IS_META = attrgetter("is_meta")

# The reference layout (sizes and devices of a state's EMA leaves) is fixed at `init` for a given
# configuration, so it is computed once and kept, keyed by the identity of the configuration's
# `param_dtypes` tuple (held here, so its id cannot be reused while cached). Bounded: a few
# live configurations at a time.
_LAYOUTS: dict[int, tuple[Any, tuple[list[Any], ...]]] = {}
_LAYOUTS_MAX = 8


def _reference_layout(reference: Sequence[torch.Tensor], key: Sequence[torch.dtype]) -> tuple[list[Any], ...]:
    hit = _LAYOUTS.get(id(key))
    if hit is not None and hit[0] is key:
        return hit[1]
    layout = (
        list(map(_SIZE, reference)),
        list(map(_DEVICE_INDEX, reference)),
        list(map(_IS_CUDA, reference)),
        list(map(_IS_META, reference)),
    )
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        del _LAYOUTS[next(iter(_LAYOUTS))]
    _LAYOUTS[id(key)] = (key, layout)
    return layout


def dtype_kind(dtype: torch.dtype) -> str:
    """Classify a dtype as `"floating"`, `"complex"`, `"integer"` or `"bool"`."""
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    if dtype == torch.bool:
        return "bool"
    return "integer"


def path_difference(expected: Sequence[str], actual: Sequence[str]) -> tuple[list[str], list[str]]:
    """The paths of `expected` missing from `actual`, and the paths of `actual` not expected."""
    expected_set, actual_set = set(expected), set(actual)
    return [p for p in expected if p not in actual_set], [p for p in actual if p not in expected_set]


def format_paths(names: Sequence[str], limit: int = 8) -> str:
    """Format a list of paths for an error message: at most `limit` names, then a count.

    Examples:
        >>> format_paths(["a", "b.c"])
        "['a', 'b.c']"
        >>> format_paths([str(i) for i in range(10)], limit=2)
        "['0', '1' and 8 more]"
    """
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"
