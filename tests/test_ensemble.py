"""One EMA of a ``torch.func.stack_module_state`` ensemble is the EMA of each of its members.

The EMA is elementwise and every leaf of the stacked tree gets the same interpolation weight, so
the stacked EMA must equal, slice by slice, the EMAs of the members computed one by one. The
comparison is exact: both sides apply the same floating-point operations to the same elements
with the same host-computed weight (measured: bit-identical), and a mismatch would mean the
stacked update mixed members or used another weight.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

import funcema as fe

MEMBERS = 3
STEPS = 30


def _members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)) for _ in range(MEMBERS)]


def test_stacked_ensemble_ema_equals_each_members_ema(tmp_path) -> None:
    members = _members()
    params, _ = stack_module_state(members)
    params = {k: v.detach() for k, v in params.items()}
    base = copy.deepcopy(members[0]).to("meta")

    def loss_fn(p, x, y):
        return F.mse_loss(functional_call(base, p, (x,)), y)

    schedule = fe.schedules.warmup(max_decay=0.95)
    stacked = fe.init(params, schedule=schedule, after=2)
    single = [fe.init({k: v[m] for k, v in params.items()}, schedule=schedule, after=2) for m in range(MEMBERS)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(MEMBERS, 16, 5, generator=gen), torch.randn(MEMBERS, 16, 2, generator=gen)
        grads = vmap(grad(loss_fn))(params, x, y)
        params = {k: params[k] - 0.1 * grads[k] for k in params}
        stacked = fe.update(stacked, params)
        single = [fe.update(s, {k: v[m] for k, v in params.items()}) for m, s in enumerate(single)]

    assert int(stacked.step) == STEPS
    for m, state in enumerate(single):
        for k, ema in state.ema.items():
            assert torch.equal(stacked.ema[k][m], ema), (m, k)
    # The EMA moved away from both the start and the live parameters, so the equality says something.
    start, _ = stack_module_state(members)
    for k in params:
        assert not torch.allclose(stacked.ema[k], start[k].detach())
        assert not torch.allclose(stacked.ema[k], params[k])

    # Evaluating each member with its EMA: vmap over the stacked EMA equals one call per member.
    # Tolerance: the batched and the single matmul may sum in another order (a few float32 ulps).
    x_val = torch.randn(10, 5, generator=gen)
    each = vmap(functional_call, in_dims=(None, 0, None))(base, stacked.ema, (x_val,))
    for m, state in enumerate(single):
        torch.testing.assert_close(each[m], functional_call(base, state.ema, (x_val,)), rtol=1e-6, atol=1e-6)

    # The stacked state is an ordinary state: it saves and loads bit for bit.
    fe.save(stacked, tmp_path / "ensemble.safetensors")
    loaded = fe.load(tmp_path / "ensemble.safetensors", like=params)
    assert all(torch.equal(loaded.ema[k], stacked.ema[k]) for k in params)
