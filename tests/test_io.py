"""fe.save / fe.load: exact round trip, resume is bit-identical, no pickle."""

from __future__ import annotations

import json
import struct

import optree
import pytest
import torch
from safetensors import safe_open

import funcema as fe
from funcema import schedules
from tests.conftest import assert_trees_equal, perturb, trees


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(schedule=schedules.power(sigma_rel=0.05), every=3),
        dict(schedule=schedules.warmup(inv_gamma=2.0), debias=True, after=2),
        dict(schedule=schedules.halflife(10, rampup=0.1), dtype=torch.bfloat16, seed=7),
        dict(schedule=schedules.litema(0.999), on_nonfinite="skip", average=lambda p, t: "bf16" not in p),
    ],
)
def test_resume_after_load_is_bit_identical(kwargs, tmp_path):
    params = trees()["mixed-dtypes"]
    uninterrupted = fe.init(params, **kwargs)
    for i in range(7):
        uninterrupted = fe.update(uninterrupted, perturb(params, seed=i))
    saved = uninterrupted
    path = fe.save(saved, tmp_path / "ema.safetensors")
    resumed = fe.load(path, like=params)
    assert resumed.config == saved.config
    assert torch.equal(resumed.step, saved.step)
    assert torch.equal(resumed.log_decay_product, saved.log_decay_product)
    assert torch.equal(resumed.nonfinite_count, saved.nonfinite_count)
    for i in range(7, 15):
        uninterrupted = fe.update(uninterrupted, perturb(params, seed=i))
        resumed = fe.update(resumed, perturb(params, seed=i))
    assert_trees_equal(resumed.ema, uninterrupted.ema)


def test_file_is_plain_safetensors_with_json_config(tmp_path):
    state = fe.init({"w": torch.ones(2)}, schedule=schedules.constant(0.99), every=2)
    path = fe.save(state, tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["funcema"])
        assert set(f.keys()) == {"ema/w", "step", "log_decay_product", "nonfinite_count"}
    assert header["schedule"] == {"name": "constant", "decay": 0.99} and header["every"] == 2
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_load_like_a_state_and_onto_its_devices(tmp_path):
    params = {"a": torch.randn(3), "b": [torch.randn(2), None]}
    state = fe.update(fe.init(params), perturb(params))
    loaded = fe.load(fe.save(state, tmp_path / "s.safetensors"), like=state)
    assert_trees_equal(loaded.ema, dict(state.ema))
    assert optree.tree_structure(loaded.ema) == optree.tree_structure(state.ema)


def test_save_rejects_a_donated_state(tmp_path):
    state = fe.init({"w": torch.ones(2)})
    fe.update(state, {"w": torch.ones(2)}, donate=True)
    with pytest.raises(ValueError, match="donate"):
        fe.save(state, tmp_path / "s.safetensors")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    from funcema import _format

    path = fe.save(fe.init({"w": torch.ones(2)}), tmp_path / "s.safetensors")
    before = path.read_bytes()

    def boom(f, leaf):
        raise OSError("disk full")

    monkeypatch.setattr(_format, "_write_tensor", boom)
    with pytest.raises(OSError, match="disk full"):
        fe.save(fe.init({"w": torch.zeros(2)}), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]


# ---------------------------------------------------------------------------------------------
# Every field of a state file is checked, with no coercion, and the tensors against the header


def _saved(tmp_path):
    params = {"w": torch.randn(3), "n": torch.tensor(4)}
    state = fe.update(fe.init(params, schedule=schedules.warmup(), debias=True), params)
    return fe.save(state, tmp_path / "ema.safetensors"), params


def _set(key, value):
    def edit(meta):
        meta[key] = value

    return edit


def _deep(depth: int) -> str:
    return '{"format": "funcema.state", "x": ' + "[" * depth + "]" * depth + "}"


BAD_STATE_METADATA = {
    "metadata-not-an-object": dict(raw_meta="[1, 2]"),
    "metadata-a-string": dict(raw_meta='"funcema.state"'),
    "nesting-deeper-than-the-limit": dict(raw_meta=_deep(50)),
    "nesting-that-overflows-the-parser": dict(raw_meta=_deep(200_000)),
    "every-infinity-literal": dict(replace_meta=lambda m: json.loads(json.dumps(m).replace('"every": 1', '"every": 1e400'))),
    "every-bool": dict(edit_meta=_set("every", True)),
    "every-float": dict(edit_meta=_set("every", 2.0)),
    "every-zero": dict(edit_meta=_set("every", 0)),
    "after-string": dict(edit_meta=_set("after", "3")),
    "seed-beyond-int64": dict(edit_meta=_set("seed", 2**64)),
    "seed-negative": dict(edit_meta=_set("seed", -1)),
    "version-a-list": dict(edit_meta=_set("version", [1])),
    "version-a-bool": dict(edit_meta=_set("version", True)),
    "version-newer": dict(edit_meta=_set("version", 2)),
    "debias-an-int": dict(edit_meta=_set("debias", 1)),
    "on_nonfinite-unknown": dict(edit_meta=_set("on_nonfinite", "ignore")),
    "dtype-integer": dict(edit_meta=_set("dtype", "int64")),
    "dtype-unknown": dict(edit_meta=_set("dtype", "float99")),
    "averaged-strings": dict(edit_meta=_set("averaged", ["no", "no"])),
    "averaged-short": dict(edit_meta=_set("averaged", [True])),
    "param_dtypes-unknown": dict(edit_meta=_set("param_dtypes", ["float32", "nn"])),
    "paths-repeated": dict(edit_meta=_set("paths", ["w", "w"])),
    "unknown-field": dict(edit_meta=_set("comment", "hi")),
    "missing-field": dict(edit_meta=lambda m: m.pop("seed")),
    "schedule-not-an-object": dict(edit_meta=_set("schedule", "warmup")),
    "schedule-decay-a-string": dict(edit_meta=_set("schedule", {"name": "constant", "decay": "0.9"})),
    "schedule-decay-1e400": dict(edit_meta=_set("schedule", {"name": "constant", "decay": 1e400})),
}


@pytest.mark.parametrize("damage", list(BAD_STATE_METADATA), ids=list(BAD_STATE_METADATA))
def test_load_rejects_every_invalid_header_field_naming_the_file(tmp_path, damage):
    from tests.conftest import rewrite_safetensors

    path, params = _saved(tmp_path)
    rewrite_safetensors(path, **BAD_STATE_METADATA[damage])
    with pytest.raises(ValueError, match=r"ema\.safetensors"):
        fe.load(path, like=params)


def _tensor(name, value):
    def edit(tensors):
        tensors[name] = value

    return edit


BAD_STATE_TENSORS = {
    "log_decay_product-nan": _tensor("log_decay_product", torch.tensor(float("nan"), dtype=torch.float64)),
    "log_decay_product-positive": _tensor("log_decay_product", torch.tensor(0.5, dtype=torch.float64)),
    "log_decay_product-float32": _tensor("log_decay_product", torch.tensor(-1.0)),
    "step-negative": _tensor("step", torch.tensor(-1)),
    "step-not-a-scalar": _tensor("step", torch.tensor([1, 2])),
    "step-a-float": _tensor("step", torch.tensor(1.0)),
    "nonfinite_count-negative": _tensor("nonfinite_count", torch.tensor(-3)),
    "nonfinite_count-not-a-scalar": _tensor("nonfinite_count", torch.zeros(1, dtype=torch.int64)),
    "averaged-leaf-int": _tensor("ema/w", torch.zeros(3, dtype=torch.int64)),
    "averaged-leaf-bool": _tensor("ema/w", torch.zeros(3, dtype=torch.bool)),
    "averaged-leaf-float8": _tensor("ema/w", torch.zeros(3).to(torch.float8_e4m3fn)),
    "copied-leaf-other-dtype": _tensor("ema/n", torch.tensor(4, dtype=torch.int32)),
}


@pytest.mark.parametrize("damage", list(BAD_STATE_TENSORS), ids=list(BAD_STATE_TENSORS))
def test_load_rejects_tensors_that_contradict_the_header(tmp_path, damage):
    from tests.conftest import rewrite_safetensors

    path, params = _saved(tmp_path)
    rewrite_safetensors(path, edit_tensors=BAD_STATE_TENSORS[damage])
    with pytest.raises(ValueError, match=r"ema\.safetensors"):
        fe.load(path, like=params)


def test_a_file_older_than_the_compensated_and_kernel_options_loads_with_their_defaults(tmp_path):
    from tests.conftest import rewrite_safetensors

    path, params = _saved(tmp_path)
    saved = fe.load(path, like=params)
    rewrite_safetensors(path, edit_meta=lambda m: [m.pop("compensated"), m.pop("kernel")])
    loaded = fe.load(path, like=params)
    assert loaded.config.compensated is False and loaded.config.kernel == "auto"
    assert loaded.config == saved.config and loaded.compensation is None
    assert_trees_equal(loaded.ema, saved.ema)


def test_a_minus_infinity_log_decay_product_is_a_valid_state(tmp_path):
    # warmup's first decay is exactly 0, so log A = -inf after the first averaging step
    path, params = _saved(tmp_path)
    loaded = fe.load(path, like=params)
    assert float(loaded.log_decay_product) == float("-inf")


def test_a_flipped_bit_in_the_metadata_is_caught_by_its_digest(tmp_path):
    path, params = _saved(tmp_path)
    data = path.read_bytes()
    i = data.index(b'\\"every\\": 1')  # inside the JSON string of the funcema metadata
    path.write_bytes(data[: i + 10] + b"3" + data[i + 11 :])  # every = 31: valid, but not what was saved
    with pytest.raises(ValueError, match=r"ema\.safetensors: the funcema metadata does not match its digest"):
        fe.load(path, like=params)


def _edit_header(path, edit):
    """Edit the parsed safetensors header of `path` in place (the header stays valid JSON)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])


def test_other_paths_than_like_are_refused_from_the_metadata_before_the_entries(tmp_path):
    # a hundred thousand entries cost more to check than the paths: a file that cannot fit `like`
    # is refused from its metadata; one that fits has every entry checked before a tensor is read
    path, params = _saved(tmp_path)
    _edit_header(path, lambda header: header["ema/w"].update(data_offsets=[0, 4]))
    with pytest.raises(ValueError, match=r"ema\.safetensors: the saved state's paths differ .*only in `like` \['v'\]"):
        fe.load(path, like={"v": torch.zeros(3), "n": torch.tensor(4)})
    with pytest.raises(ValueError, match=r"ema\.safetensors: safetensors header entry 'ema/w' spans 4 bytes, but F32\[3\]"):
        fe.load(path, like=params)
    with pytest.raises(ValueError, match=r"ema\.safetensors: safetensors header entry 'ema/w' spans 4 bytes"):
        fe.load(path)


def test_a_damaged_metadata_is_reported_after_the_entries_as_before(tmp_path):
    # a flipped bit in the key "__metadata__" leaves no metadata and one malformed entry: the
    # entry is what is named, whatever `like` is
    path, params = _saved(tmp_path)
    _edit_header(path, lambda header: header.update(__metadatA__=header.pop("__metadata__")))
    for like in (params, {"v": torch.zeros(3)}):
        with pytest.raises(ValueError, match=r"ema\.safetensors: safetensors header entry '__metadatA__' lacks the fields"):
            fe.load(path, like=like)
    _edit_header(path, lambda header: header.update(__metadata__=header.pop("__metadatA__")))
    _edit_header(path, lambda header: header["__metadata__"].update(funcema='{"format": "other"}'))
    with pytest.raises(ValueError, match=r"ema\.safetensors: the funcema metadata does not match its digest"):
        fe.load(path, like={"v": torch.zeros(3)})


def test_load_without_like_gives_a_flat_path_keyed_dict(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    state = fe.update(fe.init(model.state_dict(), schedule=schedules.constant(0.5)), model.state_dict())
    path = fe.save(state, tmp_path / "ema.safetensors")
    loaded = fe.load(path)
    assert list(loaded.ema) == list(state.config.paths)
    assert_trees_equal(loaded.ema, dict(state.ema))
    options = ("schedule", "every", "after", "debias", "dtype", "on_nonfinite", "seed")
    assert all(getattr(loaded.config, name) == getattr(state.config, name) for name in options)
    for per_leaf in ("averaged", "param_dtypes"):  # the same per path (the flat dict's flattening order may differ)
        by_path = dict(zip(loaded.config.paths, getattr(loaded.config, per_leaf)))
        assert by_path == dict(zip(state.config.paths, getattr(state.config, per_leaf)))
    assert int(loaded.step) == 1
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(loaded.ema)  # writes the EMA into a module for good
    # resuming from the flat dict equals resuming from the original tree
    a = fe.update(state, model.state_dict())
    b = fe.update(loaded, model.state_dict())
    assert_trees_equal(dict(a.ema), b.ema)


def test_load_without_like_of_nested_trees_keys_by_dotted_path(tmp_path):
    params = {"enc": {"w": torch.ones(2)}, "layers": [torch.zeros(1), None, torch.full((3,), 2.0)]}
    path = fe.save(fe.init(params), tmp_path / "ema.safetensors")
    assert sorted(fe.load(path).ema) == ["enc.w", "layers.0", "layers.2"]


def test_load_of_a_sharded_directory_needs_like(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="like="):
        fe.load(tmp_path / "ckpt")


def test_load_like_none_is_the_empty_tree_not_the_flat_dict(tmp_path):
    path = fe.save(fe.init(None), tmp_path / "ema.safetensors")
    assert fe.load(path, like=None).ema is None
    assert fe.load(path).ema == {}


@pytest.mark.parametrize("call", ["save", "load-like-state"])
def test_consumed_state_refused_by_save_and_load_with_one_message(call, tmp_path):
    from tests.conftest import consumed_message, consumed_state

    live = fe.init({"w": torch.zeros(3)})
    file = fe.save(live, tmp_path / "live.safetensors")
    state = consumed_state()
    with pytest.raises(ValueError) as info:
        if call == "save":
            fe.save(state, tmp_path / "consumed.safetensors")
        else:
            fe.load(file, like=state)
    assert str(info.value) == consumed_message()
    assert not (tmp_path / "consumed.safetensors").exists()


@pytest.mark.parametrize("given", ["module", "generator"])
def test_load_like_a_module_says_what_to_pass(given, tmp_path):
    model = torch.nn.Linear(2, 2)
    file = fe.save(fe.init(dict(model.named_parameters())), tmp_path / "s.safetensors")
    like = model if given == "module" else model.parameters()
    with pytest.raises(TypeError, match=r"^like .*dict\(\w+\.named_parameters\(\)\)"):
        fe.load(file, like=like)
