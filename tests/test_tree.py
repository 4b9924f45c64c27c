"""Tree helpers: which leaves are refused and how, memory shared between leaves, linear errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import funcema as fe
from funcema import _tree

FLOAT8 = [getattr(torch, n) for n in dir(torch) if n.startswith("float8_")]


def unsupported_leaves() -> dict[str, torch.Tensor]:
    """One tensor of every kind that no update path can write."""
    leaves = {str(d).removeprefix("torch."): torch.zeros(3).to(d) for d in FLOAT8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CSR, quantized and nested tensors warn that they are beta/deprecated
        leaves["sparse_coo"] = torch.eye(3).to_sparse()
        leaves["sparse_csr"] = torch.eye(3).to_sparse_csr()
        leaves["quantized"] = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
        leaves["nested"] = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    return leaves


@pytest.mark.parametrize("kind", list(unsupported_leaves()))
def test_check_supported_names_the_leaf_of_every_unsupported_kind(kind):
    leaf = unsupported_leaves()[kind]
    with pytest.raises((TypeError, ValueError), match=r"params leaf 'block\.w'") as info:
        _tree.check_supported([torch.zeros(2), leaf], ["ok", "block.w"])
    assert ("dtype" in str(info.value)) == (info.type is ValueError)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_every_leaf_dtype_passes_every_update_path():
    """Every dtype that `check_supported` accepts is written by the eager and the traced path, pure and donated."""
    for dtype in sorted(_tree.LEAF_DTYPES, key=str):
        x = torch.zeros(3).to(dtype)
        for policy, donate in itertools.product(("propagate", "skip"), (False, True)):
            state = fe.init({"w": x}, on_nonfinite=policy)
            fe.update(fe.update(state, {"w": x}, donate=donate), {"w": x}, donate=donate)
    for dtype in FLOAT8:
        assert dtype not in _tree.LEAF_DTYPES


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        (torch.nn.Linear(2, 2), r"params is a Linear \(an nn\.Module\); pass dict\(module\.named_parameters\(\)\)"),
        (
            torch.nn.Linear(2, 2).parameters(),
            r"params is a generator, which has no names .*dict\(model\.named_parameters\(\)\)",
        ),
        ({"m": torch.nn.Linear(2, 2)}, r"params leaf 'm' is a Linear \(an nn\.Module\)"),
        ({"x": {"a": 1}.items()}, r"params leaf 'x' is a dict_items, which has no names"),
        ({"x": 3.0}, r"params leaf 'x' is a float, .*torch\.as_tensor"),
        ({"x": "text"}, r"params leaf 'x' is a str, expected a torch\.Tensor or None\.$"),
    ],
)
def test_non_tensor_trees_say_what_to_pass(tree, expected):
    with pytest.raises(TypeError, match=expected):
        _tree.flatten(tree, "params")


def test_unnamed_parameter_list_for_a_named_state_says_what_to_pass():
    model = torch.nn.Linear(2, 2)
    names = ("weight", "bias")
    with pytest.raises(
        ValueError, match=r"params is a sequence of 2 tensors without names .*dict\(model\.named_parameters\(\)\)"
    ):
        _tree.match_leaves(list(model.parameters()), fe.init(dict(model.named_parameters())).config.treespec, names)


def test_paths_from_the_spec_equal_paths_from_flatten_with_path():
    """`flatten` names leaves from `spec.paths()`; optree's own path flattening must agree."""
    import optree

    from tests.conftest import trees

    for tree in trees().values():
        paths, leaves, _ = optree.tree_flatten_with_path(tree)
        got_leaves, names, _ = _tree.flatten(tree, "params")
        assert names == tuple(_tree.path_string(p) for p in paths)
        assert all(a is b for a, b in zip(got_leaves, leaves))


def test_mismatch_error_of_100000_leaves_lists_both_sides():
    """The error path is linear (timed in benchmarks/bench_errors.py); here only its content."""
    n = 100_000
    paths = tuple(f"layers.{i}.weight" for i in range(n))
    leaf = torch.zeros(1)
    state_spec = fe.init({p: leaf for p in paths[:2]}).config.treespec  # any spec other than params'
    params = {p: leaf for p in paths[1:]} | {"extra": leaf}
    with pytest.raises(ValueError) as info:
        _tree.match_leaves(params, state_spec, paths)
    message = str(info.value)
    assert "missing paths ['layers.0.weight']" in message and "extra paths ['extra']" in message


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda x: [x, x], (1,)),  # one tensor twice (tied weights)
        (lambda x: [x, x.view(2, 4)], (1,)),  # a view of all of it
        (lambda x: [x[:3], x[2:], x[6:]], (1, 2)),  # a chain of overlaps is one group: the first is kept
        (lambda x: [x[:4], x[4:]], ()),  # disjoint slices of one buffer share no memory
        (lambda x: [x, x.clone()], ()),
        (lambda x: [x[0:0], x[0:0]], ()),  # empty tensors hold no memory
        (lambda x: [torch.empty(3, device="meta"), torch.empty(3, device="meta")], ()),
    ],
)
def test_shared_memory_lists_all_but_the_first_of_each_group(make, expected):
    tensors = make(torch.zeros(8))
    assert _tree.shared_memory(tensors) == expected


def test_vmap_check_is_one_call_outside_vmap_and_refuses_batched_leaves():
    _tree.check_not_vmapped([torch.zeros(2)])  # outside vmap: nothing to refuse
    seen = []

    def body(x: torch.Tensor) -> torch.Tensor:
        try:
            _tree.check_not_vmapped([x])
        except TypeError as err:
            seen.append(str(err))
        return x

    torch.func.vmap(body)(torch.zeros(3, 2))
    assert seen and "stack_module_state" in seen[0]
