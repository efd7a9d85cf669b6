"""render (plans, placeholders, validation) and launch (ports, environment, backend dir) without servers."""

from __future__ import annotations

import json
import os
import re
import sysconfig
from pathlib import Path

import pytest

from trt_disagg.commands.serve import parse_instance
from trt_disagg.config import load_deployment, parse_deployment
from trt_disagg.contract import Role
from trt_disagg.errors import UserError
from trt_disagg.triton import launch
from trt_disagg.triton.render import plan_instances, render_deployment

REPO = Path(__file__).resolve().parents[3]


def tiny():
    return load_deployment(REPO / "configs" / "tiny.yaml")


def test_plans_cover_every_instance_prefill_first(tmp_path):
    plans = plan_instances(tiny(), tmp_path)
    assert [p.instance_id for p in plans] == ["prefill-0", "decode-0", "colocated-0"]
    assert plans[0].engine_dir == (tmp_path / "tiny" / "prefill").resolve()
    assert [p.env() for p in plans] == [{}, {}, {}]  # python backend: no TensorRT-LLM variables


def test_render_fills_every_placeholder_and_copies_the_model(tmp_path):
    rendered = render_deployment(tiny(), tmp_path / "out", tmp_path)
    for plan, repo in rendered:
        text = (repo / plan.model_name / "config.pbtxt").read_text()
        assert not re.search(r"\$\{(?!\.\.\.\})", text)  # only the comment's literal "${...}" is left
        assert f'string_value: "{plan.role.value}"' in text
        assert (repo / plan.model_name / "1" / "model.py").is_file()
        assert json.loads((repo / "instance.json").read_text())["instance_id"] == plan.instance_id
    decoupled = {p.role: "decoupled: true" in (r / p.model_name / "config.pbtxt").read_text() for p, r in rendered}
    assert decoupled == {Role.PREFILL: False, Role.DECODE: True, Role.COLOCATED: True}


def test_render_non_decoupled_for_http_clients(tmp_path):
    rendered = render_deployment(tiny(), tmp_path / "out", tmp_path, decoupled=False)
    assert all("decoupled: false" in (r / p.model_name / "config.pbtxt").read_text() for p, r in rendered)


def test_gpu_transport_on_python_backend_names_the_field():
    data = tiny().model_dump(mode="json", exclude_none=True)
    data["context_servers"]["cache_transceiver_config"] = {"backend": "UCX"}
    with pytest.raises(UserError, match=r"context_servers\.cache_transceiver_config\.backend: UCX"):
        plan_instances(parse_deployment(data))


@pytest.mark.parametrize("spec, expected", [("prefill:0", "prefill-0"), ("decode:3", "decode-3")])
def test_parse_instance(spec, expected):
    assert parse_instance(spec) == expected


@pytest.mark.parametrize("spec", ["prefill", "router:0", "decode:x"])
def test_parse_instance_rejects_bad_specs(spec):
    with pytest.raises(UserError, match="--instance"):
        parse_instance(spec)


def test_ports_are_distinct_and_keep_a_requested_grpc_port():
    ports = launch.Ports.pick()
    assert len({ports.grpc, ports.http, ports.metrics, ports.kv}) == 4
    fixed = launch.free_port()
    assert launch.Ports.pick(grpc=fixed).grpc == fixed
    taken = {ports.grpc, ports.http, ports.metrics, ports.kv}
    again = launch.Ports.pick(exclude=taken)  # never a port already handed to another server of the deployment
    assert not taken & {again.grpc, again.http, again.metrics, again.kv}


def test_server_environment_follows_design(tmp_path):
    binary = launch.bundled_tritonserver(tmp_path)
    env = launch.server_env(binary, {"X": "1"}, threads=2)
    assert env["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR")
    assert env["PATH"].split(":")[0] == os.path.dirname(os.sys.executable)
    assert env["OMP_NUM_THREADS"] == "2" and env["X"] == "1"
    stub = binary.backend_dir / "python" / "triton_python_backend_stub"
    assert stub.exists() and (binary.backend_dir / "python" / "libtriton_python.so").exists()
    assert binary.executable.is_file()


def test_command_names_ports_repository_and_shm_prefix(tmp_path):
    binary = launch.bundled_tritonserver(tmp_path)
    ports = launch.Ports(grpc=1, http=2, metrics=3, kv=4)
    a = launch.TritonProcess("decode-0", "decode", tmp_path, binary, ports, {}, tmp_path / "log")
    b = launch.TritonProcess("decode-0", "decode", tmp_path, binary, ports, {}, tmp_path / "log")
    cmd = a.command()
    assert "--grpc-port=1" in cmd and "--http-port=2" in cmd and f"--model-repository={tmp_path}" in cmd
    assert any(c.startswith("--backend-config=python,shm-region-prefix-name=trtd_tb_decode_0_") for c in cmd)
    assert a.shm_prefix != b.shm_prefix  # clean-up never touches another deployment's regions
    a.stop()  # never started: a no-op


def test_stopping_a_process_returns_once_its_whole_group_is_gone():
    """What a server started (its stub, rank processes) is killed with it, and stop returns only when none of
    them runs any more, so no check made after it sees stragglers."""
    import subprocess

    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        assert launch.group_members(proc.pid)  # the shell and its two children
    finally:
        launch.stop_process(proc, timeout_s=0.0)
    assert launch.group_members(proc.pid) == []


def test_a_server_stopped_before_it_was_ready_leaves_no_python_env_behind(tmp_path):
    """Triton's Python backend makes /tmp/python_env_* at start, whatever TMPDIR says, and only a normal exit
    removes it: one killed while it started (never ready, so never claimed) is removed by stop() too, and a
    directory that was there before it started is not touched."""
    import tempfile
    import time

    foreign = tempfile.mkdtemp(prefix="python_env_", dir="/tmp")
    server = tmp_path / "tritonserver"
    server.write_text('#!/bin/sh\nd=$(mktemp -d /tmp/python_env_XXXXXX)\necho "$d" > "$TMPDIR/made"\nexec sleep 60\n')
    server.chmod(0o755)
    binary = launch.TritonBinary(executable=server, backend_dir=None, cache_dir=None, lib_dirs=())
    proc = launch.TritonProcess("prefill-0", "prefill", tmp_path, binary, launch.Ports(1, 2, 3, 4), {},
                                tmp_path / "log")
    try:
        proc.start()
        made = proc.tmp_dir / "made"  # type: ignore[operator]
        deadline = time.monotonic() + 30
        while not (made.exists() and made.read_text().endswith("\n")):  # an external process's file
            assert time.monotonic() < deadline, "the stand-in server made no directory"
            time.sleep(0.01)
        made_dir = made.read_text().strip()
        proc.stop(timeout_s=5)
        assert not os.path.exists(made_dir)
        assert os.path.isdir(foreign)
    finally:
        proc.stop()
        os.rmdir(foreign)
