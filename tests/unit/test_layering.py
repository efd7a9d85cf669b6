"""The package layering, checked: who may import whom, and that the router never loads torch.

    trt_disagg.engine   nothing from trt_disagg.kv | triton | planner, nor router  (the engine knows no transport)
    trt_disagg.kv       nothing from trt_disagg.engine | triton, nor router        (transports know no engine)
    trt_disagg.sim      of trt_disagg.planner only planner.latency_model           (the simulator runs on its timings)
    router              of trt_disagg only ROUTER_ALLOWED, all torch-free         (the router is a small process)

The import check reads the source (ast), so it sees imports a test run would never execute. It counts
`import x`, `from x import y` (relative ones resolved), imports inside functions, and
`importlib.import_module("<literal>")`; it skips imports under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The trt_disagg modules the router may import: each is torch-free (checked below in a fresh interpreter).
ROUTER_ALLOWED = (
    "trt_disagg.contract",
    "trt_disagg.config",
    "trt_disagg.keys",
    "trt_disagg.registry_read",
    "trt_disagg.errors",
    "trt_disagg.engine_dir",  # the engine dir's limits and the tokenizer saved in it
    "trt_disagg.kv.release",  # the release op's client
    "trt_disagg.kv.errors",
    "trt_disagg.kv.wire",
    "trt_disagg.kv_events",  # prefix block hashes and the KV cache events the KV-aware policy reads
)


@dataclass(frozen=True)
class Rule:
    package: str  # the importing package (dotted)
    forbidden: tuple[str, ...] = ()  # nothing from these...
    allowed: tuple[str, ...] = ()  # ...except these
    only: tuple[str, ...] | None = None  # within `scope`, nothing but these
    scope: str = ""
    why: str = ""


RULES = (
    Rule("trt_disagg.engine", forbidden=("trt_disagg.kv", "trt_disagg.triton", "trt_disagg.planner", "router"),
         why="the engine knows nothing of KV transports, Triton, the planner or the router"),
    Rule("trt_disagg.kv", forbidden=("trt_disagg.engine", "trt_disagg.triton", "router"),
         why="KV transports know nothing of the engine's internals, Triton or the router"),
    Rule("trt_disagg.sim", forbidden=("trt_disagg.planner",), allowed=("trt_disagg.planner.latency_model",),
         why="the simulator takes the planner's latency model and nothing else of it"),
    Rule("router", only=ROUTER_ALLOWED, scope="trt_disagg",
         why="the router imports only torch-free modules of trt_disagg"),
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[int, str]]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return _imports_in(path.read_text(encoding="utf-8"), package)


def _imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, imported name) of every import in `source` that can run, relative ones resolved against
    `package`; `from x import y` gives x.y (y may be a module or a name in x)."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _violation(rule: Rule, name: str) -> bool:
    if rule.only is not None:
        return _within(name, rule.scope) and not any(_within(name, ok) for ok in rule.only)
    return (any(_within(name, bad) for bad in rule.forbidden)
            and not any(_within(name, ok) for ok in rule.allowed))


def _sources(package: str) -> list[Path]:
    return sorted((REPO / package.replace(".", "/")).rglob("*.py"))


def test_packages_import_only_what_their_layer_allows() -> None:
    problems = []
    for rule in RULES:
        files = _sources(rule.package)
        assert files, f"no sources found for {rule.package}"
        for path in files:
            for line, name in _imports(path):
                if _violation(rule, name):
                    problems.append(f"{path.relative_to(REPO)}:{line}: imports {name} ({rule.why})")
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_the_import_check_sees_what_it_must() -> None:
    """The checker itself: relative imports, imports in functions and import_module count; TYPE_CHECKING
    does not."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..kv import wire\n"
        "if TYPE_CHECKING:\n"
        "    import trt_disagg.triton.instance\n"
        "def f():\n"
        "    import importlib\n"
        "    from trt_disagg.planner import search\n"
        "    return importlib.import_module('router.app')\n"
    )
    names = _imports_in(source, package="trt_disagg.engine")
    assert (2, "trt_disagg.kv.wire") in names
    assert (7, "trt_disagg.planner.search") in names
    assert (8, "router.app") in names
    assert not any("triton" in name for _, name in names)
    engine, _, sim, router = RULES
    assert _violation(engine, "trt_disagg.kv.wire") and not _violation(engine, "trt_disagg.engine_dir")
    assert not _violation(sim, "trt_disagg.planner.latency_model") and _violation(sim, "trt_disagg.planner.search")
    assert _violation(router, "trt_disagg.triton.registry") and not _violation(router, "trt_disagg.keys")
    assert not _violation(router, "fastapi")


def test_the_router_runs_without_torch() -> None:
    """A fresh interpreter: importing the router app (and every trt_disagg module it may use) loads no torch."""
    modules = ["router.app", *ROUTER_ALLOWED]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"torch was imported: {out.stdout.strip()[:300]}"
