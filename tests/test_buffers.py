"""Buffers as the quick-starts track them: an EMA built from ``model.state_dict()`` averages the
float parameters and the float buffers (BatchNorm's running statistics) and copies the integer
ones, and a module evaluated inside ``fe.swapped`` uses the averaged running statistics.

Tolerances: the EMA is float32, computed with a float64 weight by ``torch.lerp``; the float64
reference of the same rule differs by a few float32 ulps per step, far below 1e-5 after 25 steps
with values of order 1. The module outputs are compared exactly against a copy of the model
loaded with the averaged values, because both run the same float32 forward on the same tensors.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import funcema as fe

DECAY = 0.8
STEPS = 25


def _train(model: nn.Module, state: fe.EmaState, tree) -> tuple[fe.EmaState, list[dict[str, torch.Tensor]]]:
    """Train a few steps in train mode (BatchNorm updates its statistics); return the new state and
    the module's state_dict after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    history = []
    for _ in range(STEPS):
        model.train()
        x = 2.0 + 3.0 * torch.randn(16, 4, generator=gen)  # statistics far from BatchNorm's initial 0 / 1
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = fe.update(state, tree(model))
        history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return state, history


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_state_dict_ema_averages_float_buffers_and_copies_integer_ones() -> None:
    model = _model()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = fe.init(model.state_dict(), schedule=fe.schedules.constant(DECAY))
    state, history = _train(model, state, lambda m: m.state_dict())

    for key in ("1.running_mean", "1.running_var", "1.weight", "0.weight"):
        ref = start[key].double()
        for point in history:
            ref = DECAY * ref + (1 - DECAY) * point[key].double()
        torch.testing.assert_close(state.ema[key].double(), ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(state.ema[key], history[-1][key], atol=1e-3)  # averaged, not live
    count = state.ema["1.num_batches_tracked"]
    assert count.dtype == torch.int64 and count.item() == STEPS  # copied, not averaged


def test_swapped_evaluates_with_the_averaged_running_statistics() -> None:
    model = _model()
    state = fe.init(model.state_dict(), schedule=fe.schedules.constant(DECAY))
    state, _ = _train(model, state, lambda m: m.state_dict())
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(state.ema)
    averaged.eval()
    model.eval()
    x = 2.0 + 3.0 * torch.randn(8, 4)
    live_out = model(x)
    with torch.no_grad(), fe.swapped(model, state):
        for key in ("running_mean", "running_var"):
            assert torch.equal(getattr(model[1], key), state.ema[f"1.{key}"])
        inside = model(x)
    assert torch.equal(inside, averaged(x))
    assert torch.equal(model(x), live_out)  # the live values are back after the block
    # The averaged statistics matter: averaged parameters with the live statistics give another output.
    params_only = copy.deepcopy(model)
    params_only.load_state_dict({k: state.ema[k] for k, _ in model.named_parameters()}, strict=False)
    assert not torch.allclose(params_only(x), inside, atol=1e-3)
    assert not torch.allclose(live_out, inside, atol=1e-3)


def test_parameters_only_ema_leaves_the_live_running_statistics() -> None:
    model = _model()
    state = fe.init(dict(model.named_parameters()), schedule=fe.schedules.constant(DECAY))
    state, _ = _train(model, state, lambda m: dict(m.named_parameters()))
    assert not any("running" in k or "num_batches" in k for k in state.ema)
    model.eval()
    live_mean = model[1].running_mean.clone()
    with torch.no_grad(), fe.swapped(model, state):
        assert torch.equal(model[1].running_mean, live_mean)  # buffers untouched
        assert torch.equal(model[1].weight, state.ema["1.weight"])
