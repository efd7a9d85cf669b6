"""The router process's command line: a deployment config, the shared Redis, and this router's identity."""

from __future__ import annotations

from pathlib import Path

from trt_disagg.triton.router_runner import settings_from_args

TINY = str(Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml")


def test_router_id_comes_from_the_flag_then_the_environment_then_host_and_port(monkeypatch):
    flagged = settings_from_args([TINY, "--redis-url", "redis://r:6379/0", "--port", "8101", "--router-id", "edge-a"])
    assert (flagged.router_id, flagged.port, flagged.redis_url) == ("edge-a", 8101, "redis://r:6379/0")
    monkeypatch.setenv("TRT_DISAGG_ROUTER_ROUTER_ID", "edge-b")
    assert settings_from_args([TINY, "--redis-url", "redis://r:6379/0"]).router_id == "edge-b"
    monkeypatch.delenv("TRT_DISAGG_ROUTER_ROUTER_ID")
    assert settings_from_args([TINY, "--redis-url", "redis://r:6379/0", "--port", "8102"]).router_id.endswith(":8102")
