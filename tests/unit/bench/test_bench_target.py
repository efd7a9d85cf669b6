"""`trt-disagg bench` measures what the deployment it benchmarks takes: its tokenizer, limits and SLO
(--config, or the server's model card), the temperature clients send, and refused requests fail the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.unit.bench.bench_support import make_record
from tests.unit.bench.test_bench_cli import make_app, write_engine_dir
from trt_disagg.bench.fake_openai import MODEL, FakeServer
from trt_disagg.bench.loadgen import completion_body
from trt_disagg.bench.metrics import is_refused, summarize
from trt_disagg.config import SLO
from trt_disagg.errors import UserError
from trt_disagg.workload import WorkloadRequest

REPO = Path(__file__).resolve().parents[3]


def write_deployment(root: Path, name: str = MODEL) -> Path:
    """configs/tiny.yaml renamed to `name` (what the router serves it as), with built engines under root."""
    engines = root / "engines"
    for role in ("prefill", "decode", "colocated"):
        write_engine_dir(engines / name / role)
    text = (REPO / "configs" / "tiny.yaml").read_text().replace("name: tiny", f"name: {name}\nengines_dir: {engines}")
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def bench(server: FakeServer, out: Path, *args: str) -> tuple[BaseException | None, list[dict]]:
    result = CliRunner().invoke(make_app(), [
        "bench", "--url", server.url, "--rates", "50", "--num-requests", "4", "--out", str(out), "--no-progress",
        *args])
    return result.exception, list(server.behaviour.bodies)


def test_is_refused_counts_bad_requests_not_load_shedding() -> None:
    codes = {400: True, 404: True, 413: True, 422: True, 429: False, 500: False, 503: False}
    for code, refused in codes.items():
        rec = make_record([], 0, error=f"HTTP {code}: x")
        rec.http_status = code
        assert is_refused(rec) is refused, code
    assert not is_refused(make_record([], 0, error="timed out after 1 s"))
    records = [make_record([0.1, 0.2]), make_record([], 0, error="HTTP 400: x"), make_record([], 0, error="x")]
    records[1].http_status = 400
    summary = summarize(records, SLO(ttft_s=1, tpot_s=1, attainment=0.9), rate_rps=1.0, duration_s=1.0)
    assert (summary.num_failed, summary.num_refused) == (2, 1)


def test_temperature_is_always_sent_and_defaults_to_openais() -> None:
    req = WorkloadRequest(prompt="hi", prompt_ids=None, input_len=1, output_len=2)
    assert completion_body("m", req)["temperature"] == 1.0
    assert completion_body("m", req, temperature=0.0)["temperature"] == 0.0


@pytest.mark.slow
def test_config_gives_the_deployments_tokenizer_limits_and_slo(fake_server: FakeServer, tmp_path: Path) -> None:
    config = write_deployment(tmp_path)
    fake_server.behaviour.max_input_len, fake_server.behaviour.max_model_len = 256, 512  # tiny's, as a router says
    exc, bodies = bench(fake_server, tmp_path / "out", "--config", str(config), "--dataset", "longbench-synthetic")
    assert exc is None
    settings = json.loads((tmp_path / "out" / "bench_config.json").read_text())
    assert settings["model"] == MODEL and settings["slo"] == {"ttft_s": 0.5, "tpot_s": 0.1, "attainment": 0.9}
    assert (settings["max_input_len"], settings["max_seq_len"]) == (256, 512)
    assert settings["tokenizer"] == str(tmp_path / "engines" / MODEL / "prefill")
    for body in bodies[1:]:  # token ids of the deployment's tokenizer, within its limits, sampled as OpenAI's default
        assert isinstance(body["prompt"], list) and len(body["prompt"]) + body["max_tokens"] < 512
        assert len(body["prompt"]) <= 256 and body["temperature"] == 1.0
    rows = list(csv.DictReader((tmp_path / "out" / "requests.csv").open()))
    assert all(r["server_input_len"] == r["input_len"] for r in rows)  # the server counts what we counted


@pytest.mark.slow
def test_config_of_another_deployment_is_a_user_error(fake_server: FakeServer, tmp_path: Path) -> None:
    exc, bodies = bench(fake_server, tmp_path / "out", "--config", str(write_deployment(tmp_path, "tiny")),
                        "--dataset", "fixed", "--input-len", "4", "--output-len", "2")
    assert isinstance(exc, UserError) and "--config" in str(exc) and "'tiny'" in str(exc)
    assert "fake-model" in str(exc) and bodies == []  # nothing was sent
    fake_server.behaviour.max_input_len, fake_server.behaviour.max_model_len = 128, 512
    exc, bodies = bench(fake_server, tmp_path / "out", "--config", str(write_deployment(tmp_path)),
                        "--dataset", "fixed", "--input-len", "4", "--output-len", "2")
    assert isinstance(exc, UserError) and "max_input_len: config 256, server 128" in str(exc) and bodies == []


@pytest.mark.slow
def test_without_config_the_servers_card_sizes_the_workload(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.behaviour.max_input_len, fake_server.behaviour.max_model_len = 20, 40
    exc, bodies = bench(fake_server, tmp_path / "out", "--dataset", "longbench-synthetic", "--output-len", "8",
                        "--temperature", "0")
    assert exc is None
    settings = json.loads((tmp_path / "out" / "bench_config.json").read_text())
    assert (settings["max_input_len"], settings["max_seq_len"], settings["temperature"]) == (20, 40, 0.0)
    assert all(b["temperature"] == 0.0 and b["max_tokens"] in (1, 8) for b in bodies)
    rows = list(csv.DictReader((tmp_path / "out" / "requests.csv").open()))
    assert rows and all(int(r["input_len"]) <= 20 for r in rows)


@pytest.mark.slow
def test_refused_requests_fail_the_run_unless_allowed(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.behaviour.refuse_every = 2  # the preflight (1st) passes, then every other request is refused
    args = ("--dataset", "fixed", "--input-len", "4", "--output-len", "2", "--ttft", "30", "--tpot", "30")
    exc, _ = bench(fake_server, tmp_path / "strict", *args)
    assert isinstance(exc, UserError)
    assert "2 of 4 requests were refused" in str(exc) and "HTTP 400: prompt: too many tokens" in str(exc)
    assert "--allow-errors" in str(exc)
    assert (tmp_path / "strict" / "summary.json").is_file()  # the results are written all the same
    fake_server.behaviour.bodies.clear()
    exc, _ = bench(fake_server, tmp_path / "allowed", *args, "--allow-errors")
    assert exc is None
    run = json.loads((tmp_path / "allowed" / "summary.json").read_text())["series"]["run"]["runs"][0]
    assert (run["num_refused"], run["num_failed"], run["attainment"]) == (2, 2, 0.5)


def test_bad_temperature_is_a_user_error() -> None:
    result = CliRunner().invoke(make_app(), ["bench", "--url", "http://127.0.0.1:9", "--rates", "1",
                                             "--temperature", "3"])
    assert isinstance(result.exception, UserError) and "--temperature" in str(result.exception)
