"""The package's layering, checked from its source with `ast` (nothing is imported).

- every import inside funcema points to a strictly lower layer (so there is no circle either);
- no module uses another module's private (`_name`) attribute;
- no function is longer than 60 lines unless a comment in it says why (`# long:`);
- every module has its test module, `tests/test_<module>.py`, and a docstring that says what it
  owns and what it must not import.

A new module must be given its layer in `LAYERS`, which is the diagram of docs/architecture.md.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "funcema"

# Bottom to top. A module may import only modules of a lower layer.
LAYERS: list[set[str]] = [
    {"_validate"},
    {"_tree"},
    {"_sigma"},
    {"schedules"},
    {"_state"},
    {"_interp"},
    {"_native"},
    {"_kernels", "_triton", "_dtensor"},
    {"_ops"},
    {"_core"},
    {"_format"},
    {"_io", "nn", "posthoc._files", "posthoc._solve"},
    {"posthoc._state", "posthoc._synthesize"},
    {"posthoc"},
    {"_stateful"},
    {"integrations", "integrations.lightning", "integrations.transformers"},
    {"_cli"},
    {""},  # funcema/__init__.py: re-exports only
    {"__main__"},
]
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}

def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom) -> str | None:
    """The funcema module (dotted, relative to the package) that `from X import ...` names, or None."""
    if node.level == 0:
        if node.module is None or not (node.module == "funcema" or node.module.startswith("funcema.")):
            return None
        return node.module.removeprefix("funcema").lstrip(".")
    is_package = MODULES.get(module) is not None and MODULES[module].name == "__init__.py"
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, int]]:
    """`(imported module, imported name or None, line)` for every funcema import of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            if target is None:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in MODULES:  # `from . import _tree`: a module, not a name
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("funcema"):
                    found.append((alias.name.removeprefix("funcema").lstrip("."), None, node.lineno))
    return found


def module_aliases(module: str) -> dict[str, str]:
    """Local names bound to funcema modules in `module` (`from . import _tree` binds `_tree`)."""
    tree = ast.parse(MODULES[module].read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (target := resolve(module, node)) is not None:
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in MODULES:
                    aliases[alias.asname or alias.name] = sub
    return aliases


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_has_a_layer(module: str) -> None:
    assert module in RANK, f"funcema module {module or '__init__'!r} has no layer: add it to LAYERS."


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    for target, _, line in imports(module):
        if target == module:
            continue
        assert target in RANK, f"{module}:{line} imports {target!r}, which has no layer"
        assert RANK[target] < RANK[module], (
            f"{module}:{line} imports {target!r} from layer {RANK[target]}, not below its own layer {RANK[module]}"
        )


def test_no_import_circles() -> None:
    """Implied by test_imports_point_down; checked directly so the message names the circle."""
    graph = {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail(f"import circle: {' -> '.join([*trail, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module: str) -> None:
    for target, name, line in imports(module):
        private = name is not None and name.startswith("_") and target != module
        if private:
            pytest.fail(f"{module}:{line} imports the private name {name!r} of {target!r}")
    aliases = module_aliases(module)
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert not node.attr.startswith("_"), (
                f"{module}:{node.lineno} uses the private name {node.attr!r} of {aliases[node.value.id]!r}"
            )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short(module: str) -> None:
    source = MODULES[module].read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
            length = node.end_lineno - node.lineno + 1
            explained = any("# long:" in line for line in lines[node.lineno - 1 : node.end_lineno])
            if length > 60 and not explained:
                pytest.fail(f"{module}.{node.name} is {length} lines; split it or say why in a '# long:' comment")


# Package files that hold no code of their own to test: re-exports and the `python -m` entry.
RE_EXPORTS = {"", "__main__", "posthoc", "integrations"}


@pytest.mark.parametrize("module", sorted(set(MODULES) - RE_EXPORTS))
def test_every_module_has_its_test_module(module: str) -> None:
    name = "test_" + module.replace("._", "_").replace(".", "_").lstrip("_") + ".py"
    assert (PACKAGE.parent / "tests" / name).is_file(), f"{module} has no tests/{name}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - RE_EXPORTS))
def test_every_module_says_what_it_owns_and_must_not_import(module: str) -> None:
    docstring = ast.get_docstring(ast.parse(MODULES[module].read_text())) or ""
    assert "Owns:" in docstring and "Must not import:" in docstring, f"{module}'s docstring lacks them"


def test_the_resolver_sees_every_kind_of_import() -> None:
    """Relative, parent-relative, module and absolute imports all resolve (else the checks above are vacuous)."""
    assert ("_state", "EmaState") in {(t, n) for t, n, _ in imports("_core")}  # from ._state import EmaState
    assert ("_tree", None) in {(t, n) for t, n, _ in imports("_core")}  # from . import _tree
    assert ("_core", "match_params") in {(t, n) for t, n, _ in imports("posthoc._state")}  # from .._core import ...
    assert any(t == "_sigma" for t, _, _ in imports("schedules"))  # from funcema import _sigma
    assert module_aliases("_core")["_tree"] == "_tree"
