"""Tree helpers: flatten parameter trees against a state's layout, with path-aware errors.

Owns: flattening, matching leaves by path, checking leaves against a reference, and the one
formatter of path lists used in every "missing / extra paths" message; and
`collector_paused`, the garbage-collector pause of every check that builds many containers.

Must not import: any funcema module except `_validate` (it sits just above it).

Every tree is flattened once per call. Leaves are matched to the state by their path (dict key,
sequence index or field name), never by position, so `dict(model.named_parameters())` and
`model.state_dict()` (an `OrderedDict` in insertion order) are interchangeable for the same
keys. Errors name paths and never embed tensor values.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import traceback
from collections import OrderedDict, defaultdict
from collections.abc import ItemsView, Iterator, KeysView, Sequence, ValuesView
from itertools import repeat
from operator import attrgetter, itemgetter
from typing import Any, TypeVar

import optree
import torch

__all__ = [
    "LEAF_DTYPES",
    "Params",
    "ParamsT",
    "check_leaves",
    "check_not_vmapped",
    "check_supported",
    "collector_paused",
    "dict_leaves",
    "dtype_kind",
    "flatten",
    "format_paths",
    "match_leaves",
    "mismatch_hint",
    "path_difference",
    "path_string",
    "shared_memory",
]

LEAF_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64, torch.complex128}
    | {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64, torch.bool}
)
"""The dtypes a leaf may have: floating and complex dtypes that the update averages (in an
EMA dtype it has a lerp kernel for) and integer and bool dtypes that it copies. float8, the
sub-byte and bit dtypes have no lerp kernel; quantized dtypes no multi-tensor path."""

# A pytree whose leaves are tensors, with `None` holes (optree's default: `None` is an empty
# node, so holes are kept in the structure and have no leaf).
Params = Any
ParamsT = TypeVar("ParamsT")
"""The type of a parameter tree, carried from `init`'s argument to `state.ema`."""


def path_string(path: Sequence[Any]) -> str:
    """Join an optree accessor path into a dotted name, e.g. `("blocks", 0, "w")` → `"blocks.0.w"`.

    The root of a single-tensor tree has the empty path and is named `"<root>"`.
    """
    return ".".join(map(str, path)) if path else "<root>"


def flatten(tree: Params, argname: str) -> tuple[list[torch.Tensor], tuple[str, ...], optree.PyTreeSpec]:
    """Flatten `tree` into tensor leaves, their dotted paths and its structure.

    Raises:
        TypeError: a leaf is not a tensor (the message names its path).
        ValueError: two leaves share a dotted path (e.g. a key `"a.b"` beside `{"a": {"b": ...}}`).
    """
    leaves, spec = optree.tree_flatten(tree)
    names = _names(spec)  # spec.paths() is several times cheaper than tree_flatten_with_path
    if not all(map(isinstance, leaves, repeat(torch.Tensor))):  # one C-level pass; name the culprit below
        raise next(not_a_tensor(argname, n, x) for n, x in zip(names, leaves) if not isinstance(x, torch.Tensor))
    if len(set(names)) != len(names):
        raise ValueError(f"{argname} has two leaves named {_first_duplicate(names)!r}; rename one so every path is unique.")
    return leaves, names, spec


def _first_duplicate(names: Sequence[str]) -> str:
    seen: set[str] = set()
    return next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]


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
            raise next(not_a_tensor(argname, n, x) for n, x in zip(paths, leaves) if not isinstance(x, torch.Tensor))
        return leaves
    names = _names(other_spec)  # the leaves are already flattened: only their paths are needed
    if not all(map(isinstance, leaves, repeat(torch.Tensor))):
        raise next(not_a_tensor(argname, n, x) for n, x in zip(names, leaves) if not isinstance(x, torch.Tensor))
    return _by_path(leaves, names, paths, argname)


def _names(spec: optree.PyTreeSpec) -> tuple[str, ...]:
    return tuple(map(path_string, spec.paths()))


# The mapping types optree flattens by key (a dict subclass it does not know is a leaf).
_DICTS = (dict, OrderedDict, defaultdict)


def dict_leaves(tree: Params, keys: tuple[Any, ...], positions: tuple[int, ...]) -> list[Any] | None:
    """The values of a flat dict in leaf order if its keys are `keys` in that order, else `None`.

    `keys` are the keys of the state's tree in their dict order and `positions[i]` the position
    of leaf `i` among them: a tuple comparison and one C-level gather instead of a flatten. The
    values are not checked (`check_leaves` does that; a `None` or a non-tensor fails it).
    """
    if type(tree) not in _DICTS or not keys or tuple(tree) != keys:
        return None
    values = list(tree.values())
    if len(positions) == 1:
        return [values[positions[0]]]
    return list(itemgetter(*positions)(values))


def _by_path(leaves: list[torch.Tensor], names: tuple[str, ...], paths: tuple[str, ...], argname: str) -> list[torch.Tensor]:
    """Reorder `leaves` (named `names`) into `paths` order; linear in the number of leaves, error included."""
    if names == paths:
        return leaves
    by_name = dict(zip(names, leaves))
    if len(by_name) == len(names) and by_name.keys() == set(paths):
        return [by_name[p] for p in paths]
    missing, extra = path_difference(paths, names)
    if not extra and not missing:  # the same paths, one of them twice
        raise ValueError(f"{argname} has two leaves named {_first_duplicate(names)!r}; rename one so every path is unique.")
    raise ValueError(
        f"{argname} does not have the structure of the EMA state: "
        f"missing paths {format_paths(missing)}, extra paths {format_paths(extra)}. {mismatch_hint(names, paths, argname)}"
    )


def mismatch_hint(names: Sequence[str], paths: Sequence[str], argname: str) -> str:
    """What to pass instead of a tree with leaf paths `names` where a state's `paths` were expected."""
    if names and all(n.isdigit() for n in names) and not all(p.isdigit() for p in paths):
        return (
            f"{argname} is a sequence of {len(names)} tensors without names (e.g. list(model.parameters())), but "
            "the state's leaves have names: pass dict(model.named_parameters()) or model.state_dict()."
        )
    return "Pass the same kind of tree the state was created from (e.g. dict(model.named_parameters()) or model.state_dict())."


def not_a_tensor(argname: str, name: str, leaf: object) -> TypeError:
    """The error for a leaf (or a whole tree, `name == "<root>"`) that is not a tensor, saying what to pass."""
    what = argname if name == "<root>" else f"{argname} leaf {name!r}"
    kind = type(leaf).__name__
    if isinstance(leaf, torch.nn.Module):
        hint = (
            f"is a {kind} (an nn.Module); pass dict(module.named_parameters()) (parameters only) or "
            "module.state_dict() (with buffers) instead of the module"
        )
    elif isinstance(leaf, (Iterator, KeysView, ValuesView, ItemsView)):
        hint = (
            f"is a {kind}, which has no names (e.g. model.parameters()); pass dict(model.named_parameters()) "
            "or model.state_dict(), whose names become the EMA's paths"
        )
    elif isinstance(leaf, numbers.Number) or hasattr(leaf, "__array__"):
        hint = f"is a {kind}, expected a torch.Tensor or None; convert it with torch.as_tensor(...) or remove it"
    else:
        hint = f"is a {kind}, expected a torch.Tensor or None"
    return TypeError(f"{what} {hint}.")


def check_supported(leaves: Sequence[torch.Tensor], paths: Sequence[str], argname: str = "params") -> None:
    """Check that every leaf is a dense tensor of a dtype in `LEAF_DTYPES` (what the update can write).

    Raises:
        TypeError: a sparse (or other non-strided), nested or quantized tensor, named by path.
        ValueError: a leaf of another dtype (float8, sub-byte, bit dtypes), named by path.
    """
    for leaf, name in zip(leaves, paths):
        if leaf.layout != torch.strided or leaf.is_nested or leaf.is_quantized:
            kind = "nested" if leaf.is_nested else "quantized" if leaf.is_quantized else f"{leaf.layout}"
            raise TypeError(
                f"{argname} leaf {name!r} is a {kind} tensor; funcema averages dense (strided) tensors only: "
                "pass a dense copy (e.g. .to_dense() or .dequantize()) or leave it out of the tree."
            )
        if leaf.dtype not in LEAF_DTYPES:
            raise ValueError(
                f"{argname} leaf {name!r} has dtype {leaf.dtype}, which funcema cannot average or copy; "
                "keep a copy in a supported dtype (e.g. .to(torch.bfloat16)) or leave it out of the tree."
            )


def check_leaves(
    leaves: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
    paths: tuple[str, ...],
    argname: str = "params",
    dtypes: Sequence[torch.dtype] | None = None,
) -> bool:
    """Check each leaf's shape, dtype kind and device against the state's leaf at the same path.

    `dtypes` (the parameters' dtypes at [`init`][funcema.init]) enables the fast path: when every
    leaf is dense and has the reference's shape and device and exactly its recorded dtype (hence
    the right kind, one [`check_supported`][funcema._tree.check_supported] accepted), the check is
    a few C-level list comparisons with no per-leaf Python code; anything else falls through to
    the per-leaf check below, which names the offending path.

    Returns:
        Whether the fast path held: every leaf has exactly its recorded dtype.

    Raises:
        ValueError: the first leaf that differs, named by path, with what was expected.
        TypeError: a leaf is sparse, nested or quantized.
    """
    if dtypes is not None and len(leaves) == len(reference) == len(dtypes) and _fast_check(leaves, reference, dtypes):
        return True
    for leaf, ref, name in zip(leaves, reference, paths):
        if leaf.dtype not in LEAF_DTYPES or leaf.layout != torch.strided or leaf.is_nested:  # quantized dtypes included
            check_supported((leaf,), (name,), argname)
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
    return False


def _fast_check(leaves: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> bool:
    """Exact recorded dtypes, the reference's sizes and devices, without per-leaf Python code.

    Once a set of leaves has passed, their layout is remembered in a guard (`_layout_guard`): the
    next call with leaves of that very layout passes in one C++ loop, which reads each leaf's type,
    dispatch keys, dtype, device index, `requires_grad`, sizes and strides and builds no Python
    object. Leaves that fail the guard (anything changed, or never seen) take the C-level list
    comparisons (`_compare_layout`), and leaves that pass those become the new guard. Passing the
    guard implies passing the comparisons: it compares the same properties and more, exactly.
    """
    layout = _reference_layout(reference, dtypes)
    guard = layout.guard
    # The guard reads each leaf's strides before its dispatch keys, and a strided nested tensor
    # (type `torch.Tensor`) throws a C++ error there that ends the process: those never reach it.
    if guard is not None and True not in map(_IS_NESTED, leaves) and guard.check(*leaves):
        return True
    if not _compare_layout(leaves, layout):
        return False
    if layout.builds < _GUARD_BUILDS_MAX:  # bounded: leaves that alternate between layouts stop rebuilding
        layout.builds += 1
        layout.guard = _layout_guard(leaves)
    return True


def _compare_layout(leaves: Sequence[torch.Tensor], layout: _Layout) -> bool:
    """Exact recorded dtypes, the reference's sizes and devices: C-level list comparisons.

    The garbage collector is paused meanwhile: the sizes are one new `torch.Size` (a tuple) per
    leaf, and thousands of them would trigger collections that traverse every live object (a
    state's tensors included), costing more than the check. They are all freed before it resumes.
    """
    try:
        with collector_paused():
            return (
                tuple(map(_DTYPE, leaves)) == layout.dtypes
                and list(map(_LAYOUT, leaves)).count(torch.strided) == len(leaves)  # sparse leaves: per-leaf check
                and list(map(_SIZE, leaves)) == layout.sizes
                and _on_devices(leaves, layout.devices)
            )
    except RuntimeError:  # a nested tensor has no size(): the per-leaf check names it
        return False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the garbage collector while many new containers are built and checked, then restore it.

    Thousands of new tuples, dicts or lists (sizes of thousands of leaves, a parsed header of
    100,000 entries) form no cycles, but they trigger collections that traverse every live object
    (a model's tensors included) again and again, which cost more than the work itself. If the
    work raises, the local variables of the traceback's frames are cleared (the traceback is
    kept), so that what they built is freed before the collector resumes.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    except Exception as err:
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        if collecting:
            gc.enable()


# `Tensor.size`/`get_device` are far cheaper than the `.shape`/`.device` properties; the
# device index (-1 on the CPU and on meta) with the is_cuda/is_meta flags identifies the device.
_DTYPE = attrgetter("dtype")
_SIZE = torch.Tensor.size
_DEVICE_INDEX = torch.Tensor.get_device
_IS_CPU = attrgetter("is_cpu")
_IS_CUDA = attrgetter("is_cuda")
_IS_META = attrgetter("is_meta")
_LAYOUT = attrgetter("layout")
_IS_NESTED = attrgetter("is_nested")


def _tensor_guards_class() -> Any:
    """Dynamo's C++ tensor-metadata check, or `None` in a torch build without it (then unused)."""
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:  # pragma: no cover - every torch 2.x build with dynamo has it
        return None
    return TensorGuards


_TensorGuards: Any = _tensor_guards_class()

# Plain tensors and parameters only: the guard reads sizes and strides before comparing anything
# but the Python type, and a tensor subclass may compute those in Python (an exception there
# would end the process). A leaf of another type then fails the guard on its type, unread.
_GUARDED_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_GUARD_BUILDS_MAX = 8  # per reference layout


def _layout_guard(leaves: Sequence[torch.Tensor]) -> Any:
    """A guard that passes exactly the leaves with the type, dispatch keys, dtype, device,
    `requires_grad`, sizes and strides of `leaves` (dynamo's `TensorGuards`), or `None`.

    It holds no reference to the leaves. The dispatch keys are taken with the thread's current
    dispatch state (grad mode aside), so a call under another one (`torch.inference_mode`) fails
    the guard and takes the comparisons instead. There is none for leaves of other types than
    `_GUARDED_TYPES`, for leaves that would not pass their own guard (the guard also requires
    distinct objects, so one tensor under two paths never passes), or if it cannot be built (a
    torch without the class, or a changed signature): only the shortcut is lost.
    """
    if _TensorGuards is None or not set(map(type, leaves)) <= _GUARDED_TYPES:
        return None
    try:
        guard = _TensorGuards(*leaves, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        return guard if guard.check(*leaves) is True else None
    except Exception:  # an optimisation only: the comparisons keep working without it
        return None


class _Layout:
    """What a state's EMA leaves require of the parameters: fixed at `init` for a configuration.

    `key` is the configuration's `param_dtypes` (held, so its id, the cache key, cannot be reused
    while cached) and `dtypes` it as a tuple; `sizes` the EMA leaves' sizes; `devices` `None`
    when every leaf is on the CPU (one flag per leaf to test), else their device indices and
    is_cuda / is_meta flags; `guard` the layout guard of the last leaves that passed, if any,
    and `builds` how many guards were built.
    """

    __slots__ = ("builds", "devices", "dtypes", "guard", "key", "sizes")

    def __init__(self, key: Sequence[torch.dtype], sizes: list[torch.Size], devices: Any) -> None:
        self.key, self.dtypes, self.sizes, self.devices = key, tuple(key), sizes, devices
        self.guard: Any = None
        self.builds = 0


# The reference layouts, by the identity of the configuration's `param_dtypes` tuple. Bounded: a
# few live configurations at a time.
_LAYOUTS: dict[int, _Layout] = {}
_LAYOUTS_MAX = 8


def _reference_layout(reference: Sequence[torch.Tensor], key: Sequence[torch.dtype]) -> _Layout:
    hit = _LAYOUTS.get(id(key))
    if hit is not None and hit.key is key:
        return hit
    devices = None
    if not all(map(_IS_CPU, reference)):
        devices = (list(map(_DEVICE_INDEX, reference)), list(map(_IS_CUDA, reference)), list(map(_IS_META, reference)))
    layout = _Layout(key, list(map(_SIZE, reference)), devices)
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        del _LAYOUTS[next(iter(_LAYOUTS))]
    _LAYOUTS[id(key)] = layout
    return layout


def _on_devices(leaves: Sequence[torch.Tensor], devices: Any) -> bool:
    """Whether the leaves are on the reference's devices (`None`: all on the CPU)."""
    if devices is None:
        return all(map(_IS_CPU, leaves))
    indices, cuda, meta = devices
    return list(map(_DEVICE_INDEX, leaves)) == indices and list(map(_IS_CUDA, leaves)) == cuda and list(map(_IS_META, leaves)) == meta


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


def shared_memory(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """Indices of the tensors that share memory with another tensor of lower index.

    Two tensors share memory when their byte ranges in one storage intersect (conservative for
    strided views that interleave). Of each group of tensors that share memory, all but the first
    are listed, so giving each listed tensor its own copy leaves no two tensors sharing memory.
    Meta and empty tensors hold no memory and are never listed.
    """
    spans: list[tuple[int, int, int, int]] = []
    for i, t in enumerate(tensors):
        if t.is_meta or t.numel() == 0:
            continue
        extent = 1 + sum((int(n) - 1) * abs(int(st)) for n, st in zip(t.shape, t.stride()))
        start = int(t.storage_offset()) * t.element_size()
        spans.append((t.untyped_storage().data_ptr(), start, start + extent * t.element_size(), i))
    spans.sort()
    listed: list[int] = []
    group: list[int] = []
    storage, end = -1, 0
    for ptr, start, stop, i in spans:
        if ptr != storage or start >= end:  # a new group of overlapping spans
            listed.extend(sorted(group)[1:])
            group, storage, end = [], ptr, stop
        group.append(i)
        end = max(end, stop)
    listed.extend(sorted(group)[1:])
    return tuple(sorted(listed))


def check_not_vmapped(*groups: Sequence[torch.Tensor]) -> None:
    """Refuse batched tensors (`torch.func.vmap`), pointing to the stacked-EMA pattern.

    Outside any functorch transform this is one C call; only inside one are the leaves inspected.

    Raises:
        TypeError: a leaf is a batched tensor of `torch.func.vmap`.
    """
    functorch = torch._C._functorch
    if functorch.peek_interpreter_stack() is None:
        return
    if any(functorch.is_batchedtensor(t) for group in groups for t in group):
        raise TypeError(
            "funcema's init, update and swap cannot run under torch.func.vmap (they got batched tensors). "
            "For an ensemble of models keep one EMA of the stacked parameters: "
            "params, buffers = torch.func.stack_module_state(models); state = funcema.init(params); "
            "then after each vmapped training step call funcema.update(state, params) outside vmap. "
            "The EMA is elementwise, so slice k of the stacked EMA is the EMA of model k."
        )
