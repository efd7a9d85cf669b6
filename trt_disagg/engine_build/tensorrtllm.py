"""The `tensorrtllm` backend's build: render (and, when installed, run) TensorRT-LLM's two steps.

    python3 <examples>/llama/convert_checkpoint.py --model_dir HF --output_dir CKPT --dtype D \
        --tp_size N --pp_size M [--fp8_kv_cache]
    trtllm-build --checkpoint_dir CKPT --output_dir ENGINE --gemm_plugin auto --gpt_attention_plugin auto \
        --kv_cache_type paged --use_paged_context_fmha enable --remove_input_padding enable \
        --tokens_per_block T --max_batch_size B --max_input_len I --max_seq_len S --max_num_tokens K \
        [--use_fp8_context_fmha enable]

Flag names are TensorRT-LLM's own, read from its sources: `tensorrt_llm/commands/build.py`
(`--kv_cache_type paged`; `--paged_kv_cache` is marked "Deprecated. Enabling this option is equivalent to
`--kv_cache_type paged`", so we emit only the new spelling), `tensorrt_llm/plugin/plugin.py` (plugin flags
take `auto`/dtype/`disable`, feature flags `enable`/`disable`; `tokens_per_block`, `use_paged_context_fmha`,
`use_fp8_context_fmha`) and `examples/llama/convert_checkpoint.py` (`--int8_kv_cache`, `--fp8_kv_cache`,
which set the checkpoint's `kv_cache_quant_algo`). Paged context FMHA is what disaggregated serving and KV
reuse need. TensorRT-LLM keeps KV in the model dtype unless the checkpoint quantizes it, so a KV dtype other
than fp8 or the model dtype only gets a warning.

Nothing here imports tensorrt_llm: availability is probed with `find_spec` and `shutil.which`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trt_disagg.config import ModelSource, ServerGroup
from trt_disagg.errors import UserError

log = logging.getLogger(__name__)

ENV_EXAMPLES_DIR = "TRTLLM_EXAMPLES_DIR"
DEFAULT_EXAMPLES_DIR = "/app/tensorrt_llm/examples"  # where Triton's TensorRT-LLM containers keep them
# Older releases keep the llama example at examples/llama, newer ones at examples/models/core/llama.
CONVERT_SCRIPT_CANDIDATES = ("llama/convert_checkpoint.py", "models/core/llama/convert_checkpoint.py")
TRTLLM_BUILD = "trtllm-build"
PYTHON = "python3"
BUILD_INFO_FILE = "trt_disagg_build.json"  # ours; trtllm-build owns config.json in the same dir


class BuildFailed(RuntimeError):
    """A TensorRT-LLM step exited non-zero (not a user error: its own output says why)."""


@dataclass(frozen=True)
class TrtllmCommands:
    """The two argv lists of one role's build, in order."""

    convert: tuple[str, ...]
    build: tuple[str, ...]

    def all(self) -> list[tuple[str, ...]]:
        return [self.convert, self.build]

    def to_shell(self) -> str:
        return "\n".join(shell_line(cmd) for cmd in self.all())


def shell_line(cmd: tuple[str, ...]) -> str:
    """One command as a copy-pasteable shell line, `--flag value` pairs on continuation lines."""
    parts: list[str] = []
    for arg in cmd:
        if arg.startswith("--") and parts:
            parts.append("\\\n    " + shlex.quote(arg))
        else:
            parts.append(shlex.quote(arg))
    return " ".join(parts)


def examples_dir() -> Path:
    return Path(os.environ.get(ENV_EXAMPLES_DIR, DEFAULT_EXAMPLES_DIR))


def convert_script() -> Path:
    """The llama example's convert_checkpoint.py: the first candidate that exists, else the first one."""
    base = examples_dir()
    for rel in CONVERT_SCRIPT_CANDIDATES:
        if (base / rel).is_file():
            return base / rel
    return base / CONVERT_SCRIPT_CANDIDATES[0]


def model_dir_for(source: ModelSource) -> str:
    """The Hugging Face checkpoint convert_checkpoint.py reads."""
    if source.source == "hf" and source.path:
        return source.path
    if source.hf_model_name:
        return source.hf_model_name
    raise UserError(f"model.hf_model_name: the tensorrtllm backend converts a Hugging Face checkpoint; source "
                    f"{source.source!r} needs `hf_model_name` (or use source: hf with `path`)")


def validate_group(group: ServerGroup, where: str) -> None:
    tpb = group.kv_cache_config.tokens_per_block
    if tpb & (tpb - 1):
        raise UserError(f"{where}.kv_cache_config.tokens_per_block: TensorRT-LLM needs a power of 2, got {tpb}")


def render_commands(source: ModelSource, group: ServerGroup, *, model_dir: str, checkpoint_dir: Path | str,
                    engine_dir: Path | str) -> TrtllmCommands:
    kv_dtype = group.kv_cache_config.dtype
    convert = [PYTHON, str(convert_script()), "--model_dir", model_dir, "--output_dir", str(checkpoint_dir),
               "--dtype", source.dtype, "--tp_size", str(group.tp), "--pp_size", str(group.pp)]
    build = [TRTLLM_BUILD, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
             "--gemm_plugin", "auto", "--gpt_attention_plugin", "auto",
             "--kv_cache_type", "paged", "--use_paged_context_fmha", "enable",
             "--remove_input_padding", "enable",
             "--tokens_per_block", str(group.kv_cache_config.tokens_per_block),
             "--max_batch_size", str(group.max_batch_size), "--max_input_len", str(group.max_input_len),
             "--max_seq_len", str(group.max_seq_len), "--max_num_tokens", str(group.max_num_tokens)]
    if kv_dtype == "fp8":
        # convert_checkpoint's --fp8_kv_cache marks the checkpoint's KV as FP8; calibrated KV scales come from
        # examples/quantization/quantize.py --kv_cache_dtype fp8 (TensorRT-LLM's llama README), not rendered.
        convert.append("--fp8_kv_cache")
        build += ["--use_fp8_context_fmha", "enable"]
    elif kv_dtype != source.dtype:
        log.warning("kv_cache_config.dtype %s: TensorRT-LLM stores KV in the model dtype (%s) unless quantized",
                    kv_dtype, source.dtype)
    return TrtllmCommands(convert=tuple(convert), build=tuple(build))


def missing_tools() -> str | None:
    """Why the commands cannot run here, or None when TensorRT-LLM and its example script are installed."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not importable (install the tensorrtllm extra of trt-disagg)"
    if shutil.which(TRTLLM_BUILD) is None:
        return f"{TRTLLM_BUILD} is not on PATH"
    script = convert_script()
    if not script.is_file():
        return f"{script} not found (set {ENV_EXAMPLES_DIR} to TensorRT-LLM's examples dir)"
    return None


def run_commands(cmds: TrtllmCommands, on_step: Callable[[str], None] | None = None) -> None:
    """Run convert then build; `python3` is this interpreter, the one tensorrt_llm was found in."""
    step = on_step or (lambda _desc: None)
    for name, cmd in (("convert_checkpoint", cmds.convert), ("trtllm-build", cmds.build)):
        argv = [sys.executable, *cmd[1:]] if cmd[0] == PYTHON else list(cmd)
        log.info("running %s", shell_line(tuple(argv)).replace("\\\n    ", ""))
        rc = subprocess.run(argv, check=False).returncode
        if rc != 0:
            raise BuildFailed(f"{name} exited with code {rc}: {shlex.join(argv)}")
        step(name)


def existing_digest(engine_dir: Path, world_size: int) -> str | None:
    """The inputs digest of a complete TensorRT-LLM engine dir we built, or None."""
    info = engine_dir / BUILD_INFO_FILE
    if not info.is_file() or not (engine_dir / "config.json").is_file():
        return None
    if not all((engine_dir / f"rank{r}.engine").is_file() for r in range(world_size)):
        return None
    try:
        return str(json.loads(info.read_text())["inputs_digest"])
    except (ValueError, KeyError):
        return None


def write_build_info(engine_dir: Path, *, inputs_digest: str, role: str, tp: int, pp: int,
                     cmds: TrtllmCommands) -> None:
    info = {"inputs_digest": inputs_digest, "role": role, "tp": tp, "pp": pp,
            "commands": [list(c) for c in cmds.all()]}
    (engine_dir / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2))
