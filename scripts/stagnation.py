"""Stagnation of a plain EMA late in a long run, and what compensation recovers.

Run from the repository root (about a minute on one CPU core)::

    python scripts/stagnation.py                 # table on stdout, figure docs/img/stagnation.png
    python scripts/stagnation.py --no-figure

The experiment (the numbers quoted in docs/semantics.md):

- ``n`` parameters of order one (magnitudes log-uniform in [0.5, 2], random signs), held in float32;
- a power EMA (σ_rel = 0.05 and 0.10) whose step is set to ``t0 = 10^7`` with ``state._replace``
  (``EmaState`` is a NamedTuple), then 20,000 updates with drifting parameters:
  ``params_k = e0 * (1 + 0.01 z + 1e-4 z_k) + 1e-6 k z'``: about 1% from the average, moving by
  SGD-sized steps;
- the reference is a float64 EMA of the same float32 parameters.

The figure of merit is the error of each EMA's *movement* over the 20,000 steps, relative to the
reference's movement: ``||(x_T - x_0) - (r_T - r_0)|| / ||r_T - r_0||``. 1 means all of the movement is
lost (or drowned in noise), 0 is exact. A second sweep runs the plain and compensated float32 EMAs
for 2,000 steps from several ``t0`` to show where stagnation starts, against the rule of thumb
``t* = (gamma + 1) rho / u`` of docs/semantics.md.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch

import funcema as fe

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # label: (EMA dtype, compensated)
    "float32": (torch.float32, False),
    "float32, compensated": (torch.float32, True),
    "bfloat16 (stochastic rounding)": (torch.bfloat16, False),
    "bfloat16, compensated": (torch.bfloat16, True),
}


def trajectory(n: int, steps: int, seed: int = 0):
    """The starting parameters and a generator of the float32 parameters of each step."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    e0 = (
        sign * torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.5), math.log(2.0), generator=g))
    ).float()
    offset = 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    drift = 1e-6 * torch.randn(n, generator=g, dtype=torch.float64)

    def params(k: int) -> dict[str, torch.Tensor]:
        noise = 1e-4 * torch.randn(n, generator=g, dtype=torch.float64)
        return {"w": (e0.double() * (1 + offset + noise) + drift * k).float()}

    return {"w": e0}, params


def run(sigma_rel: float, t0: int, steps: int, n: int, variants: dict[str, tuple[torch.dtype, bool]]):
    """Movement errors of each variant against the float64 EMA, and the per-step trace of element 0."""
    start, params = trajectory(n, steps)
    schedule = fe.schedules.power(sigma_rel=sigma_rel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fe.StagnationWarning)
        states = {
            label: fe.init(start, schedule=schedule, dtype=dtype, compensated=comp)._replace(step=torch.tensor(t0))
            for label, (dtype, comp) in {"float64": (torch.float64, False), **variants}.items()
        }
    first = {label: value(s).clone() for label, s in states.items()}
    trace = {label: [0.0] for label in states}
    for k in range(steps):
        p = params(k)
        states = {label: fe.update(s, p, donate=True) for label, s in states.items()}
        for label, s in states.items():
            trace[label].append(float(value(s)[0] - first[label][0]))
    moved = value(states["float64"]) - first["float64"]
    errors = {
        label: float(((value(s) - first[label]) - moved).norm() / moved.norm())
        for label, s in states.items()
        if label != "float64"
    }
    return errors, float(moved.abs().mean()), trace


def value(state: fe.EmaState) -> torch.Tensor:
    """The average a state holds, in float64: ``ema``, plus ``compensation`` if it has one."""
    x = state.ema["w"].double()
    return x + state.compensation["w"].double() if state.compensation is not None else x


def figure(path: Path, traces: dict[float, dict[str, list[float]]], sweep: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    trace = traces[0.10]
    styles = {"float64": ("k", "-", 3.0), "float32": ("C3", "-", 2.0), "float32, compensated": ("C0", "--", 1.5)}
    styles |= {"bfloat16 (stochastic rounding)": ("C1", ":", 1.5), "bfloat16, compensated": ("C2", "-", 1.0)}
    for label, (color, ls, lw) in styles.items():
        ax.plot(trace[label], color=color, ls=ls, lw=lw, label=label if label != "float64" else "float64 (reference)")
    ax.set_xlabel("update after step $10^7$")
    ax.set_ylabel("movement of one EMA element")
    ax.set_title("σ_rel = 0.10 at $t = 10^7$")
    ax.legend(fontsize=8)
    ax = axes[1]
    for label, points in sweep.items():
        t, err = zip(*points)
        color = "C0" if "0.05" in label else "C2"
        ax.loglog(t, err, "o--" if "compensated" in label else "o-", color=color, label=label)
    for sigma_rel, color in ((0.05, "C0"), (0.10, "C2")):
        gamma = fe.sigma_rel_to_gamma(sigma_rel)
        ax.axvline((gamma + 1) * 0.01 / 2.0**-24, color=color, ls=":", lw=1)
    ax.set_xlabel("step $t$ at which the 2,000 updates start")
    ax.set_ylabel("error of the movement / movement")
    ax.set_title("float32; dotted: $t^* = (\\gamma+1)\\rho/u$, ρ = 1%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="number of parameters")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    traces = {}
    print(f"{args.steps} updates from t0 = 1e7, {args.n} parameters; error of the movement / movement")
    for sigma_rel in (0.05, 0.10):
        errors, moved, traces[sigma_rel] = run(sigma_rel, 10**7, args.steps, args.n, VARIANTS)
        print(f"σ_rel = {sigma_rel:.2f} (true mean movement {moved:.2e}):")
        for label, err in errors.items():
            print(f"  {label:32s} {err:.2e}")
    sweep: dict[str, list[tuple[int, float]]] = {}
    float32 = {k: v for k, v in VARIANTS.items() if v[0] == torch.float32}
    for sigma_rel in (0.05, 0.10):
        for t0 in (10**4, 10**5, 3 * 10**5, 10**6, 3 * 10**6, 10**7, 10**8):
            errors, _, _ = run(sigma_rel, t0, 2000, 1024, float32)
            for label, err in errors.items():
                sweep.setdefault(f"{label}, σ_rel = {sigma_rel:.2f}", []).append((t0, max(err, 1e-12)))
    print("sweep (2,000 updates from t0):")
    for label, points in sweep.items():
        print(f"  {label:40s} " + "  ".join(f"{t:.0e}:{e:.1e}" for t, e in points))
    if not args.no_figure:
        out = ROOT / "docs" / "img" / "stagnation.png"
        figure(out, traces, sweep)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
