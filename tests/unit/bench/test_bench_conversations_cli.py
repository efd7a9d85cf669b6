"""`trt-disagg bench --conversations`: its flags are checked like the others, and against the fake server each
turn resends the history with the returned answer, the hit rate comes from the per-request records, and the
usual result files are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.bench.test_bench_cli import closed_port_url, invoke, make_app
from trt_disagg.bench.fake_openai import MODEL, FakeServer
from trt_disagg.errors import UserError


@pytest.mark.parametrize("args, message", [
    (["--conversations", "0"], "--conversations must be >= 1"),
    (["--conversations", "2", "--think-time-s", "-1"], "--think-time-s"),
    (["--conversations", "2", "--max-turns", "0"], "--max-turns"),
    (["--conversations", "2", "--max-answer-tokens", "0"], "--max-answer-tokens"),
])
def test_bad_conversation_flags_are_user_errors(args: list[str], message: str) -> None:
    exc = invoke("--url", closed_port_url(), "--rates", "0.5", *args)
    assert isinstance(exc, UserError) and message in str(exc)


def test_conversations_do_not_search() -> None:
    exc = invoke("--url", closed_port_url(), "--search", "--conversations", "2")
    assert isinstance(exc, UserError) and "--search is not supported" in str(exc)


@pytest.mark.slow
def test_conversations_against_the_fake_server(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    with FakeServer() as server:
        result = CliRunner().invoke(make_app(), [
            "bench", "--url", server.url, "--conversations", "3", "--rates", "50", "--think-time-s", "0",
            "--max-turns", "2", "--max-answer-tokens", "2", "--ttft", "30", "--tpot", "30", "--out", str(out),
            "--no-progress"], env={"COLUMNS": "200"})
        bodies = list(server.behaviour.bodies)
    assert result.exception is None, result.output
    assert len(bodies) == 6 and all(b["model"] == MODEL and b["stream"] for b in bodies)
    firsts = [b for b in bodies if len(b["messages"]) == 1]
    seconds = [b for b in bodies if len(b["messages"]) == 3]
    assert len(firsts) == len(seconds) == 3
    for second in seconds:  # the history, the answer the server returned, the next user message
        assert second["messages"][1] == {"role": "assistant", "content": "tok " * second["messages"][1]["content"]
                                         .count("tok")}
        assert second["messages"][0] in [f["messages"][0] for f in firsts]
    assert "Prefix hits" in result.output and "first turns" in result.output
    config = json.loads((out / "bench_config.json").read_text())
    assert config["conversations"]["num"] == 3 and config["conversations"]["turns"] == 6
    assert config["conversations"]["rates_are"] == "conversations/s"
    (hit,) = config["conversations"]["hit_rates"]
    words = [sum(len(m["content"].split()) for m in b["messages"]) for b in bodies]
    held = [len(b["messages"][0]["content"].split()) + 2 for b in seconds]  # turn 1's prompt + 2 answer words
    assert hit == pytest.approx(sum(held) / sum(words))
    doc = json.loads((out / "summary.json").read_text())
    (run,) = doc["series"]["conversations"]["runs"]
    assert run["num_sent"] == 6 and run["num_ok"] == 6
    assert (out / "requests.csv").is_file()
