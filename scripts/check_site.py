"""Fail when the built documentation site shows markup that its renderer did not understand.

Usage: `python scripts/check_site.py SITE_DIR` (after `mkdocs build -d SITE_DIR`).

mkdocstrings renders docstrings as Markdown, so reST/Sphinx markup in a docstring (a role such as
`:func:` or a directive such as `.. math::`) reaches the page as literal text, and
`mkdocs build --strict` does not notice. This script reads the visible text of every HTML page
(tags removed, entities decoded), reports each raw role or directive with its file, line and
surrounding text, and also fails when the site publishes a Python file (scripts belong outside
`docs/`). Exit status: 0 when clean, 1 when anything was found, 2 on a usage error.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

# Sphinx roles (`:func:`init``, `:py:class:`X``) and reST directives (`.. math::`, `.. note::`).
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|exc|data|obj|const|ref|doc|term|math):`?")
DIRECTIVE = re.compile(r"(?m)^\s*\.\. [a-z][a-z-]*::|\.\. (?:math|note|warning|code-block|seealso|versionadded)::")
TAG = re.compile(r"<[^>]+>")
SKIP_ELEMENTS = re.compile(r"<(script|style)\b.*?</\1>|<!--.*?-->", re.DOTALL | re.IGNORECASE)


def visible_lines(page: str) -> list[tuple[int, str]]:
    """The text of each line of an HTML page without tags, scripts, styles and comments (the docs'
    hidden doc-test code), with its line number.

    Those elements are blanked out line by line, so that line numbers still match the file.
    """
    page = SKIP_ELEMENTS.sub(lambda m: "\n" * m.group(0).count("\n"), page)
    return [(n, html.unescape(TAG.sub("", line))) for n, line in enumerate(page.splitlines(), start=1)]


def problems(site: Path) -> list[str]:
    found = []
    for path in sorted(site.rglob("*.py")):
        found.append(f"{path.relative_to(site)}: a Python file is published; keep scripts out of docs/")
    for path in sorted(site.rglob("*.html")):
        for line_no, text in visible_lines(path.read_text(encoding="utf-8")):
            for pattern, what in ((ROLE, "Sphinx role"), (DIRECTIVE, "reST directive")):
                for match in pattern.finditer(text):
                    start = max(0, match.start() - 40)
                    context = text[start : match.end() + 40].strip()
                    found.append(
                        f"{path.relative_to(site)}:{line_no}: raw {what} {match.group(0).strip()!r} in: {context!r}"
                    )
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/check_site.py SITE_DIR (a directory built by mkdocs build)", file=sys.stderr)
        return 2
    found = problems(Path(argv[0]))
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} problem(s) in the built site {argv[0]}")
        return 1
    print(f"site {argv[0]}: no raw Sphinx roles or reST directives, no published Python files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
