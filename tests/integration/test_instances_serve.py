"""`trt-disagg serve` as a user runs it: starts everything, prints endpoints, stops cleanly on SIGTERM;
a start that fails stops what it started and says why."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from trt_disagg.config import load_deployment
from trt_disagg.contract import Role
from trt_disagg.registry_read import list_instances

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "trt-disagg")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    from trt_disagg.engine_build.builder import build_deployment

    root = tmp_path_factory.mktemp("tiny-serve")
    build_deployment(load_deployment(REPO / "configs" / "tiny.yaml"), engines_root=root)
    return root


def serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "400"}
    env.pop("REDIS_URL", None)
    return subprocess.Popen([CLI, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def processes_mentioning(text: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            out.append(int(pid))
    return out


def python_backend_regions(run_dir: Path) -> set[str]:
    """The /dev/shm regions the Python-backend stubs of this run use (named on their command lines)."""
    names = set()
    for pid in processes_mentioning(str(run_dir)):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        names |= {c.decode() for c in cmd if c.startswith(b"trtd_tb_")}
    return names


def registered_ids(redis_url: str) -> set[str]:
    async def read() -> set[str]:
        client = aioredis.from_url(redis_url)
        try:
            return {i.instance_id for role in Role for i in await list_instances(client, role)}
        finally:
            await client.aclose()

    return asyncio.run(read())


def test_serve_starts_registers_and_stops_cleanly(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = serve(str(REPO / "configs" / "tiny.yaml"), "--engines-dir", str(tiny_root), "--no-router",
                 "--run-dir", str(run_dir))
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready in"):
                break
        startup_s = time.monotonic() - t0
        text = "".join(lines)
        assert "prefill-0" in text and "decode-0" in text and "colocated-0" in text, text
        redis_url = next(ln.split()[1] for ln in lines if ln.startswith("Redis:"))
        assert registered_ids(redis_url) == {"prefill-0", "decode-0", "colocated-0"}
        assert len(processes_mentioning(str(run_dir))) >= 3
        regions = python_backend_regions(run_dir)
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        stop_s = time.monotonic() - t1
        assert not processes_mentioning(str(run_dir))  # every tritonserver, stub and rank process is gone
        assert regions and not regions & set(os.listdir("/dev/shm"))  # Triton's shm regions are gone
        print(f"tiny deployment: ready in {startup_s:.1f}s, stopped in {stop_s:.1f}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_missing_engine_fails_with_the_reason(tmp_path):
    proc = serve(str(REPO / "configs" / "tiny.yaml"), "--engines-dir", str(tmp_path), "--no-router")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "engine for prefill missing" in err and "trt-disagg build" in err


def test_taken_port_stops_what_started_and_says_why(tiny_root, tmp_path):
    blocker = socket.socket()
    blocker.bind(("0.0.0.0", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["generation_servers"]["urls"] = [f"127.0.0.1:{port}"]  # decode's gRPC port is taken
    cfg = tmp_path / "tiny-taken.yaml"
    cfg.write_text(yaml.safe_dump(data))
    try:
        run_dir = tmp_path / "run"
        proc = serve(str(cfg), "--engines-dir", str(tiny_root), "--no-router", "--run-dir", str(run_dir))
        _, err = proc.communicate(timeout=300)
    finally:
        blocker.close()
    assert proc.returncode == 2
    assert "decode-0" in err and "exited during start-up" in err
    assert not processes_mentioning(str(run_dir))  # prefill and colocated were started, then stopped
