"""An interrupted build leaves nothing a later run would trust, and a later run cleans up after it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch

from tests.unit.engine_build.build_support import LoadCounter
from trt_disagg.config import Deployment
from trt_disagg.contract import Role
from trt_disagg.engine_build.builder import BuildStatus, build_deployment
from trt_disagg.engine_build.staging import clean_stale
from trt_disagg.engine_dir import CONFIG_FILE, EngineConfig


class Interrupted(Exception):
    pass


def failing_save_after(n_ok: int) -> Callable[..., None]:
    """safetensors save_file that writes `n_ok` files, then fails like a full disk or a kill."""
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def save(tensors: Any, filename: str, metadata: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise Interrupted(f"simulated failure writing {filename}")
        real(tensors, filename, metadata=metadata)

    return save


def leftovers(dep: Deployment) -> list[str]:
    root = Path(dep.engines_dir) / dep.name
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_failure_midway_leaves_no_engine_and_no_temp(make_dep: Callable[..., Deployment], loads: LoadCounter,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dep = make_dep()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_after(1))  # prefill rank1 fails
    with pytest.raises(Interrupted):
        build_deployment(dep)
    assert leftovers(dep) == []  # no prefill/, no .prefill.tmp-<pid>/


def test_failed_rebuild_keeps_the_previous_engine(make_dep: Callable[..., Deployment], loads: LoadCounter,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dep = make_dep()
    build_deployment(dep, roles=["decode"])
    before = EngineConfig.load(dep.engine_dir(Role.DECODE))
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_after(1))
    with pytest.raises(Interrupted):
        build_deployment(dep, roles=["decode"], force=True)
    assert leftovers(dep) == ["decode"]
    assert EngineConfig.load(dep.engine_dir(Role.DECODE)) == before
    monkeypatch.undo()
    results = build_deployment(dep, roles=["decode"])
    assert results[0].status is BuildStatus.UP_TO_DATE


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_next_build_removes_temp_dirs_of_dead_builds(make_dep: Callable[..., Deployment],
                                                     loads: LoadCounter) -> None:
    dep = make_dep()
    root = Path(dep.engines_dir) / dep.name
    stale = root / f".colocated.tmp-{_dead_pid()}"
    stale.mkdir(parents=True)
    (stale / "rank0.safetensors").write_bytes(b"half written")
    stale_ckpt = root / f".prefill.ckpt-{_dead_pid()}"
    stale_ckpt.mkdir()
    results = build_deployment(dep, roles=["colocated"])
    assert results[0].status is BuildStatus.BUILT
    assert leftovers(dep) == ["colocated"]
    assert (dep.engine_dir(Role.COLOCATED) / CONFIG_FILE).is_file()


def test_temp_dir_of_a_running_build_is_kept(tmp_path: Path) -> None:
    with subprocess.Popen(["sleep", "30"]) as proc:
        try:
            live = tmp_path / f".decode.tmp-{proc.pid}"
            live.mkdir()
            dead = tmp_path / f".decode.tmp-{_dead_pid()}"
            dead.mkdir()
            keep = tmp_path / "decode"
            keep.mkdir()
            assert clean_stale(tmp_path) == [dead]
            assert live.exists() and keep.exists()
        finally:
            proc.kill()


def test_a_dir_without_config_is_not_trusted(make_dep: Callable[..., Deployment], loads: LoadCounter) -> None:
    dep = make_dep()
    build_deployment(dep, roles=["colocated"])
    (dep.engine_dir(Role.COLOCATED) / "rank0.safetensors").unlink()  # damaged by hand
    assert build_deployment(dep, roles=["colocated"])[0].status is BuildStatus.BUILT
    (dep.engine_dir(Role.COLOCATED) / CONFIG_FILE).write_text("{not json")
    assert build_deployment(dep, roles=["colocated"])[0].status is BuildStatus.BUILT
