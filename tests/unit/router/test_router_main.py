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


def test_engines_dir_flag_moves_the_routers_tokenizer_and_limits_with_the_served_engines(tmp_path):
    from trt_disagg.config import load_deployment

    dep = load_deployment(TINY)
    default = settings_for(TINY, "redis://r:6379/0")
    assert default.engine_dir == dep.engine_dir(next(iter(dep.groups())))
    moved = settings_for(TINY, "redis://r:6379/0", engines_dir=tmp_path / "elsewhere")
    assert moved.engine_dir == tmp_path / "elsewhere" / dep.name / next(iter(dep.groups())).value


class _RecordingPopen:
    """Stands in for subprocess.Popen in the cluster module: records the router's argv, starts nothing."""

    argv: list[str] = []

    def __init__(self, argv: list[str], **kwargs: object) -> None:
        type(self).argv = list(argv)


def test_serve_passes_its_engines_dir_to_the_router_process(tmp_path, monkeypatch):
    from trt_disagg.config import load_deployment
    from trt_disagg.triton import cluster as cluster_mod

    monkeypatch.setattr(cluster_mod.subprocess, "Popen", _RecordingPopen)
    for root, expected in ((tmp_path / "engines-b", ["--engines-dir", str(tmp_path / "engines-b")]), (None, [])):
        c = cluster_mod.LocalCluster(load_deployment(TINY), config_path=TINY, engines_root=root,
                                     run_dir=tmp_path)
        c.redis_url, c._router_port = "redis://127.0.0.1:1/0", 8999
        c._spawn_router()
        argv = _RecordingPopen.argv
        assert argv[argv.index("router") + 1] == str(TINY)
        flag = argv[argv.index("--engines-dir"):argv.index("--engines-dir") + 2] if "--engines-dir" in argv else []
        assert flag == expected
