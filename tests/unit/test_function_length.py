"""No function in the package or the router is longer than a screen: a longer one hides named steps."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TREES = ("trt_disagg", "router")
MAX_LINES = 80


def _long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_80_lines():
    offenders = [line for tree in TREES for line in _long_functions(REPO / tree)]
    assert not offenders, f"functions over {MAX_LINES} lines:\n" + "\n".join(offenders)
