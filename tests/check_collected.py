"""Fail when a test file exists that pytest does not collect.

    python tests/check_collected.py [TESTS_DIR]      (default: tests)

Lists every test_*.py under TESTS_DIR, asks pytest which files it collects (`--collect-only`, run from
the current directory so the project's pytest config applies: norecursedirs, python_files, addopts), and
exits 1 naming each file pytest never reaches. A directory named like one of pytest's default
`norecursedirs` (build, dist, venv, ...) hides its tests silently; this check makes that loud.
A module skipped at import (pytest.skip(allow_module_level=True)) counts as collected: pytest reached it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

_SKIPPED = re.compile(r"^SKIPPED \[\d+\] (?P<path>[^:]+\.py)(?::\d+)?:")


def _resolve(rel: str, bases: list[Path]) -> Path | None:
    """A node id's path is relative to pytest's rootdir, which -q does not print: try each base."""
    for base in bases:
        candidate = (base / rel).resolve()
        if candidate.is_file():
            return candidate
    return None


def collected_files(tests_dir: Path) -> tuple[set[Path], int, str]:
    """The test files pytest collects under tests_dir, its exit code and its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider", str(tests_dir)],
        capture_output=True,
        text=True,
    )
    output = proc.stdout + proc.stderr
    bases = [Path.cwd(), tests_dir.resolve(), *tests_dir.resolve().parents]
    files: set[Path] = set()
    for line in output.splitlines():
        line = line.strip()
        rel = None
        if "::" in line:
            rel = line.split("::", 1)[0]
        elif match := _SKIPPED.match(line):
            rel = match["path"]
        if rel and rel.endswith(".py"):
            path = _resolve(rel, bases)
            if path is not None:
                files.add(path)
    return files, proc.returncode, output


def uncollected(tests_dir: Path) -> tuple[list[Path], int, str]:
    """Every test_*.py under tests_dir that pytest does not collect, sorted."""
    present = {p.resolve() for p in tests_dir.rglob("test_*.py") if "__pycache__" not in p.parts}
    found, returncode, output = collected_files(tests_dir)
    return sorted(present - found), returncode, output


def main(argv: list[str]) -> int:
    tests_dir = Path(argv[0]) if argv else Path("tests")
    if not tests_dir.is_dir():
        print(f"check_collected: {tests_dir} is not a directory", file=sys.stderr)
        return 2
    missing, returncode, output = uncollected(tests_dir)
    # 0: collected; 5: nothing to collect (every file then shows up as missing below).
    if returncode not in (0, 5):
        print(output[-4000:], file=sys.stderr)
        print(f"check_collected: pytest --collect-only exited {returncode}", file=sys.stderr)
    if missing:
        cwd = Path.cwd().resolve()
        print("check_collected: test files pytest does not collect:", file=sys.stderr)
        for path in missing:
            shown = path.relative_to(cwd) if path.is_relative_to(cwd) else path
            print(f"  {shown}", file=sys.stderr)
        return 1
    return 0 if returncode in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
