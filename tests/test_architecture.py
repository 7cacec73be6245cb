"""The import structure of the product (karma/, services/), read with `ast` (no module is imported).

Rules, checked on every module under karma/ and services/:

1. **No circle at module level.** The graph has an edge A -> B when A's module-level code imports project
   module B (`import B`, `from B import x`, `from pkg import B`, relative imports resolved; statements
   inside `if`/`try` at module level count; `if TYPE_CHECKING:` blocks do not, they never run). Importing
   `a.b.c` also runs the `__init__` of `a` and `a.b`; that implicit edge is *not* added, otherwise every
   package whose `__init__` re-exports a submodule would be a circle of one package with itself.
2. **Function-level imports do not hide a circle either**, except the few listed in
   `ACCEPTED_LAZY_CYCLES`: an import inside a function runs later than module import, so a circle made of
   lazy edges cannot fail at import time, but it still means two modules know each other. Each accepted
   circle names why; a new one fails the test.
3. **No product module imports test support** (`tests`, `tests.*`, `conftest`, `helpers`) at any level:
   test support lives in tests/support.py, outside the product, and depends on the product, never the
   reverse.

4. **The app layer sits above the library.** The app layer is what a user runs: `karma.cli`, `karma.demo`,
   `karma.experiment.*` and every stage's command module (`*.cli`). No library module imports an app module,
   at any level; an app module may import anything.

Pure `ast`: the whole walk takes well under a second.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("karma", "services")
TEST_SUPPORT = ("tests", "conftest", "helpers", "support")

#: circles made only of function-level imports that are accepted (frozenset of the modules in the circle)
ACCEPTED_LAZY_CYCLES: dict[frozenset[str], str] = {
    frozenset({"karma.client", "karma.integrations.trl"}): (
        "the TRL adapter moved from karma.client to karma.integrations.trl (which builds on RewardClient); "
        "`karma.client.trl_reward_func` stays importable for existing callers through a module "
        "`__getattr__` that imports it on first use. Dropping that re-export opens the circle."
    ),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[_module_name(path)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import node, at module level?) for every import that can run; TYPE_CHECKING blocks skipped."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_stmt(sub, top)
                continue
            visit_stmt(child, top)

    def visit_stmt(child: ast.AST, top: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append((child, top))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            visit(child, False)
        else:  # class bodies run at import time: they keep `top`
            visit(child, top)

    visit(tree, True)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The project modules (or any module, for test-support checks) an import statement names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        out.add(sub if sub in known else prefix)
    return out


@functools.cache
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-level edges, every imported name) between/of project modules.

    Cached: parsed once per session (the callers only read it)."""
    mods = project_modules()
    known = set(mods)
    top: dict[str, set[str]] = {m: set() for m in mods}
    lazy: dict[str, set[str]] = {m: set() for m in mods}
    named: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, at_top in _imports(tree):
            for target in _targets(node, mod, path.name == "__init__.py", known):
                named[mod].add(target)
                if target in known and target != mod:
                    (top if at_top else lazy)[mod].add(target)
    return top, lazy, named


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(out)


def test_the_walk_sees_the_product():
    top, lazy, _ = import_graph()
    assert {
        "karma.cli",
        "karma.data.prepare",
        "services.reward_api.main",
        "services.policy_trainer.trainer",
    } <= set(top)
    assert "karma.data.records" in top["karma.data.prepare"]  # a module-level edge
    assert any(lazy.values())  # and function-level ones are found too


def test_no_import_circle_at_module_level():
    top, _, _ = import_graph()
    assert cycles(top) == []


def test_no_import_circle_counting_function_level_imports():
    top, lazy, _ = import_graph()
    both = {m: top[m] | lazy[m] for m in top}
    found = {frozenset(c) for c in cycles(both)}
    assert found - set(ACCEPTED_LAZY_CYCLES) == set(), sorted(
        sorted(c) for c in found - set(ACCEPTED_LAZY_CYCLES)
    )


def test_no_product_module_imports_test_support():
    _, _, named = import_graph()
    bad = {
        mod: sorted(
            t
            for t in targets
            if t.split(".")[0] in TEST_SUPPORT
            or (t.split(".")[0] in PACKAGES and t.rsplit(".", 1)[-1] in ("testing", "fixtures"))
        )
        for mod, targets in named.items()
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_no_test_support_module_inside_the_product():
    names = {p.stem for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert not names & {"testing", "fixtures", "conftest"}


def is_app(module: str) -> bool:
    return (
        module in ("karma.cli", "karma.demo", "karma.__main__")
        or module == "karma.experiment"
        or module.startswith("karma.experiment.")
        or module.rsplit(".", 1)[-1] == "cli"
    )


def test_the_app_layer_sits_above_the_library():
    top, lazy, _ = import_graph()
    assert {"karma.cli", "karma.experiment.stages", "services.reward_api.cli", "karma.rm.cli"} <= {
        m for m in top if is_app(m)
    }
    bad = {mod: sorted(t for t in top[mod] | lazy[mod] if is_app(t)) for mod in top if not is_app(mod)}
    assert {m: t for m, t in bad.items() if t} == {}
