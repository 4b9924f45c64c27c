"""Benchmark post-hoc EMA synthesis: time against reading the snapshots once, and peak memory.

Writes ``--snapshots`` snapshot files (K=2 power EMAs, snapshotted every few steps) of a float32
tree of ``--params`` parameters (gpt2-like shapes scaled down; the default 12.4M parameters is a
tenth of gpt2: 32 x 500 MB does not fit this machine's time budget, 32 x 50 MB does), then times

- reading every snapshot file once (``readinto`` a reused 64 MiB buffer: the I/O floor), and
- ``fe.posthoc.synthesize(DIR, sigma_rel=0.08)``,

both from the page cache (the files were just written; the cache is not dropped), and samples the
process's resident memory during synthesis. Targets: synthesis <= 2x the read time, and extra peak
memory <= 3 snapshots' worth.

`--solver` instead times the least-squares solve with its error quadrature (no files) for 128
snapshots at large gamma, in four layouts; target <= 2 s each at gamma = 1e4.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile
import threading
import time

import torch

import funcema as fe


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Sample the resident set size every millisecond in a background thread."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def tree(numel: int) -> dict[str, torch.Tensor]:
    """Linear layers of 768 x 3072-ish blocks until ``numel`` parameters are reached."""
    out: dict[str, torch.Tensor] = {}
    i = 0
    while numel > 0:
        n = min(numel, 768 * 3072)
        out[f"block{i}.weight"] = torch.randn(n // 768 if n >= 768 else 1, min(n, 768))
        out[f"block{i}.bias"] = torch.randn(768)
        numel -= out[f"block{i}.weight"].numel() + 768
        i += 1
    return out


def solver_layouts() -> list[tuple[str, list[float], list[float], float, float]]:
    """(name, steps, gammas, target step, target gamma): 128 snapshots with gamma up to 1e4."""
    g05, g10 = fe.sigma_rel_to_gamma(0.05), fe.sigma_rel_to_gamma(0.10)
    linear = [1000.0 * k for k in range(1, 129)]
    pairs = [1000.0 * k for k in range(1, 65) for _ in range(2)]
    geometric = sorted({float(round(100 * 10 ** (4 * k / 127))) for k in range(128)})
    return [
        ("128 times, gamma 1e4 -> 7e3", linear, [1e4] * 128, linear[-1], 7e3),
        ("64 times x gamma {1e4, 5e3} -> 7e3", pairs, [1e4, 5e3] * 64, pairs[-1], 7e3),
        ("128 geometric times 1e2..1e6, gamma 1e4 -> 5e3", geometric, [1e4] * len(geometric), geometric[-1], 5e3),
        ("64 times x default pair -> gamma 1e4", pairs, [g05, g10] * 64, pairs[-1], 1e4),
    ]


def bench_solver(repeats: int = 3) -> None:
    """Print the best of `repeats` wall times of `solve` (weights, cond and error) per layout."""
    from funcema.posthoc._solve import solve

    for name, steps, gammas, t_r, g_r in solver_layouts():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sol = solve(steps, gammas, t_r, g_r)
            times.append(time.perf_counter() - t0)
        print(f"{name:48s} {min(times):8.3f} s  error {sol.error:.3e}  cond {sol.cond:.2e}  (target <= 2 s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=12.4e6, help="parameters per snapshot (default 12.4M)")
    parser.add_argument("--snapshots", type=int, default=32, help="snapshot files (2 per snapshot call)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed)")
    parser.add_argument("--solver", action="store_true", help="time the least-squares solve at large gamma only")
    args = parser.parse_args(argv)
    if args.solver:
        bench_solver()
        return 0
    if not (hasattr(fe, "posthoc") and hasattr(fe.posthoc, "snapshot") and hasattr(fe.posthoc, "synthesize")):
        print("funcema.posthoc.snapshot/synthesize are not available; nothing to benchmark.")
        return 0
    directory = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="funcema-posthoc-bench-"))
    try:
        params = tree(int(args.params))
        numel = sum(t.numel() for t in params.values())
        snapshot_bytes = numel * 4
        state = fe.posthoc.init(params, sigma_rels=(0.05, 0.10))
        t0 = time.perf_counter()
        for _ in range(args.snapshots // 2):
            for _ in range(4):
                state = fe.posthoc.update(state, params, donate=True)
            fe.posthoc.snapshot(state, directory)
        write_s = time.perf_counter() - t0
        files = sorted(p for p in directory.iterdir() if p.is_file())
        total = sum(p.stat().st_size for p in files)
        del state

        buf = memoryview(bytearray(64 * 2**20))  # reused: time the reads, not allocations
        t0 = time.perf_counter()
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        read_s = time.perf_counter() - t0

        with PeakRss() as rss:
            t0 = time.perf_counter()
            result = fe.posthoc.synthesize(directory, sigma_rel=0.08, progress=False)
            synth_s = time.perf_counter() - t0
        extra = rss.peak - rss.base
        print(
            f"tree: {len(params)} tensors, {numel / 1e6:.1f}M float32 parameters ({snapshot_bytes / 1e6:.0f} MB/snapshot)"
        )
        print(f"snapshots: {len(files)} files, {total / 1e9:.2f} GB, written in {write_s:.1f} s")
        print(f"read every file once (page cache): {read_s:.3f} s ({total / read_s / 1e9:.1f} GB/s)")
        print(
            f"synthesize(sigma_rel=0.08):        {synth_s:.3f} s = {synth_s / read_s:.2f}x the read time (target <= 2x)"
        )
        print(
            f"peak extra resident memory during synthesis: {extra / 1e6:.0f} MB = "
            f"{extra / snapshot_bytes:.2f} snapshots (target <= 3)"
        )
        print(f"reconstruction error {result.error:.2e}, cond {result.cond:.2e}")
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
