"""`trt-disagg simulate --workload conversations` / `--trace`: hit rates and TTFT per policy, exit 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.planner.test_cli_plan import run  # noqa: F401  (the fixture)

BASE = ["simulate", "--model", "opt-13b", "--ttft", "1", "--tpot", "0.1", "--colocated", "1x1", "--num-colocated", "2"]


def _trace(tmp_path: Path) -> Path:
    requests = []
    for c in range(6):
        n_in = 300
        for k in range(3):
            requests.append({"conversation": c, "turn": k, "arrival_s": c * 0.3 + k * 10.0, "input_len": n_in,
                             "output_len": 40, "ttft_s": 0.05})
            n_in += 40 + 100
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"tokens_per_block": 16, "policy": "kv_aware", "requests": requests}))
    return path


def test_a_replayed_trace_is_predicted_per_policy(run, tmp_path: Path):  # noqa: F811
    proc = run(*BASE, "--trace", str(_trace(tmp_path)), "--compare-policies", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["policy"]: r for r in json.loads(proc.stdout)["rows"]}
    assert set(rows) == {"no reuse", "reuse, least_loaded", "reuse, kv_aware"}
    assert rows["no reuse"]["hit_rate"] == 0 and rows["reuse, kv_aware"]["hit_of_ideal"] == pytest.approx(1.0)
    assert rows["reuse, kv_aware"]["ttft_p50_s"] < rows["no reuse"]["ttft_p50_s"]
    assert rows["reuse, kv_aware"]["prefill_tokens"] < rows["no reuse"]["prefill_tokens"]
    measured = rows["reuse, kv_aware"]  # the trace says what it measured: that row sets prediction against it
    assert measured["measured_ttft_p50_s"] == 0.05
    assert measured["ttft_p50_error"] == pytest.approx(measured["ttft_p50_s"] / 0.05 - 1)
    assert "measured_ttft_p50_s" not in rows["no reuse"]


@pytest.mark.parametrize("args, message", [
    (["--workload", "conversations", "--routing", "nearest"], "--routing"),
    (["--workload", "conversations", "--think-time-s", "-1", "--num-conversations", "5"], "--think-time-s"),
    (["--trace", "/nonexistent/trace.json"], "--trace"),
    (["--workload", "conversations", "--tokens-per-block", "0"], "--tokens-per-block"),
])
def test_bad_conversation_input_exits_2_with_a_message(run, args, message):  # noqa: F811
    proc = run(*BASE, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
