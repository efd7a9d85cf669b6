"""benchmarks/gpu_profile.py: its dry run (the same code as the GPU run, on the CPU with the tiny shape)
runs here with only torch and the standard library importable, prints measured next to roofline step
times, and writes its JSON; bad arguments are exit 2 naming the flag."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "gpu_profile.py"
# What a GPU machine with nothing but torch lacks: importing any of them fails in the dry run below.
NOT_ON_A_BARE_GPU_MACHINE = ("numpy", "pydantic", "yaml", "safetensors", "transformers", "rich", "typer")

_BLOCKED_RUN = """
import importlib.abc, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"not on a bare GPU machine: {name}")
        return None
sys.meta_path.insert(0, Block())
script = sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture
def gpu_profile(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (registered while the test runs: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("gpu_profile", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_profile", module)
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_needs_only_torch_and_writes_measured_next_to_roofline(tmp_path) -> None:
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, ",".join(NOT_ON_A_BARE_GPU_MACHINE), str(SCRIPT), "--dry-run",
         "--batches", "1,2", "--lengths", "8,24", "--repeats", "1", "--warmup", "0", "--check-tokens", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "roofline ms" in done.stdout and "ratio" in done.stdout
    result = json.loads(out.read_text())
    assert (result["device"], result["dtype"], result["roofline_gpu"]) == ("cpu", "float32", "cpu")
    check = result["token_check"]
    assert check["identical"] and check["max_logit_diff"] == 0.0 and len(check["cpu_tokens"]) == 4
    rows = result["rows"]
    assert {(r["phase"], r["batch"], r["prompt_len"]) for r in rows} == {
        (phase, b, n) for phase in ("prefill", "decode") for b in (1, 2) for n in (8, 24)}
    for r in rows:
        assert 0 < r["forward_s"] <= r["step_s"] and r["roofline_s"] > 0
        assert r["ratio"] == pytest.approx(r["step_s"] / r["roofline_s"])
        expected_tokens = r["batch"] * r["prompt_len"] if r["phase"] == "prefill" else r["batch"]
        assert r["num_tokens"] == expected_tokens
    decode = [r for r in rows if r["phase"] == "decode"]
    assert all(r["sum_context"] > r["batch"] * r["prompt_len"] for r in decode)  # prompt + generated tokens


def test_bad_arguments_are_exit_2_naming_the_flag(gpu_profile, capsys) -> None:
    assert gpu_profile.main(["--dry-run", "--batches", "1,x"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert gpu_profile.main(["--model", "opt-13b", "--device", "cpu"]) == 2  # not Llama-shaped
    assert "--model" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert gpu_profile.main(["--device", "cuda", "--batches", "1", "--lengths", "8"]) == 2
        err = capsys.readouterr().err
        assert "--device" in err and "CUDA" in err
