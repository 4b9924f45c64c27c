"""A user's file that CI type-checks with mypy from outside the repository (see .ci/run).

It proves that type checkers find funcema after the documented `pip install -e .`, and that the
public API carries precise types: `EmaState` is generic in the parameter tree, and
`posthoc.synthesize` returns one result for one target and a list for a list.
"""

from __future__ import annotations

import tempfile
from typing import assert_type

import torch

import funcema as fe

params: dict[str, torch.Tensor] = {"w": torch.ones(2), "b": torch.zeros(1)}
state = fe.init(params, schedule=fe.schedules.constant(0.99))
assert_type(state, fe.EmaState[dict[str, torch.Tensor]])
state = fe.update(state, params, donate=True)
assert_type(state.ema, dict[str, torch.Tensor])
assert_type(state.step, torch.Tensor)
state, live = fe.swap(state, params)
assert_type(live, dict[str, torch.Tensor])
path = fe.save(state, tempfile.mkdtemp() + "/ema.safetensors")
assert_type(fe.load(path).ema, dict[str, torch.Tensor])
assert_type(fe.load(path, like=state), fe.EmaState[dict[str, torch.Tensor]])
assert_type(fe.sigma_rel_to_gamma(0.1), float)


def synthesized(directory: str, targets: float | list[float]) -> None:
    """Not called: the result type of `synthesize` follows its targets, and its options are checked."""
    assert_type(fe.posthoc.synthesize(directory, sigma_rel=0.05), fe.posthoc.SynthesisResult)
    assert_type(fe.posthoc.synthesize(directory, gamma=[6.9, 16.9], step=10), list[fe.posthoc.SynthesisResult])
    either = fe.posthoc.synthesize(directory, targets, normalize=False, progress=None)
    assert_type(either, fe.posthoc.SynthesisResult | list[fe.posthoc.SynthesisResult])
    # --strict reports an unused ignore, so each line below must be an error to pass.
    fe.posthoc.synthesize(directory, 0.05, normalise=False)  # type: ignore[call-overload]
    fe.posthoc.synthesize(directory, 0.05, progress="yes")  # type: ignore[call-overload]
