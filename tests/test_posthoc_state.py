"""fe.posthoc.init / update / snapshot, end to end with synthesis."""

from __future__ import annotations

import math

import pytest
import torch

import funcema as fe
from funcema import schedules


def _trajectory(n, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(size, generator=g, dtype=torch.float64)
    return [torch.sin(0.05 * t + drift) + 0.3 * torch.randn(size, generator=g, dtype=torch.float64) for t in range(1, n + 1)]


def test_posthoc_update_equals_single_power_emas():
    params = {"w": torch.zeros(5), "n": torch.tensor(0)}
    ph = fe.posthoc.init(params, sigma_rels=(0.05, 0.10), every=3)
    singles = [fe.init(params, schedule=schedules.power(sigma_rel=s), every=3) for s in (0.05, 0.10)]
    for t in range(1, 31):
        p = {"w": torch.full((5,), float(t) ** 0.5), "n": torch.tensor(t)}
        ph = fe.posthoc.update(ph, p, donate=t % 2 == 0)
        singles = [fe.update(s, p) for s in singles]
    for member, single in zip(ph.emas, singles):
        assert torch.equal(member.ema["w"], single.ema["w"]) and torch.equal(member.ema["n"], torch.tensor(30))
    assert ph.gammas == pytest.approx((16.9722, 6.9372), abs=1e-4) and int(ph.step) == 30


def test_power_ema_with_every_follows_the_held_profile():
    # ema-pytorch's KarrasEMA ignores update_every in beta, so its EMA is dominated by early
    # weights. Here averaging every D steps must equal the every-step power EMA of the trajectory
    # held constant over each interval; both float64, so to rounding (1e-12).
    every, n = 7, 140
    traj = _trajectory(n // every)
    ph = fe.posthoc.init({"w": traj[0]}, sigma_rels=(0.10,), every=every)
    dense = fe.init({"w": traj[0]}, schedule=schedules.power(sigma_rel=0.10))
    for theta in traj:
        for _ in range(every):
            ph = fe.posthoc.update(ph, {"w": theta})
            dense = fe.update(dense, {"w": theta})
    torch.testing.assert_close(ph.emas[0].ema["w"], dense.ema["w"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("every", [1, 4])
def test_snapshot_then_synthesize_matches_the_direct_ema(tmp_path, every):
    n, interval = 400, 20
    traj = _trajectory(n, seed=every)
    params = {"w": traj[0], "count": torch.tensor(0)}
    ph = fe.posthoc.init(params, sigma_rels=(0.05, 0.10), every=every)
    target = fe.init(params, schedule=schedules.power(sigma_rel=0.07), every=every)
    for t, theta in enumerate(traj, start=1):
        p = {"w": theta, "count": torch.tensor(t)}
        ph = fe.posthoc.update(ph, p)
        target = fe.update(target, p)
        if t % interval == 0:
            fe.posthoc.snapshot(ph, tmp_path)
    result = fe.posthoc.synthesize(tmp_path, sigma_rel=0.07, progress=False)
    assert result.step == n and len(result.snapshots) == 2 * (n // interval)
    diff = (result.ema["w"] - target.ema["w"]).norm().item()
    scale = max(theta.norm().item() for theta in traj)
    # Cauchy-Schwarz: |sum_tau (p_syn - p_r)(tau) theta_tau| <= ||p_syn - p_r|| ||theta||. The
    # reported error is relative to ||p_r|| of the continuous profile, ||p_r||^2 =
    # (g+1)^2 / ((2g+1) t); over n discrete steps the bound on each coordinate is about
    # error * ||p_r|| * sqrt(n) * max|theta| — we allow a factor 4 for the discrete-vs-continuous
    # profile difference (O(1/t) relative at t = 400).
    g = result.gamma
    p_r_norm = math.sqrt((g + 1) ** 2 / ((2 * g + 1) * n))
    bound = 4 * result.error * p_r_norm * math.sqrt(n) * scale
    assert result.error < 0.05
    assert diff <= bound
    # ...and tiny in practice: a few 1e-4 of the EMA's norm on this trajectory (the bound is loose
    # because it assumes the worst-aligned trajectory). Synthesizing the wrong width (the stored
    # 0.10) misses by about a third of the norm, so this check can fail.
    assert diff <= 2e-3 * target.ema["w"].norm().item()
    assert torch.equal(result.ema["count"], torch.tensor(n))


def test_snapshot_dtype_and_time(tmp_path):
    ph = fe.posthoc.init({"w": torch.randn(4)}, every=5)
    with pytest.raises(ValueError, match="no averaging step"):
        fe.posthoc.snapshot(ph, tmp_path)
    for _ in range(7):
        ph = fe.posthoc.update(ph, {"w": torch.randn(4)})
    paths = fe.posthoc.snapshot(ph, tmp_path / "half", dtype=torch.float16)
    infos = [fe.posthoc.read_snapshot_info(p) for p in paths]
    assert [i.step for i in infos] == [5, 5]  # the last averaging step, not the call count
    assert all(i.dtypes == ("float16",) for i in infos)
    with pytest.raises(ValueError, match="dtype"):
        fe.posthoc.snapshot(ph, tmp_path, dtype=torch.int8)


def test_posthoc_init_validation():
    with pytest.raises(ValueError, match="sigma_rel"):
        fe.posthoc.init({"w": torch.ones(1)}, sigma_rels=(0.05, 0.5))
    with pytest.raises(ValueError, match="distinct"):
        fe.posthoc.init({"w": torch.ones(1)}, sigma_rels=(0.1, 0.1))
    with pytest.raises(ValueError, match="at least one"):
        fe.posthoc.init({"w": torch.ones(1)}, sigma_rels=())
    ph = fe.posthoc.init({"w": torch.ones(1)}, gammas=(5.0, 10.0))
    assert ph.gammas == (5.0, 10.0)


@pytest.mark.parametrize("member", [0, 1])  # the first tracked EMA, or only a later one
@pytest.mark.parametrize("call", ["update", "update-donated", "snapshot"])
def test_consumed_member_refused_by_posthoc_functions_with_one_message(call, member, tmp_path):
    """A post-hoc state any of whose EMAs was donated is refused before any EMA is written."""
    from tests.conftest import consumed_message

    params = {"w": torch.zeros(3)}
    state = fe.posthoc.update(fe.posthoc.init(params), {"w": torch.ones(3)})
    fe.update(state.emas[member], params, donate=True)  # consumes one member only
    others = [m.ema["w"].clone() for m in state.emas]
    with pytest.raises(ValueError) as info:
        if call == "snapshot":
            fe.posthoc.snapshot(state, tmp_path)
        else:
            fe.posthoc.update(state, {"w": torch.full((3,), 5.0)}, donate=call == "update-donated")
    assert str(info.value) == consumed_message()
    live = state.emas[1 - member]
    assert int(live.step) == 1 and torch.equal(live.ema["w"], others[1 - member])  # still live, unchanged
    assert not list(tmp_path.iterdir())
