"""`trt-disagg profile` end to end on the real CPU engine (the tiny seeded model): measures, fits, reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trt_disagg.planner.latency_model import LatencyModel

REPO = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-c", "from trt_disagg.cli import main; main()"]


@pytest.mark.slow
def test_profile_the_tiny_engine(tmp_path: Path):
    engines = tmp_path / "engines"
    build = subprocess.run([*CLI, "build", str(REPO / "configs/tiny.yaml"), "--role", "colocated",
                            "--engines-dir", str(engines)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    engine_dir = engines / "tiny" / "colocated"
    out = tmp_path / "profile"
    proc = subprocess.run([*CLI, "profile", str(engine_dir), "-o", str(out), "--batch-sizes", "1,2,4",
                           "--lengths", "16,64,128", "--repeats", "2", "--decode-steps", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "profile.json").read_text())
    assert set(result["fit"]) == {"prefill", "decode_small", "decode_large"}
    for report in result["fit"].values():
        assert report["num_samples"] >= 3 and report["max_rel_error"] >= report["mean_rel_error"] >= 0
    lm = LatencyModel.from_json(out / "profile.json")
    coeffs = lm.for_tp(1)
    assert coeffs.prefill_s(64, 64 * 64) > 0 and coeffs.decode_step_s(4, 4 * 64) > 0
    assert (out / "profile.csv").read_text().startswith("phase,batch,")
