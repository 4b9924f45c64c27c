"""Shared test configuration.

Hypothesis runs under a pinned profile so that the suite is deterministic: ``ci`` (the default)
derandomises the search and keeps no example database, so every run of a clean clone tries the
same examples. Set ``HYPOTHESIS_PROFILE=explore`` to search with fresh random examples locally;
keep every falsifying example found that way as an ``@example`` on its test.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
