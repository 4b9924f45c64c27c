"""The nn.Module helper: swap the EMA in for evaluation and always restore the live weights."""

from __future__ import annotations

import pytest
import torch

import funcema as fe
from funcema import schedules
from tests.conftest import assert_trees_equal


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


def test_swapped_evaluates_in_eval_mode_and_restores_each_submodules_mode():
    model, state = _trained()
    model.train()
    model[1].eval()  # a mixed-mode module: each submodule gets its own flag back
    modes = [m.training for m in model.modules()]
    with fe.swapped(model, state):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(RuntimeError, match="boom"), fe.swapped(model, state):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == modes
    with fe.swapped(model, state, eval_mode=False):  # the opt-out keeps the caller's modes
        assert [m.training for m in model.modules()] == modes


def test_swapped_uses_the_averaged_batchnorm_statistics():
    model, state = _trained()
    model.train()
    x = torch.randn(5, 3)
    reference = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    reference.load_state_dict(state.ema)
    reference.eval()
    with fe.swapped(model, state):
        assert torch.equal(model(x), reference(x))
    assert not torch.equal(model.eval()(x), reference(x))  # the live statistics differ


@pytest.mark.parametrize("eval_mode", [True, False])
def test_evaluating_inside_swapped_never_changes_the_state(eval_mode):
    # A train-mode forward updates BatchNorm's running statistics and num_batches_tracked in
    # place; inside swapped() those are copies, so the EMA stays bit-identical.
    model, state = _trained()
    model.train()
    before = {k: v.clone() for k, v in state.ema.items()}
    with fe.swapped(model, state, eval_mode=eval_mode):
        model(torch.randn(8, 3))
        model(torch.randn(8, 3))
    assert_trees_equal(dict(state.ema), before)


def test_functional_call_in_eval_mode_never_changes_the_state():
    # The documented functional pattern: functional_call on the module in eval mode.
    model, state = _trained()
    before = {k: v.clone() for k, v in state.ema.items()}
    model.train()
    torch.func.functional_call(model.eval(), state.ema, (torch.randn(8, 3),))
    assert_trees_equal(dict(state.ema), before)


def test_swapped_rejects_a_non_bool_eval_mode():
    model, state = _trained()
    with pytest.raises(TypeError, match="eval_mode"), fe.swapped(model, state, eval_mode="yes"):  # type: ignore[arg-type]
        pass


def _copy_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


# ----------------------------------------------------------------------------------------------
# copy_to


def test_copy_to_casts_to_module_dtype_and_writes_integer_buffers() -> None:
    model = _copy_net()
    state = fe.init(model.state_dict(), schedule=schedules.constant(0.5))
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    state = fe.update(state, model.state_dict())
    low = _copy_net().to(torch.bfloat16)
    fe.copy_to(low, state)
    assert low[0].weight.dtype == torch.bfloat16
    # copy_ rounds float32 to the nearest bfloat16, exactly what .to(bfloat16) does.
    assert torch.equal(low[0].weight, state.ema["0.weight"].to(torch.bfloat16))
    assert int(low[1].num_batches_tracked) == 7


def test_copy_to_rejects_a_foreign_module_and_changes_nothing() -> None:
    state = fe.init(_copy_net().state_dict())
    last_differs = torch.nn.Linear(8, 3)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), last_differs)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'3\.weight' has shape \(3, 8\)"):
        fe.copy_to(other, state)
    # The first layers, which matched, were not written either.
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="name no parameter"):
        fe.copy_to(torch.nn.Linear(4, 8), state)
    with pytest.raises(TypeError, match="EmaState"):
        fe.copy_to(other, {"w": torch.ones(1)})  # type: ignore[arg-type]


def test_copy_to_rejects_a_donated_state() -> None:
    model = _copy_net()
    state = fe.init(model.state_dict())
    fe.update(state, model.state_dict(), donate=True)
    with pytest.raises(ValueError, match="donated"):
        fe.copy_to(model, state)
