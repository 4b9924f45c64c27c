"""The nn.Module helper: swap the EMA in for evaluation and always restore the live weights."""

from __future__ import annotations

import pytest
import torch

import funcema as fe
from funcema import schedules


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    state = fe.init(model.state_dict(), schedule=schedules.constant(0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # moves the BatchNorm running stats
    return model, fe.update(state, model.state_dict())


def test_swapped_puts_ema_in_and_restores_exactly():
    model, state = _trained()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with fe.swapped(model, state) as m:
        assert m is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, state.ema[k].to(v.dtype))
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]) and v.data_ptr() == storages[k]


def test_swapped_restores_on_exception_and_keeps_parameters_trainable():
    model, state = _trained()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = list(model.parameters())
    with pytest.raises(RuntimeError, match="boom"), fe.swapped(model, state):
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k])
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    loss = model(torch.randn(4, 3)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_swapped_casts_to_the_module_dtype():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    state = fe.init(dict(model.named_parameters()))
    assert state.ema["weight"].dtype == torch.float32
    with fe.swapped(model, state):
        assert model.weight.dtype == torch.bfloat16
        model(torch.ones(1, 2, dtype=torch.bfloat16))


def test_swapped_rejects_foreign_state():
    model = torch.nn.Linear(2, 2)
    state = fe.init({"other.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="other.weight"), fe.swapped(model, state):
        pass


def test_swapped_body_keeps_the_callers_grad_mode():
    model, state = _trained()
    with fe.swapped(model, state):
        assert torch.is_grad_enabled()
        model(torch.randn(4, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
