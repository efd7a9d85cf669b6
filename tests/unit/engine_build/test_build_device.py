"""A group's `device` (cpu | cuda | cuda:N): validated in the config, checked at build and serve time (exit 2
naming the field where CUDA is asked for and torch sees none), rendered into the instance's model config."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from tests.unit.engine_build.build_support import deep_update, tiny_config_dict
from trt_disagg import cli
from trt_disagg.config import Deployment, parse_deployment
from trt_disagg.contract import Role
from trt_disagg.engine.device import collective_backend, rank_device
from trt_disagg.engine_build.builder import build_deployment
from trt_disagg.errors import EXIT_USAGE, UserError
from trt_disagg.triton.adapter import InstanceSettings
from trt_disagg.triton.render import check_devices, render_deployment

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cpu:0"])
def test_a_malformed_device_names_the_field(device: str) -> None:
    data = deep_update(tiny_config_dict(), {"generation_servers": {"device": device}})
    with pytest.raises(UserError, match=r"generation_servers\.device"):
        parse_deployment(data, "bad")


def test_ranks_get_one_device_each_and_cuda_collectives_are_nccl() -> None:
    assert [str(rank_device("cuda", r)) for r in range(3)] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [str(rank_device("cuda:4", r)) for r in range(2)] == ["cuda:4", "cuda:5"]
    assert rank_device("cpu", 3) == torch.device("cpu")
    assert (collective_backend("cpu"), collective_backend("cuda:1")) == ("gloo", "nccl")


@no_cuda
def test_build_refuses_cuda_without_it_and_writes_nothing(make_dep: Callable[..., Deployment]) -> None:
    dep = make_dep(colocated_servers={"device": "cuda"})
    with pytest.raises(UserError, match=r"colocated_servers\.device: 'cuda' asked for, but torch sees no CUDA"):
        build_deployment(dep)
    assert not Path(dep.engines_dir).exists()
    build_deployment(dep, dry_run=True)  # a dry run renders for another machine: no device needed


@no_cuda
def test_cli_build_exit_2_names_the_device_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = deep_update(tiny_config_dict(), {"context_servers": {"device": "cuda:1"}})
    data["engines_dir"] = str(tmp_path / "engines")
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(sys, "argv", ["trt-disagg", "build", str(cfg)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == EXIT_USAGE
    assert "context_servers.device" in capsys.readouterr().err.replace("\n", "")


@no_cuda
def test_serve_check_names_the_field_of_the_roles_it_starts() -> None:
    dep = parse_deployment(deep_update(tiny_config_dict(), {"generation_servers": {"device": "cuda"}}))
    with pytest.raises(UserError, match=r"generation_servers\.device"):
        check_devices(dep)
    check_devices(dep, {Role.PREFILL})  # `serve --instance prefill:0` starts no decode instance here
    check_devices(parse_deployment(tiny_config_dict()))  # all cpu


def test_the_device_reaches_the_instance_through_its_model_config(tmp_path: Path) -> None:
    dep = parse_deployment(deep_update(tiny_config_dict(), {"generation_servers": {"device": "cuda:1"}}))
    for plan, repo in render_deployment(dep, tmp_path / "out", tmp_path):
        text = (repo / plan.model_name / "config.pbtxt").read_text()
        params = {"ROLE": plan.role.value, "ENGINE_DIR": str(plan.engine_dir),
                  "DEVICE": "cuda:1" if plan.role is Role.DECODE else "cpu"}
        assert f'key: "DEVICE", value: {{ string_value: "{params["DEVICE"]}" }}' in text
        settings = InstanceSettings.from_model_config(
            {"name": plan.model_name, "parameters": {k: {"string_value": v} for k, v in params.items()}}, {})
        assert settings.device == params["DEVICE"]


@no_cuda
def test_cli_serve_exit_2_names_the_device_field_before_starting_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data = deep_update(tiny_config_dict(), {"colocated_servers": {"device": "cuda"}})
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(sys, "argv", ["trt-disagg", "serve", str(cfg), "--run-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == EXIT_USAGE
    assert "colocated_servers.device" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "run").exists()
