"""End-to-end tests of post-hoc synthesis against power EMAs computed directly in float64.

Discrete profile. With ``beta_t = (1 - 1/t)**(g+1)`` (so ``beta_1 = 0``: the first step copies), the
EMA at time T is ``sum_tau w_T(tau) theta_tau`` with

    w_T(tau) = (1 - beta_tau) prod_{s=tau+1..T} beta_s = (tau/T)**(g+1) - ((tau-1)/T)**(g+1)
             = int_{tau-1}^{tau} p_T(u) du,

exactly the continuous profile integrated over step tau. Hence, with ``r = sum_i x_i p_i - p_r`` and
``theta~`` the piecewise-constant path (``theta~(u) = theta_tau`` on ``(tau-1, tau]``),

    synth - target = int_0^T r(u) theta~(u) du,

and Cauchy-Schwarz per coordinate, summed over coordinates, gives the bound checked here:

    ||synth - target||_2 <= error * ||p_r|| * ||theta||_F,   ||p_r||^2 = (g+1)^2 / ((2g+1) T),

where ``||theta||_F^2 = sum_tau ||theta_tau||^2``. The discrete-vs-continuous difference is zero, so
the only slack is float32 storage and accumulation (see ``_float32_slack``).
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from funcema import posthoc
from funcema._format import read_header
from funcema._sigma import gamma_to_sigma_rel, sigma_rel_to_gamma
from funcema.posthoc import _files, _synthesize, synthesize, write_snapshot

T = 240
EVERY = 16
SIGMAS = (0.05, 0.10)
EPS32 = float(torch.finfo(torch.float32).eps)


def _power_emas(theta: torch.Tensor, gammas: list[float]) -> list[list[torch.Tensor]]:
    """Exact float64 power EMAs: ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t for t = 1..T."""
    out = []
    for g in gammas:
        ema = torch.zeros_like(theta[0])
        seq = []
        for t in range(1, theta.shape[0] + 1):
            beta = (1.0 - 1.0 / t) ** (g + 1.0)
            ema = beta * ema + (1.0 - beta) * theta[t - 1]
            seq.append(ema)
        out.append(seq)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    # A drifting random walk, so that EMAs of different widths differ visibly.
    theta = torch.cumsum(torch.randn(T, 64, generator=gen, dtype=torch.float64), 0) + torch.linspace(0, 50, T)[:, None]
    gammas = [sigma_rel_to_gamma(s) for s in SIGMAS]
    emas = _power_emas(theta, gammas)
    d = tmp_path_factory.mktemp("snaps")
    for t in range(EVERY, T + 1, EVERY):
        for g, seq in zip(gammas, emas):
            ema = seq[t - 1]
            tree = {
                "blocks.0.weight": ema[:48].reshape(6, 8).float(),
                "blocks.0.bias": ema[48:].float(),
                "count": torch.tensor(t, dtype=torch.int64),
                "flag": torch.tensor([t % 5 == 0, True]),
            }
            write_snapshot(d, tree, step=t, gamma=g, sigma_rel=gamma_to_sigma_rel(g), every=1)
    return {"dir": d, "theta": theta}


def _flat(ema: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([ema["blocks.0.weight"].reshape(-1), ema["blocks.0.bias"]]).double()


def _float32_slack(res) -> float:
    """Rounding of float32 storage (<= eps/2 per element) and of the float32 accumulation
    (<= eps per add), each amplified by |x_i| times the snapshot's norm; 4x for safety."""
    norms = []
    for info in res.snapshots:
        tensors = dict(_files.iter_tensors(info))
        norms.append(float(_flat(tensors).norm()))
    return 4 * EPS32 * float(np.sum(np.abs(res.weights) * np.array(norms)))


@pytest.mark.parametrize("sigma", [0.07, 0.08, 0.13])
@pytest.mark.parametrize("step", [None, 160])
def test_matches_direct_power_ema_within_cauchy_schwarz_bound(run, sigma: float, step) -> None:
    res = synthesize(run["dir"], sigma_rel=sigma, step=step)
    t_r = res.step
    assert t_r == (step or T) and all(i.step <= t_r for i in res.snapshots)
    g = sigma_rel_to_gamma(sigma)
    target = _power_emas(run["theta"][:t_r], [g])[0][-1]
    diff = float((_flat(res.ema) - target).norm())
    p_norm = math.sqrt((g + 1) ** 2 / ((2 * g + 1) * t_r))
    theta_f = float(run["theta"][:t_r].norm())
    bound = res.error * p_norm * theta_f
    assert diff <= bound + _float32_slack(res)
    # In practice far better than the worst case: < 1e-3 relative to the EMA itself.
    assert diff / float(target.norm()) < 1e-3
    assert 0 < res.error < 0.02 and res.cond > 1
    assert res.sigma_rel == sigma and res.gamma == g


def test_list_of_targets_equals_separate_calls(run) -> None:
    many = synthesize(run["dir"], sigma_rel=[0.06, 0.09, 0.12])
    assert isinstance(many, list) and len(many) == 3
    for res in many:
        one = synthesize(run["dir"], sigma_rel=res.sigma_rel)
        assert not isinstance(one, list)
        assert res.error == one.error and np.array_equal(res.weights, one.weights)
        for k in res.ema:
            assert torch.equal(res.ema[k], one.ema[k]), k


def test_gamma_target_equals_sigma_rel_target(run) -> None:
    a = synthesize(run["dir"], sigma_rel=0.08)
    b = synthesize(run["dir"], gamma=sigma_rel_to_gamma(0.08))
    assert np.array_equal(a.weights, b.weights) and torch.equal(a.ema["blocks.0.bias"], b.ema["blocks.0.bias"])


def test_each_file_is_read_once_for_all_targets(run, monkeypatch) -> None:
    headers: list[pathlib.Path] = []
    bodies: list[str] = []
    real_header, real_open = _files.read_header, _files.open_file

    def count_header(path):
        headers.append(path)
        return real_header(path)

    def count_open(path):
        bodies.append(path)
        return real_open(path)

    monkeypatch.setattr(_files, "read_header", count_header)
    monkeypatch.setattr(_files, "open_file", count_open)
    res = synthesize(run["dir"], sigma_rel=[0.06, 0.07, 0.08, 0.09])
    n = len(list(run["dir"].glob("*.safetensors")))
    assert len(headers) == n and len(set(headers)) == n
    assert len(bodies) == len(res[0].snapshots) == n and len(set(bodies)) == n


def test_integer_and_bool_leaves_come_from_the_target_snapshot(run) -> None:
    res = synthesize(run["dir"], sigma_rel=0.07)
    assert res.ema["count"].dtype == torch.int64 and int(res.ema["count"]) == T
    assert torch.equal(res.ema["flag"], torch.tensor([True, True]))
    res = synthesize(run["dir"], sigma_rel=0.07, step=EVERY * 3)
    assert int(res.ema["count"]) == EVERY * 3 and len(res.snapshots) == 6
    assert torch.equal(res.ema["flag"], torch.tensor([False, True]))


def test_result_layout_and_dtypes(run) -> None:
    res = synthesize(run["dir"], sigma_rel=0.08)
    assert list(res.ema) == ["blocks.0.weight", "blocks.0.bias", "count", "flag"]
    assert res.ema["blocks.0.weight"].dtype == torch.float32 and res.ema["blocks.0.weight"].shape == (6, 8)
    assert res.weights.dtype == np.float64 and res.weights.shape == (len(res.snapshots),)
    with pytest.raises(AttributeError):
        res.error = 0.0  # type: ignore[misc,union-attr]


def test_like_rebuilds_the_structure(run) -> None:
    like = {"blocks": [{"weight": torch.empty(6, 8), "bias": torch.empty(16), "hole": None}], "count": 0, "flag": None}
    like["count"] = torch.empty(())
    like["flag"] = torch.empty(2, dtype=torch.bool)
    res = synthesize(run["dir"], sigma_rel=0.08, like=like)
    flat = synthesize(run["dir"], sigma_rel=0.08).ema
    assert torch.equal(res.ema["blocks"][0]["weight"], flat["blocks.0.weight"])
    assert res.ema["blocks"][0]["hole"] is None and int(res.ema["count"]) == T
    with pytest.raises(ValueError, match=r"like does not have the structure.*'blocks\.0\.bias'"):
        synthesize(run["dir"], sigma_rel=0.08, like={"blocks.0.weight": torch.empty(1)})


def test_written_result_holds_its_diagnostics_and_refuses_a_rebuilt_tree(run, tmp_path: pathlib.Path) -> None:
    res = synthesize(run["dir"], sigma_rel=0.08)
    path = _synthesize.write_synthesized(tmp_path / "r.safetensors", res)
    header = read_header(path)
    meta = json.loads(header.metadata["funcema"])
    assert meta["format"] == "funcema.posthoc.synthesized" and meta["tree"]["paths"] == list(res.ema)
    assert (meta["sigma_rel"], meta["gamma"], meta["step"]) == (0.08, res.gamma, res.step)
    assert (meta["error"], meta["cond"], meta["weights"]) == (res.error, res.cond, res.weights.tolist())
    assert [s["file"] for s in meta["snapshots"]] == [s.path.name for s in res.snapshots]
    like = {"blocks": [{"weight": torch.empty(6, 8), "bias": torch.empty(16)}], "count": torch.empty(()), "flag": torch.empty(2)}
    rebuilt = synthesize(run["dir"], sigma_rel=0.08, like=like)
    with pytest.raises(TypeError, match=r"result\.ema must be the dict path -> tensor"):
        _synthesize.write_synthesized(tmp_path / "t.safetensors", rebuilt)
    assert not (tmp_path / "t.safetensors").exists()


def test_precision_of_accumulators(tmp_path: pathlib.Path) -> None:
    g = sigma_rel_to_gamma(0.1)
    s = gamma_to_sigma_rel(g)
    base = torch.tensor([1.0 + 1e-12, 3.0], dtype=torch.float64)
    for t in (4, 8):
        tree = {"d": base * t, "h": (base * t).half(), "b": (base * t).bfloat16()}
        write_snapshot(tmp_path, tree, step=t, gamma=g, sigma_rel=s, every=1)
    res = synthesize(tmp_path, gamma=g)
    assert res.ema["d"].dtype == torch.float64  # a float64 snapshot keeps a float64 accumulator
    assert res.ema["h"].dtype == torch.float32 and res.ema["b"].dtype == torch.float32
    # Target = the stored profile at t=8: one-hot weights (to cond*eps), so float64 data survive
    # to ~cond * eps64 * 8 (far below the 1e-12 offset a float32 accumulator would erase).
    assert torch.allclose(res.ema["d"], base * 8, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({}, ValueError, "exactly one of sigma_rel and gamma"),
        ({"sigma_rel": 0.1, "gamma": 6.9}, ValueError, "exactly one of sigma_rel and gamma"),
        ({"sigma_rel": 0.5}, ValueError, "sigma_rel must be in"),
        ({"sigma_rel": 0.0}, ValueError, "sigma_rel must be in"),
        ({"gamma": -0.6}, ValueError, "gamma must be greater than -1/2"),
        ({"sigma_rel": []}, ValueError, "empty list"),
        ({"sigma_rel": "0.1"}, TypeError, "sigma_rel must be a number"),
        ({"sigma_rel": 0.1, "step": 17}, ValueError, "step=17 is not a snapshot time"),
        ({"sigma_rel": 0.1, "step": 1.5}, TypeError, "step must be an int"),
        ({"sigma_rel": 0.1, "normalize": 1}, TypeError, "normalize must be a bool"),
    ],
)
def test_bad_arguments(run, kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        synthesize(run["dir"], **kwargs)


def test_empty_directory_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=f"no funcema snapshots.*{tmp_path.name}"):
        synthesize(tmp_path, sigma_rel=0.1)


def test_duplicate_snapshot_is_reported_with_both_files(run, tmp_path: pathlib.Path) -> None:
    d = tmp_path / "dup"
    shutil.copytree(run["dir"], d)
    src = sorted(d.glob("*.safetensors"))[0]
    shutil.copy(src, d / ("copy-" + src.name))
    with pytest.raises(ValueError, match=rf"{src.name} and copy-{src.name}|copy-{src.name} and {src.name}"):
        synthesize(d, sigma_rel=0.08)


def test_progress_bar_can_be_forced(run, capsys) -> None:
    synthesize(run["dir"], sigma_rel=0.08, progress=True)
    assert "synthesizing" in capsys.readouterr().err
    synthesize(run["dir"], sigma_rel=0.08)  # auto: stderr is not a tty under pytest
    assert "synthesizing" not in capsys.readouterr().err


def test_streams_one_snapshot_at_a_time(run, monkeypatch) -> None:
    # Track how many snapshot iterators are open at once: never more than one.
    live = [0]
    peak = [0]
    real = _synthesize.iter_tensors

    def tracked(info):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        try:
            yield from real(info)
        finally:
            live[0] -= 1

    monkeypatch.setattr(_synthesize, "iter_tensors", tracked)
    synthesize(run["dir"], sigma_rel=[0.07, 0.08])
    assert peak[0] == 1


# -- weight sums, normalisation and the error bound --------------------------------------------------


def test_wider_than_positive_gamma_hint_names_an_option_synthesize_has(run) -> None:
    with pytest.raises(ValueError, match=r"pass gamma= with a value in \(-1/2, 0\)") as info:
        synthesize(run["dir"], sigma_rel=0.29)
    assert "allow_negative" not in str(info.value)
    res = synthesize(run["dir"], gamma=-0.3)  # the option the message names works
    assert res.gamma == -0.3


@settings(max_examples=30, deadline=None)
@given(
    value=st.sampled_from([1.0, -0.15625, 3.25, 1000.0]),  # exact in float16 and float32
    times=st.lists(st.integers(1, 400), min_size=1, max_size=10, unique=True),
    targets=st.lists(st.floats(0.02, 0.28), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_constant_parameter_comes_back_as_itself_or_sum_times_itself(value, times, targets, dtype) -> None:
    # Every snapshot stores exactly `value`, so the only rounding is the float32 accumulation of
    # sum_i x_i * value, bounded by g_{n+2} sum_i |x_i| |value| <= rounding_error * |value|; the
    # float64 weights sum to 1 (normalised) or weight_sum up to ~n * eps64 (the 1e-12 term).
    with tempfile.TemporaryDirectory() as d:
        for t in times:
            for sigma in SIGMAS:
                g = sigma_rel_to_gamma(sigma)
                write_snapshot(
                    d, {"c": torch.full((3,), value, dtype=dtype)}, step=t, gamma=g, sigma_rel=sigma, every=1
                )
        for normalize in (True, False):
            try:
                results = synthesize(d, sigma_rel=targets, normalize=normalize)
            except ValueError as err:  # ill-conditioned sets of snapshot times
                assume("ill-conditioned" not in str(err))
                raise
            for res in results:
                expected = value if normalize else res.weight_sum * value
                slack = (res.rounding_error + 1e-12) * abs(value)
                assert torch.all((res.ema["c"].double() - expected).abs() <= slack)
                assert math.isclose(
                    math.fsum(res.weights.tolist()), 1.0 if normalize else res.weight_sum, abs_tol=1e-12
                )


def _every_d_power_ema(theta: torch.Tensor, every: int, step: int, gamma: float) -> torch.Tensor:
    """The power EMA that averages theta at steps every, 2 every, ... <= step, from its weights.

    w_k = (kD/t)**(g+1) - ((k-1)D/t)**(g+1) = int_{(k-1)D}^{kD} p_t: the product rule's EMA,
    written from the formula and not from funcema's update.
    """
    k = torch.arange(1, step // every + 1, dtype=torch.float64)
    w = (k * every / step) ** (gamma + 1) - ((k - 1) * every / step) ** (gamma + 1)
    return (w[:, None] * theta[k.long() * every - 1]).sum(0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    every=st.integers(2, 4),
    calls=st.integers(2, 7),
    spacing=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    target=st.floats(0.03, 0.25),
    earlier=st.integers(0, 2),
    normalize=st.booleans(),
)
def test_documented_error_bound_holds(seed, every, calls, spacing, dtype, target, earlier, normalize) -> None:
    # SynthesisResult's bound, per parameter j:
    #   |ema_j - EMA_j| <= bound * M_j (+ 2**-25 sum_i |x_i| for float16 snapshots),
    # with EMA the exact every-D power EMA and M_j = max |theta_j| over its averaging steps.
    # Proof: EMA_j = int p_r theta~_j and sum_i x_i s_ij = int (sum_i x_i p_i) theta~_j exactly
    # (theta~ piecewise constant over each interval of D steps), so Cauchy-Schwarz gives
    # error * ||p_r|| * ||theta~_j|| <= error * (g+1)/sqrt(2g+1) * M_j; storage and accumulation
    # add rounding_error * M_j (see _rounding_error). The tracked EMAs are float64 here, and their
    # own rounding (~T eps64 M) is the 1e-12 M slack.
    gen = torch.Generator().manual_seed(seed)
    steps = every * spacing * calls
    scale = float(10 ** torch.empty(()).uniform_(-2, 2, generator=gen))
    theta = scale * (torch.cumsum(torch.randn(steps, 16, generator=gen, dtype=torch.float64), 0) / math.sqrt(steps))
    theta[:, 0] = 1.5  # a parameter held constant
    with tempfile.TemporaryDirectory() as d:
        ph = posthoc.init({"w": theta[0]}, sigma_rels=SIGMAS, every=every, dtype=torch.float64)
        for t in range(1, steps + 1):
            ph = posthoc.update(ph, {"w": theta[t - 1]})
            if t % (every * spacing) == 0:
                posthoc.snapshot(ph, d, dtype=dtype)
        t_r = every * spacing * max(calls - earlier, 1)
        try:
            res = synthesize(d, sigma_rel=target, step=t_r, normalize=normalize)
        except ValueError as err:
            assume("ill-conditioned" not in str(err))
            raise
    truth = _every_d_power_ema(theta, every, t_r, res.gamma)
    m = theta[every - 1 : t_r : every].abs().amax(0)
    floor = 2.0**-25 * float(np.abs(res.weights).sum()) * 1.01 if dtype == torch.float16 else 0.0
    diff = (res.ema["w"].double() - truth).abs()
    assert torch.all(diff <= (res.bound + 1e-12) * m + floor), float((diff / m).max())
    u = 2.0**-11 if dtype == torch.float16 else 2.0**-24
    assert res.rounding_error >= u * float(np.abs(res.weights).sum())


def test_rounding_error_reports_the_snapshot_dtype(run, tmp_path: pathlib.Path) -> None:
    # The float32 run against the same snapshots stored in float16: the report grows by the
    # float16 unit roundoff times sum |x_i| (the case: 2e-15 reported, 4.9e-4 real).
    half = tmp_path / "half"
    half.mkdir()
    for info in _files.scan_snapshots(run["dir"]):
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in _files.iter_tensors(info)}
        write_snapshot(half, tensors, step=info.step, gamma=info.gamma, sigma_rel=info.sigma_rel, every=info.every)
    a = synthesize(run["dir"], sigma_rel=0.10)
    b = synthesize(half, sigma_rel=0.10)
    assert np.array_equal(a.weights, b.weights) and a.error == b.error
    s = float(np.abs(a.weights).sum())
    assert 2.0**-24 * s < a.rounding_error < 1e-5 < 2.0**-11 * s < b.rounding_error
    assert b.bound == pytest.approx(b.error * (b.gamma + 1) / math.sqrt(2 * b.gamma + 1) + b.rounding_error)
