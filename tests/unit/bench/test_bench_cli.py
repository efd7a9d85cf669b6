"""`trt-disagg bench`: bad arguments are UserErrors (exit 2 through the real CLI); a good run writes results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from trt_disagg.bench.fake_openai import MODEL, FakeServer
from trt_disagg.commands.bench import parse_rates, register, resolve_slo
from trt_disagg.errors import EXIT_USAGE, UserError


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:  # a callback keeps `bench` a sub-command, as in the real CLI
        """test CLI"""

    register(app)
    return app


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def invoke(*args: str) -> BaseException | None:
    result = CliRunner().invoke(make_app(), ["bench", *args])
    return result.exception


def test_parse_rates() -> None:
    assert parse_rates("0.5, 1,2") == [0.5, 1.0, 2.0]
    for bad in ("0", "1,-2", "fast", "1,,2", "nan", "inf"):
        with pytest.raises(UserError, match="--rates"):
            parse_rates(bad)


def test_resolve_slo_from_config_and_flags(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[3]
    slo = resolve_slo(repo / "configs" / "tiny.yaml", None, 0.05, None)
    assert (slo.ttft_s, slo.tpot_s, slo.attainment) == (0.5, 0.05, 0.9)
    with pytest.raises(UserError, match="--attainment"):
        resolve_slo(None, None, None, 1.5)
    with pytest.raises(UserError, match="--ttft"):
        resolve_slo(None, -1.0, None, None)


@pytest.mark.parametrize("args, message", [
    (["--rates", "0"], "--rates: every rate must be > 0"),
    (["--rates", "1,-1"], "--rates: every rate must be > 0"),
    (["--rates", "1", "--dataset", "wikipedia"], "--dataset: unknown 'wikipedia'"),
    (["--rates", "1", "--search"], "either --rates"),
    ([], "either --rates"),
    (["--rates", "1", "--dataset", "fixed"], "--input-len and --output-len"),
    (["--rates", "1", "--arrival", "uniform"], "--arrival"),
    (["--rates", "1", "--num-requests", "0"], "--num-requests"),
    (["--search", "--cores", "0"], "--cores"),
    (["--search", "--start-rate", "0"], "start rate"),
    (["--rates", "1", "--tpot", "0"], "--tpot"),
])
def test_bad_arguments_are_user_errors(args: list[str], message: str) -> None:
    exc = invoke("--url", closed_port_url(), *args)
    assert isinstance(exc, UserError)
    assert message in str(exc)


def test_unreachable_router_is_a_user_error(tmp_path: Path) -> None:
    exc = invoke("--url", closed_port_url(), "--rates", "1", "--out", str(tmp_path))
    assert isinstance(exc, UserError)
    assert "router not reachable" in str(exc)
    assert not any(tmp_path.iterdir())  # nothing written, nothing sent


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--rates", "0"], "--rates"),
    (["--rates", "1", "--dataset", "nope"], "--dataset"),
    (["--rates", "1"], "router not reachable"),
])
def test_real_cli_exits_2_with_a_clear_message(args: list[str], message: str) -> None:
    exe = Path(sys.executable).parent / "trt-disagg"
    proc = subprocess.run([str(exe), "bench", "--url", closed_port_url(), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == EXIT_USAGE
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bench_against_fake_server_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    with FakeServer() as server:
        result = CliRunner().invoke(make_app(), [
            "bench", "--url", server.url, "--dataset", "fixed", "--input-len", "8", "--output-len", "3",
            "--rates", "20,40", "--num-requests", "5", "--cores", "2", "--ttft", "30", "--tpot", "30",
            "--out", str(out), "--no-progress"])
        bodies = list(server.behaviour.bodies)
    assert result.exception is None, result.output
    assert result.exit_code == 0
    assert "goodput" in result.output and "wrote" in result.output
    assert bodies[0]["max_tokens"] == 1  # the preflight request
    assert len(bodies) == 11 and all(b["max_tokens"] == 3 and b["model"] == MODEL for b in bodies[1:])
    config = json.loads((out / "bench_config.json").read_text())
    assert config["model"] == MODEL and config["rates"] == [20.0, 40.0] and config["slo"]["ttft_s"] == 30.0
    doc = json.loads((out / "summary.json").read_text())
    goodput = doc["series"]["run"]["goodput"]
    assert goodput["goodput_rps"] == 40.0 and goodput["per_core_goodput_rps"] == 20.0
    assert [r["num_sent"] for r in doc["series"]["run"]["runs"]] == [5, 5]
    for name in ("runs.csv", "requests.csv", "attainment_vs_rate.png", "ttft_cdf.png", "tpot_cdf.png"):
        assert (out / name).is_file()


def write_engine_dir(root: Path) -> Path:
    """An engine directory with a tiny word-level tokenizer and a config.json whose limits the bench reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trt_disagg.contract import ModelShape, Role
    from trt_disagg.engine_dir import EngineConfig, EngineLimits, KVCacheSpec

    words = "the cat sat on mat and dog ran far big red sun sky day way new old one two man car".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(root / "tokenizer"))
    shape = ModelShape(num_layers=1, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                       vocab_size=len(vocab))
    config = EngineConfig(role=Role.COLOCATED, shape=shape, tp=1, pp=1, dtype="float32",
                          limits=EngineLimits(max_batch_size=4, max_input_len=12, max_seq_len=20, max_num_tokens=64),
                          kv_cache=KVCacheSpec(dtype="float32", tokens_per_block=4, max_tokens=64), fingerprint="x")
    (root / "config.json").write_text(config.to_json())
    return root


@pytest.mark.slow
def test_tokenizer_gives_token_id_prompts_within_engine_limits(tmp_path: Path) -> None:
    engine = write_engine_dir(tmp_path / "engine")
    out = tmp_path / "bench"
    with FakeServer() as server:
        result = CliRunner().invoke(make_app(), [
            "bench", "--url", server.url, "--dataset", "longbench-synthetic", "--tokenizer", str(engine),
            "--rates", "50", "--num-requests", "3", "--out", str(out), "--no-progress"])
        bodies = list(server.behaviour.bodies)
    assert result.exception is None, result.output
    config = json.loads((out / "bench_config.json").read_text())
    assert (config["max_input_len"], config["max_output_len"]) == (12, 8)  # from the engine's limits
    assert len(bodies) == 4  # preflight + 3
    for body in bodies[1:]:  # token ids, capped to the engine's limits
        assert isinstance(body["prompt"], list) and len(body["prompt"]) == 12
        assert all(isinstance(t, int) for t in body["prompt"])
        assert body["max_tokens"] == 8


def test_tokenizer_dir_without_tokenizer_is_a_user_error(tmp_path: Path) -> None:
    exc = invoke("--url", closed_port_url(), "--rates", "1", "--tokenizer", str(tmp_path))
    assert isinstance(exc, UserError) and "--tokenizer: no tokenizer" in str(exc)
