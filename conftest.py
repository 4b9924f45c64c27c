"""pytest configuration for the whole checkout (the test command collects `tests/` and `funcema/`).

The integration modules' doctests import their frameworks, which are extras: without the extra
installed, its module is not collected (its tests in `tests/` skip with the same reason), so
`pip install -e ".[test]" && python -m pytest` passes without the frameworks.
"""

from __future__ import annotations

import importlib.util

collect_ignore = [
    f"funcema/integrations/{name}.py" for name in ("lightning", "transformers") if importlib.util.find_spec(name) is None
]
