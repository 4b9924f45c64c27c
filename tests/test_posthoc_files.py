"""Tests of snapshot files: round trip, atomic writes, scanning, corrupt and foreign files."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from funcema import _format
from funcema._sigma import gamma_to_sigma_rel, sigma_rel_to_gamma
from funcema.posthoc import _files
from funcema.posthoc._files import (
    read_snapshot_info,
    scan_snapshots,
    snapshot_filename,
    write_snapshot,
)

G10 = sigma_rel_to_gamma(0.10)
G05 = sigma_rel_to_gamma(0.05)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _tree() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=gen)
    return {
        "blocks.0.weight": base.t(),  # non-contiguous
        "blocks.0.bias": torch.randn(7, generator=gen)[::2],  # strided
        "half": torch.randn(3, 2, generator=gen).half(),
        "bf16": torch.randn(4, generator=gen).bfloat16(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "norm.num_batches_tracked": torch.tensor(123, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "cplx": torch.randn(2, dtype=torch.complex64, generator=gen).conj(),
    }


def _write(d: pathlib.Path, step: int = 10, gamma: float = G10, tree=None, name=None) -> pathlib.Path:
    target = d / name if name else d
    return write_snapshot(
        target, _tree() if tree is None else tree, step=step, gamma=gamma, sigma_rel=gamma_to_sigma_rel(gamma), every=4
    )


def test_round_trip_tensors_and_metadata(tmp_path: pathlib.Path) -> None:
    tree = _tree()
    path = _write(tmp_path, step=123456, tree=tree)
    assert path == tmp_path / "ema-g6.94-0000123456.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    info = read_snapshot_info(path)
    assert (info.step, info.gamma, info.every, info.version) == (123456, G10, 4, 1)
    assert info.sigma_rel == gamma_to_sigma_rel(G10)
    assert info.paths == tuple(tree)  # tree order, not safetensors' sorted order
    assert info.shapes == tuple(tuple(t.shape) for t in tree.values())
    assert info.dtypes == tuple(str(t.dtype).removeprefix("torch.") for t in tree.values())
    assert info.dtype == "mixed"
    loaded = dict(_files.iter_tensors(info))
    assert list(loaded) == list(tree)
    for name, tensor in tree.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    # The file is plain safetensors: the reference loader reads it, metadata is one JSON value.
    ref = load_file(path)
    assert all(torch.equal(ref[k], v) for k, v in tree.items())
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(json.loads(f.read(n))["__metadata__"]["funcema"])
    assert meta["format"] == "funcema.posthoc.snapshot" and meta["step"] == 123456
    assert set(meta) >= {"version", "gamma", "sigma_rel", "every", "dtype", "tree", "tree_hash"}


def test_empty_tree_and_single_dtype(tmp_path: pathlib.Path) -> None:
    p = _write(tmp_path, tree={}, name="empty.safetensors")
    assert read_snapshot_info(p).paths == () and load_file(p) == {}
    q = _write(tmp_path, tree={"w": torch.ones(2, dtype=torch.float16)}, name="h.safetensors")
    assert read_snapshot_info(q).dtype == "float16"


def test_float16_and_float32_snapshots_of_one_tree_match(tmp_path: pathlib.Path) -> None:
    tree = {"w": torch.randn(3), "n": torch.tensor(1)}
    _write(tmp_path, step=1, tree=tree)
    _write(tmp_path, step=2, tree={"w": tree["w"].half(), "n": tree["n"]})
    infos = scan_snapshots(tmp_path)
    assert [i.step for i in infos] == [1, 2] and infos[0].tree_hash == infos[1].tree_hash


def test_snapshot_filename() -> None:
    assert snapshot_filename(123456, 6.9372) == "ema-g6.94-0000123456.safetensors"
    assert snapshot_filename(7, 1) == "ema-k1-0000000007.safetensors"
    with pytest.raises(TypeError, match="index_or_gamma"):
        snapshot_filename(7, "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"step": 0}, ValueError, "step must be >= 1"),
        ({"step": True}, TypeError, "step must be an int"),
        ({"every": 0}, ValueError, "every must be >= 1"),
        ({"gamma": -0.7, "sigma_rel": 0.1}, ValueError, "gamma must be greater than -1/2"),
        ({"sigma_rel": 0.2}, ValueError, "sigma_rel=0.2 does not match gamma"),
        ({"gamma": float("nan")}, ValueError, "gamma must be finite"),
    ],
)
def test_write_snapshot_validates_arguments(tmp_path, kwargs, exc, match) -> None:
    args: dict[str, Any] = {"step": 5, "gamma": G10, "sigma_rel": gamma_to_sigma_rel(G10), "every": 1, **kwargs}
    with pytest.raises(exc, match=match):
        write_snapshot(tmp_path / "x.safetensors", {"w": torch.ones(1)}, **args)
    assert list(tmp_path.iterdir()) == []


def test_write_snapshot_rejects_bad_tensors(tmp_path) -> None:
    kw: dict[str, Any] = {"step": 5, "gamma": G10, "sigma_rel": gamma_to_sigma_rel(G10), "every": 1}
    with pytest.raises(TypeError, match=r"tensors\['w'\] is a float"):
        write_snapshot(tmp_path / "x.safetensors", {"w": 1.0}, **kw)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="complex128"):
        write_snapshot(tmp_path / "x.safetensors", {"w": torch.ones(1, dtype=torch.complex128)}, **kw)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    calls = []

    def boom(f, leaf):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        f.write(b"\0" * leaf.numel() * leaf.element_size())

    monkeypatch.setattr(_format, "_write_tensor", boom)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_partial_temporary_file_is_never_read(tmp_path: pathlib.Path) -> None:
    good = _write(tmp_path, step=10)
    data = good.read_bytes()
    # What a crash mid-write leaves: half a file under the temporary name of the next snapshot.
    final = tmp_path / snapshot_filename(20, G10)
    (tmp_path / f".{final.name}.abcdef012345.tmp").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=r"\.tmp: a temporary file"):
        infos = scan_snapshots(tmp_path)
    assert [i.path for i in infos] == [good]
    # A directory holding only the leftover has no snapshot at all.
    good.unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no funcema snapshots"):
        scan_snapshots(tmp_path)


@pytest.mark.parametrize("how", ["half", "minus_one_byte", "tiny", "garbage_header", "bad_json_meta"])
def test_corrupt_final_file_names_the_file(tmp_path: pathlib.Path, how: str) -> None:
    path = _write(tmp_path)
    data = bytearray(path.read_bytes())
    if how == "half":
        data = data[: len(data) // 2]
    elif how == "minus_one_byte":
        data = data[:-1]
    elif how == "tiny":
        data = data[:4]
    elif how == "garbage_header":
        data[8:20] = b"\xff" * 12
    else:
        i = data.find(b'"format')
        data[i : i + 7] = b"}}}}}}}"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=path.name):
        read_snapshot_info(path)
    with pytest.raises(ValueError, match=path.name):
        scan_snapshots(tmp_path)


def test_foreign_files_are_ignored_with_a_warning(tmp_path: pathlib.Path) -> None:
    good = _write(tmp_path)
    save_file({"x": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    with pytest.warns(UserWarning) as record:
        infos = scan_snapshots(tmp_path)
    assert [i.path for i in infos] == [good]
    messages = " ".join(str(w.message) for w in record)
    for name in ("model.safetensors", "notes.txt"):
        assert name in messages
    assert "sub" not in messages.replace("safetensors", "")
    assert sorted(p.name for p, _ in infos.skipped) == ["model.safetensors", "notes.txt"]


def test_a_damaged_funcema_file_is_an_error_unless_skipping_is_asked_for(tmp_path: pathlib.Path) -> None:
    good = _write(tmp_path)
    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"), metadata={"funcema": '{"format": "x"}'})
    with pytest.raises(ValueError, match="other.safetensors.*'format' is 'x'"):
        scan_snapshots(tmp_path)
    with pytest.warns(UserWarning, match="other.safetensors"):
        infos = scan_snapshots(tmp_path, skip_invalid=True)
    assert [i.path for i in infos] == [good]
    ((path, reason),) = infos.skipped
    assert path.name == "other.safetensors" and "invalid" in reason


def test_mixed_trees_are_rejected_naming_two_files(tmp_path: pathlib.Path) -> None:
    a = _write(tmp_path, step=10, tree={"w": torch.ones(3)})
    b = _write(tmp_path, step=20, tree={"w": torch.ones(4)})
    with pytest.raises(ValueError, match=rf"different trees: {a.name} and {b.name}.*'w'"):
        scan_snapshots(tmp_path)
    b.unlink()
    c = _write(tmp_path, step=20, tree={"v": torch.ones(3)})
    with pytest.raises(ValueError, match=rf"different trees: {a.name} and {c.name}"):
        scan_snapshots(tmp_path)


def test_unsupported_version_names_the_file(tmp_path: pathlib.Path) -> None:
    meta = {"format": _files.FORMAT, "version": 99}
    path = tmp_path / "future.safetensors"
    _files._write(path, ["w"], [torch.ones(1)], meta)
    with pytest.raises(ValueError, match="future.safetensors has snapshot format version 99"):
        scan_snapshots(tmp_path)


def test_missing_or_empty_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_snapshots(tmp_path / "nope")
    with pytest.raises(ValueError, match=f"no funcema snapshots .*{tmp_path.name}"):
        scan_snapshots(tmp_path)


def test_scan_sorts_by_step_then_gamma(tmp_path: pathlib.Path) -> None:
    tree = {"w": torch.ones(2)}
    for step, g in [(30, G10), (10, G05), (30, G05), (10, G10)]:
        _write(tmp_path, step=step, gamma=g, tree=tree)
    assert [(i.step, i.gamma) for i in scan_snapshots(tmp_path)] == [(10, G10), (10, G05), (30, G10), (30, G05)]


# ---------------------------------------------------------------------------------------------
# Every field of a snapshot is checked, with no coercion


def _edit(**changes: Any):
    def edit(meta: dict[str, Any]) -> None:
        meta.update(changes)

    return edit


BAD_SNAPSHOT_METADATA: dict[str, dict[str, Any]] = {
    "metadata-not-an-object": dict(raw_meta="[]"),
    "nesting-deeper-than-the-limit": dict(raw_meta='{"a": ' + "[" * 40 + "]" * 40 + "}"),
    "nesting-that-overflows-the-parser": dict(raw_meta='{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"),
    "step-true": dict(edit_meta=_edit(step=True)),
    "step-4.7": dict(edit_meta=_edit(step=4.7)),
    "step-zero": dict(edit_meta=_edit(step=0)),
    "step-a-string": dict(edit_meta=_edit(step="10")),
    "step-beyond-int64": dict(edit_meta=_edit(step=2**70)),
    "every-zero": dict(edit_meta=_edit(every=0)),
    "every-infinity": dict(edit_meta=_edit(every=1e400)),
    "gamma-a-string": dict(edit_meta=_edit(gamma="6.94")),
    "gamma-1e400": dict(edit_meta=_edit(gamma=1e400)),
    "gamma-below-minus-half": dict(edit_meta=_edit(gamma=-0.7)),
    "sigma_rel-disagrees-with-gamma": dict(edit_meta=_edit(sigma_rel=0.2)),
    "version-a-list": dict(edit_meta=_edit(version=[1])),
    "version-a-float": dict(edit_meta=_edit(version=1.0)),
    "format-damaged": dict(edit_meta=_edit(format="funcema.posthoc.snapshoT")),
    "format-a-list": dict(edit_meta=_edit(format=["funcema.posthoc.snapshot"])),
    "dtype-disagrees-with-the-tree": dict(edit_meta=_edit(dtype="float16")),
    "tree_hash-wrong": dict(edit_meta=_edit(tree_hash="sha256:0")),
    "set-index-out-of-range": dict(edit_meta=_edit(set={"id": "ab", "index": 2, "size": 2})),
    "unknown-field": dict(edit_meta=_edit(note=1)),
}


@pytest.mark.parametrize("damage", list(BAD_SNAPSHOT_METADATA), ids=list(BAD_SNAPSHOT_METADATA))
def test_every_invalid_snapshot_field_is_an_error_naming_the_file(tmp_path: pathlib.Path, damage: str) -> None:
    from tests.conftest import rewrite_safetensors

    path = _write(tmp_path, tree={"w": torch.ones(3), "n": torch.tensor(1)})
    rewrite_safetensors(path, **BAD_SNAPSHOT_METADATA[damage])
    with pytest.raises(ValueError, match=path.name):
        read_snapshot_info(path)
    with pytest.raises(ValueError, match=path.name):
        scan_snapshots(tmp_path)


def test_a_directory_with_an_invalid_snapshot_is_an_error_not_a_smaller_synthesis(tmp_path: pathlib.Path) -> None:
    from funcema.posthoc import synthesize
    from tests.conftest import rewrite_safetensors

    files = [_write(tmp_path, step=10 * k, tree={"w": torch.full((3,), float(k))}) for k in range(1, 7)]
    rewrite_safetensors(files[2], edit_meta=_edit(step=True))
    with pytest.raises(ValueError, match=files[2].name):
        synthesize(tmp_path, sigma_rel=0.08)
    with pytest.warns(UserWarning, match=files[2].name):
        infos = scan_snapshots(tmp_path, skip_invalid=True)  # the explicit opt-in
    assert [p for p, _ in infos.skipped] == [files[2]] and len(infos) == 5


def test_a_snapshot_set_missing_a_member_is_left_out_whole(tmp_path: pathlib.Path) -> None:
    import funcema as fe

    ph = fe.posthoc.init({"w": torch.zeros(2)}, sigma_rels=(0.05, 0.10))
    for _ in range(2):
        ph = fe.posthoc.update(ph, {"w": torch.ones(2)})
        written = fe.posthoc.snapshot(ph, tmp_path)
    first = [i.path for i in scan_snapshots(tmp_path)]
    assert len(first) == 4
    written[1].unlink()  # as a crash between the two renames of step 2 would leave it
    with pytest.warns(UserWarning, match="incomplete snapshot set of step 2"):
        infos = scan_snapshots(tmp_path)
    assert [i.step for i in infos] == [1, 1] and [p for p, _ in infos.skipped] == [written[0]]
