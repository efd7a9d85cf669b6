"""tests/check_collected.py names a test file pytest never collects, and passes once every file is."""

from pathlib import Path

import pytest

from tests.check_collected import main


def _tiny_tree(root: Path, hidden_dir: str) -> Path:
    (root / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
    tests = root / "tests"
    (tests / "unit" / hidden_dir).mkdir(parents=True)
    (tests / "unit" / "test_seen.py").write_text("def test_seen():\n    pass\n")
    (tests / "unit" / hidden_dir / "test_x.py").write_text("def test_x():\n    pass\n")
    return tests


def test_a_test_file_under_build_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # pytest's default norecursedirs holds "build": the file exists, pytest never looks in there.
    tests = _tiny_tree(tmp_path, "build")
    monkeypatch.chdir(tmp_path)
    assert main([str(tests)]) == 1
    err = capsys.readouterr().err
    assert "tests/unit/build/test_x.py" in err
    assert "test_seen.py" not in err


def test_passes_once_the_directory_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    tests = _tiny_tree(tmp_path, "engine_build")
    monkeypatch.chdir(tmp_path)
    assert main([str(tests)]) == 0
    assert capsys.readouterr().err == ""
