"""Differential tests: funcema against the EMA implementations users migrate from.

Each test drives a peer and funcema with the same random trajectory of a small module (convolution,
BatchNorm with its integer ``num_batches_tracked`` buffer, linear, LayerNorm: leaves of rank 0 to
4), using the funcema configuration that ``docs/migration.md`` gives for that peer, and compares
the averages. Both sides are also checked against a float64 reference of the rule they implement,
so a disagreement says which side is wrong. Where a peer deviates from its own documented intent
(``KarrasEMA`` with ``update_every > 1``, ``AveragedModel`` averaging integer buffers), the test
names the behaviour and asserts funcema's value against the float64 reference instead.

Tolerance: every side keeps a float32 EMA. They round differently (``lerp`` versus ``mul``/``add``,
a float32 versus a float64 weight), so each step may differ by a few float32 ulps of values of
order 1; over <= 120 steps with decays >= 0.9 the errors stay below ``ATOL`` (measured: ~1e-6),
which is 100x smaller than one step's change of the trajectory (~5e-2), so a convention off by one
step cannot hide inside it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import funcema as fe
from funcema import schedules
from tests.conftest import Rule, decay_rule, reference_ema

STEPS = 60
ATOL = 2e-5  # see the module docstring
RTOL = 1e-5
STEP_SIZE = 0.05  # standard deviation of one step of the random-walk trajectory


# ---------------------------------------------------------------------------------------------
# Fixtures: a module and a random trajectory of its state


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(7, 5), nn.LayerNorm(5))


def make_trajectory(model: nn.Module, steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """States of ``model`` after each of ``steps`` training steps: a random walk of every floating
    entry (parameters and BatchNorm statistics) and ``num_batches_tracked`` counting the steps."""
    gen = torch.Generator().manual_seed(seed)
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for _ in range(steps):
        nxt = {}
        for k, v in current.items():
            if v.is_floating_point():
                nxt[k] = v + STEP_SIZE * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            else:
                nxt[k] = v + 1
        current = nxt
        out.append({k: v.clone() for k, v in nxt.items()})
    return out


def start() -> tuple[nn.Module, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A fresh model, a trajectory of `STEPS` training steps from it, and a copy of its initial state."""
    model = make_model()
    return model, make_trajectory(model, STEPS), copy.deepcopy(model.state_dict())


def set_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a trajectory point in place (tensor identities are kept, as in training)."""
    with torch.no_grad():
        model.load_state_dict(state)


def drive(model: nn.Module, trajectory: list[dict[str, torch.Tensor]], update: Callable[[int], object]) -> None:
    """Load each point of `trajectory` into `model` in turn and call `update(t)`, t = 1, 2, ..."""
    for t, point in enumerate(trajectory, start=1):
        set_state(model, point)
        update(t)


def floating_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], keys, what: str) -> None:
    for k in keys:
        torch.testing.assert_close(
            actual[k].double(), expected[k].double(), atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{what} {k}: {m}"
        )


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys if a[k].numel())


def run_funcema(model: nn.Module, trajectory, *, tree=None, **config) -> fe.EmaState:
    tree = tree or (lambda m: m.state_dict())
    state = fe.init(tree(model), **config)
    for point in trajectory:
        set_state(model, point)
        state = fe.update(state, tree(model))
    return state


def warmup_decay(epoch: float, max_decay: float, inv_gamma: float, power: float, min_decay: float) -> float:
    """The warm-up decay that timm and ema-pytorch evaluate at ``epoch`` (their counter)."""
    return max(min(1 - (1 + epoch / inv_gamma) ** -power, max_decay), min_decay)


# ---------------------------------------------------------------------------------------------
# timm ModelEmaV3 (and V2, which has the same constant-decay rule without a step)


@pytest.mark.parametrize("after_step", [0, 5])
def test_timm_v3_constant_decay(after_step, timm_model_ema):
    timm_ema = timm_model_ema
    model, traj, init = start()
    peer = timm_ema.ModelEmaV3(model, decay=0.9, update_after_step=after_step)
    drive(model, traj, lambda t: peer.update(model, step=t))  # timm's train.py passes the 1-based optimizer step
    # timm: step <= update_after_step + 1 copies (its counter max(0, step - after - 1) is 0), then decay.
    state = run_funcema(make_model(), traj, schedule=schedules.constant(0.9), after=after_step + 1)
    ref = reference_ema(init, traj, lambda t: 1.0 if t <= after_step + 1 else 0.1)
    keys = floating_keys(model)
    got = peer.module.state_dict()
    assert_close(got, ref, keys, "timm vs float64")
    assert_close(state.ema, ref, keys, "funcema vs float64")
    assert_close(state.ema, got, keys, "funcema vs timm")
    # Integer buffers: both copy the live value.
    assert int(state.ema["1.num_batches_tracked"]) == int(got["1.num_batches_tracked"]) == STEPS


def test_timm_v3_without_step_is_constant_from_the_first_update(timm_model_ema):
    timm_ema = timm_model_ema
    model, traj, init = start()
    peer = timm_ema.ModelEmaV3(model, decay=0.95)
    drive(model, traj, lambda t: peer.update(model))  # step=None: the constant decay from the first call, no copy
    state = run_funcema(make_model(), traj, schedule=schedules.constant(0.95), after=0)
    ref = reference_ema(init, traj, lambda t: 0.05)
    keys = floating_keys(model)
    assert_close(peer.module.state_dict(), ref, keys, "timm vs float64")
    assert_close(state.ema, peer.module.state_dict(), keys, "funcema vs timm")


def test_timm_v2_constant_decay(timm_model_ema):
    timm_ema = timm_model_ema
    model, traj, init = start()
    peer = timm_ema.ModelEmaV2(model, decay=0.95)
    drive(model, traj, lambda t: peer.update(model))
    state = run_funcema(make_model(), traj, schedule=schedules.constant(0.95), after=0)
    keys = floating_keys(model)
    got = peer.module.state_dict()
    assert_close(got, reference_ema(init, traj, lambda t: 0.05), keys, "timm V2 vs float64")
    assert_close(state.ema, got, keys, "funcema vs timm V2")
    # ModelEmaV2 applies decay * ema + (1 - decay) * live to every state_dict entry, the integer
    # num_batches_tracked included (truncated back to int64), so the count lags; funcema copies it.
    assert int(state.ema["1.num_batches_tracked"]) == STEPS
    assert int(got["1.num_batches_tracked"]) != STEPS


def test_timm_v3_warmup(timm_model_ema):
    timm_ema = timm_model_ema
    model, traj, init = start()
    kw = dict(max_decay=0.995, inv_gamma=2.0, power=0.75)
    peer = timm_ema.ModelEmaV3(
        model, decay=0.995, update_after_step=3, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75
    )
    drive(model, traj, lambda t: peer.update(model, step=t))
    # timm's warm-up counter is step - after - 1 = (funcema's u) - 1 with after = update_after_step,
    # which is exactly schedules.warmup's (u - 1); at u = 1 both give decay 0 (a copy).
    state = run_funcema(make_model(), traj, schedule=schedules.warmup(**kw), after=3)

    def rule(t: int) -> float:
        epoch = max(0, t - 3 - 1)
        return 1.0 if epoch == 0 else 1 - warmup_decay(epoch, min_decay=0.0, **kw)

    ref = reference_ema(init, traj, rule)
    keys = floating_keys(model)
    assert_close(peer.module.state_dict(), ref, keys, "timm vs float64")
    assert_close(state.ema, ref, keys, "funcema vs float64")
    assert_close(state.ema, peer.module.state_dict(), keys, "funcema vs timm")


def test_timm_v3_warmup_with_min_decay_differs_at_one_step(timm_model_ema):
    """timm returns decay 0 (a copy) at the first step after the warm start *before* clamping to
    ``min_decay``; funcema's ``warmup`` clamps at every u, so at u = 1 it keeps ``min_decay`` of the
    previous EMA. That single step is the whole difference: both match their float64 rule."""
    timm_ema = timm_model_ema
    model, traj, init = start()
    kw = dict(max_decay=0.995, inv_gamma=2.0, power=0.75, min_decay=0.5)
    peer = timm_ema.ModelEmaV3(
        model, decay=0.995, min_decay=0.5, update_after_step=3, use_warmup=True, warmup_gamma=2.0, warmup_power=0.75
    )
    drive(model, traj, lambda t: peer.update(model, step=t))
    state = run_funcema(make_model(), traj, schedule=schedules.warmup(**kw), after=3)

    def timm_rule(t: int) -> float:
        epoch = max(0, t - 3 - 1)
        return 1.0 if epoch == 0 else 1 - warmup_decay(epoch, **kw)

    def funcema_rule(t: int) -> float:
        return 1.0 if t <= 3 else 1 - warmup_decay(t - 3 - 1, **kw)

    keys = floating_keys(model)
    assert_close(peer.module.state_dict(), reference_ema(init, traj, timm_rule), keys, "timm vs its rule")
    assert_close(state.ema, reference_ema(init, traj, funcema_rule), keys, "funcema vs its rule")
    # The difference is transient: later (small) warm-up decays forget it, so after 60 steps the
    # two agree within the tolerance, but right after the differing step they do not.
    assert_close(state.ema, peer.module.state_dict(), keys, "funcema vs timm after 60 steps")
    short = run_funcema(make_model(), traj[:4], schedule=schedules.warmup(**kw), after=3)
    assert max_diff(short.ema, reference_ema(init, traj[:4], timm_rule), keys) > 100 * ATOL


# ---------------------------------------------------------------------------------------------
# ema-pytorch EMA


def ema_pytorch_rule(after: int, every: int, decay: Callable[[int], float]) -> Rule:
    """ema-pytorch ``EMA.update`` as established by experiment: with ``s = t - 1`` (its counter
    before the call), call 1 copies; when ``s % every == 0``: ``s <= after`` copies, otherwise one
    lerp with ``decay(s - after)`` -- a single step's decay even when ``every > 1``."""

    def rule(t: int) -> float | None:
        s = t - 1
        if s == 0:
            return 1.0
        if s % every:
            return None
        return 1.0 if s <= after else 1 - decay(s - after)

    return rule


def ema_pytorch_ema(model, **kw):
    ema_pytorch = pytest.importorskip("ema_pytorch", reason="ema-pytorch is not installed")
    return ema_pytorch.EMA(model, include_online_model=False, **kw)


@pytest.mark.parametrize("after", [0, 4])
def test_ema_pytorch_warmup(after):
    model, traj, init = start()
    kw = dict(max_decay=0.995, inv_gamma=1.5, power=0.7)
    peer = ema_pytorch_ema(model, beta=0.995, update_after_step=after, update_every=1, inv_gamma=1.5, power=0.7)
    drive(model, traj, lambda t: peer.update())
    state = run_funcema(make_model(), traj, schedule=schedules.warmup(**kw), after=after)
    ref = reference_ema(init, traj, ema_pytorch_rule(after, 1, lambda e: warmup_decay(e, min_decay=0.0, **kw)))
    keys = floating_keys(model)  # ema-pytorch averages parameters and floating buffers
    got = peer.ema_model.state_dict()
    assert_close(got, ref, keys, "ema-pytorch vs float64")
    assert_close(state.ema, ref, keys, "funcema vs float64")
    assert_close(state.ema, got, keys, "funcema vs ema-pytorch")
    # ema-pytorch never touches integer buffers after the deepcopy (only floating buffers are
    # tracked): its num_batches_tracked stays at the value the model had at construction.
    assert int(got["1.num_batches_tracked"]) == 0
    assert int(state.ema["1.num_batches_tracked"]) == STEPS  # funcema copies the live value


def test_ema_pytorch_constant_decay():
    """Constant decay in ema-pytorch is ``min_value=beta``; it copies for s <= update_after_step,
    so funcema needs ``after=update_after_step + 1`` with ``schedules.constant``."""
    model, traj, init = start()
    peer = ema_pytorch_ema(model, beta=0.9, min_value=0.9, update_after_step=5, update_every=1)
    drive(model, traj, lambda t: peer.update())
    state = run_funcema(make_model(), traj, schedule=schedules.constant(0.9), after=6)
    keys = floating_keys(model)
    ref = reference_ema(init, traj, ema_pytorch_rule(5, 1, lambda e: 0.9))
    assert_close(peer.ema_model.state_dict(), ref, keys, "ema-pytorch vs float64")
    assert_close(state.ema, peer.ema_model.state_dict(), keys, "funcema vs ema-pytorch")


def test_ema_pytorch_update_every_differs():
    """ema-pytorch with ``update_every=E > 1`` applies one step's decay ``d(s - after)`` every E
    calls (the EMA forgets E times slower per step than with E = 1), warm-starts only on multiples
    of E and averages at ``(t - 1) % E == 0``. funcema's ``every=E`` applies the decay of the whole
    interval, ``prod d(v)``, at ``(t - after) % E == 0``, so it equals the every-step EMA of
    parameters held over each interval. The two are different averages, shown here explicitly:
    each matches its float64 rule, and they differ by far more than the tolerance."""
    every, after = 3, 4
    model, traj, init = start()
    kw = dict(max_decay=0.995, inv_gamma=1.5, power=0.7)
    peer = ema_pytorch_ema(model, beta=0.995, update_after_step=after, update_every=every, inv_gamma=1.5, power=0.7)
    drive(model, traj, lambda t: peer.update())
    state = run_funcema(make_model(), traj, schedule=schedules.warmup(**kw), after=after, every=every)

    def d(u: int) -> float:
        return warmup_decay(u - 1, min_decay=0.0, **kw)

    keys = floating_keys(model)
    got = peer.ema_model.state_dict()
    assert_close(got, reference_ema(init, traj, ema_pytorch_rule(after, every, lambda e: d(e + 1))), keys, "ema-pytorch")
    assert_close(state.ema, reference_ema(init, traj, decay_rule(d, every=every, after=after)), keys, "funcema")
    assert max_diff(state.ema, got, keys) > 100 * ATOL


# ---------------------------------------------------------------------------------------------
# torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn


def test_averaged_model_ema():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model, traj, init = start()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    drive(model, traj, lambda t: peer.update_parameters(model))
    # AveragedModel copies on its first update_parameters (n_averaged == 0): funcema's after=1.
    state = run_funcema(make_model(), traj, schedule=schedules.constant(0.9), after=1)
    ref = reference_ema(init, traj, lambda t: 1.0 if t == 1 else 0.1)
    keys = floating_keys(model)
    got = peer.module.state_dict()
    assert_close(got, ref, keys, "AveragedModel vs float64")
    assert_close(state.ema, got, keys, "funcema vs AveragedModel")
    # With use_buffers=True, AveragedModel passes the integer num_batches_tracked through the EMA
    # function too (its non-floating branch computes decay * ema + (1 - decay) * live and truncates),
    # so it lags behind the true count; funcema copies integer leaves.
    assert int(state.ema["1.num_batches_tracked"]) == STEPS
    assert int(got["1.num_batches_tracked"]) != STEPS


# ---------------------------------------------------------------------------------------------
# torch-ema ExponentialMovingAverage (and LitEma, which has the same rule)


@pytest.mark.parametrize("use_num_updates", [True, False])
def test_torch_ema(use_num_updates):
    torch_ema = pytest.importorskip("torch_ema", reason="torch-ema is not installed")
    model, traj, init = start()
    peer = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.95, use_num_updates=use_num_updates)
    drive(model, traj, lambda t: peer.update())
    # torch-ema starts from the parameters at construction and never copies: after=0; its
    # min(decay, (1 + n) / (10 + n)) with n = number of updates is schedules.litema(decay).
    schedule = schedules.litema(0.95) if use_num_updates else schedules.constant(0.95)
    state = run_funcema(make_model(), traj, tree=lambda m: dict(m.named_parameters()), schedule=schedule)
    names = [n for n, _ in model.named_parameters()]
    got = dict(zip(names, peer.shadow_params))

    def rule(t: int) -> float:
        return 1 - (min(0.95, (1 + t) / (10 + t)) if use_num_updates else 0.95)

    ref = reference_ema(init, traj, rule)
    assert_close(got, ref, names, "torch-ema vs float64")
    assert_close(state.ema, ref, names, "funcema vs float64")
    assert_close(state.ema, got, names, "funcema vs torch-ema")


# ---------------------------------------------------------------------------------------------
# big-sleep's bias-corrected EMA


class BigSleepEma:
    """big-sleep's EMA, reimplemented for the test (the package is not on the registry): the
    biased average starts at zero, ``accum`` is the running product of decays, and the average is
    ``biased / (1 - accum)``. Its constructor performs the first update."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float, dtype=torch.float32):
        self.decay = decay
        self.accum = torch.tensor(1.0, dtype=dtype)
        self.biased = {k: torch.zeros_like(v, dtype=dtype) for k, v in params.items()}
        self.average = {k: torch.zeros_like(v, dtype=dtype) for k, v in params.items()}
        self.update(params)

    def update(self, params: dict[str, torch.Tensor]) -> None:
        self.accum *= self.decay
        for k, p in params.items():
            self.biased[k].mul_(self.decay).add_((1 - self.decay) * p.to(self.biased[k].dtype))
            self.average[k] = self.biased[k] / (1 - self.accum)


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_big_sleep_debias(decay):
    model = make_model()
    traj = make_trajectory(model, STEPS)
    keys = [n for n, _ in model.named_parameters()]
    params = lambda: {k: v for k, v in model.state_dict().items() if k in keys}  # noqa: E731
    set_state(model, traj[0])
    peer32, peer64 = BigSleepEma(params(), decay), BigSleepEma(params(), decay, torch.float64)
    # funcema: debias=True gives the initial value zero weight; init's value is irrelevant.
    state = fe.init(params(), schedule=schedules.constant(decay), debias=True)
    state = fe.update(state, params())
    for point in traj[1:]:
        set_state(model, point)
        peer32.update(params())
        peer64.update(params())
        state = fe.update(state, params())
    assert_close(state.ema, peer64.average, keys, "funcema vs big-sleep float64")
    # big-sleep in float32 divides by 1 - accum computed in float32: at decay 0.999 that loses
    # ~3 digits in the first steps; it stays within the tolerance over these 60 steps.
    assert_close(peer32.average, peer64.average, keys, "big-sleep float32 vs float64")
    assert_close(state.ema, peer32.average, keys, "funcema vs big-sleep")


# ---------------------------------------------------------------------------------------------
# ema-pytorch KarrasEMA


def karras(model, **kw):
    post_hoc = pytest.importorskip("ema_pytorch.post_hoc_ema", reason="ema-pytorch is not installed")
    return post_hoc.KarrasEMA(model, **kw)


def power_reference_ema(trajectory: list[dict[str, torch.Tensor]], gamma: float, keys) -> dict[str, torch.Tensor]:
    """Float64 power EMA updated at every step: d(u) = (1 - 1/u) ** (gamma + 1), u = 1, 2, ..."""
    ema: dict[str, torch.Tensor] = {}
    for u, point in enumerate(trajectory, start=1):
        w = 1 - (1 - 1 / u) ** (gamma + 1)
        for k in keys:
            ema[k] = point[k].double() if u == 1 else ema[k] + w * (point[k].double() - ema[k])
    return ema


def test_karras_ema_update_every_1():
    gamma = 6.94
    model = make_model()
    traj = make_trajectory(model, STEPS)
    peer = karras(model, gamma=gamma, update_every=1)
    drive(model, traj, lambda t: peer.update())
    # KarrasEMA copies on its first call and then lerps with beta computed from its counter after
    # the increment, (1 - 1/(n + 2)) ** (gamma + 1) on the n-th call (0-based): the first sample is
    # counted twice (t = n + 2). funcema reproduces it by feeding the first sample twice.
    state = fe.init(traj[0], schedule=schedules.power(gamma=gamma))
    for point in [traj[0], *traj]:
        state = fe.update(state, point)
    keys = floating_keys(model)
    got = peer.ema_model.state_dict()
    assert_close(got, power_reference_ema([traj[0], *traj], gamma, keys), keys, "KarrasEMA vs float64")
    assert_close(state.ema, got, keys, "funcema vs KarrasEMA")
    # Without the duplicated first sample, funcema is the exact power EMA of the trajectory.
    exact = run_funcema(make_model(), traj, schedule=schedules.power(gamma=gamma))
    assert_close(exact.ema, power_reference_ema(traj, gamma, keys), keys, "funcema vs power EMA")


def test_karras_ema_update_every_diverges():
    """KarrasEMA with update_every=E > 1 computes beta from the call counter (n + 2), not from
    the number of averaging steps, so each update moves the EMA ~E times too little: the EMA is
    dominated by early weights. funcema with every=E stays on the exact power profile: it equals
    the every-step float64 power EMA of the trajectory held constant over each interval.

    The trajectory includes a ``time`` leaf equal to the step, so the EMA of it is the mean time
    of the averaging profile: (gamma + 1) / (gamma + 2) * T for the power EMA."""
    gamma, every, steps = 6.94, 10, 200
    model = make_model()
    model.register_buffer("time", torch.zeros(()))
    traj = make_trajectory(model, steps)
    for t, point in enumerate(traj, start=1):
        point["time"] = torch.tensor(float(t))
    peer = karras(model, gamma=gamma, update_every=every)
    drive(model, traj, lambda t: peer.update())
    state = run_funcema(make_model_with_time(), traj, schedule=schedules.power(gamma=gamma), every=every)
    keys = floating_keys(model)
    held = [traj[every * math.ceil(v / every) - 1] for v in range(1, steps + 1)]
    ref = power_reference_ema(held, gamma, keys)
    assert_close(state.ema, ref, keys, "funcema every=10 vs float64 power EMA of the held trajectory")
    funcema_mean = float(state.ema["time"]) / steps
    karras_mean = float(peer.ema_model.state_dict()["time"]) / steps
    ideal = (gamma + 1) / (gamma + 2)
    assert abs(funcema_mean - float(ref["time"]) / steps) < 1e-6
    assert abs(funcema_mean - ideal) < 0.05  # the held trajectory shifts it by < every / steps
    # KarrasEMA's profile is far from the power profile (measured: mean time 0.43 T here, funcema 0.91 T, ideal 0.89 T).
    assert karras_mean < ideal - 0.3
    assert max_diff(peer.ema_model.state_dict(), ref, keys) > 100 * ATOL


def make_model_with_time() -> nn.Module:
    model = make_model()
    model.register_buffer("time", torch.zeros(()))
    return model


def test_fp32_ema_of_bf16_params():
    """AveragedModel cannot keep a float32 EMA of a bfloat16 model: its foreach lerp raises on the
    mixed dtypes. funcema's default for bf16 parameters is a float32 EMA, converted inside the
    update, and it matches the float64 reference of the bf16 trajectory."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_model().to(torch.bfloat16)
    traj = make_trajectory(model, STEPS)
    init = copy.deepcopy(model.state_dict())
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    peer.module.float()
    peer.update_parameters(model)  # the first call copies
    with pytest.raises(RuntimeError):
        peer.update_parameters(model)
    state = run_funcema(model, traj, schedule=schedules.constant(0.9), after=1)
    keys = floating_keys(model)
    assert all(state.ema[k].dtype == torch.float32 for k in keys)
    assert_close(state.ema, reference_ema(init, traj, lambda t: 1.0 if t == 1 else 0.1), keys, "funcema vs float64")
