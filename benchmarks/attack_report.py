"""The outcome table that `attack_core.py` and `attack_files.py` print (Markdown, for docs/reliability.md)."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch

import funcema as fe

OUTCOMES = ("clear", "correct", "raw", "hang", "silent")


def print_table(results: Mapping[str, Mapping[str, int]]) -> None:
    """One row per attack class: its number of cases and the count of each outcome."""
    print("| class | cases | clear errors | correct results | raw exceptions | hangs | silent wrong results |")
    print("|---|---|---|---|---|---|---|")
    for cls, counts in results.items():
        print(f"| {cls} | {sum(counts.values())} | " + " | ".join(str(counts[c]) for c in OUTCOMES) + " |")
    print(f"\nfuncema {fe.__file__}, torch {torch.__version__}, Python {sys.version.split()[0]}", file=sys.stderr)
