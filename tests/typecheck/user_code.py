"""A user's file that CI type-checks with mypy from outside the repository (see .ci/run).

It proves that type checkers find funcema after the documented `pip install -e .`, and that the
public API carries precise types.
"""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import funcema as fe

params = {"w": torch.ones(2), "b": torch.zeros(1)}
state = fe.init(params, schedule=fe.schedules.constant(0.99))
state = fe.update(state, params, donate=True)
assert_type(state.step, torch.Tensor)
assert_type(fe.sigma_rel_to_gamma(0.1), float)
