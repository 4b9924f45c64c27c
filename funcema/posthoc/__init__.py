"""Post-hoc EMA (Karras et al. 2024, arXiv 2312.02696): snapshot power EMAs, synthesize any width.

Track a few power-function EMAs during training (`init`, `update`), store them as snapshot
files (`snapshot`), then `synthesize` the EMA of any other width by least squares over their
weight profiles (`solve_weights`), with the reconstruction error reported.

This package file only re-exports; it must not be imported by any module below it (the core,
`_io`, `nn`).
"""

from ._files import SnapshotInfo as SnapshotInfo
from ._files import read_snapshot_info as read_snapshot_info
from ._files import scan_snapshots as scan_snapshots
from ._files import snapshot_filename as snapshot_filename
from ._files import write_snapshot as write_snapshot
from ._solve import inner_product as inner_product
from ._solve import solve_weights as solve_weights
from ._state import PosthocState as PosthocState
from ._state import init as init
from ._state import snapshot as snapshot
from ._state import update as update
from ._synthesize import SynthesisResult as SynthesisResult
from ._synthesize import synthesize as synthesize

__all__ = [
    "PosthocState",
    "init",
    "snapshot",
    "update",
    "SnapshotInfo",
    "SynthesisResult",
    "inner_product",
    "read_snapshot_info",
    "scan_snapshots",
    "snapshot_filename",
    "solve_weights",
    "synthesize",
    "write_snapshot",
]
