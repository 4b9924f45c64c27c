"""Regenerate the figures of the documentation into `docs/img/`.

Run from the repository root::

    python scripts/make_figures.py              # all figures (the digits example takes ~20 s to 2 min)
    python scripts/make_figures.py --skip-digits

Figures:

- `schedules.png`: the per-step decay `d(u)` of every schedule in `funcema.schedules`.
- `posthoc_profiles.png`: power-EMA weight profiles and a least-squares reconstruction.
- `digits_sigma_rel.png`: validation loss against `sigma_rel` from `examples/train_digits.py`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import funcema as fe

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"


def schedules_figure(path: Path) -> None:
    schedules = {
        "constant(0.999)": fe.schedules.constant(0.999),
        "warmup()": fe.schedules.warmup(),
        "warmup(power=3/4)": fe.schedules.warmup(power=3 / 4),
        "litema()": fe.schedules.litema(),
        "power(sigma_rel=0.05)": fe.schedules.power(sigma_rel=0.05),
        "power(sigma_rel=0.10)": fe.schedules.power(sigma_rel=0.10),
        "halflife(500, rampup=0.05)": fe.schedules.halflife(500, rampup=0.05),
    }
    u = np.unique(np.round(np.geomspace(1, 1e6, 600)).astype(np.int64))
    fig, (ax, ax_log) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for k, (name, s) in enumerate(schedules.items()):
        d = np.array([s(int(v)) for v in u])
        style = "--" if k % 2 else "-"
        ax.semilogx(u, d, style, label=name)
        with np.errstate(divide="ignore"):
            ax_log.loglog(u, 1.0 / np.maximum(1.0 - d, 1e-300), style, label=name)
    ax.set_xlabel("averaging step u")
    ax.set_ylabel("decay d(u)")
    ax.set_title("per-step decay")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax_log.set_xlabel("averaging step u")
    ax_log.set_ylabel("1 / (1 - d(u))")
    ax_log.set_title("effective averaging length (steps)")
    ax_log.set_ylim(0.8, 2e6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
    """The weight profile of a power EMA read at time ``t``: ``(g+1)/t (tau/t)**g`` on (0, t]."""
    return np.where(tau <= t, (gamma + 1) / t * (np.clip(tau, 0, t) / t) ** gamma, 0.0)


def profiles_figure(path: Path) -> None:
    total, n_snap = 1000, 8
    times = np.linspace(total / n_snap, total, n_snap)
    tracked = [fe.sigma_rel_to_gamma(s) for s in (0.05, 0.10)]
    steps = np.repeat(times, 2)
    gammas = np.tile(tracked, n_snap)
    tau = np.linspace(0, total, 4001)[1:]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), constrained_layout=True)
    ax = axes[0]
    for t in times:
        for g, color in zip(tracked, ("C0", "C1")):
            ax.plot(tau, profile(tau, t, g), color=color, linewidth=0.8, alpha=0.7)
    ax.plot([], [], color="C0", label=r"$\sigma_\mathrm{rel}=0.05$ snapshots")
    ax.plot([], [], color="C1", label=r"$\sigma_\mathrm{rel}=0.10$ snapshots")
    ax.set_title(f"stored profiles: 2 EMAs x {n_snap} snapshots")
    ax.set_xlabel(r"training step $\tau$")
    ax.set_ylabel(r"weight $p(\tau)$")
    ax.legend(fontsize=8)
    ax = axes[1]
    for k, sigma in enumerate((0.03, 0.08, 0.20)):
        g = fe.sigma_rel_to_gamma(sigma)
        weights, err = fe.posthoc.solve_weights(steps, gammas, total, g)
        recon = sum(w * profile(tau, t, gi) for w, t, gi in zip(weights, steps, gammas))
        ax.plot(tau, profile(tau, total, g), color=f"C{k + 2}", linewidth=2.0, alpha=0.5)
        ax.plot(
            tau, recon, "--", color=f"C{k + 2}", linewidth=1.2,
            label=rf"$\sigma_\mathrm{{rel}}={sigma}$: relative error {err:.1e}",
        )
    ax.set_title("targets (solid) and least-squares reconstructions (dashed)")
    ax.set_xlabel(r"training step $\tau$")
    ax.legend(fontsize=8, loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def digits_figure(path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    import train_digits

    with tempfile.TemporaryDirectory() as tmp:
        summary = train_digits.main(["--out", tmp, "--quiet"])
        shutil.copyfile(summary["plot"], path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-digits", action="store_true", help="do not rerun examples/train_digits.py")
    args = p.parse_args(argv)
    IMG.mkdir(parents=True, exist_ok=True)
    schedules_figure(IMG / "schedules.png")
    profiles_figure(IMG / "posthoc_profiles.png")
    if not args.skip_digits:
        digits_figure(IMG / "digits_sigma_rel.png")
    print(f"figures written to {IMG}")


if __name__ == "__main__":
    main()
