"""What `serve` tells its user and its scripts: complete endpoint lines off a terminal, and each instance's
instance.json naming the address it listens on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from trt_disagg.commands.serve import print_endpoints
from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.triton import launch
from trt_disagg.triton.cluster import Endpoint, LocalCluster
from trt_disagg.triton.render import plan_instances, render_instance

REPO = Path(__file__).resolve().parents[3]
LONG_LOG = Path("/var/tmp/a-rather-long-run-directory-name/for-a-deployment/prefill-0.log")


def endpoint(instance_id: str, grpc_port: int) -> Endpoint:
    return Endpoint(instance_id, Role.PREFILL, "prefill", f"127.0.0.1:{grpc_port}", f"127.0.0.1:{grpc_port + 1}",
                    grpc_port + 2, LONG_LOG)


def test_endpoint_lines_are_complete_when_not_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=40, force_terminal=False)  # narrower than any one line
    print_endpoints(console, [endpoint("prefill-0", 53111), endpoint("decode-0", 53211)],
                    "redis://127.0.0.1:6379/0", "http://127.0.0.1:8000", 3.25)
    lines = buf.getvalue().splitlines()
    assert lines[0] == ("instance prefill-0 model=prefill grpc=127.0.0.1:53111 http=127.0.0.1:53112 kv_port=53113 "
                        f"log={LONG_LOG}")
    assert lines[1].startswith("instance decode-0 ") and lines[1].endswith(f"log={LONG_LOG}")
    assert lines[2:] == ["Redis: redis://127.0.0.1:6379/0",
                         "Router: http://127.0.0.1:8000  (OpenAI API: http://127.0.0.1:8000/v1)",
                         "ready in 3.2s; Ctrl-C stops everything"]


def test_endpoint_table_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=True)
    print_endpoints(console, [endpoint("prefill-0", 53111)], "redis://r", None, 1.0)
    text = buf.getvalue()
    assert "gRPC" in text and "53111" in text and "instance prefill-0" not in text and "Router:" not in text


def test_render_writes_the_given_url(tmp_path: Path) -> None:
    plan = plan_instances(load_deployment(REPO / "configs" / "tiny.yaml"), tmp_path)[0]
    repo = render_instance(plan, tmp_path / "repos", url="127.0.0.1:40001")
    assert json.loads((repo / "instance.json").read_text())["url"] == "127.0.0.1:40001"
    repo = render_instance(plan, tmp_path / "repos")  # no address picked yet, no `urls` in the config
    assert json.loads((repo / "instance.json").read_text())["url"] is None


def test_serve_fills_in_each_instance_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster serve runs, with the tritonserver processes left unstarted: instance.json in the run dir
    holds the gRPC address each instance was launched on."""
    monkeypatch.setattr(launch.TritonProcess, "start", lambda self: None)
    monkeypatch.setattr(launch.TritonProcess, "wait_ready", lambda self, timeout_s: None)
    dep = load_deployment(REPO / "configs" / "tiny.yaml")
    overrides = {Role.PREFILL: "fake:prefill", Role.DECODE: "fake:decode", Role.COLOCATED: "fake:colocated"}
    with LocalCluster(dep, start_router=False, engine_overrides=overrides, run_dir=tmp_path / "run") as cluster:
        by_id = {e.instance_id: e.grpc_url for e in cluster.endpoints()}
        written = {d.name: json.loads((d / "instance.json").read_text())["url"]
                   for d in (tmp_path / "run" / "repos").iterdir()}
    assert set(by_id) == {"prefill-0", "decode-0", "colocated-0"}
    assert written == by_id
    assert all(url.startswith("127.0.0.1:") and int(url.rpartition(":")[2]) > 0 for url in written.values())


def test_a_new_deployment_in_a_reused_run_dir_starts_new_iteration_logs(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance appends to its iteration log (a restart continues it); a deployment started again in the
    same run dir must not leave an earlier deployment's steps in it."""
    monkeypatch.setattr(launch.TritonProcess, "start", lambda self: None)
    monkeypatch.setattr(launch.TritonProcess, "wait_ready", lambda self, timeout_s: None)
    dep = load_deployment(REPO / "configs" / "tiny.yaml")
    overrides = {Role.PREFILL: "fake:prefill", Role.DECODE: "fake:decode", Role.COLOCATED: "fake:colocated"}
    run = tmp_path / "run"
    run.mkdir()
    stale = run / "decode-0.iterations.jsonl"
    stale.write_text('{"t": 1.0, "kind": "decode"}\n')
    other = run / "notes.txt"
    other.write_text("kept")
    with LocalCluster(dep, start_router=False, engine_overrides=overrides, run_dir=run, iteration_logs=True) as c:
        assert c.iteration_log_path("decode-0") == stale and not stale.exists()
    assert other.read_text() == "kept"
