"""Every ```` ```python ```` block of README.md and docs/*.md runs.

Conventions (for whoever writes a page):

- The ```` ```python ```` blocks of one page run in document order in one namespace, in a fresh
  temporary working directory (files a block writes vanish), with ``torch.manual_seed(0)``. Other
  fences (``bash``, ``text``) are not run.
- **Hidden code** is an HTML comment that opens with ``<!-- doc-test`` on a line of its own and
  closes with ``-->`` on a line of its own::

      <!-- doc-test
      model = MyModel()          # setup a fragment needs, or a check of what a block computed
      -->

  It runs at its place in the order, and neither GitHub nor mkdocs shows it. Use it for the setup
  that a fragment needs (a model, a loader, an ``evaluate``) and for checks of what a visible
  block computed (an ``assert`` against a peer library's own result).
- **Markers** are one-line comments directly before a ```` ```python ```` block:
  ``<!-- doc-test skip="reason" -->`` never runs the block (for what cannot run here: several
  processes, CUDA); ``<!-- doc-test requires="ema_pytorch" -->`` runs it only where that module is
  installed. ``requires="..."`` also goes on the opening line of hidden code. A skip needs a
  non-empty reason. Every block that does not run is reported by ``test_block_not_run`` as a
  skipped test carrying its page, line and reason (``pytest -ra`` lists them).

Why this shape: the comments are invisible on GitHub and on the site alike, the fences stay plain
```` ```python ```` (highlighted everywhere), and a reader sees exactly the code that runs.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^[ \t]*<!--[ \t]*doc-test\b(?P<args>.*?)(?P<close>-->)?[ \t]*$")
_ARG = re.compile(r'\s*(?P<key>[a-z]+)="(?P<value>[^"]*)"')
_KEYS = {"skip", "requires"}


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the first line of code
    code: str
    hidden: bool
    skip: str | None = None  # the reason, when marked skip="..."
    requires: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def reason_not_run(self) -> str | None:
        if self.skip is not None:
            return self.skip
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"needs {', '.join(missing)}, not installed" if missing else None


def _parse_args(text: str, where: str) -> dict[str, str]:
    args, pos = {}, 0
    for match in _ARG.finditer(text):
        if match.start() != pos or match.group("key") not in _KEYS:
            break
        args[match.group("key")] = match.group("value")
        pos = match.end()
    if text[pos:].strip():
        raise ValueError(
            f'{where}: cannot read doc-test arguments {text.strip()!r}; expected skip="reason" or requires="module"'
        )
    if "skip" in args and not args["skip"].strip():
        raise ValueError(f'{where}: skip="" needs a reason')
    return args


def _requires(args: dict[str, str]) -> tuple[str, ...]:
    return tuple(m.strip() for m in args.get("requires", "").split(",") if m.strip())


def parse(path: Path, root: Path = ROOT) -> list[Block]:
    """The runnable blocks of a Markdown page, visible and hidden, in document order."""
    page = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    pending: tuple[dict[str, str], int] | None = None  # a marker waiting for its block
    i = 0
    while i < len(lines):
        fence, marker = _FENCE.match(lines[i]), _MARKER.match(lines[i])
        if fence:
            indent, ticks = fence.group("indent"), fence.group("fence")
            end = i + 1
            while end < len(lines) and not re.match(
                rf"^{re.escape(indent)}{ticks[0]}{{{len(ticks)},}}\s*$", lines[end]
            ):
                end += 1
            language = fence.group("info").strip().split(" ")[0].lstrip("{.")
            if language == "python":
                code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end])
                args = pending[0] if pending else {}
                blocks.append(Block(page, i + 2, code, False, args.get("skip"), _requires(args)))
                pending = None
            elif pending:
                raise ValueError(f"{page}:{pending[1]}: a doc-test marker must precede a ```python block")
            i = end + 1
            continue
        if marker:
            where = f"{page}:{i + 1}"
            if pending:
                raise ValueError(f"{page}:{pending[1]}: a doc-test marker must precede a ```python block")
            args = _parse_args(marker.group("args"), where)
            if marker.group("close"):  # a one-line marker for the next block
                pending = (args, i + 1)
            else:  # hidden code up to a line "-->"
                end = i + 1
                while end < len(lines) and lines[end].strip() != "-->":
                    end += 1
                if end == len(lines):
                    raise ValueError(f"{where}: hidden doc-test code is not closed by a line '-->'")
                if "skip" in args:
                    raise ValueError(f"{where}: hidden code cannot be skipped; delete it instead")
                code = "\n".join(lines[i + 1 : end])
                blocks.append(Block(page, i + 2, textwrap.dedent(code), True, None, _requires(args)))
                i = end
        i += 1
    if pending:
        raise ValueError(f"{page}:{pending[1]}: a doc-test marker must precede a ```python block")
    return blocks


BLOCKS = {str(p.relative_to(ROOT)): parse(p) for p in PAGES}
NOT_RUN = [(b.where, b.reason_not_run()) for blocks in BLOCKS.values() for b in blocks if b.reason_not_run()]


@pytest.mark.parametrize("page", [p for p, blocks in BLOCKS.items() if blocks])
def test_page(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks of one page run in order in one namespace, and none raises."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # The pages use tiny models, for which threads only contend: measured on 2 loaded cores, the
    # migration page took 2.8 s with one thread and 135 s with two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(page)
    finally:
        torch.set_num_threads(threads)


def _run(page: str) -> None:
    namespace: dict[str, object] = {"__name__": f"doc_test_{Path(page).stem}"}
    for block in BLOCKS[page]:
        if block.reason_not_run():
            continue
        # Pad with empty lines so that a traceback names the line of the Markdown page.
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(ROOT / block.page), "exec"), namespace)


@pytest.mark.parametrize(
    ("where", "reason"), NOT_RUN or [pytest.param("", "", marks=pytest.mark.skip("every block runs"))]
)
def test_block_not_run(where: str, reason: str) -> None:
    """Each block that does not run is listed with its reason (``pytest -ra`` shows them)."""
    assert reason.strip(), f"{where}: a block that does not run needs a reason"
    pytest.skip(f"{where}: not run: {reason}")


def test_every_python_fence_is_parsed() -> None:
    """No ```` ```python ```` block escapes the runner: the count of opening fences (found by a
    plain text search) equals the count of visible blocks the parser returns, page by page."""
    for path in PAGES:
        text = path.read_text(encoding="utf-8")
        fences = len(re.findall(r"^[ \t]*```python\b", text, flags=re.MULTILINE))
        visible = [b for b in BLOCKS[str(path.relative_to(ROOT))] if not b.hidden]
        assert fences == len(visible), f"{path.name}: {fences} ```python fences, {len(visible)} parsed"
        assert not re.search(r"^[ \t]*```(py|python3|pycon)\s*$", text, flags=re.MULTILINE), (
            f"{path.name}: use ```python for Python code so that it runs in CI"
        )


MAX_CODE_COLUMNS = 80  # what the site's code column shows at a 1280-pixel window (measured: ~83)


def test_code_lines_fit_the_page() -> None:
    """Visible Python lines fit the site's code column, so nothing needs the wrap of extra.css."""
    long = [
        f"{b.page}:{b.line + i}: {len(line)} columns"
        for blocks in BLOCKS.values()
        for b in blocks
        if not b.hidden
        for i, line in enumerate(b.code.splitlines())
        if len(line) > MAX_CODE_COLUMNS
    ]
    assert not long, f"code lines longer than {MAX_CODE_COLUMNS} columns: {long}"


def test_parser_conventions(tmp_path: Path) -> None:
    """The runner itself: markers attach to the next block, hidden code is found, mistakes are refused."""
    page = tmp_path / "page.md"

    def blocks(text: str) -> list[Block]:
        page.write_text(text)
        return parse(page, root=tmp_path)

    got = blocks(
        "<!-- doc-test\nx = 1\n-->\n\n```python\ny = x\n```\n\n"
        '<!-- doc-test skip="needs 2 processes" -->\n```python\nlaunch()\n```\n\n'
        "```bash\necho hi\n```\n\n"
        '- item\n\n    <!-- doc-test requires="no_such_module_xyz" -->\n    ```python\n    z = 1\n    ```\n'
    )
    assert [(b.line, b.code, b.hidden) for b in got] == [
        (2, "x = 1", True),
        (6, "y = x", False),
        (11, "launch()", False),
        (22, "z = 1", False),
    ]
    assert got[2].reason_not_run() == "needs 2 processes"
    assert got[3].reason_not_run() == "needs no_such_module_xyz, not installed"
    assert got[1].reason_not_run() is None
    for bad in (
        '<!-- doc-test skip="" -->\n```python\nx\n```\n',
        '<!-- doc-test skip="why" -->\n```bash\nx\n```\n',
        '<!-- doc-test sikp="why" -->\n```python\nx\n```\n',
        "<!-- doc-test\nx = 1\n",
        '<!-- doc-test skip="why" -->\n',
    ):
        with pytest.raises(ValueError, match=r"page\.md:\d+"):
            blocks(bad)


def _check_site():
    spec = importlib.util.spec_from_file_location("check_site", ROOT / "scripts" / "check_site.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_site_reports_raw_sphinx_markup(tmp_path: Path) -> None:
    """scripts/check_site.py (run by CI after mkdocs build) names file, line and text of each raw
    role or directive and of a published Python file, and passes a clean page."""
    check_site = _check_site()
    (tmp_path / "api").mkdir()
    (tmp_path / "index.html").write_text("<p>See <a href='api/'><code>fe.init</code></a>.</p>\n<pre>x = 1</pre>\n")
    assert check_site.problems(tmp_path) == []
    (tmp_path / "api" / "index.html").write_text(
        "<html>\n<script>var a = ':func:';</script>\n<p>Read a state written by :func:<code>save</code>.</p>\n"
        "<!-- hidden\n:meth:`x`\n-->\n"
        "<p>.. math:: \\text{ema}</p>\n<p>A :class:`Constant` schedule.</p>\n"
    )
    (tmp_path / "make_figures.py").write_text("print(1)\n")
    found = check_site.problems(tmp_path)
    assert len(found) == 4, found
    assert found[0].startswith("make_figures.py: a Python file is published")
    assert found[1].startswith("api/index.html:3: raw Sphinx role ':func:'") and "written by :func:save" in found[1]
    assert found[2].startswith("api/index.html:7: raw reST directive '.. math::'")
    assert found[3].startswith("api/index.html:8: raw Sphinx role ':class:`'")
    assert check_site.main([str(tmp_path)]) == 1
    assert check_site.main([str(tmp_path / "missing")]) == 2
