"""The ``funcema`` command line: synthesize post-hoc EMAs and inspect snapshot directories.

    funcema synthesize DIR --sigma-rel 0.05 0.08 --out OUT [--step T]
    funcema synthesize DIR --gamma 6.94 --out OUT
    funcema inspect DIR [--grid 25] [--plot errors.png] [--skip-invalid]

Errors print one line to stderr and exit with status 2 (never a traceback). The error grid of
`inspect` always holds the tracked widths themselves, where the reconstruction error is zero.

Owns: the `funcema` command: its arguments, its one-line errors and its exit statuses.

Must not import: `_core`, `_io`, `nn`, `_stateful` or the integrations; it reads and writes
snapshot files through `posthoc` only.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["main"]


class _UsageError(Exception):
    """A command-line usage error (argparse's are turned into this, printed on one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="funcema", description="Post-hoc EMA tools (Karras et al. 2024).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    syn = sub.add_parser("synthesize", help="synthesize EMAs of new widths from snapshots")
    syn.add_argument("directory", metavar="DIR", help="directory of snapshot files")
    target = syn.add_mutually_exclusive_group(required=True)
    target.add_argument("--sigma-rel", type=float, nargs="+", metavar="S", help="target width(s) sigma_rel")
    target.add_argument("--gamma", type=float, nargs="+", metavar="G", help="target exponent(s) gamma")
    syn.add_argument("--step", type=int, default=None, metavar="T", help="target snapshot time (default: latest)")
    syn.add_argument("--out", required=True, metavar="OUT", help="output directory (created if missing)")
    syn.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    ins = sub.add_parser("inspect", help="list snapshots and the reconstruction error over sigma_rel")
    ins.add_argument("directory", metavar="DIR", help="directory of snapshot files")
    ins.add_argument("--grid", type=int, default=25, metavar="N", help="number of sigma_rel grid points (25)")
    ins.add_argument("--min", type=float, default=0.01, dest="lo", metavar="S", help="smallest sigma_rel (0.01)")
    ins.add_argument("--max", type=float, default=0.25, dest="hi", metavar="S", help="largest sigma_rel (0.25)")
    ins.add_argument("--step", type=int, default=None, metavar="T", help="target snapshot time (default: latest)")
    ins.add_argument("--plot", default=None, metavar="FILE.png", help="also plot error against sigma_rel")
    ins.add_argument(
        "--skip-invalid", action="store_true", help="skip corrupt or invalid files (listed) instead of failing"
    )
    return parser


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _synthesize(args: argparse.Namespace) -> int:
    from .posthoc._synthesize import synthesize, write_synthesized

    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory.")
    progress = False if args.no_progress else None
    if args.sigma_rel is not None:
        results = synthesize(args.directory, sigma_rel=list(args.sigma_rel), step=args.step, progress=progress)
    else:
        results = synthesize(args.directory, gamma=list(args.gamma), step=args.step, progress=progress)
    assert isinstance(results, list)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for res in results:
        name = f"synth-s{res.sigma_rel:.6g}-g{res.gamma:.6g}-{res.step:010d}.safetensors"
        path = write_synthesized(out / name, res)
        rows.append(
            [
                f"{res.sigma_rel:.4f}",
                f"{res.gamma:.4f}",
                f"{res.error:.3e}",
                f"{res.cond:.3e}",
                str(len(res.snapshots)),
                str(path),
            ]
        )
    print(_table(["sigma_rel", "gamma", "error", "cond", "snapshots", "file"], rows))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .posthoc._files import scan_snapshots

    if args.grid < 1:
        raise ValueError(f"--grid must be >= 1, got {args.grid}.")
    if not (0.0 < args.lo <= args.hi) or not math.isfinite(args.hi):
        raise ValueError(f"need 0 < --min <= --max, got {args.lo} and {args.hi}.")
    plot = _pyplot() if args.plot is not None else None
    infos = scan_snapshots(args.directory, skip_invalid=args.skip_invalid)
    print(f"{len(infos)} snapshots in {args.directory}:")
    rows = [[str(i.step), f"{i.gamma:.4f}", f"{i.sigma_rel:.4f}", i.dtype, i.path.name] for i in infos]
    print(_table(["step", "gamma", "sigma_rel", "dtype", "file"], rows))
    if infos.skipped:
        print(f"\nskipped {len(infos.skipped)} files:")
        print(_table(["file", "reason"], [[p.name, " ".join(r.split())] for p, r in infos.skipped]))
    times = sorted({i.step for i in infos})
    t_r = times[-1] if args.step is None else args.step
    if t_r not in times:
        raise ValueError(f"--step {t_r} is not a snapshot time (latest: {times[-1]}).")
    used = [i for i in infos if i.step <= t_r]
    grid = _grid(args, used)
    errors, rows = _error_grid(grid, used, t_r)
    print(f"\nreconstruction error at step {t_r} from {len(used)} snapshots (* a tracked width):")
    print(_table(["sigma_rel", "gamma", "error", "cond", ""], rows))
    if plot is not None:
        _plot(plot, args.plot, grid, errors, used, t_r)
        print(f"\nplot written to {args.plot}")
    return 0


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install funcema[plot]") from None
    return matplotlib.pyplot


def _grid(args: argparse.Namespace, used: Sequence[Any]) -> list[tuple[float, float, bool]]:
    """`(sigma_rel, gamma, tracked)` of a geometric grid plus every tracked width, exactly, sorted.

    A tracked width keeps the stored gamma (not one recomputed from sigma_rel), so its error is
    the exact zero of the least-squares fit, and the plot shows the dip at each tracked width.
    """
    from ._sigma import sigma_rel_to_gamma

    tracked = {i.gamma: i.sigma_rel for i in used}
    points = np.geomspace(args.lo, args.hi, args.grid) if args.grid > 1 else np.array([args.lo])
    near = [s for s in points if any(math.isclose(s, t, rel_tol=1e-9) for t in tracked.values())]
    grid = [(float(s), sigma_rel_to_gamma(float(s)), False) for s in points if s not in near]
    grid += [(s, g, True) for g, s in tracked.items()]
    return sorted(grid)


def _error_grid(
    grid: Sequence[tuple[float, float, bool]], used: Sequence[Any], t_r: int
) -> tuple[list[float], list[list[str]]]:
    from .posthoc._solve import solve

    steps = [float(i.step) for i in used]
    gammas = [i.gamma for i in used]
    errors, rows = [], []
    for s, g, tracked in grid:
        mark = "*" if tracked else ""
        try:
            sol = solve(steps, gammas, float(t_r), g)
            errors.append(sol.error)
            rows.append([f"{s:.4f}", f"{g:.4f}", f"{sol.error:.3e}", f"{sol.cond:.3e}", mark])
        except ValueError as err:
            errors.append(math.nan)
            rows.append([f"{s:.4f}", f"{g:.4f}", "n/a", str(err).split(":")[0], mark])
    return errors, rows


def _plot(
    plot: Any, file: str, grid: Sequence[tuple[float, float, bool]], errors: list[float], used: Any, t_r: int
) -> None:
    fig, ax = plot.subplots(figsize=(6, 4))
    # an error of exactly 0 (a tracked width) has no log: show it at the bottom of the axis
    floor = min([e for e in errors if e > 0] or [1e-16]) / 10
    ax.loglog([s for s, _, _ in grid], [max(e, floor) for e in errors], marker="o")
    for s in sorted({i.sigma_rel for i in used}):
        ax.axvline(s, color="gray", linestyle=":")
    ax.set_xlabel("sigma_rel")
    ax.set_ylabel("relative L2 profile error")
    ax.set_title(f"post-hoc EMA reconstruction at step {t_r}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(file)
    plot.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``funcema`` command line; return the exit status (2 on any error)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except _UsageError as err:
        print(f"funcema: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = _synthesize(args) if args.command == "synthesize" else _inspect(args)
        except Exception as err:  # the command line reports every failure on one line, never a traceback
            status = 2
            known = isinstance(err, (ValueError, TypeError, OSError))
            text = str(err) if known else f"{type(err).__name__}: {err}"
            message: str | None = " ".join(text.split())
        else:
            message = None
    for w in caught:
        print(f"funcema: warning: {w.message}", file=sys.stderr)
    if message is not None:
        print(f"funcema: error: {message}", file=sys.stderr)
    return status
