"""`trt-disagg plan / simulate / profile` through the real entry point: output, YAML, exit code 2 on bad input."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trt_disagg import cli
from trt_disagg.config import load_deployment

REPO = Path(__file__).resolve().parents[3]
SMALL = ["--num-requests", "100", "--gpus-per-node", "2"]


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys, monkeypatch):
    """The real entry point (`trt_disagg.cli.main`) in this process: exit code, stdout, stderr."""

    def invoke(*args: str) -> Proc:
        monkeypatch.setattr(sys, "argv", ["trt-disagg", *args])
        monkeypatch.setenv("COLUMNS", "200")
        code = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Proc(code, captured.out, captured.err)

    return invoke


def test_plan_prints_json_and_writes_a_loadable_deployment(run, tmp_path: Path):
    out = tmp_path / "planned.yaml"
    proc = run("plan", "--model", "opt-13b", "--ttft", "0.25", "--tpot", "0.1", *SMALL, "--json", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["best_disaggregated"]["goodput_rps"] > 0
    # Every ratio names its baseline: both policies, on the same engine and on the published vLLM fits.
    named = {(b["policy"], b["engine"]) for b in summary["baselines"]}
    assert named == {(p, e) for p in ("prefill-first", "chunked") for e in ("same", "vllm")}
    top = summary["headline"]
    assert top["engine"] == "vllm" and "prefill-first" in top["baseline"]  # the paper's baseline by default
    base = next(b for b in summary["baselines"] if (b["policy"], b["engine"]) == ("prefill-first", "vllm"))
    assert top["unit_ratio"] == pytest.approx(summary["best_disaggregated"]["per_cost_goodput_rps"]
                                              / base["unit"]["per_cost_goodput_rps"], rel=1e-2)
    # Goodput per GPU of the whole cluster, idle GPUs counted; the idle ones are explained.
    dep_row = summary["deployment"]
    assert dep_row["cluster_gpus"] == 2 and summary["goodput_per_gpu_rps"] == pytest.approx(
        dep_row["goodput_rps"] / 2, rel=1e-2)
    assert (dep_row["idle_gpus"] == 0) == (dep_row["idle_reason"] is None)
    assert summary["workload"]["token_counts"].startswith("estimate")  # OPT's tokenizer is not available offline
    dep = load_deployment(out)
    assert dep.context_servers is not None and dep.context_servers.backend == "tensorrtllm"
    assert json.loads(out.with_suffix(".plan.json").read_text())["deployment"] == dep_row


def test_plan_reads_a_lengths_file_and_reports_what_the_limits_dropped(run, tmp_path: Path):
    lengths = tmp_path / "trace.csv"
    lengths.write_text("input_len,output_len,arrival_s\n" + "".join(
        f"{100 + 10 * i},{20 + i},{0.5 * i}\n" for i in range(30)) + "3000,10,15.5\n")
    proc = run("plan", "--model", "opt-13b", "--ttft", "0.5", "--tpot", "0.1", "--gpus-per-node", "2",
               "--lengths-file", str(lengths), "--max-pp", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    w = summary["workload"]
    assert w["num_requests"] == 30 and w["dropped"] == {"prompt + output over the context": 1}
    assert w["token_counts"].startswith("given")
    assert all("PP1" in c["placement"] and "PP2" not in c["placement"] for c in summary["disaggregated_candidates"])


def test_simulate_rates_and_slo_scale(run, tmp_path: Path):
    proc = run("simulate", "--model", "opt-13b", "--ttft", "0.25", "--tpot", "0.1", "--prefill", "1x1", "--decode",
               "1x1", "--rates", "1,4,16", "--num-requests", "200", "--json", "--plot", str(tmp_path / "a.png"))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [r["attainment"] for r in rows] == sorted((r["attainment"] for r in rows), reverse=True)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    proc = run("simulate", "--model", "opt-13b", "--ttft", "0.25", "--tpot", "0.1", "--colocated", "1x1",
               "--slo-scale-rate", "2", "--num-requests", "200", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)["rows"][0]
    assert 0 < row["slo_scale"] < 10


def test_simulate_takes_instances_from_a_deployment_yaml(run):
    proc = run("simulate", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--deployment",
               str(REPO / "configs/llama3-70b-8xh100.yaml"), "--ttft", "1.0", "--tpot", "0.05", "--rates", "0.5,8",
               "--num-requests", "100", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "h100-sxm TP4xPP1" in out["placement"] and "h100-sxm TP2xPP2" in out["placement"]
    assert out["rows"][0]["attainment"] >= out["rows"][1]["attainment"]


@pytest.fixture
def cpu_profile(tmp_path: Path) -> Path:
    """A profile-style JSON for the CPU engine at TP1 and TP2 (as `trt-disagg profile` writes)."""
    from trt_disagg.planner.latency_model import Coefficients, LatencyModel, PhaseCoefficients

    def phase(scale: float) -> PhaseCoefficients:
        d = Coefficients(0.033 * scale, 2e-5 * scale, 0.011 * scale)
        return PhaseCoefficients(Coefficients(0.067 * scale, 1.3e-3 * scale, 1e-7), d, d)

    lm = LatencyModel("engine:smollm2", "cpu", "profile:test", {1: phase(1.0), 2: phase(0.6)})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"latency_model": json.loads(lm.to_json())}))
    return path


def test_simulate_the_cpu_deployment_with_profiled_coefficients(run, cpu_profile: Path):
    proc = run("simulate", "--model", "smollm2-135m", "--gpu", "cpu", "--coefficients", str(cpu_profile),
               "--deployment", str(REPO / "configs/smollm2.yaml"), "--ttft", "2", "--tpot", "0.15",
               "--rates", "0.2,5", "--workload", "fixed", "--input-len", "128", "--output-len", "32",
               "--num-requests", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert rows[0]["attainment"] > rows[1]["attainment"]


def test_plan_for_the_cpu_engine_writes_a_python_backend_deployment(run, cpu_profile: Path, tmp_path: Path):
    out = tmp_path / "cpu.yaml"
    proc = run("plan", "--model", "smollm2-135m", "--gpu", "cpu", "--gpus-per-node", "2", "--coefficients",
               str(cpu_profile), "--ttft", "2", "--tpot", "0.15", "--workload", "fixed", "--input-len", "128",
               "--output-len", "32", "--num-requests", "50", "--max-input-len", "1024", "--max-output-len", "256",
               "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    dep = load_deployment(out)
    assert dep.model.source == "gguf"
    assert dep.context_servers is not None and dep.context_servers.backend == "python"


@pytest.mark.parametrize("args, message", [
    (["plan", "--model", "gpt-9", "--ttft", "1", "--tpot", "1"], "--model: unknown model"),
    (["plan", "--model", "opt-13b", "--gpu", "tpu-v5", "--ttft", "1", "--tpot", "1"], "--gpu: unknown GPU"),
    (["plan", "--model", "opt-13b", "--ttft", "0", "--tpot", "1"], "--ttft must be > 0"),
    (["plan", "--model", "opt-13b", "--ttft", "1", "--tpot", "-1"], "--tpot must be > 0"),
    (["plan", "--model", "opt-175b", "--gpu", "a100-40g", "--gpus-per-node", "2", "--ttft", "1", "--tpot", "1",
      "--num-requests", "50"], "does not fit on this cluster"),
    (["simulate", "--model", "opt-13b", "--ttft", "1", "--tpot", "1", "--colocated", "1x1"], "--rates"),
    (["profile", "/nonexistent/engine"], "no config.json"),
    (["plan", "--model", "opt-13b", "--ttft", "1", "--tpot", "1", "--max-pp", "0"], "--max-pp must be >= 1"),
    (["plan", "--model", "opt-13b", "--ttft", "1", "--tpot", "1", "--long-prompts", "cut"], "--long-prompts"),
    (["plan", "--model", "opt-13b", "--ttft", "1", "--tpot", "1", "--workload", "longbench-synthetic",
      "--max-input-len", "1000"], "no request left after the filters"),
])
def test_bad_input_exits_2_with_a_message(run, args, message):
    proc = run(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in " ".join(proc.stderr.split())


@pytest.mark.parametrize("content, message", [
    ("input_len,output_len\n100,20\n-5,20\n", "row 2: input_len must be >= 1"),
    ("input_len,output_len\n100,20\n100,\n", "row 2: missing output_len"),
    ("prompt_len\n100\n", "row 1: missing output_len"),
    ("input_len,output_len,arrival_s\n100,20,1\n100,20,-1\n", "row 2: arrival_s must be >= 0"),
])
def test_a_bad_lengths_file_exits_2_naming_row_and_field(run, tmp_path: Path, content, message):
    path = tmp_path / "lengths.csv"
    path.write_text(content)
    proc = run("plan", "--model", "opt-13b", "--ttft", "1", "--tpot", "1", "--lengths-file", str(path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in " ".join(proc.stderr.split())
