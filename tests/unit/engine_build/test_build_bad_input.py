"""Bad input is refused with the field named, exit code 2 from the CLI, and nothing written."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.unit.engine_build.build_support import LoadCounter, deep_update, tiny_config_dict
from trt_disagg import cli
from trt_disagg.config import Deployment
from trt_disagg.engine_build.builder import build_deployment
from trt_disagg.errors import EXIT_USAGE, UserError


def nothing_written(dep: Deployment) -> bool:
    return not Path(dep.engines_dir).exists()


@pytest.mark.parametrize("overrides,field,detail", [
    ({"context_servers": {"tensor_parallel_size": 8}}, "context_servers.tensor_parallel_size", "4 KV heads"),
    ({"generation_servers": {"pipeline_parallel_size": 5}}, "generation_servers.pipeline_parallel_size",
     "4 layers"),
    ({"colocated_servers": {"kv_cache_config": {"dtype": "fp8"}}}, "colocated_servers.kv_cache_config.dtype",
     "tensorrtllm"),
    ({"generation_servers": {"kv_cache_config": {"max_tokens": 100}}},
     "generation_servers.kv_cache_config.max_tokens", "max_seq_len 512"),
    ({"model": {"source": "gguf", "path": "/nonexistent/model.gguf"}}, "model.path", "not found"),
    ({"model": {"source": "hf", "path": "/nonexistent/dir"}}, "model.path", "not found"),
])
def test_refused_before_anything_is_written(make_dep: Callable[..., Deployment], loads: LoadCounter,
                                            overrides: dict, field: str, detail: str) -> None:
    dep = make_dep(**overrides)
    with pytest.raises(UserError) as exc:
        build_deployment(dep)
    assert field in str(exc.value) and detail in str(exc.value)
    assert nothing_written(dep)


def test_bad_tp_is_refused_in_a_dry_run_too(make_dep: Callable[..., Deployment]) -> None:
    dep = make_dep(context_servers={"tensor_parallel_size": 8})
    with pytest.raises(UserError, match="context_servers.tensor_parallel_size"):
        build_deployment(dep, dry_run=True)
    assert nothing_written(dep)


def test_unknown_role(make_dep: Callable[..., Deployment]) -> None:
    with pytest.raises(UserError, match="--role: unknown role 'encode'"):
        build_deployment(make_dep(), roles=["encode"])
    with pytest.raises(UserError, match="--role: .* no colocated role"):
        build_deployment(make_dep(colocated_servers=None), roles=["colocated"])


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["trt-disagg", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return int(exc.value.code or 0)


def write_config(path: Path, **overrides: object) -> Path:
    data = deep_update(tiny_config_dict(), dict(overrides))
    data["engines_dir"] = str(path.parent / "engines")
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_exit_2_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loads: LoadCounter,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "bad.yaml", context_servers={"tensor_parallel_size": 8})
    assert run_cli(["build", str(cfg)], monkeypatch) == EXIT_USAGE
    assert "context_servers.tensor_parallel_size" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "engines").exists()


def test_cli_exit_2_for_malformed_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "bad.yaml", generation_servers={"max_batch_size": 0})
    assert run_cli(["build", str(cfg), "--dry-run"], monkeypatch) == EXIT_USAGE
    assert "generation_servers.max_batch_size" in capsys.readouterr().err


def test_cli_dry_run_writes_nothing_and_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "tiny.yaml")
    assert run_cli(["build", str(cfg), "--dry-run"], monkeypatch) == 0
    assert "dry run" in capsys.readouterr().out
    assert not (tmp_path / "engines").exists()
