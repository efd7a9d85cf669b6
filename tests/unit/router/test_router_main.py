"""The router process's command line (`python -m router`): a deployment config, the shared Redis, and this
router's identity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from router.__main__ import settings_for

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "configs" / "tiny.yaml"


def test_router_id_comes_from_the_flag_then_the_environment_then_host_and_port(monkeypatch):
    flagged = settings_for(TINY, "redis://r:6379/0", port=8101, router_id="edge-a")
    assert (flagged.router_id, flagged.port, flagged.redis_url) == ("edge-a", 8101, "redis://r:6379/0")
    monkeypatch.setenv("TRT_DISAGG_ROUTER_ROUTER_ID", "edge-b")
    assert settings_for(TINY, "redis://r:6379/0").router_id == "edge-b"
    monkeypatch.delenv("TRT_DISAGG_ROUTER_ROUTER_ID")
    assert settings_for(TINY, "redis://r:6379/0", port=8102).router_id.endswith(":8102")


def test_a_bad_config_is_a_clear_message_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrouter: {port: -5}\n")
    done = subprocess.run([sys.executable, "-m", "router", str(bad), "--redis-url", "redis://127.0.0.1:1/0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr and "port" in done.stderr
