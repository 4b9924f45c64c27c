"""A torch.compile(fullgraph=True) training step calling fe.update compiles once and never recompiles."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

import funcema as fe
from funcema import schedules


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    return model, x, y


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize(
    ("schedule", "debias", "policy"),
    [(schedules.power(sigma_rel=0.1), False, "propagate"), (schedules.warmup(), True, "skip")],
)
def test_compiled_step_compiles_once_and_matches_eager(schedule, debias, policy, donate):
    model, x, y = _model_and_data()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def train_step(p, state):
        g = grad(loss_fn)(p)
        p = {k: p[k] - 0.1 * g[k] for k in p}
        return p, fe.update(state, p, donate=donate)

    torch._dynamo.reset()
    compiled = torch.compile(train_step, fullgraph=True, backend="inductor")
    p_c, s_c = dict(params), fe.init(params, schedule=schedule, every=3, after=2, debias=debias, on_nonfinite=policy)
    p_e, s_e = dict(params), fe.init(params, schedule=schedule, every=3, after=2, debias=debias, on_nonfinite=policy)
    p_c, s_c = compiled(p_c, s_c)  # the one compilation
    p_e, s_e = train_step(p_e, s_e)
    with torch.compiler.set_stance("fail_on_recompile"):  # any recompilation raises
        for _ in range(200):
            p_c, s_c = compiled(p_c, s_c)
            p_e, s_e = train_step(p_e, s_e)
    assert int(s_c.step) == int(s_e.step) == 201
    for k in params:
        # Compiled and eager differ only by float32 rounding in the training step (fused
        # kernels reassociate sums) and in the update (a traced float64 weight vs a host float):
        # a few ulps per step, compounding over 200 SGD steps to well under 1e-4.
        torch.testing.assert_close(s_c.ema[k], s_e.ema[k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_c.log_decay_product.cpu(), s_e.log_decay_product.cpu(), rtol=1e-9, atol=0)


def test_compiled_posthoc_update_compiles_once():
    model, x, y = _model_and_data()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    step = torch.compile(lambda ph, p: fe.posthoc.update(ph, {k: v * 1.01 for k, v in p.items()}), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    ph = fe.posthoc.init(params, sigma_rels=(0.05, 0.1), every=2)
    eager = fe.posthoc.init(params, sigma_rels=(0.05, 0.1), every=2)
    ph = step(ph, params)
    eager = fe.posthoc.update(eager, {k: v * 1.01 for k, v in params.items()})
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(20):
            ph = step(ph, params)
            eager = fe.posthoc.update(eager, {k: v * 1.01 for k, v in params.items()})
    for a, b in zip(ph.emas, eager.emas):
        for k in params:
            # traced float64 weight vs host float64 weight, applied in float32: ulp-level.
            torch.testing.assert_close(a.ema[k], b.ema[k], rtol=1e-6, atol=1e-7)
